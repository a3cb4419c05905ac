"""GPU check: the cuDNN attention path computes what the XLA path computes, and takes the causal
flash form (no dense mask) where it can.

    python benchmarks/gpu_attention_check.py [--out FILE.json]

On a GPU, for a GQA model in bfloat16 compute:
- right-padded batches without a cache (training, scoring): logits and the gradient of a reward
  loss, cuDNN vs XLA; the compiled program's cuDNN calls and their `mask_type` (expected
  PADDING_CAUSAL, no bias operand);
- a left-padded prefill into the KV cache (sampling; the XLA path under either setting): equal;
- a left-padded batch without a cache on the cuDNN path: must come out NaN (`causal_length_attention`).
"""

from __future__ import annotations

import argparse
import json
import re

import jax
import jax.numpy as jnp
import numpy as np

from apo_jax import models


def _batch(side: str, b: int = 4, t: int = 128, vocab: int = 512):
    rng = np.random.RandomState(0)
    ids = rng.randint(3, vocab, (b, t)).astype(np.int32)
    mask = np.zeros_like(ids)
    for i, n in enumerate([t, 100, 64, 17][:b]):
        if side == "right":
            mask[i, :n] = 1
        else:
            mask[i, t - n:] = 1
    return ids, mask


def _rel(a, b, where=None) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if where is not None:
        a, b = a[where], b[where]
    return float(np.abs(a - b).max() / (np.abs(b).max() + 1e-12))


def cudnn_calls(hlo: str) -> list[dict[str, str]]:
    """The cuDNN fused-attention custom calls of a compiled program: target and mask type."""
    out = []
    for line in hlo.splitlines():
        m = re.search(r'custom_call_target="(__cudnn\$fmha[^"]*)"', line)
        if m:
            mask = re.search(r'"mask_type"\s*:\s*"([A-Z_]+)"', line)
            out.append({"target": m.group(1), "mask_type": mask.group(1) if mask else "?"})
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out")
    p.add_argument("--portable", action="store_true",
                   help="CPU wiring check: the cuDNN calls run jax's portable implementation (no cuDNN calls in the HLO)")
    args = p.parse_args()
    if args.portable:
        original = jax.nn.dot_product_attention
        jax.nn.dot_product_attention = lambda *a, implementation=None, **k: original(*a, implementation=None, **k)
    report: dict = {"devices": [str(d) for d in jax.devices()], "jax": jax.__version__}
    print("devices:", jax.devices(), "jax", jax.__version__)
    xla = models.ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                             num_attention_heads=8, num_key_value_heads=2, head_dim=64, param_dtype="float32",
                             dtype="bfloat16", remat_policy="none")
    cudnn = xla.replace(attention_impl="cudnn")
    params = models.init_params(xla, jax.random.PRNGKey(0), reward_head=True, reward_head_std=0.02)

    ids, mask = _batch("right")
    real = mask.astype(bool)
    logits = {c.attention_impl: jax.jit(models.lm_logits, static_argnums=0)(c, params, ids, mask) for c in (xla, cudnn)}
    report["right_logits_rel_diff"] = _rel(logits["cudnn"], logits["xla"], real)

    def loss(cfg, p):
        r = models.rewards(cfg, p, ids, mask)
        return jnp.sum(r ** 2)

    grads = {c.attention_impl: jax.jit(jax.grad(loss, argnums=1), static_argnums=0)(c, params) for c in (xla, cudnn)}
    gdiff = jax.tree_util.tree_map(_rel, grads["cudnn"], grads["xla"])
    report["right_grad_rel_diff_max"] = float(max(jax.tree_util.tree_leaves(gdiff)))
    hlo = jax.jit(jax.grad(loss, argnums=1), static_argnums=0).lower(cudnn, params).compile().as_text()
    report["train_cudnn_calls"] = cudnn_calls(hlo)

    prompt, kv = _batch("left", t=64)
    kv_mask = np.concatenate([kv, np.zeros((4, 32), np.int32)], axis=1)
    positions = models.positions_from_mask(jnp.asarray(kv))
    hidden = {}
    for c in (xla, cudnn):
        cache = models.init_cache(c, 4, 96)
        fwd = jax.jit(models.cached_forward, static_argnums=0)
        hidden[c.attention_impl] = fwd(c, params, prompt, positions, kv_mask, cache, 0)[0]
    report["left_prefill_rel_diff"] = _rel(hidden["cudnn"], hidden["xla"], kv.astype(bool))

    left_ids, left_mask = _batch("left")
    bad = jax.jit(models.lm_logits, static_argnums=0)(cudnn, params, left_ids, left_mask)
    report["left_no_cache_rows_nan"] = [bool(np.isnan(np.asarray(bad[i], np.float32)).all()) for i in range(4)]

    for k, v in report.items():
        print(f"{k}: {v}")
    ok = (report["right_logits_rel_diff"] < 0.02 and report["right_grad_rel_diff_max"] < 0.05
          and report["left_prefill_rel_diff"] < 0.02 and report["left_no_cache_rows_nan"] == [False, True, True, True]
          and report["train_cudnn_calls"]
          and all(c["mask_type"] == "PADDING_CAUSAL" for c in report["train_cudnn_calls"]))
    report["ok"] = bool(ok)
    print("OK" if ok else "MISMATCH")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
