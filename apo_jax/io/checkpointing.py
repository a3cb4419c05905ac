"""Checkpoints: Orbax for train states and finished models, an atomic JSON file for the loop.

Layout under a run directory:

    ckpt/<phase>/<step>/        in-progress train state + data-iterator position (CheckpointManager);
                                removed once the phase's model is saved
    models/<name>/              finished parameters of a model (one Orbax checkpoint each)
    loop_state.json             which phases are done, and what they produced

A run killed anywhere restarts from these: finished phases are skipped, an interrupted training
phase resumes from its last saved step with the same data position and RNG stream. The run dir
may be local or `gs://...` (Orbax writes there natively; see `fileio`).
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from apo_jax.io import fileio


def _abstract(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) describing `tree`, for a restore into the same layout."""

    def leaf(x):
        sharding = getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree_util.tree_map(leaf, tree)


def _without_frozen(state: Any) -> Any:
    return state.replace(frozen=None) if getattr(state, "frozen", None) is not None else state


# Dtypes tensorstore cannot write (a QLoRA base's 4-bit values: `models.quant`) are stored widened.
_STORED = {jax.numpy.dtype(jax.numpy.int4): jax.numpy.dtype(jax.numpy.int8),
           jax.numpy.dtype(jax.numpy.uint4): jax.numpy.dtype(jax.numpy.uint8)}


def _storable(x: Any) -> Any:
    wide = _STORED.get(getattr(x, "dtype", None))
    return x if wide is None else x.astype(wide)


class TrainCheckpointer:
    """Periodic, asynchronous saves of one training phase's state and data position."""

    def __init__(self, directory: str, *, save_every: int, max_to_keep: int = 2, async_save: bool = True,
                 preemption_check_every: int = 1):
        self.save_every = save_every
        # Multi-process runs agree on a preemption signal with a small all-gather, a host sync;
        # the loop checks at its metric-logging steps, where it syncs with the device anyway.
        self.preemption_check_every = max(1, preemption_check_every)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(fileio.path(directory), options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def should_save(self, step: int) -> bool:
        """Whether to save at `step`. Every process must call it at every step: in a multi-process
        run it is where the processes agree on a preemption (a collective every
        `preemption_check_every` steps)."""
        preempted = agree_on_preemption() if step % self.preemption_check_every == 0 else preemption_requested()
        return (self.save_every > 0 and step % self.save_every == 0) or preempted or (
            self._manager.reached_preemption(step)
        )

    def save(self, step: int, state: Any, data_state: dict[str, Any], *, force: bool = False) -> None:
        """Saves `state` without its frozen params (a LoRA state's base: `train.TrainState.frozen`),
        which never change during the phase and are restored from the phase's starting point."""
        self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(_without_frozen(state)),
                                    data=ocp.args.JsonSave(data_state)),
            force=force,
        )

    def restore(self, step: int, like_state: Any) -> tuple[Any, dict[str, Any]]:
        """The state saved at `step`, laid out (shapes, dtypes, shardings) like `like_state`, with
        `like_state`'s frozen params."""
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(_abstract(_without_frozen(like_state))), data=ocp.args.JsonRestore()
            ),
        )
        state = restored["state"]
        if getattr(like_state, "frozen", None) is not None:
            state = state.replace(frozen=like_state.frozen)
        return state, dict(restored["data"])

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


class ModelStore:
    """Finished model parameters by name, written once with Orbax and read back on demand."""

    def __init__(self, directory: str):
        self.directory = fileio.path(directory)
        self._checkpointer = ocp.StandardCheckpointer()

    def path(self, name: str) -> epath.Path:
        return self.directory / name

    def save(self, name: str, params: Any) -> None:
        self._checkpointer.save(self.path(name), jax.tree_util.tree_map(_storable, params), force=True)
        self._checkpointer.wait_until_finished()

    def load(self, name: str, like: Any) -> Any:
        stored = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, _STORED.get(x.dtype, x.dtype),
                                                                       sharding=getattr(x, "sharding", None)), like)
        restored = self._checkpointer.restore(self.path(name), _abstract(stored))
        return jax.tree_util.tree_map(lambda x, want: x if x.dtype == want.dtype else x.astype(want.dtype),
                                      restored, like)

    def close(self) -> None:
        self._checkpointer.close()


class LoopState:
    """The loop's own progress: completed phases and their small JSON results.

    Written atomically by process 0 after every phase (`fileio.write_json`: temp file + rename
    locally, one object upload on GCS).
    """

    def __init__(self, path: str):
        self.path = path
        self.data: dict[str, Any] = {"done": {}, "version": 1}
        if fileio.exists(path):
            self.data = json.loads(fileio.read_text(path))

    def done(self, phase: str) -> bool:
        return phase in self.data["done"]

    def result(self, phase: str) -> Any:
        return self.data["done"][phase]

    def mark_done(self, phase: str, result: Any = None) -> None:
        self.data["done"][phase] = result
        if jax.process_index() == 0:
            fileio.write_json(self.path, self.data, indent=1, sort_keys=True)  # atomic


# --------------------------------------------------------------------------------------------
# Preemption: SIGTERM (what TPU maintenance events and SLURM/Kubernetes send first) asks the
# running training phase to save at its next step and stop.
#
# With several processes the signal reaches each at a different step (or only some of them), and
# a save or a stop that not all processes make hangs the others in their next collective. So a
# process only records the signal (_SIGNALLED); the processes act on it once they agree, at the
# same step (_PREEMPTED, set on all of them by `agree_on_preemption`).

_SIGNALLED = threading.Event()
_PREEMPTED = threading.Event()


class Preempted(Exception):
    """Raised after a preemption-triggered save; the run resumes from it when restarted."""


def preemption_requested() -> bool:
    """Whether to stop: this process was signalled (one process), or all agreed to (several)."""
    if jax.process_count() == 1 and _SIGNALLED.is_set():
        _PREEMPTED.set()
    return _PREEMPTED.is_set()


def agree_on_preemption() -> bool:
    """`preemption_requested()`, made the same on every process: with several processes, an
    all-gather of each one's signal flag (every process must call this at the same point)."""
    if jax.process_count() > 1 and not _PREEMPTED.is_set():
        import numpy as np
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.asarray([_SIGNALLED.is_set()], np.int32))
        if np.any(flags):
            _PREEMPTED.set()
    return preemption_requested()


STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2")
"""Signals that stop a run with a save: SIGTERM (preemption notices), SIGINT (Ctrl-C; a second one
aborts at once), SIGUSR1 / SIGUSR2 (what srun forwards to the tasks, e.g. Slurm's time-limit warning)."""


def install_preemption_handler() -> None:
    def handler(signum, frame):  # noqa: ARG001
        logging.warning("%s: saving a checkpoint at the next step, then stopping", signal.Signals(signum).name)
        _SIGNALLED.set()
        if signum == signal.SIGINT:  # a second Ctrl-C stops without the save
            signal.signal(signal.SIGINT, signal.default_int_handler)

    if threading.current_thread() is threading.main_thread():
        for name in STOP_SIGNALS:
            signal.signal(getattr(signal, name), handler)
