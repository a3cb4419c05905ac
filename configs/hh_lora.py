"""The paper's game (configs/hh.py: LLaMA-7B reward models, an Alpaca-7B policy, HH-RLHF, 3 rounds,
S = 4) with LoRA on both sides, for one 80 GB GPU (A100 / H100).

    python -m apo_jax.main --config=configs/hh_lora.py \
        --config.policy.checkpoint=/path/to/alpaca-7b --config.rm.init_checkpoint=/path/to/llama-7b \
        --config.data.hh_train=/path/to/hh-rlhf --config.data.hh_test=/path/to/hh-rlhf

What changes from configs/hh.py, and why (docs/lora.md has the memory arithmetic):
- policy.lora / rm.lora: rank-16 adapters (alpha 32) on every projection of every layer; the frozen
  bases are bfloat16 (13.5 GB each: the policy's Alpaca and the RMs' LLaMA), adapters, the reward
  head and their Adam moments float32 (40M trainable parameters per model, 0.6 GB with Adam).
  Full fine-tuning of one 7B model alone is ~16 bytes a parameter (108 GB) before activations.
- Every RM after RM_Base and every policy round trains its starting model's adapters further on
  the same frozen base, so the run holds two bases, not one per model.
- Micro-batches through grad_accum (the global batches and so the optimisation are the paper's):
  RM steps 4 pairs x 512 tokens, SFT steps 4 x 1024, with the "dots_no_batch" remat policy.
- Learning rates: LoRA takes ~10x the full-fine-tuning rate (the LoRA paper, and PEFT's and TRL's
  LLaMA-7B recipes, use 1e-4 to 3e-4); the RM / APO-RM / policy ratios are the paper's.
"""

import importlib.util
import os


def _hh():
    spec = importlib.util.spec_from_file_location("hh_config", os.path.join(os.path.dirname(__file__), "hh.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config():
    c = _hh()
    c.run_dir = "runs/hh_lora"
    c.mesh.fsdp = -1  # one device: fsdp = 1; more devices shard the bases too
    for m in (c.policy, c.rm):
        m.param_dtype = "bfloat16"  # the frozen base; adapters and the head stay float32
        m.dtype = "bfloat16"
        m.remat_policy = "dots_no_batch"
        m.lora.rank = 16
        m.lora.alpha = 32.0
        m.lora.targets = "all-linear"
    c.rm.base.lr = 1e-5
    c.rm.test.lr = 1e-5
    c.rm.apo.lr = 1e-7
    for opt in (c.rm.base, c.rm.test, c.rm.apo):
        opt.grad_accum = 16  # 64 pairs = 16 micro-batches of 4
    c.sft.lrs = (5e-5, 2e-5, 9e-6)
    c.sft.grad_accum = 32  # 128 = 32 x 4
    c.dpo.lrs = (5e-6, 5e-6, 5e-6)
    c.dpo.grad_accum = 32
    c.sampling.batch_size = 32
    c.eval.batch_size = 32
    return c
