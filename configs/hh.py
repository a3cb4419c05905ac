"""The paper's setup (Section 4.1): LLaMA-7B reward models, an Alpaca-7B policy, HH-RLHF, 3 rounds, S=4.

    python -m apo_jax.main --config=configs/hh.py \
        --config.policy.checkpoint=/path/to/alpaca-7b \
        --config.rm.init_checkpoint=/path/to/llama-7b \
        --config.data.hh_train=/path/to/hh-rlhf --config.data.hh_test=/path/to/hh-rlhf \
        --config.data.gold=/path/to/gold.jsonl

Hub ids work too where the machine has network access (`Anthropic/hh-rlhf`, a model repo id).
"""

from apo_jax.config import base_config


def get_config():
    c = base_config()
    c.run_dir = "runs/hh"
    c.compilation_cache_dir = "~/.cache/apo_jax/xla"  # a preempted run restarts without recompiling
    c.mesh.fsdp = -1  # ZeRO-3 over every device; add tensor=2..8 for 7B+ on small-memory chips

    c.data.kind = "hh"
    c.data.hh_train = "Anthropic/hh-rlhf"
    c.data.hh_test = "Anthropic/hh-rlhf"
    c.data.gold = ""  # JSONL of golden answers (GPT-4 in the paper); missing ones fall back to HH chosen
    c.data.tokenizer = ""  # default: the policy checkpoint's tokenizer
    c.data.n_rm = 20_000
    c.data.n_dev = 10_000
    c.data.n_llm = 0  # 0 = the rest of the train prompts (about 66K)
    c.data.n_test = 0  # 0 = all (about 4.7K)
    c.data.rm_max_len = 512
    c.data.sft_max_len = 1024
    c.data.prompt_max_len = 512
    c.data.buckets = (128, 256, 512, 1024)

    c.policy.checkpoint = "chavinlo/alpaca-native"  # Alpaca-7B (HF LLaMA format, safetensors)
    c.policy.param_dtype = "float32"
    c.policy.dtype = "bfloat16"
    c.policy.remat_policy = "dots_no_batch"
    # cuDNN's causal flash attention on NVIDIA GPUs (sm80+) for training and scoring, XLA on TPU / CPU.
    c.policy.attention_impl = "auto"
    c.rm.attention_impl = "auto"

    c.rm.init_checkpoint = "huggyllama/llama-7b"  # LLaMA-7B; RM_Base, RM_Test and APO RMs start here
    c.rm.base.lr = 1e-6
    c.rm.test.lr = 1e-6
    c.rm.apo.lr = 1e-8
    for opt in (c.rm.base, c.rm.test, c.rm.apo):
        opt.batch_size = 64
        opt.epochs = 1
        opt.warmup_steps = 100
    c.rm.apo_weight_per_query = 0.1  # the official code's form of eq. 15: 0.1/S per APO pair, 1 per human pair
    c.rm.human_weight = 1.0

    c.sft.lrs = (5e-6, 2e-6, 9e-7)
    c.sft.batch_size = 128
    c.sft.epochs = 1
    c.sft.warmup_steps = 20

    # DPO policy updates, for the `<arm>-dpo` schedules (e.g. --config.apo.schedules="('rjs-dpo','apo-dpo')").
    # Not in the paper, which runs APO with rejection-sampling SFT only. Starting values at 7B:
    # beta 0.1 (Rafailov et al. 2023, the DPO paper's default and TRL's); lr 5e-7 with batch 128,
    # 1 epoch per round and no label smoothing or SFT term, as in the online iterative DPO recipe
    # of RLHFlow (Dong et al. 2024, "RLHF Workflow"), which also pairs the RM's best and worst of
    # the policy's samples against the round's starting policy as reference.
    c.dpo.lrs = (5e-7, 5e-7, 5e-7)
    c.dpo.batch_size = 128
    c.dpo.epochs = 1
    c.dpo.warmup_steps = 20
    c.dpo.beta = 0.1
    c.dpo.label_smoothing = 0.0
    c.dpo.sft_weight = 0.0

    c.apo.rounds = 3
    c.apo.num_samples = 4
    c.apo.schedules = ("rjs", "apo", "apo_seq", "ablation")

    c.sampling.train.temperature = 1.2
    c.sampling.train.top_p = 1.0
    c.sampling.train.top_k = 0
    c.sampling.train.max_new_tokens = 256
    c.sampling.test.temperature = 0.3
    c.sampling.test.top_p = 0.85
    c.sampling.test.top_k = 5
    c.sampling.test.max_new_tokens = 512
    c.sampling.batch_size = 64
    return c
