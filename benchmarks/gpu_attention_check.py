"""GPU check: cuDNN attention (jax.nn.dot_product_attention) gives the XLA path's logits.

    python benchmarks/gpu_attention_check.py

Prints the max |difference| of float32 logits for left- and right-padded batches, GQA, bf16.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from apo_jax import models


def main() -> None:
    print("devices:", jax.devices())
    for dtype in ("bfloat16",):
        cfg = models.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                 num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                                 param_dtype="float32", dtype=dtype)
        params = models.init_params(cfg, jax.random.PRNGKey(0))
        rng = np.random.RandomState(0)
        ids = rng.randint(3, 512, (4, 128)).astype(np.int32)
        for side in ("right", "left"):
            mask = np.ones_like(ids)
            for i, n in enumerate([128, 100, 64, 17]):
                if side == "right":
                    mask[i, n:] = 0
                else:
                    mask[i, : 128 - n] = 0
            ref = jax.jit(models.lm_logits, static_argnums=0)(cfg, params, ids, mask)
            out = jax.jit(models.lm_logits, static_argnums=0)(cfg.replace(attention_impl="cudnn"), params, ids, mask)
            real = mask.astype(bool)
            diff = np.abs(np.asarray(out) - np.asarray(ref))[real].max()
            print(f"cudnn vs xla, {dtype}, {side}-padded: max |logit diff| = {diff:.4f} "
                  f"(logit scale {np.abs(np.asarray(ref))[real].max():.2f})")


if __name__ == "__main__":
    main()
