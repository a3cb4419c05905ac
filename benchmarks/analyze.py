"""What a CPU can tell about the GPU benchmarks, from XLA's own analyses of the compiled programs.

    python benchmarks/analyze.py --out /tmp/analysis.json            # all sections, a few minutes
    python benchmarks/analyze.py --sections flops,decode              # the quick ones

Sections:
- flops: XLA's cost_analysis FLOPs of the RM step, the SFT step (remat none and full) and the
  scoring forward, compiled with the layer stack UNROLLED (cost_analysis counts a scan body once),
  against the analytical counts of `common` (causal attention) and with full (non-causal)
  attention, which is what the XLA attention path computes.
- residuals: what autodiff keeps from the forward for the backward (traced, not compiled, so it
  holds for the GPU too, cuDNN attention included), per token and layer, by remat policy.
- memory: XLA's buffer assignment (memory_analysis) of the RM and SFT steps of the 1B and 3B
  shapes at seq 1024 and 2048 and the GPU preset's batches, compiled on abstract shapes (nothing
  is allocated). CPU compiles use the XLA attention path (cuDNN does not exist here), which holds
  [B, H, T, T] float32 logits: an upper bound for the cuDNN path at long sequences.
- decode: how many times one decode step moves the KV cache, as the slope of XLA's "bytes
  accessed" against cache size (two cache sizes, unrolled layers), and how many bytes per
  weight it reads, from the intercept; both for float32 and bfloat16 stored weights.
- sweep: the memory sweep of `bench_train.sweep` (RM step, remat full, seq 1024, 4 pairs)
  against a 75 GiB budget (95% of an H100's 80 GB, as XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 gives).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from apo_jax import models  # noqa: E402
from benchmarks import bench_train, common  # noqa: E402

GIB = 2**30


def flops_section() -> list[dict[str, Any]]:
    rows = []
    shapes = [("tiny", 64, 2, {}), ("1b", 1024, 2, {"num_hidden_layers": 2})]
    for model, seq, batch, over in shapes:
        for task, remat in (("rm", "none"), ("rm", "full"), ("sft", "none")):
            case = dict(task=task, model=model, seq=seq, batch=batch, remat=remat)
            compiled = bench_train.compile_abstract(case, scan_layers=False, **over)
            cfg = common.model_config(model, remat=remat).replace(**over)
            tokens = bench_train.tokens_per_step(case)
            analytic = common.train_flops(cfg, tokens, seq, lm_head=task == "sft")
            full_attn = analytic + 3 * common.attention_flops_fwd_per_token(cfg, seq) * tokens
            rows.append(_flop_row(f"{task} step {model}{'(L=2)' if over else ''} seq{seq} b{batch} remat={remat}",
                                  common.compiled_cost(compiled)["flops"], analytic, full_attn))
        cfg = common.model_config(model).replace(scan_layers=False, **over)
        params = jax.eval_shape(lambda c=cfg: models.init_params(c, jax.random.PRNGKey(0), lm_head=False,
                                                                 reward_head=True))
        ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
        compiled = jax.jit(lambda p, i, m, c=cfg: models.rewards(c, p, i, m)).lower(params, ids, ids).compile()
        analytic = common.forward_flops(cfg, batch * seq, seq, lm_head=False)
        full_attn = analytic + common.attention_flops_fwd_per_token(cfg, seq) * batch * seq
        rows.append(_flop_row(f"score fwd {model}{'(L=2)' if over else ''} seq{seq} b{batch}",
                              common.compiled_cost(compiled)["flops"], analytic, full_attn))
    return rows


def _flop_row(name: str, xla: float, analytic: float, full_attn: float) -> dict[str, Any]:
    row = {"program": name, "xla_flops": xla, "analytic_causal": analytic, "analytic_full_attention": full_attn,
           "xla_over_causal": xla / analytic, "xla_over_full": xla / full_attn}
    print(f"  {name:45s} XLA {xla:.4g}  analytic {analytic:.4g} (x{xla / analytic:.3f})  "
          f"full-attention {full_attn:.4g} (x{xla / full_attn:.3f})", flush=True)
    return row


def memory_section(models_: list[str]) -> list[dict[str, Any]]:
    rows = []
    batches = {("rm", 1024): 8, ("rm", 2048): 4, ("sft", 1024): 16, ("sft", 2048): 8}
    for model in models_:
        for (task, seq), batch in batches.items():
            for remat in ("none", "full"):
                case = dict(task=task, model=model, seq=seq, batch=batch, remat=remat)
                t0 = time.perf_counter()
                mem = common.compiled_memory(bench_train.compile_abstract(case))
                cfg = common.model_config(model)
                n = common.total_params(cfg, lm_head=task == "sft", reward_head=task == "rm")
                rows.append({"model": model, "task": task, "seq": seq, "batch": batch, "remat": remat,
                             "total_params": n, "state_bytes": 12 * n, "memory_analysis": mem,
                             "compile_s": time.perf_counter() - t0})
                print(f"  {model} {task} seq{seq} b{batch} remat={remat:5s} peak {mem['peak_estimate'] / GIB:7.1f} GiB"
                      f"  (args {mem['argument'] / GIB:.1f}, temp {mem['temp'] / GIB:.1f}, state "
                      f"{12 * n / GIB:.1f} GiB)", flush=True)
    return rows


def _residual_bytes(cfg: models.ModelConfig, task: str, batch: int, seq: int) -> int:
    """Bytes autodiff keeps from the forward for the backward (jaxpr level, so the same on every
    backend), arguments excluded."""
    from jax._src.ad_checkpoint import saved_residuals

    from apo_jax.training import losses

    params = jax.eval_shape(lambda: models.init_params(cfg, jax.random.PRNGKey(0), lm_head=task == "sft",
                                                       reward_head=task == "rm"))
    ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)

    def loss(p, i, m):
        if task == "rm":
            return jnp.sum(models.rewards(cfg, p, i, m))
        logits = models.lm_logits(cfg, p, i, m)
        return losses.sft_stats(logits, i, m, jnp.ones((batch,), jnp.float32))["loss_num"]

    total = 0
    for aval, desc in saved_residuals(loss, params, ids, ids):
        if hasattr(aval, "shape") and not desc.startswith("from the argument"):
            total += int(aval.size) * aval.dtype.itemsize
    return total


def residuals_section(models_: list[str]) -> list[dict[str, Any]]:
    """Forward activations kept for the backward, per token and layer, by remat policy and
    attention path, split into a part that grows with tokens and a fixed part (bf16 copies of
    the weights). Tracing the cuDNN path needs no GPU: only its cuDNN version check is stubbed
    (nothing is lowered or compiled). With float32 master weights, state + gradients are 16
    bytes per parameter; peak >= that + residuals (a lower bound: no workspace, no transients)."""
    from jax._src.cudnn import fused_attention_stablehlo

    fused_attention_stablehlo.check_cudnn_version = lambda *a, **k: 90800  # trace only
    rows = []
    seq = 1024
    for model in models_:
        for task in ("rm", "sft"):
            for attention in ("xla", "cudnn"):
                for remat in ("none", "dots_no_batch", "full"):
                    cfg = common.model_config(model, remat=remat, attention=attention)
                    b1, b2 = _residual_bytes(cfg, task, 1, seq), _residual_bytes(cfg, task, 2, seq)
                    per_token = (b2 - b1) / seq
                    fixed = b1 - per_token * seq
                    n = common.total_params(cfg, lm_head=task == "sft", reward_head=task == "rm")
                    rows.append({"model": model, "task": task, "attention": attention, "remat": remat, "seq": seq,
                                 "bytes_per_token": per_token, "fixed_bytes": fixed,
                                 "bytes_per_token_per_layer": per_token / cfg.num_hidden_layers,
                                 "state_and_grad_bytes": 16 * n})
                    print(f"  {model} {task:3s} attn={attention:5s} remat={remat:13s} "
                          f"{per_token / cfg.num_hidden_layers / 1024:6.1f} KiB/token/layer (seq {seq}) + "
                          f"{fixed / GIB:4.2f} GiB fixed; state+grads {16 * n / GIB:5.1f} GiB", flush=True)
    return rows


def decode_section() -> list[dict[str, Any]]:
    rows = []
    # float32 compute has no dtype conversions at all, so its counts are the program's structure;
    # the bf16 rows add the CPU backend's bf16 -> f32 upcasts around every dot (GPUs do bf16 dots).
    for param_dtype, dtype in (("float32", "float32"), ("float32", "bfloat16"), ("bfloat16", "bfloat16")):
        cfg = models.ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=2, dtype=dtype,
                                 param_dtype=param_dtype, pad_token_id=0, scan_layers=False)
        params = jax.eval_shape(lambda c=cfg: models.init_params(c, jax.random.PRNGKey(0)))
        weight_bytes = jnp.dtype(cfg.weight_dtype).itemsize * common.matmul_params(cfg, lm_head=True)
        rows_r = 8
        points = []
        for slots in (128, 1024):
            cache = jax.eval_shape(lambda c=cfg, s=slots: models.init_cache(c, rows_r, s))
            kv = jax.ShapeDtypeStruct((rows_r, slots), jnp.int32)
            tok = jax.ShapeDtypeStruct((rows_r, 1), jnp.int32)

            def step(p, c, t, m, cfg=cfg):
                pos = jnp.full(t.shape, 64, jnp.int32)
                return models.cached_forward(cfg, p, t, pos, m, c, 64)

            compiled = jax.jit(step, donate_argnums=1).lower(params, cache, tok, kv).compile()
            cache_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(cache))
            points.append((cache_bytes, common.compiled_cost(compiled)["bytes_accessed"],
                           common.compiled_memory(compiled)["temp"]))
        (c0, b0, t0), (c1, b1, t1) = points
        slope = (b1 - b0) / (c1 - c0)
        intercept = b0 - slope * c0
        rows.append({"param_dtype": param_dtype, "dtype": dtype, "cache_bytes": [c0, c1], "bytes_accessed": [b0, b1],
                     "temp_bytes": [t0, t1], "cache_passes_per_step": slope,
                     "non_cache_bytes_per_weight_byte": intercept / weight_bytes, "weight_bytes": weight_bytes})
        print(f"  params={param_dtype:8s} compute={dtype:8s} cache passes per decode step {slope:5.2f} (ideal 1.0); "
              f"other bytes "
              f"{intercept / weight_bytes:4.2f} x the stored matmul weights (ideal 1.0); temp "
              f"{t0 / 2**20:.1f} -> {t1 / 2**20:.1f} MiB as the cache grows {c0 / 2**20:.1f} -> "
              f"{c1 / 2**20:.1f} MiB", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out")
    p.add_argument("--sections", default="flops,decode,residuals,memory,sweep")
    p.add_argument("--memory-models", default="1b,3b")
    p.add_argument("--limit-gib", type=float, default=75.0)
    args = p.parse_args(argv)
    sections = args.sections.split(",")
    out: dict[str, Any] = {"environment": common.environment()}
    if "flops" in sections:
        print("FLOPs: XLA cost_analysis (unrolled layers) vs analytical")
        out["flops"] = flops_section()
    if "decode" in sections:
        print("Decode step traffic (XLA bytes accessed, unrolled layers)")
        out["decode"] = decode_section()
    if "residuals" in sections:
        print("Residuals kept for the backward (jaxpr level; seq 1024)")
        out["residuals"] = residuals_section(args.memory_models.split(","))
    if "memory" in sections:
        print("Memory: XLA memory_analysis of the train steps (scan over layers, XLA attention)")
        out["memory"] = memory_section(args.memory_models.split(","))
    if "sweep" in sections:
        print(f"Sweep: RM step, remat full, seq 1024, 4 pairs, against {args.limit_gib:g} GiB")
        out["sweep"] = bench_train.sweep("rm", 1024, 4, "full", ["1b", "3b", "7b_l18", "7b_l22", "7b"],
                                         int(args.limit_gib * GIB), "xla", "float32", confirm=False)
        print("  largest fitting:", out["sweep"]["largest_fitting"])
    if args.out:
        common.write_json(args.out, out)


if __name__ == "__main__":
    main()
