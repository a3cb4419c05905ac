"""`fit`: the train loop of every training phase, with hooks.

A phase runs `total_steps` steps of one compiled train step over a resumable batch stream. What
happens around the steps is a list of hooks, run in order after every step: logging (one host
sync per log interval, NaN check, metrics record), checkpointing (periodic Orbax saves, and a save
then `Preempted` when a preemption is agreed on), the progress bar, and any *progress hooks*
installed with `add_progress_hook` (tests use one to kill the process at a chosen step; the
sampling phases call them after every batch too).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
from tqdm.auto import tqdm

from apo_jax import sharding
from apo_jax.io import checkpointing
from apo_jax.training import train
from apo_jax.data import batching

ProgressHook = Callable[[str, int], None]
_PROGRESS_HOOKS: list[ProgressHook] = []


def add_progress_hook(hook: ProgressHook) -> Callable[[], None]:
    """Calls `hook(phase, step)` after every train step and sampling batch; returns its remover."""
    _PROGRESS_HOOKS.append(hook)
    return lambda: _PROGRESS_HOOKS.remove(hook) if hook in _PROGRESS_HOOKS else None


def progress(phase: str, step: int) -> None:
    """Runs the installed progress hooks (a finished unit of work of `phase`)."""
    for hook in list(_PROGRESS_HOOKS):
        hook(phase, step)


@dataclasses.dataclass
class FitRun:
    """What hooks see of a running phase."""

    phase: str
    total: int
    start: int
    state: Any = None
    data: batching.BatchIterator | None = None


class Hook:
    """Called around a phase's steps; every method is optional."""

    def begin(self, run: FitRun) -> None: ...

    def after_step(self, run: FitRun, step: int, metrics: Any) -> None: ...

    def end(self, run: FitRun) -> None: ...


class LogMetrics(Hook):
    """Fetches step metrics once per `every` steps (one host sync), checks they are finite and
    writes the last one as a `{"phase", "step", ...}` record (a TensorBoard curve too)."""

    def __init__(self, writer: Any, every: int):
        self.writer, self.every = writer, max(1, every)
        self.pending: list[tuple[int, Any]] = []
        self.phase = ""

    def begin(self, run: FitRun) -> None:
        self.phase = run.phase

    def after_step(self, run: FitRun, step: int, metrics: Any) -> None:
        self.pending.append((step, metrics))
        if step % self.every == 0 or step == run.total:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        fetched = jax.device_get([m for _, m in self.pending])
        for (step, _), m in zip(self.pending, fetched):
            train.check_finite(m, step, self.phase)
        step, m = self.pending[-1][0], fetched[-1]
        self.pending = []
        self.writer.write({"phase": self.phase, "step": step, **{k: float(v) for k, v in m.items()}},
                          step=step, tb_prefix=self.phase)


class Checkpoint(Hook):
    """Saves state + data position every `save_every` steps and on an agreed preemption, after
    which it raises `checkpointing.Preempted` (the run resumes from that save)."""

    def __init__(self, checkpointer: checkpointing.TrainCheckpointer, log: LogMetrics):
        self.ckpt, self.log = checkpointer, log

    def after_step(self, run: FitRun, step: int, metrics: Any) -> None:
        if self.ckpt.should_save(step) and step != run.total:
            self.log.flush()  # the logged curve reaches the checkpoint's step first,
            self.log.writer.flush()  # durably (on GCS the JSONL is otherwise rewritten every 30 s)
            self.ckpt.save(step, run.state, run.data.state())
            if checkpointing.preemption_requested():
                self.ckpt.close()
                raise checkpointing.Preempted(f"{run.phase} step {step}")

    def end(self, run: FitRun) -> None:
        self.ckpt.close()


class ProgressBar(Hook):
    def __init__(self, enabled: bool):
        self.enabled, self.bar = enabled, None

    def begin(self, run: FitRun) -> None:
        self.bar = tqdm(total=run.total, initial=run.start, desc=run.phase, disable=not self.enabled, leave=False)

    def after_step(self, run: FitRun, step: int, metrics: Any) -> None:
        progress(run.phase, step)
        self.bar.update(1)

    def end(self, run: FitRun) -> None:
        self.bar.close()


def fit(
    phase: str,
    state: train.TrainState,
    step_fn: Callable,
    examples: Any,
    *,
    batch_size: int,
    total_steps: int,
    seed: int,
    mesh: jax.sharding.Mesh,
    checkpointer: checkpointing.TrainCheckpointer,
    metrics: Any,
    log_every: int,
    show_progress: bool = True,
    status: Callable[[str], None] = lambda msg: None,
    extra_hooks: Sequence[Hook] = (),
) -> train.TrainState:
    """Runs steps `start + 1 .. total_steps` of `step_fn` over `examples` and returns the state.

    Resumes from `checkpointer`'s latest save (state and batch-stream position), dropping the
    metric records logged after it, so the finished phase equals an uninterrupted one.
    """
    data = batching.BatchIterator(len(examples), batch_size, seed=seed)
    start = checkpointer.latest_step() or 0
    if start:
        state, data_state = checkpointer.restore(start, state)
        data.restore(data_state)
        metrics.rewind(phase, start)  # the steps after the checkpoint are logged again
        status(f"{phase}: resumed at step {start}/{total_steps}")
    log = LogMetrics(metrics, log_every)
    hooks: list[Hook] = [log, Checkpoint(checkpointer, log), *extra_hooks, ProgressBar(show_progress)]
    run = FitRun(phase, total_steps, start, state, data)
    for h in hooks:
        h.begin(run)
    try:
        for step in range(start + 1, total_steps + 1):
            local = examples.batch(data.next_indices())  # this process's rows only
            run.state, step_metrics = step_fn(run.state, sharding.shard_batch(local, mesh))
            for h in hooks:
                h.after_step(run, step, step_metrics)
    except BaseException:  # a stop (checkpointing.Preempted) or a failure: the bar's line is cleared
        for h in hooks:
            if isinstance(h, ProgressBar):
                h.end(run)
        raise
    for h in hooks:
        h.end(run)
    return run.state
