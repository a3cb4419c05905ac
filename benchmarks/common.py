"""Shared pieces of the benchmarks: model shapes, FLOP and byte counts, timing, the device's
measured ceilings, peak memory, the transformers reference models, and the result table.

Units everywhere: seconds, bytes, FLOPs; rates in tokens/s, FLOP/s and bytes/s.

FLOP convention (what "MFU" means in every table here):
- N is the number of parameters that take part in a matmul for every token: all layer matrices,
  plus the LM head where logits are computed (SFT); the embedding table is a gather and is left
  out, so is the [D, 1] reward head read at one token.
- Causal attention, forward, per token: QK^T and PV are 2 FLOPs per multiply-add over seq/2 keys
  on average, so 2 * L * seq * H * Dh.
- Training = 6 * N * tokens + 3 * attention forward; forward only = 2 * N * tokens + attention
  forward. An RM step counts chosen and rejected sequences (2 * pairs * seq tokens).
- Recomputation under remat is not counted (it is overhead, not model FLOPs).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from apo_jax import models, sharding  # noqa: E402

# --------------------------------------------------------------------------------------------
# Model shapes.

MODEL_SHAPES: dict[str, dict[str, Any]] = {
    # CI-sized: runs on a laptop CPU in seconds.
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
    # SmolLM2-135M's shape (HuggingFaceTB/SmolLM2-135M config.json): 1.35e8 parameters, tied.
    "smollm2_135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                         rope_theta=100000.0),
    # TinyLlama-1.1B's shape: 1.10e9 parameters.
    "1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
               num_attention_heads=32, num_key_value_heads=4),
    # Llama-3.2-3B's shape with a 32k vocabulary: 3.01e9 parameters.
    "3b": dict(vocab_size=32000, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
               num_attention_heads=24, num_key_value_heads=8),
    # Llama-2-7B's width at 18 and 22 layers (3.9e9, 4.7e9) and in full (6.7e9): the memory sweep.
    "7b_l18": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=18,
                   num_attention_heads=32, num_key_value_heads=32),
    "7b_l22": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=22,
                   num_attention_heads=32, num_key_value_heads=32),
    "7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32),
}

PAD_ID = 0
FIRST_TOKEN = 3  # random ids avoid pad (0), BOS (1) and EOS (2)


def model_config(
    name: str,
    *,
    dtype: str = "bfloat16",
    param_dtype: str = "float32",
    remat: str = "none",
    attention: str = "xla",
    scan_layers: bool = True,
) -> models.ModelConfig:
    """A ModelConfig of preset `name` with the given run-time settings (pad id 0)."""
    return models.ModelConfig(**MODEL_SHAPES[name], max_position_embeddings=4096, pad_token_id=PAD_ID,
                              dtype=dtype, param_dtype=param_dtype, remat_policy=remat,
                              attention_impl=attention, scan_layers=scan_layers)


def single_device_mesh() -> jax.sharding.Mesh:
    """A 1x1x1 mesh on the first device: every benchmark here is one device."""
    return sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])


_PARAMS_CACHE: dict[Any, Any] = {}
REWARD_HEAD_STD = 0.1  # a non-zero head, so an RM's first loss is not log(2) on every side


def init_params(cfg: models.ModelConfig, seed: int, *, lm_head: bool, reward_head: bool) -> dict[str, Any]:
    """Random params with the heads asked for. One jitted init makes both heads; on CPU the
    result is kept per (shape, dtype, seed), so the cases of one preset share one init compile."""
    key = (tuple(sorted(common_shape(cfg).items())), cfg.param_dtype, seed)
    full = _PARAMS_CACHE.get(key)
    if full is None:
        fn = lambda r: models.init_params(cfg, r, lm_head=True, reward_head=True,  # noqa: E731
                                          reward_head_std=REWARD_HEAD_STD)
        full = jax.jit(fn)(jax.random.PRNGKey(seed))
        if jax.devices()[0].platform == "cpu":
            _PARAMS_CACHE[key] = full
    out = {"model": full["model"]}
    if lm_head and "lm_head" in full:
        out["lm_head"] = full["lm_head"]
    if reward_head:
        out["score"] = full["score"]
    return out


def case_config(c: dict[str, Any], *, remat: str = "none", attention: str = "xla") -> models.ModelConfig:
    """A case's model: the preset shape `c["model"]`, or with `c["checkpoint"]` (a HF LLaMA
    directory or hub id) that checkpoint's config.json; with the case's `dtype` (compute) and
    `param_dtype`. The pad id is 0 either way (random ids never use it; HF's sequence classifier
    needs one to find the last token)."""
    runtime = dict(dtype=c.get("dtype", "bfloat16"), param_dtype=c.get("param_dtype", "float32"),
                   remat_policy=remat, attention_impl=attention, scan_layers=c.get("scan_layers", True))
    if not c.get("checkpoint"):
        return model_config(c["model"], remat=remat, attention=attention, dtype=runtime["dtype"],
                            param_dtype=runtime["param_dtype"], scan_layers=runtime["scan_layers"])
    from apo_jax.io import hf

    hf_config = hf.read_config(hf.resolve_checkpoint_dir(c["checkpoint"]))
    return models.ModelConfig.from_hf(hf_config, **runtime).replace(pad_token_id=PAD_ID)


def case_params(cfg: models.ModelConfig, c: dict[str, Any], *, lm_head: bool, reward_head: bool) -> dict[str, Any]:
    """A case's params: random (`init_params`) or the checkpoint's weights, with the heads asked
    for (a reward head the checkpoint lacks is drawn with std REWARD_HEAD_STD)."""
    seed = c.get("seed", 0)
    if not c.get("checkpoint"):
        return init_params(cfg, seed, lm_head=lm_head, reward_head=reward_head)
    from apo_jax.io import hf

    _, full = hf.load_pretrained(c["checkpoint"], param_dtype=cfg.param_dtype, dtype=cfg.dtype)
    out = {"model": full["model"]}
    if lm_head and "lm_head" in full:
        out["lm_head"] = full["lm_head"]
    if reward_head:
        out["score"] = full.get("score") or {
            "kernel": models.new_reward_head(cfg, jax.random.PRNGKey(seed), REWARD_HEAD_STD)}
    return out


def model_label(c: dict[str, Any]) -> str:
    """The model's name in a table row: the preset name or the checkpoint's base name."""
    ckpt = c.get("checkpoint")
    return os.path.basename(os.path.normpath(ckpt)) if ckpt else c["model"]


def rss_bytes() -> dict[str, int | None]:
    """This process's resident memory now and its peak so far (Linux /proc VmRSS / VmHWM). On
    CPU both frameworks allocate from host memory: the peak of a case run in its own process
    (`run_all --isolate yes`) is that case's peak, buffers, allocator and runtime included."""
    out: dict[str, int | None] = {"rss": None, "peak_rss": None}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key = "rss" if line.startswith("VmRSS") else "peak_rss"
                    out[key] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def common_shape(cfg: models.ModelConfig) -> dict[str, Any]:
    return {k: getattr(cfg, k) for k in (*MODEL_SHAPES["tiny"], "tie_word_embeddings", "rope_theta")}


