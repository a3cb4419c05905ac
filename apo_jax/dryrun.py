"""The dry run: does a config fit the devices it will run on? (`python -m apo_jax.main --config=X --dry_run`)

No weights, no data, no network. The mesh is resolved for the devices this process sees (so
`XLA_FLAGS=--xla_force_host_platform_device_count=64` checks a 64-chip pod on a laptop), the
config is validated for the sections the run uses, and every training phase's step is built by
the one train-step builder (`train.make_train_step` with the phase's objective) and compiled on
abstract shapes: `jax.eval_shape` for params and optimizer state, `ShapeDtypeStruct`s carrying the
rules table's shardings for the batch, and XLA's memory analysis of the compiled program per
device. Model dimensions come from a local `config.json` (a checkpoint directory, or the Hugging
Face cache for a hub id), or from `policy.arch` for a new policy; otherwise the phase is skipped
with the reason.

`phase_memory(model_config, objective, opt_cfg, mesh, batch)` is the per-phase computation; the
rest of this module plans the phases of a config and prints the table.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from apo_jax import config as config_lib
from apo_jax import models, sharding
from apo_jax.training import objectives, train

GIB = 1024**3

# Device memory per chip where jax does not report it (TPUs report none on some runtimes).
KNOWN_DEVICE_GIB: dict[str, float] = {
    "TPU v4": 32, "TPU v5 lite": 16, "TPU v5e": 16, "TPU v5p": 95, "TPU v5": 95, "TPU v6 lite": 32, "TPU v6e": 32,
    "Tesla T4": 15, "NVIDIA A100-SXM4-40GB": 40, "NVIDIA A100-SXM4-80GB": 80, "NVIDIA H100 80GB HBM3": 80,
    "NVIDIA H200": 141, "NVIDIA L4": 24,
}


@dataclasses.dataclass(frozen=True)
class PhaseMemory:
    """One phase's memory per device, in bytes (XLA's analysis of the compiled step)."""

    params: int
    """The phase's parameters on one device (sharded by the rules table)."""
    opt_state: int
    """Adam moments (and the step counter) on one device."""
    arguments: int
    """The compiled step's inputs on one device (state + batch + schedule)."""
    outputs: int
    aliased: int
    """Output bytes that reuse donated inputs."""
    temp: int
    """XLA's scratch: activations, gradients, remat buffers."""
    code: int

    @property
    def peak(self) -> int:
        """Live bytes at the step's high-water mark: inputs, outputs not written in place, scratch."""
        return self.arguments + self.outputs - self.aliased + self.temp + self.code


def _per_device_bytes(tree: Any, shardings: Any) -> int:
    total = 0
    for x, s in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(shardings)):
        total += math.prod(s.shard_shape(tuple(x.shape))) * np.dtype(x.dtype).itemsize
    return total


def abstract_params(config: models.ModelConfig, head: str) -> Any:
    """The parameter tree of a policy ("lm") or reward model ("score") as ShapeDtypeStructs."""
    return jax.eval_shape(lambda: models.init_params(config, jax.random.PRNGKey(0), lm_head=head == "lm",
                                                     reward_head=head == "score"))


def phase_memory(config: models.ModelConfig, objective: objectives.Objective, opt_cfg: train.OptimizerConfig,
                 mesh: jax.sharding.Mesh, batch: Mapping[str, tuple[tuple[int, ...], Any]], *,
                 grad_accum: int = 1, params: Any = None) -> PhaseMemory:
    """Compiles `objective`'s train step (`train.make_train_step`) on abstract shapes and returns
    its memory per device. `batch` is {name: (global shape, dtype)} (`Objective.batch_layout`);
    `params` (abstract, default: the full tree of `objective.head`) is the trained parameter tree."""
    if params is None:
        params = abstract_params(config, objective.head)
    tx = train.make_optimizer(opt_cfg)
    state = train.TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                             opt_state=jax.eval_shape(tx.init, params))
    st_sh = train.state_shardings(state, mesh)
    state = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, st_sh)
    abatch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)))
              for k, (shape, dtype) in batch.items()}
    hyper = jax.ShapeDtypeStruct((3,), jnp.float32, sharding=NamedSharding(mesh, P()))
    step = train.make_train_step(config, objective, opt_cfg, mesh, grad_accum=grad_accum)
    compiled = step.jitted(state, abatch).lower(state, abatch, hyper).compile()
    ma = compiled.memory_analysis()
    p_bytes = _per_device_bytes(state.params, st_sh.params)
    o_bytes = _per_device_bytes(state.opt_state, st_sh.opt_state) + 4
    if ma is None:  # a backend without the analysis: the state alone, twice (in and out)
        return PhaseMemory(p_bytes, o_bytes, p_bytes + o_bytes, p_bytes + o_bytes, p_bytes + o_bytes, 0, 0)
    return PhaseMemory(p_bytes, o_bytes, int(ma.argument_size_in_bytes), int(ma.output_size_in_bytes),
                       int(ma.alias_size_in_bytes), int(ma.temp_size_in_bytes), int(ma.generated_code_size_in_bytes))


