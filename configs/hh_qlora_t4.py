"""QLoRA on a 16 GB Colab T4: the paper's game (configs/hh_lora.py) with the frozen 7B bases stored
as NF4 (4-bit NormalFloat, a bfloat16 scale per 64 weights: ~3.6 GB per 7B base, `models.quant`)
and rank-16 adapters over them.

    python -m apo_jax.main --config=configs/hh_qlora_t4.py \
        --config.policy.checkpoint=/path/to/alpaca-7b --config.rm.init_checkpoint=/path/to/llama-7b \
        --config.data.hh_train=/path/to/hh-rlhf --config.data.hh_test=/path/to/hh-rlhf

Sized by arithmetic, not yet run on a T4 (docs/lora.md): two NF4 bases (policy and RM) ~7.2 GB,
their embeddings and LM head in float16 another ~0.8 GB, adapters + Adam ~0.6 GB per trained
model; the activations of a micro-batch of 2 x 512 tokens under full remat, and each layer's
kernel dequantized in turn, stay under a GB. The T4 (sm75) has no bfloat16: compute runs in float16
("auto" picks it on the device). Shorter lengths and smaller micro-batches than hh_lora.py; the
global batches, and so the game, are the paper's.
"""

import importlib.util
import os


def _hh_lora():
    spec = importlib.util.spec_from_file_location("hh_lora_config",
                                                  os.path.join(os.path.dirname(__file__), "hh_lora.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config():
    c = _hh_lora()
    c.run_dir = "runs/hh_qlora_t4"
    for m in (c.policy, c.rm):
        m.param_dtype = "bfloat16"
        m.dtype = "auto"
        m.remat_policy = "full"
        m.lora.quantization = "nf4"
    c.data.rm_max_len = 512
    c.data.sft_max_len = 512
    c.data.prompt_max_len = 384
    c.data.buckets = (128, 256, 512)
    for opt in (c.rm.base, c.rm.test, c.rm.apo):
        opt.grad_accum = 32  # 64 pairs = 32 micro-batches of 2
    c.sft.grad_accum = 64  # 128 = 64 x 2
    c.dpo.grad_accum = 64
    c.sampling.batch_size = 8
    c.sampling.train.max_new_tokens = 128
    c.sampling.test.max_new_tokens = 256
    c.eval.batch_size = 8
    return c