# --------------------------------------------------------------------------------------------
# The project's train step and scoring function: the one place the benchmarks build them.


def make_train_step(cfg: models.ModelConfig, task: str, opt_cfg: Any, mesh: jax.sharding.Mesh,
                    *, grad_accum: int = 1) -> Any:
    """`(state, batch) -> (state, metrics)`: the RM ("rm": BT ranking) or SFT ("sft") step that
    the loop runs, built by `train.make_train_step` from the registered objective."""
    from apo_jax.training import objectives, train

    objective = objectives.get("ranking" if task == "rm" else "sft")
    return train.make_train_step(cfg, objective, opt_cfg, mesh, grad_accum=grad_accum)


def make_score_fn(cfg: models.ModelConfig, mesh: jax.sharding.Mesh) -> Any:
    """The jitted `(params, ids, mask) -> rewards [B]` the scoring phases use."""
    from apo_jax.inference import scoring

    return scoring.make_reward_fn(cfg, mesh)


def random_ids(seed: int, batch: int, length: int, vocab: int) -> np.ndarray:
    """int32 [batch, length] ids in [FIRST_TOKEN, vocab); never zeros (METHOD.md)."""
    return np.random.RandomState(seed).randint(FIRST_TOKEN, vocab, size=(batch, length)).astype(np.int32)


# --------------------------------------------------------------------------------------------
# FLOP and byte counts.


