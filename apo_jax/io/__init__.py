"""Storage: run-dir file I/O for local disks and gs:// (`fileio`), the run-dir lock and config
fingerprint (`rundir`), Orbax train-state and model checkpoints (`checkpointing`), and Hugging
Face checkpoints in and out (`hf`, also importable as `apo_jax.hf`)."""
