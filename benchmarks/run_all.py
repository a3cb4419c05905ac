"""Every benchmark of a preset, one table, one JSON file.

    python benchmarks/run_all.py --preset tiny --out /tmp/bench.json     # CPU, under a minute
    python benchmarks/run_all.py --preset cpu --out /tmp/cpu.json       # SmolLM2-135M shape, float32, CPU
    python benchmarks/run_all.py --preset cpu --checkpoint DIR --dtype float32  # real weights
    python benchmarks/run_all.py --preset gpu --out $OUT/bench.json      # one H100, under 10 minutes
    python benchmarks/run_all.py --preset gpu-extra --out $OUT/extra.json  # 3B, remat, torch.compile
    python benchmarks/run_all.py --preset gpu-sweep --out $OUT/sweep.json  # largest batch, memory sweep

The table has one row per apo_jax configuration: tokens/s, step time (a train step, a decode
step, a scoring forward), MFU against the matmul ceiling measured in the same run (train and
scoring) or the share of the HBM roofline (decode), peak memory, the transformers reference's
tokens/s on the same device, shapes and batch, and the ratio apo_jax / reference.

GPU presets run every case in its own process (`--isolate yes`): a clean allocator gives a true
per-case peak, an OOM ends only its case, and JAX and PyTorch never share the card. Cases run
in priority order; once `--budget-s` is spent the rest are written as skipped, and the JSON is
rewritten after every case, so a run cut short still leaves its numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import bench_sampler, bench_train, common  # noqa: E402

PRESETS = ("tiny", "cpu", "gpu", "gpu-small", "gpu-extra", "gpu-sweep")
TARGETS = {"train_mfu": 0.55, "train_ratio": 1.5, "sample_ratio": 3.0, "sample_roofline": 0.60}
# Issue 18 on CPU (float32 both sides): at least PyTorch's tokens/s and at most its peak RSS for
# the train steps, at least 2x `generate` for best-of-S sampling.
CPU_TARGETS = {"train_ratio": 1.0, "sample_ratio": 2.0}


# --------------------------------------------------------------------------------------------
# Presets: ordered lists of cases. A case with "ref" is compared with the case of that id.


def _train_pair(pid: str, **kw: Any) -> list[dict[str, Any]]:
    jax_kw = {k: v for k, v in kw.items() if k != "torch_compile"}
    return [dict(id=pid, bench="train", impl="jax", ref=pid + ":ref", **jax_kw),
            dict(id=pid + ":ref", bench="train", impl="torch", **{**kw, "attention": "xla"})]


def _pair(pid: str, bench: str, **kw: Any) -> list[dict[str, Any]]:
    return [dict(id=pid, bench=bench, impl="jax", ref=pid + ":ref", **kw),
            dict(id=pid + ":ref", bench=bench, impl="torch", **{**kw, "attention": "xla"})]


def preset_cases(name: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(cases, settings) of a preset. On the GPU presets every apo_jax case also profiles one
    extra call and keeps the longest ops (`profile` in its result), so each number comes with
    what limits it."""
    cases, settings = _preset_cases(name)
    if name != "tiny":
        for c in cases:
            if c.get("impl") == "jax" and c["bench"] in ("train", "sample", "score"):
                c.setdefault("profile", True)
    return cases, settings


