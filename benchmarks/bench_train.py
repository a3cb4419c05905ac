"""RM and SFT train steps of apo_jax against the same model's training step in transformers PyTorch.

    python benchmarks/bench_train.py --model 1b --task rm --seq 1024 --batch 8 --impl both
    python benchmarks/bench_train.py --model tiny --task sft --seq 64 --batch 4 --impl both
    python benchmarks/bench_train.py --sweep --task rm --seq 1024 --batch 4 --remat full

A step is the whole optimizer step (forward, backward, global-norm clip, AdamW) on one device,
bf16 compute by default. `--param-dtype float32` (the default, as the APO configs train) keeps
float32 master weights on both sides: apo_jax casts per matmul, PyTorch runs under bf16
autocast. `--param-dtype bfloat16` stores bf16 weights on both sides. `--dtype float32` computes
in float32 on both sides (no autocast): the CPU comparison. `--checkpoint DIR` runs a HF LLaMA
checkpoint's shape and weights (both sides load the same weights). `--batch` counts pairs for the RM
step (each step runs 2 x batch sequences: chosen and rejected) and sequences for SFT.
`--remat` other than none turns on HF gradient checkpointing in the reference (whole layers).

`--sweep` compiles the RM (or SFT) step of each model in `--sweep-models` on abstract shapes (no
device memory is used), reads XLA's buffer assignment, and reports the largest model whose
estimate fits the device's memory (or `--memory-limit-gib` on CPU); on a GPU it then runs that
model's step once to confirm.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from apo_jax import models, sharding  # noqa: E402
from apo_jax.training import train
from benchmarks import common  # noqa: E402

TASKS = ("rm", "sft")
ASSUMED_LIMIT_BYTES = 75 * 2**30  # 95% of an H100's 79.6 GiB (XLA_PYTHON_CLIENT_MEM_FRACTION=0.95)
OPT = train.OptimizerConfig(lr=1e-5, warmup_steps=0, total_steps=10_000, schedule="linear", grad_clip=1.0)
DEFAULTS = dict(impl="jax", task="rm", model="tiny", seq=64, batch=2, remat="none", attention="xla",
                param_dtype="float32", dtype="bfloat16", checkpoint=None, warmup=2, steps=5, torch_compile=False,
                ref_weights="random", seed=0,
                profile=False, oom_retry_remat=None, scan_layers=True)


def case_defaults(case: dict[str, Any]) -> dict[str, Any]:
    return {**DEFAULTS, **case}


def case_name(case: dict[str, Any]) -> str:
    c = case_defaults(case)
    unit = "pairs" if c["task"] == "rm" else "seqs"
    name = f"{c['task']} {common.model_label(c)} seq{c['seq']} b{c['batch']}{unit[0]} remat={c['remat']}"
    if c["dtype"] != "bfloat16":
        name += f" compute={c['dtype']}"
    if c["param_dtype"] != "float32":
        name += f" params={c['param_dtype']}"
    if c["attention"] != "xla":
        name += f" attn={c['attention']}"
    if not c["scan_layers"]:
        name += " unrolled"
    return name


def tokens_per_step(case: dict[str, Any]) -> int:
    c = case_defaults(case)
    return (2 if c["task"] == "rm" else 1) * c["batch"] * c["seq"]


def make_batch(task: str, batch: int, seq: int, vocab: int, seed: int) -> dict[str, np.ndarray]:
    """A full-length (unpadded) batch of random ids; the same arrays for apo_jax and PyTorch."""
    ones = np.ones((batch, seq), np.int32)
    if task == "rm":
        return {"chosen_ids": common.random_ids(seed, batch, seq, vocab), "chosen_mask": ones,
                "rejected_ids": common.random_ids(seed + 1, batch, seq, vocab), "rejected_mask": ones.copy(),
                "weight": np.ones((batch,), np.float32), "is_apo": np.zeros((batch,), np.int32)}
    return {"input_ids": common.random_ids(seed, batch, seq, vocab), "attention_mask": ones,
            "loss_mask": ones.copy(), "weight": np.ones((batch,), np.float32)}


def _config(c: dict[str, Any]) -> models.ModelConfig:
    return common.case_config(c, remat=c["remat"], attention=c["attention"])


def init_params(cfg: models.ModelConfig, c: dict[str, Any]) -> Any:
    """The case's params with the head the task needs (the LM head for SFT, the reward head for RM)."""
    return common.case_params(cfg, c, lm_head=c["task"] == "sft", reward_head=c["task"] == "rm")