def matmul_params(cfg: models.ModelConfig, *, lm_head: bool) -> int:
    """Parameters multiplied by every token (layer matrices, plus the LM head if `lm_head`)."""
    d, f, n, k, h = (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
                     cfg.num_key_value_heads, cfg.head_dim)
    per_layer = d * n * h + 2 * d * k * h + n * h * d + 3 * d * f
    return cfg.num_hidden_layers * per_layer + (d * cfg.vocab_size if lm_head else 0)


def total_params(cfg: models.ModelConfig, *, lm_head: bool, reward_head: bool) -> int:
    """Every stored parameter (embedding, norms and heads included)."""
    d = cfg.hidden_size
    norms = (2 * cfg.num_hidden_layers + 1) * d
    return (matmul_params(cfg, lm_head=lm_head) + cfg.vocab_size * d + norms + (d if reward_head else 0))


def attention_flops_fwd_per_token(cfg: models.ModelConfig, seq: int) -> float:
    """Causal attention forward FLOPs per token at sequence length `seq` (see module docstring)."""
    return 2.0 * cfg.num_hidden_layers * seq * cfg.num_attention_heads * cfg.head_dim


def train_flops(cfg: models.ModelConfig, tokens: int, seq: int, *, lm_head: bool) -> float:
    """Model FLOPs of one training step over `tokens` tokens of sequences of length `seq`."""
    n = matmul_params(cfg, lm_head=lm_head)
    return 6.0 * n * tokens + 3.0 * attention_flops_fwd_per_token(cfg, seq) * tokens


def forward_flops(cfg: models.ModelConfig, tokens: int, seq: int, *, lm_head: bool) -> float:
    """Model FLOPs of one forward pass over `tokens` tokens of sequences of length `seq`."""
    n = matmul_params(cfg, lm_head=lm_head)
    return 2.0 * n * tokens + attention_flops_fwd_per_token(cfg, seq) * tokens


def decode_bytes_per_step(cfg: models.ModelConfig, rows: int, kv_len: float, *, kv_bytes: int = 2) -> dict[str, float]:
    """The fewest bytes one decode step must read: every matmul weight (layers and LM head, in
    the stored dtype) once, plus the valid KV cache (`kv_len` slots per row, all layers)."""
    w = jnp.dtype(cfg.weight_dtype).itemsize * matmul_params(cfg, lm_head=True)
    kv = rows * kv_len * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * kv_bytes
    return {"param_bytes": float(w), "kv_bytes": float(kv), "total": float(w + kv)}


# --------------------------------------------------------------------------------------------
# Timing.


@dataclasses.dataclass
class Timing:
    """Per-call seconds over `iters` samples (each sample = `inner` calls, then one sync)."""

    median_s: float
    min_s: float
    max_s: float
    iters: int
    inner: int
    first_s: float
    """The first warm-up call (compilation included)."""

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def jax_sync(x: Any) -> None:
    jax.block_until_ready(x)


def time_calls(call: Callable[[], Any], sync: Callable[[Any], None], *, warmup: int, iters: int,
               inner: int = 1) -> Timing:
    """Median wall time per call. Device work is asynchronous: each sample runs `inner` calls and
    then waits for the last one (`sync`), so host time never stands in for device time."""
    first = None
    for i in range(warmup):
        t0 = time.perf_counter()
        sync(call())
        if i == 0:
            first = time.perf_counter() - t0
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        out = None
        for _ in range(inner):
            out = call()
        sync(out)
        samples.append((time.perf_counter() - t0) / inner)
    first = samples[0] * inner if first is None else first
    return Timing(statistics.median(samples), min(samples), max(samples), iters, inner, float(first))


# --------------------------------------------------------------------------------------------
# Compile counting: every XLA backend compile in this process, from jax.monitoring.

_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_COMPILES = {"n": 0, "registered": False}


def _on_duration(event: str, duration: float, **kwargs: Any) -> None:
    del duration, kwargs
    if event == _BACKEND_COMPILE_EVENT:
        _COMPILES["n"] += 1


def backend_compiles() -> int:
    """XLA compiles so far in this process (a cached executable is not counted)."""
    if not _COMPILES["registered"]:
        jax.monitoring.register_event_duration_secs_listener(_on_duration)
        _COMPILES["registered"] = True
    return _COMPILES["n"]


backend_compiles()  # register at import, before anything compiles


