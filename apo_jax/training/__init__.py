"""Training: the losses (`losses`), the learning rules (`objectives/`), the one jitted, sharded
train step (`train.make_train_step`) and a phase's train loop with its hooks (`fit`)."""