# --------------------------------------------------------------------------------------------
# A config's phases.


@dataclasses.dataclass(frozen=True)
class Phase:
    section: str
    """The optimizer section (`config.used_optimizer_sections`)."""
    model: str
    """"policy" or "rm": whose dimensions and runtime settings."""
    objective: str
    seq_len: int
    """The longest padded length a batch of this phase can have (a bucket)."""


def plan(cfg: ml_collections.ConfigDict) -> list[Phase]:
    """The training phases of `cfg`, one per optimizer section it uses."""
    from apo_jax.data import tokenize

    def bucket(n: int) -> int:
        return tokenize.bucket_length(n, tuple(cfg.data.buckets))

    out = []
    for section in config_lib.used_optimizer_sections(cfg):
        if section.startswith("rm."):
            out.append(Phase(section, "rm", "ranking", bucket(cfg.data.rm_max_len)))
        else:
            rule = "sft" if section == "policy.pretrain" else section
            out.append(Phase(section, "policy", rule, bucket(cfg.data.sft_max_len)))
    return out


def _runtime(m: ml_collections.ConfigDict) -> dict[str, Any]:
    return dict(param_dtype=m.param_dtype, dtype=m.dtype, remat_policy=m.remat_policy,
                attention_impl=m.attention_impl)


def _local_config_json(path: str) -> str | None:
    """A local config.json for a checkpoint path or hub id (the HF cache, offline), or None."""
    if os.path.isdir(path):
        f = os.path.join(path, "config.json")
        return f if os.path.exists(f) else None
    if "://" in path or os.path.exists(path):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(path, "config.json")
    except Exception:
        return None
    return found if isinstance(found, str) and os.path.exists(found) else None


def model_configs(cfg: ml_collections.ConfigDict) -> dict[str, models.ModelConfig | str]:
    """The policy's and the RM's ModelConfig, or for each a reason it cannot be known here."""
    import json

    def from_checkpoint(path: str, field: str, runtime: dict) -> models.ModelConfig | str:
        found = _local_config_json(path)
        if found is None:
            return (f"skipped: needs the checkpoint's config.json ({field}={path!r} is not a local directory "
                    "or cached hub id; pass a local copy)")
        try:
            with open(found) as f:
                return models.config_from_hf(json.load(f), **runtime)
        except (ValueError, TypeError, OSError) as e:
            return f"skipped: {found}: {e}"

    out: dict[str, models.ModelConfig | str] = {}
    if cfg.policy.checkpoint:
        out["policy"] = from_checkpoint(cfg.policy.checkpoint, "policy.checkpoint", _runtime(cfg.policy))
    else:
        arch = dict(cfg.policy.arch)
        if "vocab_size" not in arch:
            if cfg.data.kind == "synthetic":
                from apo_jax.data import synthetic_files

                tok = synthetic_files.build_tokenizer()
                arch.update(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id)
            else:
                out["policy"] = "skipped: a new policy needs policy.arch.vocab_size (or the tokenizer's) to be sized"
        if "policy" not in out:
            out["policy"] = models.ModelConfig(**arch, **_runtime(cfg.policy), scan_layers=cfg.policy.scan_layers)
    if cfg.rm.init_checkpoint:
        out["rm"] = from_checkpoint(cfg.rm.init_checkpoint, "rm.init_checkpoint", _runtime(cfg.rm))
    elif isinstance(out["policy"], str):
        out["rm"] = out["policy"]
    else:
        out["rm"] = out["policy"].replace(**_runtime(cfg.rm))
    return out


def device_gib(override: float = 0.0) -> tuple[float | None, str]:
    """Memory of one device in GiB and its description (`override` > 0 wins; None if unknown)."""
    dev = jax.devices()[0]
    name = f"{dev.platform} {dev.device_kind}"
    if override > 0:
        return float(override), f"{name} (--dry_run_device_gib={override:g})"
    try:
        stats = dev.memory_stats() or {}
    except Exception:
        stats = {}
    if stats.get("bytes_limit"):
        return stats["bytes_limit"] / GIB, name
    for kind, gib in KNOWN_DEVICE_GIB.items():
        if str(dev.device_kind).startswith(kind):
            return float(gib), name
    return None, name