def guarded_transfers(call: Callable[[], Any], steps: int = 1) -> dict[str, str]:
    """Runs `call` `steps` times under each transfer guard: "none", or the first violation.
    device_to_host = a host sync (the host waits for a value); host_to_device = a host array
    copied in per call. Waiting for the result (block_until_ready) is neither."""
    out = {}
    for direction, guard in (("device_to_host", jax.transfer_guard_device_to_host),
                             ("host_to_device", jax.transfer_guard_host_to_device)):
        try:
            with guard("disallow"):
                result = None
                for _ in range(steps):
                    result = call()
                jax_sync(result)
            out[direction] = "none"
        except Exception as exc:  # noqa: BLE001 - a violation is a finding, not a crash
            out[direction] = "found: " + str(exc).splitlines()[0][:200]
            jax_sync(call())
    return out


_RUNTIME_EVENTS = ("$", "end: ", "ThunkExecutor", "ThreadpoolListener", "PjitFunction", "PjRt", "Pjrt",
                   "CommonPjRt", "AllocateOutputBuffers", "Handle inputs", "ParseArguments", "PythonRefManager",
                   "SlinkyThreadPool")


def attribute_op_time(events: list[dict[str, Any]]) -> dict[str, Any]:
    """Wall time per op from trace events ({"name", "ts", "dur", "tid"}, microseconds), each instant
    shared equally by the ops running then, so the ops' times add up to the busy wall time.

    XLA:CPU runs independent thunks concurrently (summed durations overcount a 2-core step by
    ~1.5x), and a control-flow thunk (`while`, `conditional`) spans the ops it runs: an event that
    contains another op event of its thread is such a container and is left out. Returns
    {"ops": {name: us}, "busy_us", "idle_us" (no op running between the first start and last end)}.
    """
    # By start, a container before the ops it holds (the longer first on equal starts).
    ops = sorted(((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0)), e.get("tid"), str(e["name"]))
                  for e in events if not str(e["name"]).startswith(_RUNTIME_EVENTS)), key=lambda o: (o[0], -o[1]))
    containers = set()
    open_by_tid: dict[Any, list[tuple[float, int]]] = {}
    for i, (start, end, tid, _) in enumerate(ops):
        stack = open_by_tid.setdefault(tid, [])
        while stack and stack[-1][0] <= start:
            stack.pop()
        if stack and end <= stack[-1][0]:
            containers.add(stack[-1][1])
        stack.append((end, i))
    kept = [op for i, op in enumerate(ops) if i not in containers and op[1] > op[0]]
    edges = sorted([(s, 1, n) for s, _, _, n in kept] + [(e, -1, n) for _, e, _, n in kept], key=lambda x: (x[0], x[1]))
    running: dict[str, int] = {}
    totals: dict[str, float] = {}
    busy = idle = 0.0
    last = None
    for t, delta, name in edges:
        if last is not None and t > last:
            width = sum(running.values())
            if width:
                busy += t - last
                for n, k in running.items():
                    totals[n] = totals.get(n, 0.0) + (t - last) * k / width
            else:
                idle += t - last
        last = t
        running[name] = running.get(name, 0) + delta
        if not running[name]:
            del running[name]
    return {"ops": totals, "busy_us": busy, "idle_us": idle}


def op_kind(name: str) -> str:
    """An HLO op's kind: its name without the ".N" XLA appends (`ynn_fusion.43` -> `ynn_fusion`)."""
    head, _, tail = name.rpartition(".")
    return head if head and tail.isdigit() else name