def torch_checkpointing(remat: str) -> bool:
    """Whether the reference runs HF gradient checkpointing (whole layers): for the policies that
    recompute matmuls. "auto" / "minimal" recompute only norms, SwiGLU and attention
    probabilities, so they are compared with PyTorch's default (everything kept)."""
    return remat in ("full", "dots", "dots_no_batch")


def make_step(cfg: models.ModelConfig, task: str, mesh: jax.sharding.Mesh):
    return common.make_train_step(cfg, task, OPT, mesh)


def step_executable(run: Any, state: Any, batch: Any) -> tuple[Any, tuple[Any, ...]]:
    """The jitted program `run` dispatches for these shapes and the extra arguments it passes
    after (state, batch), so `.lower(...).compile()` returns the executable already compiled
    instead of compiling a second one. Works with `train.TrainStep` (`.jitted`) and with the
    earlier closure-based steps; (None, ()) if neither is found."""
    if hasattr(run, "jitted"):
        return run.jitted(state, batch), tuple(x for x in (getattr(run, "_hyper", None),) if x is not None)
    for cell in getattr(run, "__closure__", None) or ():
        value = cell.cell_contents
        if isinstance(value, dict) and value and all(hasattr(v, "lower") for v in value.values()):
            return next(iter(value.values())), ()
    return None, ()


def _cache_size(jitted: Any) -> int | None:
    """Executables the jitted step holds (one per input signature); None if jax hides it."""
    try:
        return int(jitted._cache_size())
    except Exception:  # noqa: BLE001 - a private jax API
        return None


def abstract_state(cfg: models.ModelConfig, task: str) -> train.TrainState:
    """The train state's shapes and dtypes, built without allocating anything."""
    params = jax.eval_shape(lambda: models.init_params(cfg, jax.random.PRNGKey(0), lm_head=task == "sft",
                                                       reward_head=task == "rm"))
    opt_state = jax.eval_shape(train.make_optimizer(OPT).init, params)
    return train.TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params, opt_state=opt_state)


def compile_abstract(case: dict[str, Any], **cfg_over: Any) -> Any:
    """The step compiled on abstract shapes (no device memory): for memory and FLOP estimates.
    `cfg_over` replaces ModelConfig fields (e.g. scan_layers=False, num_hidden_layers=2)."""
    c = case_defaults(case)
    cfg = _config(c).replace(**cfg_over)
    mesh = common.single_device_mesh()
    batch = make_batch(c["task"], c["batch"], c["seq"], cfg.vocab_size, c["seed"])
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
    run = make_step(cfg, c["task"], mesh)
    # Outer jit over the step's own jit: the inner one's shardings become constraints.
    return jax.jit(run, donate_argnums=0).lower(abstract_state(cfg, c["task"]), batch).compile()


# --------------------------------------------------------------------------------------------
# apo_jax.


