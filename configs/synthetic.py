"""The embedded demo: the APO game on the synthetic preference world, on two CPU cores.

    python -m apo_jax.main --config=configs/synthetic.py

A tiny character-level LLaMA is pretrained on mixed-quality demonstrations (the world's analogue of
the paper's Alpaca policy), then 2 rounds of APO run with all four RM schedules. The world's true
reward r* is known, so the tables also report each policy's true quality and each RM's accuracy
against the true order. Same code path as configs/hh.py; only the numbers differ.
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
    c.data.synthetic.n_demos = 3200
    c.data.n_rm = 500  # HH_RM analogue: queries with human pairs and golden answers
    c.data.n_dev = 200  # HH_Dev: pairs from the policy split, for RM validation
    c.data.n_llm = 512  # HH_LLM: policy training queries (best-of-S + SFT each round)
    c.data.n_test = 0  # all test pairs
    # Prompts are <= 69 characters, responses <= 24: [BOS] prompt " " response [EOS] < 100 tokens.
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
    c.policy.pretrain.epochs = 6
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
    c.sft.epochs = 1
    c.sft.warmup_steps = 5

    c.apo.rounds = 2
    c.apo.num_samples = 4
    c.apo.schedules = ("rjs", "apo", "apo_seq", "ablation")

    c.sampling.train.temperature = 0.7  # the paper's 1.2 is for a 7B policy; a tiny one rambles
    c.sampling.train.top_p = 1.0
    c.sampling.train.top_k = 0
    c.sampling.train.max_new_tokens = 28
    c.sampling.test.temperature = 0.3
    c.sampling.test.top_p = 0.85
    c.sampling.test.top_k = 5
    c.sampling.test.max_new_tokens = 28
    c.sampling.batch_size = 128

    c.eval.batch_size = 128
    c.checkpoint.save_every_steps = 50
    c.log_every_steps = 25
    return c
