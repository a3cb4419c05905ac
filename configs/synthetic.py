"""The embedded demo: the APO game on the synthetic preference world (v2), on two CPU cores.

    python -m apo_jax.main --config=configs/synthetic.py

A tiny character-level LLaMA is pretrained on mixed-quality demonstrations (the world's analogue of
the paper's Alpaca policy), then 2 rounds of APO run with all four RM schedules. The world's true
reward r* is known, so the tables also report each policy's true quality and each RM's accuracy
against the true order. Same code path as configs/hh.py; only the numbers differ.

The world (apo_jax/data/synthetic.py) has a spurious marker " :)" that human-preferred responses
carry far more often than bad ones (90% of correct, 5% of corrupted, no junk responses) and that
r* charges 0.3 for: a fixed RM learns to like it, and best-of-S against that RM (RJS) teaches the
policy to add it. Content is kept learnable at this size (the easy tasks echo and upper, 1,200
pretraining steps, 3 SFT epochs per round), and policies are evaluated at the training
temperature (0.7), where SFT on best-of-S samples is measured like for like.
"""

from apo_jax.config import base_config
from apo_jax.data import synthetic


def get_config():
    c = base_config()
    c.run_dir = "runs/synthetic"
    c.seed = 0
    c.mesh.fsdp = -1

    c.data.kind = "synthetic"
    c.data.synthetic = synthetic.default_config()
    c.data.synthetic.n_train_prompts = 1600
    c.data.synthetic.n_test_prompts = 200
    c.data.synthetic.n_demos = 6400  # x 12 epochs / batch 64 = 1,200 pretraining steps
    c.data.synthetic.tasks = ("echo", "upper")  # easy tasks: the 0.1M-parameter policy can partly learn them
    # 0.3 per marker (the world's default is 0.15): SFT on best-of-4 raises a tiny policy's content
    # reward by ~0.1 in two rounds, and at 0.15 a marker rate going from 0.3 to 0.9 only cancels that
    # (measured: RJS r* 0.57 -> 0.59 while its marker rate rose to 0.94); at 0.3 the hack shows in r*.
    c.data.synthetic.marker_cost = 0.3
    c.data.n_rm = 500  # HH_RM analogue: queries with human pairs and golden answers
    c.data.n_dev = 200  # HH_Dev: pairs from the policy split, for RM validation
    c.data.n_llm = 512  # HH_LLM: policy training queries (best-of-S + SFT each round)
    c.data.n_test = 0  # all test pairs
    # Prompts are <= 69 characters, responses <= 24 (markers included): [BOS] prompt " " response [EOS] < 100 tokens.
    c.data.prompt_max_len = 80
    c.data.rm_max_len = 112
    c.data.sft_max_len = 112
    c.data.buckets = (64, 80, 112)

    c.policy.arch.hidden_size = 64
    c.policy.arch.intermediate_size = 176
    c.policy.arch.num_hidden_layers = 2
    c.policy.arch.num_attention_heads = 4
    c.policy.arch.num_key_value_heads = 2
    c.policy.arch.max_position_embeddings = 256
    c.policy.pretrain.lr = 3e-3
    c.policy.pretrain.batch_size = 64
    c.policy.pretrain.epochs = 12
    c.policy.pretrain.warmup_steps = 20
    c.policy.pretrain.schedule = "cosine"

    # Tiny models need far larger steps than the paper's 7B ones; the ratios follow the paper
    # (APO RMs are fine-tuned from RM_Base with a much smaller rate than RM_Base's).
    for opt in (c.rm.base, c.rm.test):
        opt.lr = 1e-3
        opt.batch_size = 32
        opt.warmup_steps = 10
    c.rm.base.epochs = 2
    c.rm.test.epochs = 1
    c.rm.apo.lr = 2e-4
    c.rm.apo.batch_size = 32
    c.rm.apo.epochs = 1
    c.rm.apo.warmup_steps = 5
    c.rm.apo_weight = 0.1 / 4 * 10  # official form scaled up: few human pairs at this size
    c.rm.human_weight = 1.0

    c.sft.batch_size = 32
    c.sft.lrs = (5e-4, 3e-4)
    c.sft.epochs = 3
    c.sft.warmup_steps = 5

    # DPO arms (<arm>-dpo): the SFT phase's batch and epochs; a step ~5x smaller than SFT's
    # (sigmoid loss on a log-ratio difference), beta as in the DPO paper.
    c.dpo.batch_size = 32
    c.dpo.lrs = (1e-4, 1e-4)
    c.dpo.epochs = 3
    c.dpo.warmup_steps = 5
    c.dpo.beta = 0.1

    # The RM reads its reward at an appended EOS (the form the world was designed and piloted with).
    # At the answer's last character instead (the `last_token` default), seed 0 measured: RM_Base
    # picks fewer markers than the samples carry, RJS's marker rate falls 0.29 -> 0.05 and nothing
    # is hacked; with "eos", RJS's marker rate rose 0.31 -> 0.81 and its r* fell 0.544 -> 0.486.
    c.data.reward_position = "eos"

    c.apo.rounds = 2
    c.apo.num_samples = 4
    c.apo.schedules = ("rjs", "apo", "apo_seq", "ablation")

    c.sampling.train.temperature = 0.7  # the paper's 1.2 is for a 7B policy; a tiny one rambles
    c.sampling.train.top_p = 1.0
    c.sampling.train.top_k = 0
    c.sampling.train.max_new_tokens = 28
    # Evaluated at the training temperature: the policy is fine-tuned on T=0.7 samples, and at the
    # paper's T=0.3 a tiny policy's r* changes with the temperature more than with training.
    c.sampling.test.temperature = 0.7
    c.sampling.test.top_p = 1.0
    c.sampling.test.top_k = 0
    c.sampling.test.max_new_tokens = 28
    c.sampling.batch_size = 128

    c.eval.batch_size = 128
    c.checkpoint.save_every_steps = 50
    c.log_every_steps = 25
    return c
