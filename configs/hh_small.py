"""A small real setup: SmolLM2-135M-Instruct as policy and RM init, on HH-RLHF, for one GPU.

    python -m apo_jax.main --config=configs/hh_small.py
    # offline / local copies:
    python -m apo_jax.main --config=configs/hh_small.py \
        --config.policy.checkpoint=/path/to/smollm2-135m-instruct \
        --config.rm.init_checkpoint=/path/to/smollm2-135m-instruct \
        --config.data.hh_train=/path/to/hh-rlhf --config.data.hh_test=/path/to/hh-rlhf

SmolLM2-135M-Instruct is a LLaMA-architecture model (30 layers, d 576, 9 query / 3 KV heads, vocab
49152, tied embeddings, rope_theta 1e5, pad id = EOS id = 2). Sized for one GPU (an H100 or a
24 GB card) in well under an hour: 5K RM queries, 5K policy queries, 3 rounds, S = 4. (An estimate
from step costs, not yet timed on a GPU: the largest phases are RM_Test's one epoch over all HH
train pairs, about 2.7K steps of 32 pairs, and each sampling phase's 5K prompts x 4 x 128 tokens.)

Which values are the paper's (LLaMA-7B, Section 4.1 and the official code) and which were chosen
for a 135M model, and why:
- Paper: the game (3 rounds, S = 4, the four RM schedules), the APO loss weights (0.1/S per APO
  pair, 1 per human pair), 1 epoch per RM/SFT phase, AdamW, warmup, the test-generation filters
  (temperature 0.3, top-k 5, top-p 0.85), the "\\nHuman" stop string.
- Chosen for 135M:
  * data.prompt_format = "chat_template": an Instruct model answers its own chat format; with the
    paper's raw "Human:/Assistant:" text it continues the transcript and writes both sides.
  * learning rates 1e-5 (RM_Base, RM_Test), 1e-6 (APO RMs), 1e-5 / 5e-6 / 2e-6 (policy rounds):
    the paper's 1e-6 / 1e-8 / 5e-6..9e-7 were set for 7B models; on 135M they leave the RM at
    accuracy 0.5 with scores ~1e-4 after an epoch of 20K pairs (measured, issue #17). Small models
    take 10x larger steps (TRL's reward-modelling examples use 1e-5 to 5e-5 at this size); the
    APO / RM_Base ratio stays well below 1 so an APO RM is a fine-tune of RM_Base, as in the paper.
  * rm.reward_head_std = 0.02: a small random head (the `transformers` initializer_range, what a
    TRL reward model starts from) instead of the paper's zero head, so the first steps see distinct
    rewards and a non-zero gradient to the trunk.
  * training samples at temperature 0.7, top-p 0.9 (paper: 1.2, top-p 1.0): at 1.2 a 135M model
    writes word salad, and best-of-S over word salad teaches the policy nothing.
  * 128 new tokens for training samples and 192 for test answers (paper 256 / 512): HH answers of
    this model rarely run longer, and EOS ends a row early.
  * lengths 512 (RM, SFT) and 384 (prompts), batches 32 (RM) and 32 (SFT) (paper 512 / 1024,
    64 / 128): HH dialogues fit in 512 tokens; smaller batches give more steps on 5K examples.

CPU smoke test (minutes on two cores, on the HH test split alone carved into train and test):
see docs/small_real_model.md ("CPU smoke test").
"""

from apo_jax.config import base_config

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def get_config():
    c = base_config()
    c.run_dir = "runs/hh_small"
    c.compilation_cache_dir = "~/.cache/apo_jax/xla"
    c.mesh.fsdp = -1

    c.data.kind = "hh"
    c.data.hh_train = "Anthropic/hh-rlhf"
    c.data.hh_test = "Anthropic/hh-rlhf"
    c.data.gold = ""  # no GPT-4 answers: golden responses fall back to HH chosen (as the paper does for 1.7K)
    c.data.tokenizer = ""  # the policy checkpoint's tokenizer (and its chat template)
    c.data.prompt_format = "chat_template"
    c.data.n_rm = 5_000
    c.data.n_dev = 1_000
    c.data.n_llm = 5_000
    c.data.n_test = 1_000
    c.data.rm_max_len = 512
    c.data.sft_max_len = 512
    c.data.prompt_max_len = 384
    c.data.buckets = (128, 256, 384, 512)

    c.policy.checkpoint = MODEL
    c.policy.param_dtype = "float32"
    c.policy.dtype = "bfloat16"
    c.policy.attention_impl = "auto"  # cuDNN causal flash attention on NVIDIA GPUs, XLA elsewhere
    c.rm.attention_impl = "auto"

    c.rm.init_checkpoint = MODEL
    c.rm.reward_head_std = 0.02
    c.rm.dtype = "bfloat16"
    c.rm.base.lr = 1e-5
    c.rm.test.lr = 1e-5
    c.rm.apo.lr = 1e-6
    for opt in (c.rm.base, c.rm.test, c.rm.apo):
        opt.batch_size = 32
        opt.epochs = 1
        opt.warmup_steps = 20
    c.rm.apo_weight = 0.1 / 4  # the official code's form of eq. 15 (0.1/S per APO pair, 1 per human pair)
    c.rm.human_weight = 1.0

    c.sft.lrs = (1e-5, 5e-6, 2e-6)
    c.sft.batch_size = 32
    c.sft.epochs = 1
    c.sft.warmup_steps = 10

    c.apo.rounds = 3
    c.apo.num_samples = 4
    c.apo.schedules = ("rjs", "apo", "apo_seq", "ablation")

    c.sampling.train.temperature = 0.7
    c.sampling.train.top_p = 0.9
    c.sampling.train.top_k = 0
    c.sampling.train.max_new_tokens = 128
    c.sampling.test.temperature = 0.3
    c.sampling.test.top_p = 0.85
    c.sampling.test.top_k = 5
    c.sampling.test.max_new_tokens = 192
    c.sampling.batch_size = 64
    c.eval.batch_size = 64
    return c