def profile_top_ops(call: Callable[[], Any], sync: Callable[[Any], None], *, top: int = 12) -> dict[str, Any]:
    """One call under `jax.profiler.trace`: wall time per op (`attribute_op_time`), longest first,
    and the same summed by op kind.

    On a GPU the device's "XLA Ops" line is used (HLO ops: fusions, cuBLAS/cuDNN custom calls),
    else its stream lines (kernels); without a device line (CPU) the host's threads, runtime
    events left out. "idle_ms" is time inside the call with no op running (host work, waits). A
    failure is returned as {"error": ...}: profiling must never cost the benchmark its numbers."""
    import glob
    import gzip

    try:
        with tempfile.TemporaryDirectory() as tmp:
            with jax.profiler.trace(tmp):
                sync(call())
            files = glob.glob(os.path.join(tmp, "**", "*.trace.json.gz"), recursive=True)
            if not files:
                return {"error": "no trace.json.gz written"}
            with gzip.open(files[0]) as f:
                events = json.load(f)["traceEvents"]
        procs = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
        threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
                   if e.get("ph") == "M" and e.get("name") == "thread_name"}
        device = [pid for pid, name in procs.items() if "/device:" in name]
        pids = device[:1] or list(procs)
        lines = {k: v for k, v in threads.items() if k[0] in pids}
        chosen = ([k for k, v in lines.items() if v == "XLA Ops"]
                  or [k for k, v in lines.items() if v.startswith("Stream")] or list(lines))
        spans = [e for e in events if e.get("ph") == "X" and (e.get("pid"), e.get("tid")) in chosen]
        attributed = attribute_op_time(spans)
        total = attributed["busy_us"]
        kinds: dict[str, float] = {}
        for name, us in attributed["ops"].items():
            kinds[op_kind(name)] = kinds.get(op_kind(name), 0.0) + us

        def ranked(d: dict[str, float]) -> list[dict[str, Any]]:
            return [{"op": n, "ms": us / 1e3, "share": us / total if total else 0.0}
                    for n, us in sorted(d.items(), key=lambda kv: -kv[1])[:top]]

        return {"source": procs.get(pids[0], "?") if pids else "?", "lines": sorted({lines[k] for k in chosen}),
                "total_ms": total / 1e3, "idle_ms": attributed["idle_us"] / 1e3,
                "top": ranked(attributed["ops"]), "by_kind": ranked(kinds)}
    except Exception as exc:  # noqa: BLE001
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}


# --------------------------------------------------------------------------------------------
# Ceilings, measured on the device in the same run.


def measure_matmul_ceiling(n: int, *, iters: int = 10, inner: int = 10, sets: int = 3) -> dict[str, float]:
    """bf16 [n, n] @ [n, n] (float32 accumulation) FLOP/s, rotating over `sets` random input
    pairs so repeated calls are not served from cache."""
    keys = jax.random.split(jax.random.PRNGKey(0), 2 * sets)
    xs = [jax.random.normal(k, (n, n), jnp.bfloat16) for k in keys]
    mm = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
    counter = {"i": 0}

    def call():
        i = counter["i"] % sets
        counter["i"] += 1
        return mm(xs[2 * i], xs[2 * i + 1])

    t = time_calls(call, jax_sync, warmup=3, iters=iters, inner=inner)
    return {"n": n, "flops_per_s": 2.0 * n**3 / t.median_s, "time_s": t.median_s}


