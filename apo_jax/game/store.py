"""The run store: everything a run keeps in its run directory, and the only memo/resume mechanism.

A unit of work is named by a small typed `Key` (a model, a samples file, a scores file, an
evaluation). `RunStore.once(key, fn)` runs `fn` unless the run dir records `key` as done, then
records its (small, JSON) result in `loop_state.json`: a restarted run skips finished work and
resumes unfinished work from its own checkpoints. Finished models are Orbax checkpoints under
`models/<name>/`, cached in memory once read. The store also owns the run's paths, the
metrics writer and the multi-host barrier. (Compiled programs are not the run's: they live in
the process's one cache, `apo_jax.compiled`.)
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from typing import Any, Callable

import jax
from tqdm.auto import tqdm

from apo_jax import models, sharding
from apo_jax.io import checkpointing, fileio
from apo_jax.evaluation.metrics import MetricsWriter


@dataclasses.dataclass(frozen=True)
class Key:
    """A unit of work the run dir remembers; `id` is its entry in loop_state.json."""

    @property
    def id(self) -> str:
        kind = type(self).__name__.removesuffix("Key").lower()
        return ":".join([kind] + [str(getattr(self, f.name)) for f in dataclasses.fields(self)])


@dataclasses.dataclass(frozen=True)
class ModelKey(Key):
    """A finished model (its params are under models/<name>/)."""

    name: str


@dataclasses.dataclass(frozen=True)
class SamplesKey(Key):
    """All samples of `policy` on the prompts of `split` (samples/<policy>_<split>.jsonl)."""

    policy: str
    split: str


@dataclasses.dataclass(frozen=True)
class ScoresKey(Key):
    """RM `rm`'s scores of the samples `tag` (scores/<rm>__<tag>.jsonl)."""

    rm: str
    tag: str


@dataclasses.dataclass(frozen=True)
class RMEvalKey(Key):
    model: str
    schedule: str


@dataclasses.dataclass(frozen=True)
class PolicyEvalKey(Key):
    policy: str
    schedule: str


@dataclasses.dataclass(frozen=True)
class ProbeKey(Key):
    """A diagnostic computed once (e.g. a best-of-S phase's hacking measurements)."""

    name: str


@dataclasses.dataclass
class ModelSlot:
    """A finished model: its architecture/runtime config and its params on the mesh."""

    config: models.ModelConfig
    params: Any


def phase_key(seed: int, name: str) -> jax.Array:
    """A PRNG key for a unit of work: a function of the seed and its name only, so a resumed run
    draws the same numbers as an uninterrupted one."""
    digest = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")
    return jax.random.fold_in(jax.random.PRNGKey(seed), digest)


def phase_seed(seed: int, name: str) -> int:
    """An integer seed (data order) for a unit of work, from the seed and its name only."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:4], "little")


class RunStore:
    """A run directory (local or gs://) on a mesh."""

    def __init__(self, run_dir: str, mesh: jax.sharding.Mesh, trackers: Any = None):
        self.run_dir = run_dir
        fileio.makedirs(run_dir)
        self.mesh = mesh
        self.is_main = jax.process_index() == 0
        self._state = checkpointing.LoopState(fileio.join(run_dir, "loop_state.json"))
        self._orbax = checkpointing.ModelStore(fileio.join(run_dir, "models"))
        self.metrics = MetricsWriter(run_dir, trackers)  # trackers: see MetricsWriter (default TensorBoard)
        self._models: dict[str, ModelSlot] = {}

    # ------------------------------------------------------------------ memo

    def done(self, key: Key) -> bool:
        return self._state.done(key.id)

    def result(self, key: Key) -> Any:
        return self._state.result(key.id)

    def once(self, key: Key, fn: Callable[[], Any]) -> Any:
        """`fn()` unless `key` finished in this run dir before; its result is recorded and returned."""
        if self.done(key):
            return self.result(key)
        result = fn()
        self.metrics.flush()  # a finished unit's records reach storage before it counts as done
        self._state.mark_done(key.id, result)
        return result

    # ------------------------------------------------------------------ paths, barrier, status

    def path(self, *parts: str) -> str:
        """A path under the run dir (a string: local or gs://); its parent exists afterwards."""
        p = fileio.join(self.run_dir, *parts)
        fileio.makedirs(fileio.path(p).parent)
        return p

    def barrier(self, tag: str) -> None:
        """Waits for every process at `tag`: files process 0 wrote before it are then complete."""
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(tag)

    def status(self, msg: str) -> None:
        if self.is_main:
            tqdm.write(f"[apo_jax {time.strftime('%H:%M:%S')}] {msg}")

    # ------------------------------------------------------------------ models

    def has_model(self, name: str) -> bool:
        return self.done(ModelKey(name))

    def save_model(self, name: str, config: models.ModelConfig, params: Any, base: str | None = None) -> None:
        """Writes a finished model and records it; its step checkpoints are no longer needed.

        A LoRA model whose frozen params are those of the finished model `base` (a phase that
        trained `base`'s adapters further) is written as its adapters and head only, and read
        back on top of `base`'s frozen params."""
        meta_base = None
        trained, frozen = models.lora.split(config, params)
        if base is not None and frozen is not None and self.has_model(base):
            base_slot = self.model(base)
            _, base_frozen = models.lora.split(config, base_slot.params)
            if base_frozen is not None and _same_arrays(frozen, base_frozen):
                meta_base = base
        self._orbax.save(name, trained if meta_base else params)
        heads = sorted(k for k in ("lm_head", "score") if k in params)
        meta = {"config": config.to_json(), "heads": heads} | ({"base": meta_base} if meta_base else {})
        self.once(ModelKey(name), lambda: meta)
        self._models[name] = ModelSlot(config, params)

    def model(self, name: str) -> ModelSlot:
        """A finished model's params on the mesh (kept in memory once read)."""
        if name not in self._models:
            meta = self.result(ModelKey(name))
            config = models.ModelConfig.from_json(meta["config"])
            heads = meta["heads"]
            like = jax.eval_shape(lambda: models.init_params(config, jax.random.PRNGKey(0), lm_head="lm_head" in heads,
                                                             reward_head="score" in heads))
            frozen = None
            if meta.get("base"):  # adapters and head only, on the base's frozen params
                like, _ = models.lora.split(config, like)
                _, frozen = models.lora.split(config, self.model(meta["base"]).params)
            like = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                          like, sharding.tree_shardings(like, self.mesh))
            self._models[name] = ModelSlot(config, models.lora.combine(self._orbax.load(name, like), frozen))
        return self._models[name]

    def checkpoint_dir(self, phase: str) -> str:
        return fileio.join(self.run_dir, "ckpt", phase)

    def drop_checkpoints(self, phase: str) -> None:
        """Deletes a training phase's step checkpoints (once its model is saved and recorded)."""
        self.barrier(f"drop ckpt/{phase}")  # no process still reads them
        ckpt_dir = fileio.path(self.checkpoint_dir(phase))
        if self.is_main and ckpt_dir.exists():
            ckpt_dir.rmtree()

    def close(self) -> None:
        self.metrics.close()


def _same_arrays(a: Any, b: Any) -> bool:
    """Whether two trees hold the same arrays (the same objects, or equal values on device)."""
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    if jax.tree_util.tree_structure(a) != jax.tree_util.tree_structure(b):
        return False
    return all(x is y or (x.shape == y.shape and x.dtype == y.dtype and bool(jax.numpy.array_equal(x, y)))
               for x, y in zip(la, lb))
