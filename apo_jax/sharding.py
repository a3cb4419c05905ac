"""The device mesh, the one table of partition rules, and helpers to place params and batches.

Every array apo_jax puts on a mesh gets its layout from two small tables:

- `PARAM_AXES`: (regex over a param's '/'-joined path, logical axis names per dimension). It
  matches parameters and, because optax states mirror the param tree (`.../mu/model/...`),
  optimizer moments too. Scalars (step counters) are replicated; any other unmatched array is an
  error (`ShardingRuleError`) unless `REPLICATED` lists it.
- `LOGICAL_RULES`: logical axis name -> mesh axes. Weights are sharded over `fsdp` (ZeRO-3
  style) and `tensor` (Megatron style); activations over `data`+`fsdp` on the batch and `tensor`
  on heads / MLP / vocab.

Activations are constrained inside the model through `constrain(x, ACT_*)`, which is a no-op
unless a mesh has been made current with `activation_sharding(mesh)` (entered inside a traced
function, so each jitted step states its own mesh).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import re
from typing import Any, Iterator, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from apo_jax.settings import MESH_AXES, MeshConfig

# Logical axis name -> mesh axis (or axes, or None = replicated).
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    # weights
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    ("score", None),
    ("lora_rank", None),
    # activations
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("act_cache_length", None),
)

# Param path regex -> logical axes, first match wins. Stacked layer params lead with `layers` (dropped
# for one layer's params under "layer_<i>", the sampler's split layout). These are the parameters
# every family has; the rows of those only some families have (biases, q/k norms, sandwich norms)
# come from the family files (`models.families`, through `register_param_axes`).
PARAM_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"embed/embedding$", ("vocab", "embed")),
    (r"attn/q_proj/kernel$", ("layers", "embed", "heads", "head_dim")),
    (r"attn/(k|v)_proj/kernel$", ("layers", "embed", "kv_heads", "head_dim")),
    (r"attn/o_proj/kernel$", ("layers", "heads", "head_dim", "embed")),
    (r"mlp/(gate|up)_proj/kernel$", ("layers", "embed", "mlp")),
    (r"mlp/down_proj/kernel$", ("layers", "mlp", "embed")),
    (r"(attn|mlp)_norm/scale$", ("layers", "norm")),
    (r"final_norm/scale$", ("norm",)),
    (r"lm_head/kernel$", ("embed", "vocab")),
    (r"score/kernel$", ("embed", "score")),
    # LoRA adapters (`models.lora`): A [in..., r] and B [r, out...] sharded like their kernel's
    # input and output axes; the rank is replicated.
    (r"attn/q_proj/lora_a$", ("layers", "embed", "lora_rank")),
    (r"attn/q_proj/lora_b$", ("layers", "lora_rank", "heads", "head_dim")),
    (r"attn/(k|v)_proj/lora_a$", ("layers", "embed", "lora_rank")),
    (r"attn/(k|v)_proj/lora_b$", ("layers", "lora_rank", "kv_heads", "head_dim")),
    (r"attn/o_proj/lora_a$", ("layers", "heads", "head_dim", "lora_rank")),
    (r"attn/o_proj/lora_b$", ("layers", "lora_rank", "embed")),
    (r"mlp/(gate|up)_proj/lora_a$", ("layers", "embed", "lora_rank")),
    (r"mlp/(gate|up)_proj/lora_b$", ("layers", "lora_rank", "mlp")),
    (r"mlp/down_proj/lora_a$", ("layers", "mlp", "lora_rank")),
    (r"mlp/down_proj/lora_b$", ("layers", "lora_rank", "embed")),
)

# Param path regexes deliberately replicated on every device (small, rank >= 1).
REPLICATED: tuple[str, ...] = ()

_FAMILY_AXES: list[tuple[str, tuple[str | None, ...]]] = []


def register_param_axes(rows: Sequence[tuple[str, tuple[str | None, ...]]]) -> None:
    """Adds a model family's partition rows (after `PARAM_AXES`; a row already there is kept once)."""
    for row in rows:
        if row not in _FAMILY_AXES and row not in PARAM_AXES:
            _FAMILY_AXES.append(row)


def param_axes() -> tuple[tuple[str, tuple[str | None, ...]], ...]:
    """Every partition row: the core table, then the families' rows."""
    return PARAM_AXES + tuple(_FAMILY_AXES)

# Activation layouts used by the model and steps.
ACT_EMBED = ("act_batch", "act_length", "act_embed")
ACT_HEADS = ("act_batch", "act_length", "act_heads", None)
ACT_KV_HEADS = ("act_batch", "act_length", "act_kv_heads", None)
ACT_MLP = ("act_batch", "act_length", "act_mlp")
ACT_VOCAB = ("act_batch", "act_length", "act_vocab")
ACT_BATCH = ("act_batch",)
# KV cache [L, B, S, K, h]: batch over data/fsdp, heads over tensor.
CACHE_AXES = ("layers", "act_batch", "act_cache_length", "act_kv_heads", None)