def run_jax(case: dict[str, Any]) -> dict[str, Any]:
    c = case_defaults(case)
    cfg = _config(c)
    mesh = common.single_device_mesh()
    rss0 = common.rss_bytes()["rss"]
    compiles0 = common.backend_compiles()
    params = init_params(cfg, c)
    state = train.init_state(cfg, params, OPT, mesh)
    del params  # init_state copied them; drop ours so the step's peak is not inflated
    run = make_step(cfg, c["task"], mesh)
    batch = sharding.shard_batch(make_batch(c["task"], c["batch"], c["seq"], cfg.vocab_size, c["seed"]), mesh)
    holder: dict[str, Any] = {"state": state, "first": None}

    def call():
        holder["state"], metrics = run(holder["state"], batch)
        if holder["first"] is None:
            holder["first"] = metrics
        return holder["state"].step, metrics["loss"]

    c_start = common.backend_compiles()
    timing = common.time_calls(call, common.jax_sync, warmup=c["warmup"], iters=c["steps"])
    step_compiles = common.backend_compiles() - c_start

    # Steady state: no compile, no device-to-host sync and no host-to-device copy per step.
    c_steady = common.backend_compiles()
    transfers = common.guarded_transfers(call, steps=2)
    steady_compiles = common.backend_compiles() - c_steady

    compiled = None
    jitted, extra = step_executable(run, holder["state"], batch)
    if jitted is not None:
        c_lower = common.backend_compiles()
        compiled = jitted.lower(holder["state"], batch, *extra).compile()
        assert common.backend_compiles() == c_lower, "lower().compile() recompiled the step"
    mem = common.compiled_memory(compiled) if compiled is not None else None
    profile = common.profile_top_ops(call, common.jax_sync) if c["profile"] else None
    peak = common.device_peak_bytes()
    tokens = tokens_per_step(c)
    first_loss = float(np.asarray(holder["first"]["loss"]))
    return {
        "status": "ok",
        "tokens_per_step": tokens,
        "tokens_per_s": tokens / timing.median_s,
        "step_time_s": timing.median_s,
        "flops_per_step": common.train_flops(cfg, tokens, c["seq"], lm_head=c["task"] == "sft"),
        "matmul_params": common.matmul_params(cfg, lm_head=c["task"] == "sft"),
        "total_params": common.total_params(cfg, lm_head=c["task"] == "sft", reward_head=c["task"] == "rm"),
        "peak_bytes": peak if peak is not None else (mem or {}).get("peak_estimate"),
        "peak_source": "device.memory_stats" if peak is not None else "memory_analysis",
        "memory_analysis": mem,
        "remat_resolved": models.remat_for(cfg, (2 if c["task"] == "rm" else 1) * c["batch"], c["seq"]),
        "rss_start_bytes": rss0,
        "rss_peak_bytes": common.rss_bytes()["peak_rss"],
        "xla_cost_scan_body_once": common.compiled_cost(compiled) if compiled is not None else None,
        "compiles": {"total_in_case": common.backend_compiles() - compiles0, "step_first_calls": step_compiles,
                     "steady_state": steady_compiles, "step_executables": _cache_size(jitted)},
        "host_syncs_per_step": transfers["device_to_host"],
        "host_to_device_per_step": transfers["host_to_device"],
        "first_loss": first_loss,
        "profile": profile,
        "timing": timing.as_dict(),
    }


# --------------------------------------------------------------------------------------------
# transformers PyTorch.