@dataclasses.dataclass
class Row:
    phase: Phase
    global_batch: int
    per_device_batch: int
    grad_accum: int
    memory: PhaseMemory | None = None
    skipped: str = ""


def _size(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2**20:.1f} MiB"


def measure(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
            configs: Mapping[str, models.ModelConfig | str]) -> list[Row]:
    """A row per training phase of `cfg`: its batch and, unless skipped, `phase_memory` (phases
    that compile the same program are compiled once)."""
    shape = dict(mesh.shape)
    shards = shape["data"] * shape["fsdp"]
    compiled: dict[tuple, PhaseMemory] = {}
    rows: list[Row] = []
    for ph in plan(cfg):
        opt_sec = config_lib.lookup(cfg, ph.section)
        k = int(opt_sec.grad_accum)
        row = Row(ph, int(opt_sec.batch_size), int(opt_sec.batch_size) // (k * shards), k)
        rows.append(row)
        mc = configs[ph.model]
        if isinstance(mc, str):
            row.skipped = mc
            continue
        objective = objectives.from_config(ph.objective, cfg)
        opt = train.OptimizerConfig(lr=1e-6, schedule=opt_sec.schedule, weight_decay=opt_sec.weight_decay,
                                    grad_clip=opt_sec.grad_clip, b1=opt_sec.b1, b2=opt_sec.b2)
        key = train.step_key(mc, objective, opt, mesh, k) + (row.global_batch, ph.seq_len)
        if key not in compiled:
            compiled[key] = phase_memory(mc, objective, opt, mesh, objective.batch_layout(row.global_batch, ph.seq_len),
                                         grad_accum=k)
        row.memory = compiled[key]
    return rows


def run(cfg: ml_collections.ConfigDict, *, device_gib_override: float = 0.0,
        write: Any = print) -> list[str]:
    """Plans, compiles and prints every phase of `cfg` (already validated, "auto" resolved);
    returns the problems (one line each; empty: it fits)."""
    mesh = sharding.make_mesh(sharding.MeshConfig(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor))
    shape = dict(mesh.shape)
    limit, dev_name = device_gib(device_gib_override)
    write(f"dry run: {jax.device_count()} devices ({dev_name}), mesh data={shape['data']} fsdp={shape['fsdp']} "
          f"tensor={shape['tensor']}; device memory {f'{limit:.1f} GiB' if limit else 'unknown'}")
    configs = model_configs(cfg)
    rows = measure(cfg, mesh, configs)
    header = ("| phase | objective | global batch | per device (x accum) | seq len | params | params/dev "
              "| opt state/dev | XLA args/dev | XLA temp/dev | peak/dev |")
    write(header)
    write("|" + " --- |" * (header.count("|") - 1))
    for r in rows:
        ph = r.phase
        mc = configs[ph.model]
        head = objectives.OBJECTIVES[ph.objective].head
        n_params = (0 if isinstance(mc, str)
                    else sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(abstract_params(mc, head))))
        m = r.memory
        cells = [ph.section, ph.objective, str(r.global_batch), f"{r.per_device_batch} x {r.grad_accum}", str(ph.seq_len)]
        if m is None:
            cells += ["-"] * 6
            cells[-1] = r.skipped
        else:
            cells += [f"{n_params / 1e6:,.1f}M", _size(m.params), _size(m.opt_state), _size(m.arguments), _size(m.temp),
                      _size(m.peak)]
        write("| " + " | ".join(cells) + " |")
    problems = []
    measured = [r for r in rows if r.memory is not None]
    if measured:
        top = max(measured, key=lambda r: r.memory.peak)
        peak = top.memory.peak / GIB
        write(f"peak {peak:.2f} GiB per device in {top.phase.section} ({top.phase.objective}, batch "
              f"{top.global_batch} x {top.phase.seq_len} tokens)")
        if limit:
            for r in measured:
                if r.memory.peak / GIB > limit:
                    problems.append(f"{r.phase.section}: needs {r.memory.peak / GIB:.2f} GiB per device, more than "
                                    f"the {limit:.1f} GiB of {dev_name} (more devices on fsdp/tensor, a smaller "
                                    f"{r.phase.section}.batch_size or a larger {r.phase.section}.grad_accum)")
    for r in rows:
        if r.skipped:
            write(f"{r.phase.section}: {r.skipped}")
    return problems