def make_mesh(config: MeshConfig | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh with Auto axis types over `devices` (default: all)."""
    config = config or MeshConfig()
    devices = list(devices if devices is not None else jax.devices())
    shape = config.resolve(len(devices))
    try:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
    except Exception:  # Unusual topologies (e.g. fake CPU devices across processes).
        grid = np.asarray(devices).reshape(shape)
    # `Mesh` defaults to Auto axes; `jax.make_mesh` would default to Explicit (breaks constraints).
    axis_types = getattr(jax.sharding, "AxisType", None)
    if axis_types is not None:
        return Mesh(grid, MESH_AXES, axis_types=(axis_types.Auto,) * len(MESH_AXES))
    return Mesh(grid, MESH_AXES)


def maybe_initialize_distributed() -> None:
    """Calls `jax.distributed.initialize()` when this is one process of a multi-process run.

    Detected from the usual launchers' environment: JAX_COORDINATOR_ADDRESS (explicit), a SLURM
    job step of several tasks (`srun`), a TPU pod (TPU_WORKER_HOSTNAMES listing several hosts),
    or APO_JAX_DISTRIBUTED=1 (JAX's own detection). Log records are then tagged `[process i/n]`.
    """
    if _distributed_initialized():
        return
    env = os.environ
    explicit = env.get("JAX_COORDINATOR_ADDRESS")
    # SLURM_NTASKS > 1 also holds inside `salloc` and in the batch script itself, where only this
    # one process runs (initialize would wait for the others forever): only a job step started by
    # srun (SLURM_STEP_ID; the batch/extern/interactive pseudo-steps count from 4294967290) has
    # all of its tasks running. APO_JAX_DISTRIBUTED=1 opts in without one.
    step = env.get("SLURM_STEP_ID", "")
    in_step = step.isdigit() and int(step) < 4294967290
    slurm = (int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or "1") > 1
             and (in_step or env.get("APO_JAX_DISTRIBUTED") == "1"))
    if (explicit or slurm) and env.get("JAX_PLATFORMS", "") == "cpu":
        # Cross-process collectives on CPU (tests, CPU clusters) need gloo, chosen before initialize.
        try:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        except Exception:  # Older/newer jax without the option: its default then.
            pass
    if explicit:
        jax.distributed.initialize(
            coordinator_address=explicit,
            num_processes=int(env["JAX_NUM_PROCESSES"]),
            process_id=int(env["JAX_PROCESS_ID"]),
        )
    elif slurm:
        jax.distributed.initialize(local_device_ids=slurm_local_device_ids(env))
    elif len(env.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1 or env.get("APO_JAX_DISTRIBUTED") == "1":
        # APO_JAX_DISTRIBUTED=1: JAX finds the other processes itself (a Cloud TPU VM slice reads
        # them from the metadata server; launch/tpu_pod.sh sets it).
        jax.distributed.initialize()
    else:
        return
    tag_log_records(jax.process_index(), jax.process_count())
    logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())


def slurm_local_device_ids(env: Mapping[str, str]) -> list[int] | None:
    """The GPUs one SLURM task drives, as indices into its visible GPUs.

    JAX's default under SLURM is GPU number SLURM_LOCALID (one task per GPU, every task seeing
    all of the node's GPUs). With one task per node that would leave all but GPU 0 idle, and
    with SLURM binding one GPU per task (`--gpus-per-task=1`) GPU SLURM_LOCALID does not exist.
    """
    visible = [g for g in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    if not visible:
        return None  # no GPUs (CPU cluster) or not known: JAX's default
    if len(visible) == 1:
        return [0]
    nodes = int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or 1)
    if int(env.get("SLURM_NTASKS", "1")) <= nodes:  # one task per node
        return list(range(len(visible)))
    return None


def tag_log_records(process_index: int, process_count: int) -> None:
    """Prefixes every log message of this process with `[process i/n]`.

    Every process of a multi-process run logs to its own stream, and launchers often merge them
    (`gcloud ... --worker=all`, a shared SLURM output file), so each line says where it came from.
    """
    prefix = f"[process {process_index}/{process_count}] "
    factory = logging.getLogRecordFactory()
    if getattr(factory, "apo_jax_prefix", None) is not None:
        return

    def make_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        record.msg = prefix + str(record.msg)  # the prefix holds no '%', so %-args still apply
        return record

    make_record.apo_jax_prefix = prefix  # type: ignore[attr-defined]
    logging.setLogRecordFactory(make_record)


def _distributed_initialized() -> bool:
    try:
        from jax._src import distributed

        return distributed.global_state.client is not None
    except Exception:
        return False


# --------------------------------------------------------------------------------------------
# Logical -> mesh mapping.


def logical_to_spec(
    logical_axes: Sequence[str | None],
    mesh: Mesh,
    shape: Sequence[int] | None = None,
    rules: Sequence[tuple[str, Any]] = LOGICAL_RULES,
) -> P:
    """PartitionSpec for logical axes. A mesh axis is dropped from a dimension it does not divide
    (e.g. 2 KV heads on a tensor axis of 4), and never used twice in one spec."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for dim, name in enumerate(logical_axes):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise KeyError(f"logical axis {name!r} has no rule in LOGICAL_RULES")
        target = table[name]
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        kept = []
        size = 1
        for axis in axes:
            if axis in used or mesh.shape[axis] == 1:
                continue
            if shape is not None and shape[dim] % (size * mesh.shape[axis]):
                continue
            kept.append(axis)
            size *= mesh.shape[axis]
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return P(*spec)


def path_str(path: Sequence[Any]) -> str:
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


class ShardingRuleError(ValueError):
    """A parameter the rules table does not cover, or covers with the wrong rank."""


def logical_axes_for(path: str, ndim: int) -> tuple[str | None, ...]:
    """Logical axes of a param (or optimizer moment) at `path`.

    Scalars (step counters, Adam's count) are replicated. Any other array must match a rule of
    `param_axes()` with its rank, or a pattern of `REPLICATED`: a new parameter is never silently
    replicated (a 7B model would then hold a full copy on every device).
    """
    if ndim == 0:
        return ()
    # A quantized kernel's parts (`models.quant`: qvalue of its shape, a broadcastable scale) take
    # the kernel's row; a mesh axis that does not divide a scale's dimension is dropped there.
    path = re.sub(r"/kernel/(qvalue|scale|zero_point)$", "/kernel", path)
    # One layer of the stack (`models.params_for_generation`'s "layer_<i>" trees): no layer axis.
    per_layer = re.search(r"(^|/)layer_\d+/", path) is not None
    for pattern, axes in param_axes():
        if re.search(pattern, path):
            if per_layer and axes[:1] == ("layers",):
                axes = axes[1:]
            if len(axes) != ndim:
                raise ShardingRuleError(f"parameter {path!r} has rank {ndim} but its rule {pattern!r} in "
                                        f"sharding.PARAM_AXES names {len(axes)} axes {axes}")
            return axes
    if any(re.search(pattern, path) for pattern in REPLICATED):
        return (None,) * ndim
    raise ShardingRuleError(f"parameter {path!r} (rank {ndim}) matches no rule in sharding.PARAM_AXES; add a rule, "
                            "or list it in sharding.REPLICATED to replicate it on purpose")


def tree_shardings(tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for every array leaf of a params / optimizer-state / train-state tree."""

    def leaf(path, x):
        shape = np.shape(x)
        axes = logical_axes_for(path_str(path), len(shape))
        return NamedSharding(mesh, logical_to_spec(axes, mesh, shape))

    return jax.tree_util.tree_map_with_path(leaf, tree)


def shard_tree(tree: Any, mesh: Mesh) -> Any:
    """Places a (host or device) tree on the mesh by the rules table."""
    return jax.device_put(tree, tree_shardings(tree, mesh))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a batch-major array: dim 0 over ('data', 'fsdp'), the rest replicated."""
    return NamedSharding(mesh, logical_to_spec(("act_batch",) + (None,) * (ndim - 1), mesh))


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Global arrays from this host's slice of a batch (dict of numpy arrays, batch-major).

    Each process passes only its own rows; `jax.make_array_from_process_local_data` assembles
    the global array, so no host ever materialises the whole global batch.
    """

    def leaf(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)

    return jax.tree_util.tree_map(leaf, batch)


def to_host(x: Any) -> np.ndarray:
    """A full host copy of an array on every process: an all-gather when a global array spans
    processes (every process must call it then), a plain transfer otherwise."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def map_batches(fn: Any, batch_rows: Any, n: int, mesh: Mesh, batch_size: int) -> Any:
    """`fn` over rows 0..n-1 in global batches of `batch_size` (the last filled up with repeats):
    each batch is `batch_rows(rows)` (a dict of host arrays) placed on the mesh; `fn`'s outputs (a
    pytree of [B, ...] arrays) stay on device until one transfer per batch at the end, so the host
    builds the next batch while the device works. Returns the outputs for the n rows, on the host."""
    outs = []
    for i in range(0, n, batch_size):
        rows = np.arange(i, i + batch_size) % n
        outs.append(fn(shard_batch(batch_rows(rows), mesh)))
    host = [jax.tree_util.tree_map(to_host, out) for out in outs]
    return jax.tree_util.tree_map(lambda *xs: np.concatenate(xs)[:n], *host)


def cache_sharding(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(CACHE_AXES, mesh, shape))


# --------------------------------------------------------------------------------------------
# Activation constraints.

_ACTIVE_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("apo_jax_mesh", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh | None) -> Iterator[None]:
    """Makes `constrain` place activations on `mesh` for code traced inside this block."""
    token = _ACTIVE_MESH.set(mesh)
    try:
        yield
    finally:
        _ACTIVE_MESH.reset(token)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical axes; identity when no mesh is active."""
    mesh = _ACTIVE_MESH.get()
    if mesh is None or mesh.size == 1:
        return x
    spec = logical_to_spec(logical_axes, mesh, x.shape)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