def _preset_cases(name: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    if name == "tiny":
        t = dict(model="tiny", ref_weights="identical", warmup=1, steps=3)
        cases = [dict(id="ceiling", bench="ceiling", matmul_n=256, copy_bytes=16 * 2**20)]
        cases += _train_pair("rm-64", task="rm", seq=64, batch=2, **t)
        cases += _train_pair("sft-64", task="sft", seq=64, batch=4, **t)
        cases += _pair("sample", "sample", model="tiny", batch=2, prompt_len=16, new_tokens=16, iters=2,
                       ref_weights="identical")
        cases += _pair("score", "score", model="tiny", batch=4, seq=64, iters=3, ref_weights="identical",
                       profile=True)
        return cases, dict(isolate=False, budget_s=300)
    if name == "cpu":
        # Issue 18's CPU comparison: the SmolLM2-135M shape in float32 on both sides (bf16 on a
        # CPU is slower than float32), the project's default remat ("auto"), each case in its own
        # process so the process's peak RSS is the case's own.
        # No profiled extra call: one SmolLM2-135M step takes 20-40 s on two cores.
        m = dict(model="smollm2_135m", dtype="float32", param_dtype="float32", ref_weights="identical",
                 profile=False)
        cases = [dict(id="ceiling", bench="ceiling", matmul_n=1024, copy_bytes=256 * 2**20)]
        cases += _train_pair("rm-256", task="rm", seq=256, batch=8, remat="auto", warmup=1, steps=3, **m)
        cases += _train_pair("sft-256", task="sft", seq=256, batch=8, remat="auto", warmup=1, steps=3, **m)
        cases += _pair("score", "score", batch=16, seq=256, iters=3, **m)
        cases += _pair("sample", "sample", batch=4, prompt_len=64, new_tokens=64, iters=3, **m)
        return cases, dict(isolate=True, budget_s=3600)
    # remat none is predicted to fit 1B at 16k tokens (>= 54-57 GiB of 76); an OOM is retried
    # with dots_no_batch (HF gradient checkpointing for the reference) and reported as such.
    g = dict(model="1b", attention="cudnn", remat="none", warmup=2, steps=8, oom_retry_remat="dots_no_batch")
    if name == "gpu":
        cases = [dict(id="ceiling", bench="ceiling", matmul_n=8192, copy_bytes=2**30)]
        cases += _train_pair("rm-1024", task="rm", seq=1024, batch=8, **g)
        cases += _pair("sample", "sample", model="1b", batch=64, prompt_len=256, new_tokens=256, iters=3,
                       attention="xla")
        cases.append(dict(id="sample-bf16", bench="sample", impl="jax", ref="sample:ref", model="1b", batch=64,
                          prompt_len=256, new_tokens=256, iters=3, param_dtype="bfloat16", attention="xla"))
        cases += _train_pair("sft-1024", task="sft", seq=1024, batch=16, **g)
        cases += _pair("score", "score", model="1b", batch=64, seq=512, iters=5, attention="cudnn")
        cases += _train_pair("rm-2048", task="rm", seq=2048, batch=4, **g)
        cases += _train_pair("sft-2048", task="sft", seq=2048, batch=8, **g)
        return cases, dict(isolate=True, budget_s=570)
    if name == "gpu-small":
        # configs/hh_small.py's steps at their largest bucket (SmolLM2-135M, bf16 compute, float32
        # master weights, cuDNN): the step costs a GPU time for the small real game is summed from.
        # Samples run to max_new_tokens (no EOS), so sampling is the upper bound.
        s = dict(model="smollm2_135m", attention="cudnn", remat="auto", warmup=2, steps=8)
        cases = [dict(id="ceiling", bench="ceiling", matmul_n=8192, copy_bytes=2**30)]
        cases += _train_pair("rm-512", task="rm", seq=512, batch=32, **s)
        cases += _train_pair("sft-512", task="sft", seq=512, batch=32, **s)
        cases += [dict(id="score", bench="score", impl="jax", model="smollm2_135m", batch=64, seq=512, iters=5,
                       attention="cudnn"),
                  dict(id="sample-train", bench="sample", impl="jax", model="smollm2_135m", batch=64, num_samples=4,
                       prompt_len=384, new_tokens=128, temperature=0.7, top_p=0.9, iters=3,
                       param_dtype="bfloat16", attention="xla"),
                  dict(id="sample-test", bench="sample", impl="jax", model="smollm2_135m", batch=64, num_samples=1,
                       prompt_len=384, new_tokens=192, temperature=0.3, top_k=5, top_p=0.85, iters=3,
                       param_dtype="bfloat16", attention="xla")]
        return cases, dict(isolate=True, budget_s=300)
    if name == "gpu-extra":
        cases = [dict(id="ceiling", bench="ceiling", matmul_n=8192, copy_bytes=2**30)]
        cases += _train_pair("rm-1024-compiled", task="rm", seq=1024, batch=8, torch_compile=True, **g)
        g3 = {**g, "model": "3b", "remat": "dots_no_batch", "oom_retry_remat": "full"}  # none: ~84 GiB
        cases += _train_pair("rm-3b-1024", task="rm", seq=1024, batch=4, **g3)
        # Both remat policies are compared with HF gradient checkpointing (HF has only whole layers).
        cases += _train_pair("rm-2048-full", task="rm", seq=2048, batch=4, **{**g, "remat": "full"})
        cases.append(dict(id="rm-2048-dots_no_batch", bench="train", impl="jax", ref="rm-2048-full:ref", task="rm",
                          seq=2048, batch=4, **{**g, "remat": "dots_no_batch"}))
        cases += _train_pair("sft-1024-compiled", task="sft", seq=1024, batch=16, torch_compile=True, **g)
        cases += _train_pair("sft-3b-1024", task="sft", seq=1024, batch=4, **g3)
        return cases, dict(isolate=True, budget_s=570)
    if name == "gpu-sweep":
        cases = [dict(id="ceiling", bench="ceiling", matmul_n=8192, copy_bytes=2**30)]
        cases += _pair("sample-256", "sample", model="1b", batch=256, prompt_len=256, new_tokens=256, iters=2,
                       param_dtype="bfloat16", attention="xla")
        cases.append(dict(id="sweep", bench="sweep", task="rm", seq=1024, batch=4, remat="full", attention="cudnn",
                          models=["1b", "3b", "7b_l18", "7b_l22", "7b"]))
        return cases, dict(isolate=True, budget_s=570)
    raise ValueError(f"unknown preset {name!r}; expected one of {PRESETS}")


# --------------------------------------------------------------------------------------------
# Running one case (in this process or a child).


def with_model(cases: list[dict[str, Any]], checkpoint: str | None, dtype: str | None) -> list[dict[str, Any]]:
    """The cases on a HF checkpoint's shape and weights and / or in another compute dtype (the
    reference follows: float32 compute means no autocast and float32 weights on its side)."""
    out = []
    for c in cases:
        c = dict(c)
        if c["bench"] in ("train", "sample", "score"):
            if checkpoint:
                c["checkpoint"] = checkpoint
            if dtype:
                c["dtype"] = dtype
        out.append(c)
    return out


def run_case(case: dict[str, Any], ceilings: dict[str, Any] | None = None) -> dict[str, Any]:
    bench = case["bench"]
    if bench == "ceiling":
        try:
            return {"bench": "ceiling", "name": "ceilings", "case": case, "status": "ok",
                    "matmul": common.measure_matmul_ceiling(case["matmul_n"]),
                    "copy": common.measure_copy_bandwidth(case["copy_bytes"]),
                    "environment": common.environment()}
        except Exception as exc:  # noqa: BLE001
            return {"bench": "ceiling", "name": "ceilings", "case": case, "status": f"error: {exc}",
                    "traceback": traceback.format_exc()[-3000:]}
    if bench == "train":
        return bench_train.run_case(_strip(case))
    if bench in ("sample", "score"):
        c = _strip(case)
        if bench == "sample" and ceilings and ceilings.get("copy"):
            c["copy_bytes_per_s"] = ceilings["copy"]["bytes_per_s"]
        return bench_sampler.run_case(c)
    if bench == "sweep":
        try:
            out = bench_train.sweep(case["task"], case["seq"], case["batch"], case["remat"], case["models"], None,
                                    case["attention"], case.get("param_dtype", "float32"), confirm=True)
            return {"bench": "sweep", "name": f"sweep {case['task']} seq{case['seq']} b{case['batch']} "
                    f"remat={case['remat']}", "case": case, "status": "ok", **out}
        except Exception as exc:  # noqa: BLE001
            return {"bench": "sweep", "name": "sweep", "case": case, "status": f"error: {exc}",
                    "traceback": traceback.format_exc()[-3000:]}
    raise ValueError(f"unknown bench {bench!r}")


def shrink(case: dict[str, Any]) -> dict[str, Any]:
    """The same case at CI size (tiny model, sequences / 16, small batches, no torch.compile), so
    a GPU preset's wiring (isolation, pairing, cuDNN fallback, the sweep) can be checked on CPU."""
    c = dict(case)
    small = {"model": "tiny", "steps": 2, "warmup": 1, "iters": 2, "torch_compile": False,
             "matmul_n": 256, "copy_bytes": 16 * 2**20}
    c.update({k: v for k, v in small.items() if k in c or k in ("model",)})
    if "seq" in c:
        c["seq"] = max(c["seq"] // 16, 16)
    if "batch" in c:
        c["batch"] = min(c["batch"], 2)
    for k in ("prompt_len", "new_tokens"):
        if k in c:
            c[k] = 16
    if c["bench"] == "sweep":
        c["models"] = ["tiny"]
    if c["bench"] == "ceiling":
        c.pop("model", None)
    return c


def _strip(case: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in case.items() if k not in ("id", "ref")}


def run_isolated(case: dict[str, Any], ceilings: dict[str, Any] | None, timeout: float) -> dict[str, Any]:
    """`run_case` in a fresh Python process; JAX gets 95% of the card, PyTorch children see no
    JAX accelerator (so neither framework holds memory the other needs)."""
    env = dict(os.environ)
    if case.get("impl") == "torch":
        env["JAX_PLATFORMS"] = "cpu"
    else:
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--case", json.dumps(case), "--result-file", out]
        if ceilings:
            cmd += ["--ceilings", json.dumps(ceilings)]
        try:
            proc = subprocess.run(cmd, env=env, timeout=timeout, capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            return {"bench": case["bench"], "name": case["id"], "case": case,
                    "status": f"timeout after {timeout:.0f} s"}
        if os.path.exists(out):
            with open(out) as f:
                return json.load(f)
        return {"bench": case["bench"], "name": case["id"], "case": case,
                "status": f"crashed (exit {proc.returncode})", "stderr": proc.stderr[-3000:]}


# --------------------------------------------------------------------------------------------
# The table.


def derive(result: dict[str, Any], ceilings: dict[str, Any] | None) -> dict[str, Any]:
    """Adds MFU (train, score) or roofline share (sample) from the measured ceilings."""
    if result.get("status") != "ok" or not ceilings:
        return result
    if result.get("flops_per_step") and ceilings.get("matmul"):
        result["mfu"] = result["flops_per_step"] / result["step_time_s"] / ceilings["matmul"]["flops_per_s"]
    if result.get("decode_floor_bytes") and ceilings.get("copy"):
        floor_s = result["decode_floor_bytes"]["total"] / ceilings["copy"]["bytes_per_s"]
        result["decode_floor_s"] = floor_s
        result["roofline"] = floor_s / result["step_time_s"]
    return result


def table_rows(results: dict[str, dict[str, Any]]) -> list[dict[str, str]]:
    rows = []
    for cid, r in results.items():
        case = r.get("case", {})
        if r.get("bench") == "sweep":
            largest = r.get("largest_fitting")
            est = next((m["estimate_bytes"] for m in r.get("models", []) if m["model"] == largest), None)
            rows.append({"config": f"{r['name']}: largest fitting = {largest}", "peak memory":
                         common.fmt_bytes(est) + " (estimate)", "status": r.get("status", "-")})
            continue
        if r.get("bench") == "ceiling" or case.get("impl") == "torch":
            continue
        ref = results.get(case.get("ref") or "", {})
        ok = r.get("status") == "ok"
        ref_ok = ref.get("status") == "ok"
        eff = "-"
        if r.get("mfu") is not None:
            eff = f"MFU {common.fmt_pct(r['mfu'])}"
        elif r.get("roofline") is not None:
            eff = f"roofline {common.fmt_pct(r['roofline'])}"
        ratio = r["tokens_per_s"] / ref["tokens_per_s"] if ok and ref_ok else None
        r["ratio"] = ratio
        rows.append({
            "config": r.get("name", cid),
            "tokens/s": common.fmt_num(r.get("tokens_per_s")) if ok else "-",
            "step time": common.fmt_time(r.get("step_time_s")) if ok else "-",
            "calls min / median": _timing_cell(r) if ok else "-",
            "reference min / median": _timing_cell(ref) if ref_ok else "-",
            "load": _load_cell(r, ref),
            "MFU / roofline": eff,
            "peak memory": _peak_cell(r) if ok else "-",
            "reference tokens/s": (common.fmt_num(ref.get("tokens_per_s")) if ref_ok
                                   else str(ref.get("status", "-"))[:40]),
            "ratio": f"{ratio:.2f}x" if ratio is not None else "-",
            "reference peak": _peak_cell(ref) if ref_ok else "-",
            "status": _status(r) + (f"; reference {_status(ref)}" if ref.get("oom_at_remat") else ""),
        })
    return rows


def _timing_cell(r: dict[str, Any]) -> str:
    """Min / median of the timed calls (a train or scoring step; a whole best-of-S call)."""
    t = r.get("timing") or {}
    if "min_s" not in t:
        return "-"
    return f"{common.fmt_time(t['min_s'])} / {common.fmt_time(t['median_s'])} (n={t['iters']})"


def _load_cell(*rs: dict[str, Any]) -> str:
    """The 1-minute load average before -> after each of the cases (apo_jax, then its reference)."""
    cells = []
    for r in rs:
        la = r.get("load_average") or {}
        if la.get("before") is not None and la.get("after") is not None:
            cells.append(f"{la['before']:.1f}->{la['after']:.1f}")
    return ", ".join(cells) or "-"


def _peak_cell(r: dict[str, Any]) -> str:
    """Peak memory: the allocator's (GPU), or XLA's buffer-assignment estimate (`*`) and / or the
    process's peak RSS (CPU; the case's own when run isolated)."""
    source = r.get("peak_source") or ""
    if source.startswith("memory_analysis"):
        cell = common.fmt_bytes(r.get("peak_bytes")) + "*"
        if r.get("rss_peak_bytes"):
            cell += f" / RSS {common.fmt_bytes(r['rss_peak_bytes'])}"
        return cell
    if source.startswith("process RSS"):
        return f"RSS {common.fmt_bytes(r.get('peak_bytes'))}"
    return common.fmt_bytes(r.get("peak_bytes"))


def _status(r: dict[str, Any]) -> str:
    """The case's status plus what it had to fall back on (an OOM retried lighter, cuDNN refused)."""
    s = str(r.get("status", "-"))[:60]
    if r.get("oom_at_remat"):
        s += f" (OOM at remat={r['oom_at_remat']})"
    if r.get("cudnn_error"):
        s += " (cuDNN failed: XLA attention)"
    return s


def targets(results: dict[str, dict[str, Any]], backend: str | None = None) -> list[str]:
    """One line per measured target (issue 9 on GPU, issue 18 on CPU): met or missed, with the numbers."""
    if backend == "cpu":
        return _cpu_targets(results)
    lines = []
    for r in results.values():
        case = r.get("case", {})
        if r.get("status") != "ok" or case.get("impl") != "jax":
            continue
        if r["bench"] == "train" and r.get("mfu") is not None:
            ok = r["mfu"] >= TARGETS["train_mfu"] and (r.get("ratio") or 0) >= TARGETS["train_ratio"]
            lines.append(f"{'MET ' if ok else 'MISS'} {r['name']}: MFU {common.fmt_pct(r['mfu'])} (>= 55%), "
                         f"ratio {r.get('ratio') or 0:.2f}x (>= 1.5x)")
        if r["bench"] == "sample" and r.get("roofline") is not None:
            ok = r["roofline"] >= TARGETS["sample_roofline"] and (r.get("ratio") or 0) >= TARGETS["sample_ratio"]
            lines.append(f"{'MET ' if ok else 'MISS'} {r['name']}: roofline {common.fmt_pct(r['roofline'])} "
                         f"(>= 60%), ratio {r.get('ratio') or 0:.2f}x (>= 3x)")
    return lines


def _cpu_targets(results: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    for r in results.values():
        case = r.get("case", {})
        ref = results.get(case.get("ref") or "", {})
        if r.get("status") != "ok" or case.get("impl") != "jax" or ref.get("status") != "ok":
            continue
        ratio = r.get("ratio") or 0.0
        if r["bench"] == "train":
            mine, theirs = r.get("rss_peak_bytes"), ref.get("rss_peak_bytes")
            leaner = mine is not None and theirs is not None and mine <= theirs
            ok = ratio >= CPU_TARGETS["train_ratio"] and leaner
            lines.append(f"{'MET ' if ok else 'MISS'} {r['name']}: ratio {ratio:.2f}x (>= 1.0x), peak RSS "
                         f"{common.fmt_bytes(mine)} vs PyTorch {common.fmt_bytes(theirs)} (<=)")
        if r["bench"] == "sample":
            ok = ratio >= CPU_TARGETS["sample_ratio"]
            lines.append(f"{'MET ' if ok else 'MISS'} {r['name']}: ratio {ratio:.2f}x (>= 2x)")
    return lines


def run_preset(preset: str, out: str | None, *, isolate: bool | None = None, budget_s: float | None = None,
               only: list[str] | None = None, quiet: bool = False, shrink_cases: bool = False,
               checkpoint: str | None = None, dtype: str | None = None) -> dict[str, Any]:
    cases, settings = preset_cases(preset)
    cases = with_model(cases, checkpoint, dtype)
    if shrink_cases:
        cases = [shrink(c) for c in cases]
    if only:
        cases = [c for c in cases if c["id"] == "ceiling" or any(c["id"].startswith(o) for o in only)]
    isolate = settings["isolate"] if isolate is None else isolate
    budget = settings["budget_s"] if budget_s is None else budget_s
    t0 = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    ceilings = None
    payload: dict[str, Any] = {"preset": preset + (" (shrunk)" if shrink_cases else ""), "isolated": isolate,
                               "budget_s": budget,
                               "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
                               "formulas": {"train_flops": "6 * N * tokens + 6 * L * seq * H * Dh * tokens",
                                            "forward_flops": "2 * N * tokens + 2 * L * seq * H * Dh * tokens",
                                            "N": "layer matrices (+ LM head for SFT); embedding excluded",
                                            "decode_floor_bytes": "matmul weights (stored dtype) + valid KV "
                                                                  "cache (bf16), per step",
                                            "roofline": "decode_floor_bytes / copy bandwidth / decode step time",
                                            "mfu": "model FLOPs / step time / measured bf16 matmul FLOP/s"}}
    for case in cases:
        elapsed = time.perf_counter() - t0
        remaining = budget - elapsed
        if remaining < 20:
            results[case["id"]] = {"bench": case["bench"], "name": case["id"], "case": case,
                                   "status": f"skipped (time budget {budget:.0f} s spent)"}
            continue
        if not quiet:
            print(f"[{elapsed:6.1f} s] {case['id']} ({case.get('impl', '')})", flush=True)
        load_before = common.load_average()
        r = run_isolated(case, ceilings, remaining) if isolate else run_case(case, ceilings)
        r.setdefault("case", case)
        r["load_average"] = {"before": load_before, "after": common.load_average()}
        r["case"] = {**r["case"], "id": case["id"], "ref": case.get("ref")}
        r["elapsed_s"] = time.perf_counter() - t0 - elapsed
        if case["bench"] == "ceiling" and r.get("status") == "ok":
            ceilings = {"matmul": r["matmul"], "copy": r["copy"]}
            payload["environment"] = r["environment"]
        results[case["id"]] = derive(r, ceilings)
        _summarize(payload, results, ceilings, t0)
        if out:
            common.write_json(out, payload)
    if "environment" not in payload and not isolate:
        payload["environment"] = common.environment()
    _summarize(payload, results, ceilings, t0)
    if out:
        common.write_json(out, payload)
    if not quiet:
        print_report(payload)
    return payload


def _summarize(payload: dict[str, Any], results: dict[str, Any], ceilings: Any, t0: float) -> None:
    payload["ceilings"] = ceilings
    payload["results"] = results
    payload["table"] = table_rows(results)  # also sets each row's "ratio", which targets() reads
    payload["targets"] = targets(results, (payload.get("environment") or {}).get("backend"))
    payload["elapsed_s"] = time.perf_counter() - t0


def print_report(payload: dict[str, Any]) -> None:
    env = payload.get("environment", {})
    ceil = payload.get("ceilings") or {}
    print()
    print(f"device: {env.get('device_kind', '?')} ({env.get('backend', '?')}; host CPU "
          f"{env.get('cpu_model') or '?'} x {env.get('cpu_count', '?')}), jax {env.get('jax', '?')}, "
          f"torch {env.get('torch', '?')} on {env.get('torch_device', 'cpu')}, {env.get('date', '')}")
    if ceil:
        print(f"measured ceilings: bf16 matmul {common.fmt_num(ceil['matmul']['flops_per_s'], 'FLOP/s')} "
              f"(n={ceil['matmul']['n']}), copy {common.fmt_num(ceil['copy']['bytes_per_s'], 'B/s')} (read + write)")
    print(f"preset {payload['preset']}, {payload['elapsed_s']:.0f} s; * = peak from XLA memory_analysis "
          "(no allocator stats on this backend)")
    print("\n".join(common.table_lines(payload["table"])))
    for line in payload["targets"]:
        print(line)
    for r in payload["results"].values():
        prof = r.get("profile") or {}
        if prof.get("top"):
            ops = ", ".join(f"{o['op'][:40]} {100 * o['share']:.0f}%" for o in prof["top"][:4])
            idle = prof.get("idle_ms", 0.0)
            print(f"profile {r['name']}: {prof['total_ms']:.3g} ms with an op running (+{idle:.3g} ms without) "
                  f"on {prof['source']}: {ops}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", choices=PRESETS)
    p.add_argument("--out", help="JSON file to write (rewritten after every case)")
    p.add_argument("--isolate", choices=("auto", "yes", "no"), default="auto",
                   help="one process per case (auto: yes for the GPU presets)")
    p.add_argument("--budget-s", type=float, help="stop starting cases after this many seconds")
    p.add_argument("--only", help="comma-separated case id prefixes (the ceiling always runs)")
    p.add_argument("--shrink", action="store_true", help="run the preset's cases at CI size (checks wiring on CPU)")
    p.add_argument("--checkpoint", help="run every case on this HF LLaMA checkpoint's shape and weights")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype of every case (both sides)")
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--ceilings", help=argparse.SUPPRESS)
    p.add_argument("--result-file", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.case:  # a child of run_isolated
        result = run_case(json.loads(args.case), json.loads(args.ceilings) if args.ceilings else None)
        common.write_json(args.result_file, result)
        return
    isolate = None if args.isolate == "auto" else args.isolate == "yes"
    run_preset(args.preset, args.out, isolate=isolate, budget_s=args.budget_s,
               only=args.only.split(",") if args.only else None, shrink_cases=args.shrink,
               checkpoint=args.checkpoint, dtype=args.dtype)


if __name__ == "__main__":
    main()