def run_torch(case: dict[str, Any]) -> dict[str, Any]:
    import torch

    c = case_defaults(case)
    cfg = _config(c)
    device = common.torch_device()
    rm = c["task"] == "rm"
    rss0 = common.rss_bytes()["rss"]
    params = None
    if c["ref_weights"] == "identical" or c["checkpoint"]:
        params = jax.device_get(init_params(cfg, c))
    mixed = c["param_dtype"] == "float32" and c["dtype"] == "bfloat16"
    model = common.hf_model(cfg, reward=rm, params=params, dtype=c["param_dtype"], device=device)
    del params
    model.train()
    model.config.use_cache = False
    if torch_checkpointing(c["remat"]):
        model.gradient_checkpointing_enable()
    fwd = torch.compile(model) if c["torch_compile"] else model
    opt = torch.optim.AdamW(model.parameters(), lr=OPT.lr, betas=(OPT.b1, OPT.b2), eps=OPT.eps,
                            weight_decay=OPT.weight_decay, fused=device == "cuda")
    b = {k: torch.as_tensor(v, device=device) for k, v in
         make_batch(c["task"], c["batch"], c["seq"], cfg.vocab_size, c["seed"]).items()}
    if rm:
        ids = torch.cat([b["chosen_ids"], b["rejected_ids"]]).long()
        mask = torch.cat([b["chosen_mask"], b["rejected_mask"]]).long()
    else:
        ids, mask = b["input_ids"].long(), b["attention_mask"].long()
    n = c["batch"]
    holder: dict[str, Any] = {"first": None}

    def call():
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=mixed):
            if rm:
                r = fwd(input_ids=ids, attention_mask=mask).logits[:, 0].float()
                loss = -torch.nn.functional.logsigmoid(r[:n] - r[n:]).mean()
            else:
                loss = fwd(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), OPT.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if holder["first"] is None:
            holder["first"] = loss.detach()
        return loss

    common.torch_reset_peak()
    timing = common.time_calls(call, common.torch_sync, warmup=c["warmup"], iters=c["steps"])
    tokens = tokens_per_step(c)
    rss = common.rss_bytes()["peak_rss"]
    cuda_peak = common.torch_peak_bytes()
    return {
        "status": "ok",
        "tokens_per_step": tokens,
        "tokens_per_s": tokens / timing.median_s,
        "step_time_s": timing.median_s,
        "flops_per_step": common.train_flops(cfg, tokens, c["seq"], lm_head=not rm),
        "peak_bytes": cuda_peak if cuda_peak is not None else rss,
        "peak_source": "torch.cuda.max_memory_allocated" if cuda_peak is not None else "process RSS (VmHWM)",
        "rss_start_bytes": rss0,
        "rss_peak_bytes": rss,
        "first_loss": float(holder["first"].float().cpu()),
        "torch_device": device,
        "torch_compile": bool(c["torch_compile"]),
        "gradient_checkpointing": torch_checkpointing(c["remat"]),
        "ref_weights": c["ref_weights"],
        "timing": timing.as_dict(),
    }


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    """One case; failures (OOM included) are returned as a status, never raised."""
    c = case_defaults(case)
    try:
        result = run_jax(c) if c["impl"] == "jax" else run_torch(c)
    except Exception as exc:  # noqa: BLE001
        status = "oom" if common.is_oom(exc) else f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        result = {"status": status, "traceback": traceback.format_exc()[-3000:]}
        if c["impl"] == "jax" and c["attention"] == "cudnn" and status.startswith("error"):
            # cuDNN refused this shape or build: measure the portable path instead, and say so.
            fallback = run_case({**c, "attention": "xla"})
            fallback["cudnn_error"] = status
            return fallback
        retry_remat = c.get("oom_retry_remat")
        if status == "oom" and retry_remat and retry_remat != c["remat"]:
            # Out of memory without remat: measure with the lighter policy rather than no number.
            import gc

            del exc
            gc.collect()
            if c["impl"] == "torch":
                common.torch_reset_peak()
            retry = run_case({**c, "remat": retry_remat, "oom_retry_remat": None})
            retry["oom_at_remat"] = c["remat"]
            return retry
    return {"bench": "train", "name": case_name(c), "case": c, **result}


# --------------------------------------------------------------------------------------------
# The memory sweep.


def sweep(task: str, seq: int, batch: int, remat: str, names: list[str], limit_bytes: int | None,
          attention: str, param_dtype: str, confirm: bool) -> dict[str, Any]:
    """Estimated peak of each model's step (abstract compile) and the largest that fits."""
    device_limit = common.device_bytes_limit()
    limit = limit_bytes or device_limit or ASSUMED_LIMIT_BYTES
    limit_source = "given" if limit_bytes else "device bytes_limit" if device_limit else "assumed: 75 GiB"
    rows = []
    for name in names:
        case = dict(task=task, model=name, seq=seq, batch=batch, remat=remat, attention=attention,
                    param_dtype=param_dtype)
        try:
            mem = common.compiled_memory(compile_abstract(case))
            est = mem["peak_estimate"]
            status = "ok"
        except Exception as exc:  # noqa: BLE001
            mem, est, status = None, None, f"compile failed: {str(exc).splitlines()[0][:200]}"
        cfg = common.model_config(name)
        rows.append({"model": name, "total_params": common.total_params(cfg, lm_head=task == "sft",
                                                                        reward_head=task == "rm"),
                     "estimate_bytes": est, "memory_analysis": mem, "fits": est is not None and limit is not None
                     and est <= limit, "status": status})
        print(f"  {name:8s} {rows[-1]['total_params'] / 1e9:5.2f}B params  estimate {common.fmt_bytes(est)}"
              f"  {'fits' if rows[-1]['fits'] else 'does not fit'} in {common.fmt_bytes(limit)}", flush=True)
    fitting = [r for r in rows if r["fits"]]
    largest = max(fitting, key=lambda r: r["total_params"]) if fitting else None
    out = {"task": task, "seq": seq, "batch": batch, "remat": remat, "limit_bytes": limit,
           "limit_source": limit_source, "models": rows,
           "largest_fitting": largest["model"] if largest else None}
    if confirm and largest is not None and jax.devices()[0].platform != "cpu":
        out["confirm_run"] = run_case(dict(impl="jax", task=task, model=largest["model"], seq=seq, batch=batch,
                                           remat=remat, attention=attention, param_dtype=param_dtype,
                                           warmup=1, steps=2))
    return out


# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", help="a whole case as JSON (run_all's subprocess protocol)")
    p.add_argument("--result-file", help="write the result JSON here")
    p.add_argument("--impl", choices=("jax", "torch", "both"), default="both")
    p.add_argument("--task", choices=TASKS, default="rm")
    p.add_argument("--model", choices=sorted(common.MODEL_SHAPES), default="tiny")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--remat", choices=models.REMAT_POLICIES, default="none")
    p.add_argument("--attention", choices=models.ATTENTION_IMPLS, default="xla")
    p.add_argument("--param-dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16", help="compute dtype")
    p.add_argument("--checkpoint", help="a HF LLaMA checkpoint dir or hub id (its shape and weights)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--torch-compile", action="store_true")
    p.add_argument("--ref-weights", choices=("random", "identical"), default="random")
    p.add_argument("--profile", action="store_true",
                   help="trace one more apo_jax step and print its wall time per op kind (common.profile_top_ops)")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--sweep-models", default="1b,3b,7b_l18,7b_l22,7b")
    p.add_argument("--memory-limit-gib", type=float, default=None,
                   help="memory to fit in (default: the device's bytes_limit, else 75 GiB)")
    args = p.parse_args(argv)

    if args.case:
        result = run_case(__import__("json").loads(args.case))
        if args.result_file:
            common.write_json(args.result_file, result)
        print(result["name"], result["status"], common.fmt_num(result.get("tokens_per_s"), " tok/s"))
        return
    if args.sweep:
        limit = int(args.memory_limit_gib * 2**30) if args.memory_limit_gib else None
        out = sweep(args.task, args.seq, args.batch, args.remat, args.sweep_models.split(","), limit,
                    args.attention, args.param_dtype, confirm=True)
        print("largest fitting:", out["largest_fitting"])
        if args.result_file:
            common.write_json(args.result_file, {"environment": common.environment(), "sweep": out})
        return
    impls = ("jax", "torch") if args.impl == "both" else (args.impl,)
    results = []
    for impl in impls:
        case = dict(impl=impl, task=args.task, model=args.model, seq=args.seq, batch=args.batch, remat=args.remat,
                    attention=args.attention if impl == "jax" else "xla", param_dtype=args.param_dtype,
                    dtype=args.dtype, checkpoint=args.checkpoint,
                    steps=args.steps, warmup=args.warmup, torch_compile=args.torch_compile,
                    ref_weights=args.ref_weights, profile=args.profile and impl == "jax")
        results.append(run_case(case))
        r = results[-1]
        print(f"{impl:5s} {r['name']}: {r['status']}  {common.fmt_num(r.get('tokens_per_s'), ' tok/s')}  "
              f"step {common.fmt_time(r.get('step_time_s'))}  peak {common.fmt_bytes(r.get('peak_bytes'))}  "
              f"first loss {r.get('first_loss')}", flush=True)
        prof = r.get("profile") or {}
        if prof.get("by_kind"):
            print(f"  traced step: {prof['total_ms']:.0f} ms with an op running, {prof['idle_ms']:.0f} ms without")
            for o in prof["by_kind"]:
                print(f"  {o['ms']:9.1f} ms {100 * o['share']:5.1f}%  {o['op']}")
        elif prof:
            print("  profile:", prof.get("error"))
    if args.result_file:
        common.write_json(args.result_file, {"environment": common.environment(), "results": results})


if __name__ == "__main__":
    main()
