"""Best-of-S sampling and reward scoring of apo_jax against transformers PyTorch.

    python benchmarks/bench_sampler.py --model 1b --batch 64 --prompt-len 256 --new-tokens 256
    python benchmarks/bench_sampler.py --score --model 1b --batch 64 --seq 512

Sampling: S samples of each of `batch` full-length prompts (no EOS, so every row generates
`new_tokens`), temperature 1.2 and top_p 1.0 as the official APO code samples for training.
apo_jax runs `sampler.generate` (prefill once, tile the cache S times, one `while_loop` decode);
transformers runs `generate(num_return_sequences=S)` with the same settings on the same batch.
Reported: generated tokens/s (batch * S * new_tokens over the whole call), the decode step time
((whole call - prefill) / new_tokens), and the decode step's share of the HBM roofline: the
fewest bytes a step must read (every matmul weight once + the valid KV cache) over the measured
copy bandwidth, divided by the measured step time.

Scoring: `scoring.make_reward_fn` (forward only, reward at the last token) on [batch, seq]
against LlamaForSequenceClassification's forward under `torch.no_grad`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from apo_jax import compiled, models  # noqa: E402
from apo_jax.inference import sampler
from benchmarks import common  # noqa: E402

SAMPLE_DEFAULTS = dict(impl="jax", model="tiny", batch=2, num_samples=4, prompt_len=32, new_tokens=32,
                       temperature=1.2, top_p=1.0, top_k=0, param_dtype="float32", dtype="bfloat16",
                       checkpoint=None, attention="xla", warmup=1, iters=3, seed=0, ref_weights="random",
                       copy_bytes_per_s=None, profile=False)
SCORE_DEFAULTS = dict(impl="jax", model="tiny", batch=4, seq=64, param_dtype="float32", dtype="bfloat16",
                      checkpoint=None, attention="xla",
                      warmup=1, iters=3, seed=0, ref_weights="random", profile=False)


def sample_name(c: dict[str, Any]) -> str:
    c = {**SAMPLE_DEFAULTS, **c}
    name = (f"best-of-{c['num_samples']} {common.model_label(c)} b{c['batch']} prompt{c['prompt_len']} "
            f"new{c['new_tokens']} params={c['param_dtype']}")
    name += f" compute={c['dtype']}" if c["dtype"] != "bfloat16" else ""
    return name + (f" attn={c['attention']}" if c["attention"] != "xla" else "")


def score_name(c: dict[str, Any]) -> str:
    c = {**SCORE_DEFAULTS, **c}
    name = f"score {common.model_label(c)} seq{c['seq']} b{c['batch']} params={c['param_dtype']}"
    name += f" compute={c['dtype']}" if c["dtype"] != "bfloat16" else ""
    return name + (f" attn={c['attention']}" if c["attention"] != "xla" else "")


def _prompts(c: dict[str, Any], vocab: int) -> tuple[np.ndarray, np.ndarray]:
    ids = common.random_ids(c["seed"], c["batch"], c["prompt_len"], vocab)
    return ids, np.ones_like(ids)


def _kv_len_avg(c: dict[str, Any]) -> float:
    """Valid cache slots a decode forward attends, averaged over the new_tokens forwards:
    the forward for new token i attends prompt_len + i + 1 slots."""
    return c["prompt_len"] + (c["new_tokens"] + 1) / 2


# --------------------------------------------------------------------------------------------
# Sampling.


def run_jax_sample(c: dict[str, Any]) -> dict[str, Any]:
    rss0 = common.rss_bytes()["rss"]
    cfg = common.case_config(c, attention=c["attention"])
    # The sampling phase's weights, made once per phase as `phases.sample` does: compute dtype,
    # one tree per layer (`models.params_for_generation`).
    params = models.params_for_generation(cfg, common.case_params(cfg, c, lm_head=True, reward_head=False))
    ids_np, mask_np = _prompts(c, cfg.vocab_size)
    kw = dict(num_samples=c["num_samples"], max_new_tokens=c["new_tokens"], temperature=c["temperature"],
              top_p=c["top_p"], top_k=c["top_k"], eos_token_id=None)
    key = jax.random.PRNGKey(c["seed"])

    # Compile counts: three batches of one length bucket (prompts of different lengths) through
    # `sample_dataset` must compile prefill and decode once each.
    before = compiled.TRACES.copy()
    rng = np.random.RandomState(c["seed"] + 7)
    lengths = rng.randint(max(1, c["prompt_len"] // 2), c["prompt_len"] + 1, size=3 * c["batch"])
    prompts = [list(common.random_ids(int(i), 1, int(n), cfg.vocab_size)[0]) for i, n in enumerate(lengths)]
    sampler.sample_dataset(cfg, params, prompts, key, batch_size=c["batch"], buckets=(c["prompt_len"],),
                           progress=False, **kw)
    three_batches = {k: compiled.TRACES[k] - before[k] for k in ("prefill", "decode")}

    ids, mask = jax.device_put(ids_np), jax.device_put(mask_np)
    keys = list(jax.random.split(key, c["warmup"] + c["iters"] + 4))
    before = compiled.TRACES.copy()
    c_start = common.backend_compiles()

    def call():
        return sampler.generate(cfg, params, ids, mask, keys.pop(), **kw).tokens

    timing = common.time_calls(call, common.jax_sync, warmup=c["warmup"], iters=c["iters"])
    timed = {k: compiled.TRACES[k] - before[k] for k in ("prefill", "decode")}
    timed["backend"] = common.backend_compiles() - c_start

    transfers = common.guarded_transfers(call)

    prefill = sampler._prefill_fn(cfg, c["num_samples"], c["new_tokens"], None)
    t_pre = common.time_calls(lambda: prefill(params, ids, mask), common.jax_sync, warmup=1, iters=c["iters"])
    decode_step = (timing.median_s - t_pre.median_s) / c["new_tokens"]
    rows = c["batch"] * c["num_samples"]
    floor = common.decode_bytes_per_step(cfg, rows, _kv_len_avg(c))
    generated = rows * c["new_tokens"]

    # The decode program's buffer assignment (the executable already compiled: no new compile).
    cache_abs, logits_abs, kv_abs = jax.eval_shape(prefill, params, ids, mask)
    decode = sampler._decode_fn(cfg, c["new_tokens"], float(c["temperature"]), int(c["top_k"]),
                                float(c["top_p"]), (), (), int(cfg.pad_token_id or 0), None)
    c_lower = common.backend_compiles()
    executable = decode.lower(params, cache_abs, logits_abs, kv_abs, jax.ShapeDtypeStruct((rows,), jnp.int32),
                              key).compile()
    cached = common.backend_compiles() == c_lower
    mem = common.compiled_memory(executable)
    profile = common.profile_top_ops(call, common.jax_sync) if c["profile"] else None
    peak = common.device_peak_bytes()
    return {
        "status": "ok",
        "profile": profile,
        "generated_tokens": generated,
        "tokens_per_s": generated / timing.median_s,
        "step_time_s": decode_step,
        "call_time_s": timing.median_s,
        "prefill_time_s": t_pre.median_s,
        "decode_floor_bytes": floor,
        "copy_bytes_per_s": c.get("copy_bytes_per_s"),
        "peak_bytes": peak if peak is not None else mem["peak_estimate"],
        "peak_source": "device.memory_stats" if peak is not None else "memory_analysis (decode program)",
        "decode_memory_analysis": mem,
        "rss_start_bytes": rss0,
        "rss_peak_bytes": common.rss_bytes()["peak_rss"],
        "decode_executable_reused": cached,
        "cache_bytes": 2 * cfg.num_hidden_layers * rows * (c["prompt_len"] + c["new_tokens"])
                       * cfg.num_key_value_heads * cfg.head_dim * jnp.dtype(cfg.compute_dtype).itemsize,
        "compiles": {"three_batches_one_bucket": three_batches, "timed_loop": timed},
        "host_syncs_per_call": transfers["device_to_host"],
        "host_to_device_per_call": transfers["host_to_device"],
        "timing": timing.as_dict(),
    }


def run_torch_sample(c: dict[str, Any]) -> dict[str, Any]:
    import torch

    rss0 = common.rss_bytes()["rss"]
    cfg = common.case_config(c)
    device = common.torch_device()
    params = None
    if c["ref_weights"] == "identical" or c["checkpoint"]:
        params = jax.device_get(common.case_params(cfg, c, lm_head=True, reward_head=False))
    # Generation in transformers is run in bf16 weights, as its users load a model for sampling;
    # with float32 compute (the CPU comparison) in float32 weights.
    tdtype = "float32" if c["dtype"] == "float32" else "bfloat16"
    model = common.hf_model(cfg.replace(param_dtype=tdtype), reward=False, params=params, dtype=tdtype,
                            device=device).eval()
    ids_np, mask_np = _prompts(c, cfg.vocab_size)
    ids = torch.as_tensor(ids_np, device=device).long()
    mask = torch.as_tensor(mask_np, device=device).long()

    def gen(n: int):
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=c["temperature"],
                                  top_p=c["top_p"], top_k=c["top_k"], max_new_tokens=n, min_new_tokens=n,
                                  num_return_sequences=c["num_samples"], pad_token_id=common.PAD_ID)

    common.torch_reset_peak()
    out = gen(c["new_tokens"])
    assert out.shape == (c["batch"] * c["num_samples"], c["prompt_len"] + c["new_tokens"]), out.shape
    timing = common.time_calls(lambda: gen(c["new_tokens"]), common.torch_sync, warmup=0, iters=c["iters"])
    t_one = common.time_calls(lambda: gen(1), common.torch_sync, warmup=0, iters=c["iters"])
    generated = c["batch"] * c["num_samples"] * c["new_tokens"]
    return {
        "status": "ok",
        "generated_tokens": generated,
        "tokens_per_s": generated / timing.median_s,
        "step_time_s": (timing.median_s - t_one.median_s) / max(c["new_tokens"] - 1, 1),
        "call_time_s": timing.median_s,
        "prefill_time_s": t_one.median_s,
        "peak_bytes": common.torch_peak_bytes() or common.rss_bytes()["peak_rss"],
        "peak_source": "torch.cuda.max_memory_allocated" if device == "cuda" else "process RSS (VmHWM)",
        "rss_start_bytes": rss0,
        "rss_peak_bytes": common.rss_bytes()["peak_rss"],
        "torch_device": device,
        "torch_weights": tdtype,
        "timing": timing.as_dict(),
    }


# --------------------------------------------------------------------------------------------
# Reward scoring.


def run_jax_score(c: dict[str, Any]) -> dict[str, Any]:
    rss0 = common.rss_bytes()["rss"]
    cfg = common.case_config(c, attention=c["attention"])
    mesh = common.single_device_mesh()
    params = common.case_params(cfg, c, lm_head=False, reward_head=True)
    score = common.make_score_fn(cfg, mesh)
    ids = jax.device_put(common.random_ids(c["seed"], c["batch"], c["seq"], cfg.vocab_size))
    mask = jax.device_put(np.ones((c["batch"], c["seq"]), np.int32))
    c_start = common.backend_compiles()
    timing = common.time_calls(lambda: score(params, ids, mask), common.jax_sync, warmup=c["warmup"],
                               iters=c["iters"])
    compiles = common.backend_compiles() - c_start
    executable = score.lower(params, ids, mask).compile()
    mem = common.compiled_memory(executable)
    profile = common.profile_top_ops(lambda: score(params, ids, mask), common.jax_sync) if c["profile"] else None
    peak = common.device_peak_bytes()
    tokens = c["batch"] * c["seq"]
    first = np.asarray(score(params, ids, mask))
    return {
        "status": "ok",
        "tokens_per_step": tokens,
        "tokens_per_s": tokens / timing.median_s,
        "step_time_s": timing.median_s,
        "flops_per_step": common.forward_flops(cfg, tokens, c["seq"], lm_head=False),
        "peak_bytes": peak if peak is not None else mem["peak_estimate"],
        "peak_source": "device.memory_stats" if peak is not None else "memory_analysis",
        "memory_analysis": mem,
        "rss_start_bytes": rss0,
        "rss_peak_bytes": common.rss_bytes()["peak_rss"],
        "compiles": {"first_calls": compiles},
        "profile": profile,
        "rewards_head": [float(x) for x in first[:4]],
        "timing": timing.as_dict(),
    }


def run_torch_score(c: dict[str, Any]) -> dict[str, Any]:
    import torch

    rss0 = common.rss_bytes()["rss"]
    cfg = common.case_config(c)
    device = common.torch_device()
    params = None
    if c["ref_weights"] == "identical" or c["checkpoint"]:
        params = jax.device_get(common.case_params(cfg, c, lm_head=False, reward_head=True))
    model = common.hf_model(cfg, reward=True, params=params, dtype=c["param_dtype"], device=device).eval()
    ids = torch.as_tensor(common.random_ids(c["seed"], c["batch"], c["seq"], cfg.vocab_size), device=device).long()
    mask = torch.ones_like(ids)
    mixed = c["param_dtype"] == "float32" and c["dtype"] == "bfloat16"

    def call():
        with torch.no_grad(), torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=mixed):
            return model(input_ids=ids, attention_mask=mask).logits

    common.torch_reset_peak()
    timing = common.time_calls(call, common.torch_sync, warmup=c["warmup"], iters=c["iters"])
    tokens = c["batch"] * c["seq"]
    return {
        "status": "ok",
        "tokens_per_step": tokens,
        "tokens_per_s": tokens / timing.median_s,
        "step_time_s": timing.median_s,
        "flops_per_step": common.forward_flops(cfg, tokens, c["seq"], lm_head=False),
        "peak_bytes": common.torch_peak_bytes() or common.rss_bytes()["peak_rss"],
        "peak_source": "torch.cuda.max_memory_allocated" if device == "cuda" else "process RSS (VmHWM)",
        "rss_start_bytes": rss0,
        "rss_peak_bytes": common.rss_bytes()["peak_rss"],
        "rewards_head": [float(x) for x in call()[:4, 0].float().cpu()],
        "torch_device": device,
        "timing": timing.as_dict(),
    }


# --------------------------------------------------------------------------------------------


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    """One sampling or scoring case (`bench` = "sample" or "score"); failures become a status."""
    bench = case.get("bench", "sample")
    c = {**(SAMPLE_DEFAULTS if bench == "sample" else SCORE_DEFAULTS), **case}
    fns = {("sample", "jax"): run_jax_sample, ("sample", "torch"): run_torch_sample,
           ("score", "jax"): run_jax_score, ("score", "torch"): run_torch_score}
    try:
        result = fns[(bench, c["impl"])](c)
    except Exception as exc:  # noqa: BLE001
        status = "oom" if common.is_oom(exc) else f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        result = {"status": status, "traceback": traceback.format_exc()[-3000:]}
        if c["impl"] == "jax" and c["attention"] == "cudnn" and status.startswith("error"):
            fallback = run_case({**case, "attention": "xla"})
            fallback["cudnn_error"] = status
            return fallback
    name = sample_name(c) if bench == "sample" else score_name(c)
    return {"bench": bench, "name": name, "case": c, **result}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", help="a whole case as JSON (run_all's subprocess protocol)")
    p.add_argument("--result-file")
    p.add_argument("--score", action="store_true", help="reward scoring instead of sampling")
    p.add_argument("--impl", choices=("jax", "torch", "both"), default="both")
    p.add_argument("--model", choices=sorted(common.MODEL_SHAPES), default="tiny")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--seq", type=int, default=64, help="scoring sequence length")
    p.add_argument("--param-dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16", help="compute dtype")
    p.add_argument("--checkpoint", help="a HF LLaMA checkpoint dir or hub id (its shape and weights)")
    p.add_argument("--attention", choices=models.ATTENTION_IMPLS, default="xla")
    p.add_argument("--iters", type=int, default=3)
    args = p.parse_args(argv)
    if args.case:
        result = run_case(json.loads(args.case))
        if args.result_file:
            common.write_json(args.result_file, result)
        print(result["name"], result["status"], common.fmt_num(result.get("tokens_per_s"), " tok/s"))
        return
    copy_bw = None
    if not args.score:
        copy_bw = common.measure_copy_bandwidth(256 * 2**20 if jax.devices()[0].platform != "cpu" else 16 * 2**20)
        print(f"copy bandwidth {common.fmt_num(copy_bw['bytes_per_s'], 'B/s')}")
    results = []
    for impl in (("jax", "torch") if args.impl == "both" else (args.impl,)):
        if args.score:
            case = dict(bench="score", impl=impl, model=args.model, batch=args.batch, seq=args.seq,
                        param_dtype=args.param_dtype, dtype=args.dtype, checkpoint=args.checkpoint,
                        attention=args.attention, iters=args.iters)
        else:
            case = dict(bench="sample", impl=impl, model=args.model, batch=args.batch, num_samples=args.num_samples,
                        prompt_len=args.prompt_len, new_tokens=args.new_tokens, param_dtype=args.param_dtype,
                        dtype=args.dtype, checkpoint=args.checkpoint, attention=args.attention, iters=args.iters,
                        copy_bytes_per_s=copy_bw["bytes_per_s"])
        r = run_case(case)
        results.append(r)
        extra = ""
        if r.get("decode_floor_bytes") and copy_bw:
            floor_s = r["decode_floor_bytes"]["total"] / copy_bw["bytes_per_s"]
            extra = f"  roofline {common.fmt_pct(floor_s / r['step_time_s'])}"
        print(f"{impl:5s} {r['name']}: {r['status']}  {common.fmt_num(r.get('tokens_per_s'), ' tok/s')}  "
              f"step {common.fmt_time(r.get('step_time_s'))}{extra}  compiles {r.get('compiles')}", flush=True)
    if args.result_file:
        common.write_json(args.result_file, {"environment": common.environment(), "results": results})


if __name__ == "__main__":
    main()