def measure_copy_bandwidth(nbytes: int, *, iters: int = 10, inner: int = 10) -> dict[str, float]:
    """Device copy bandwidth: x = x + 1 over a float32 array of `nbytes`, counting bytes read
    plus bytes written (2 * nbytes), as ANCHORS.md's ~3.0 TB/s does.

    The array is donated, so each call writes the buffer it reads. Without donation every call
    writes a freshly allocated output: on a GPU the allocator hands back the same memory, but on a
    CPU a buffer this size is a fresh mmap whose page faults (the kernel zeroing each page) then
    set the rate: 7.4 GB/s against 48 GB/s in place on a 2-vCPU Xeon, a floor 6x too high for
    the decode roofline."""
    holder = {"x": jax.random.normal(jax.random.PRNGKey(1), (nbytes // 4,), jnp.float32)}
    add = jax.jit(lambda a: a + 1.0, donate_argnums=0)

    def call():
        holder["x"] = add(holder["x"])
        return holder["x"]

    t = time_calls(call, jax_sync, warmup=3, iters=iters, inner=inner)
    return {"nbytes": nbytes, "bytes_per_s": 2.0 * nbytes / t.median_s, "time_s": t.median_s}


# --------------------------------------------------------------------------------------------
# Memory and compiled-program statistics.


def device_memory_stats() -> dict[str, int] | None:
    """The first device's allocator statistics (GPU/TPU); None on CPU."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - backends without allocator stats
        return None
    return dict(stats) if stats else None


def device_peak_bytes() -> int | None:
    """Peak bytes in use on the first device since the process started (None on CPU)."""
    stats = device_memory_stats()
    return None if stats is None else stats.get("peak_bytes_in_use")


def device_bytes_limit() -> int | None:
    stats = device_memory_stats()
    return None if stats is None else stats.get("bytes_limit")


def compiled_memory(compiled: Any) -> dict[str, int]:
    """XLA's buffer assignment for a compiled program: inputs, outputs, donated (aliased) bytes,
    temporaries, and the peak those imply (inputs + outputs - aliased + temporaries)."""
    m = compiled.memory_analysis()
    out = {
        "argument": int(m.argument_size_in_bytes),
        "output": int(m.output_size_in_bytes),
        "alias": int(m.alias_size_in_bytes),
        "temp": int(m.temp_size_in_bytes),
    }
    out["peak_estimate"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def compiled_cost(compiled: Any) -> dict[str, float]:
    """XLA's cost analysis (FLOPs, bytes accessed). A `scan`/`while` body is counted ONCE, not
    once per iteration: compare with analytical counts only on unrolled programs."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    cost = cost or {}
    return {"flops": float(cost.get("flops", 0.0)), "bytes_accessed": float(cost.get("bytes accessed", 0.0))}


def is_oom(exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc}".lower()
    return "resource_exhausted" in text or "out of memory" in text or "outofmemory" in text


# --------------------------------------------------------------------------------------------
# The transformers reference (torch is imported only when a reference runs).


def torch_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_sync(_: Any = None) -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def torch_reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def torch_peak_bytes() -> int | None:
    import torch

    return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None


def hf_model(cfg: models.ModelConfig, *, reward: bool, params: Any = None, dtype: str = "float32",
             device: str | None = None):
    """The same LLaMA as a `transformers` model with sdpa attention, on `device`.

    With `params`, the weights are apo_jax's, written by `hf.save_pretrained` and read by
    `from_pretrained` (the identical model); without, transformers' own random init (speed does
    not depend on the values). `reward` gives LlamaForSequenceClassification(num_labels=1).
    """
    import torch
    import transformers

    device = device or torch_device()
    tdtype = getattr(torch, dtype)
    cls = transformers.LlamaForSequenceClassification if reward else transformers.LlamaForCausalLM
    if params is not None:
        from apo_jax.io import hf

        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model")
            hf.save_pretrained(path, cfg, params)
            model = cls.from_pretrained(path, attn_implementation="sdpa", dtype=tdtype)
        return model.to(device)
    hf_cfg = cfg.to_hf()
    if reward:
        hf_cfg.update(num_labels=1)
    config = transformers.LlamaConfig.from_dict(hf_cfg)
    with torch.device(device):
        model = cls._from_config(config, attn_implementation="sdpa", dtype=tdtype)
    return model


# --------------------------------------------------------------------------------------------
# Environment, tables and JSON.


def cpu_model() -> str | None:
    """The host CPU's model name (Linux /proc/cpuinfo; None elsewhere): CPU numbers differ by 2x
    between the machines this project runs on, so every result names its CPU."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def load_average() -> float | None:
    """The host's 1-minute load average (None where the OS has none): on a shared CPU it says
    whether a case ran alone (about its own thread count) or beside other work."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def environment() -> dict[str, Any]:
    dev = jax.devices()[0]
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": dev.platform,
        "device_kind": dev.device_kind,
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "load_average": load_average(),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
    }
    try:
        import torch
        import transformers

        env["torch"] = torch.__version__
        env["transformers"] = transformers.__version__
        if torch.cuda.is_available():
            env["torch_device"] = torch.cuda.get_device_name(0)
    except Exception as exc:  # noqa: BLE001 - the reference is optional
        env["torch"] = f"unavailable ({exc})"
    return env


def fmt_num(x: float | None, unit: str = "") -> str:
    """3 significant digits with an SI prefix: 1.23M tok/s, 812 ms."""
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "-"
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{prefix}{unit}"
    return f"{x:.3g}{unit}"


def fmt_time(s: float | None) -> str:
    if s is None:
        return "-"
    if s >= 1:
        return f"{s:.3g} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} us"


def fmt_bytes(b: float | None) -> str:
    if b is None:
        return "-"
    return f"{b / 2**30:.3g} GiB" if b >= 1000 * 2**20 else f"{b / 2**20:.3g} MiB"  # never "1.01e+03 MiB"


def fmt_pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


TABLE_COLUMNS = ("config", "tokens/s", "step time", "MFU / roofline", "peak memory", "reference tokens/s",
                 "ratio", "reference peak", "calls min / median", "reference min / median", "load", "status")


def table_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Markdown lines of the one table (rows as made by `run_all.table_rows`)."""
    cells = [[str(r.get(c, "-")) for c in TABLE_COLUMNS] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(TABLE_COLUMNS)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    return [line(TABLE_COLUMNS), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells]


def write_json(path: str, payload: Any) -> None:
    """Writes `payload` atomically (a killed run leaves the previous file whole)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True, default=_json_default)
    os.replace(tmp, path)


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)
