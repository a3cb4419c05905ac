"""Metrics out, written by process 0 only, through trackers behind one small interface.

`MetricsWriter` fans each record out to its trackers: a JSONL journal (`metrics.jsonl`, every
record, the input of tables and studies) and TensorBoard event files (numeric fields, through
`tensorboardX`, which needs no TensorFlow), and Weights & Biases when the run config names a
project (`WandbTracker`, the `wandb` extra). Another backend is one more `Tracker`.
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable, Mapping, Protocol, Sequence

import jax
import numpy as np

from apo_jax.io import fileio


class Tracker(Protocol):
    """Where metric records go. `step`/`prefix` are set for training curves, None for events."""

    def log(self, record: Mapping[str, Any], *, step: int | None, prefix: str | None) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class JsonlTracker:
    """Every record as one JSON line. Locally appended at once; on GCS the object is rewritten at
    most every 30 s and at flush/close (GCS cannot append)."""

    def __init__(self, path: str):
        self.path = path
        self._file: fileio.Appender | None = fileio.Appender(path, flush_every_s=30.0)

    def log(self, record: Mapping[str, Any], *, step: int | None = None, prefix: str | None = None) -> None:
        del step, prefix
        self._file.write(json.dumps(dict(record), sort_keys=True) + "\n")

    def rewind(self, phase: str, step: int) -> None:
        """Drops the records of `phase` logged after `step` (and a torn last line)."""
        self._file.flush()
        if fileio.keep_lines(self.path, lambda lines: [x for x in lines if not _logged_after(x, phase, step)]):
            self._file = fileio.Appender(self.path, flush_every_s=self._file.flush_every_s)

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file = None


class TensorBoardTracker:
    """Numeric fields as TensorBoard scalars `prefix/field` at `step` (training curves only)."""

    def __init__(self, log_dir: str):
        import tensorboardX

        _register_gcs_writer()
        self._writer = tensorboardX.SummaryWriter(log_dir, flush_secs=30)

    def log(self, record: Mapping[str, Any], *, step: int | None = None, prefix: str | None = None) -> None:
        if prefix is None:
            return
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self._writer.add_scalar(f"{prefix}/{key}", value, global_step=int(step or 0))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbTracker:
    """Weights & Biases (the `wandb` extra): training curves as `prefix/field` against their own
    step axis `prefix/step` (every phase counts from 1), evaluation records as `eval/<name>/field`.
    The W&B run id derives from the run dir, so a resumed run continues the same W&B run."""

    def __init__(self, run_dir: str, *, project: str, entity: str = "", name: str = "", mode: str = "",
                 config: Mapping[str, Any] | None = None):
        import hashlib

        import wandb

        run_id = hashlib.sha1(str(run_dir).rstrip("/").encode()).hexdigest()[:16]
        self._wandb = wandb
        self._run = wandb.init(project=project, entity=entity or None, name=name or str(run_dir).rstrip("/").rsplit("/", 1)[-1],
                               id=run_id, resume="allow", mode=mode or None, config=dict(config or {}),
                               dir=None if fileio.is_remote(run_dir) else _local_dir(run_dir))
        self._axes: set[str] = set()

    def log(self, record: Mapping[str, Any], *, step: int | None = None, prefix: str | None = None) -> None:
        numeric = {k: v for k, v in record.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if prefix is not None:
            if prefix not in self._axes:
                self._run.define_metric(f"{prefix}/step")
                self._run.define_metric(f"{prefix}/*", step_metric=f"{prefix}/step")
                self._axes.add(prefix)
            numeric.pop("step", None)
            self._run.log({f"{prefix}/step": int(step or 0), **{f"{prefix}/{k}": v for k, v in numeric.items()}})
        elif numeric:
            tag = record.get("name") or record.get("kind") or record.get("phase") or "event"
            self._run.log({f"eval/{tag}/{k}": v for k, v in numeric.items()})

    def flush(self) -> None:
        pass  # wandb streams in the background; finish() at close waits for it

    def close(self) -> None:
        if self._run is not None:
            self._run.finish()
        self._run = None


def _local_dir(run_dir: str) -> str:
    import os

    os.makedirs(run_dir, exist_ok=True)
    return run_dir


def trackers_from_config(cfg: Any, run_dir: str) -> list[Tracker]:
    """The trackers besides the JSONL journal a run config asks for: TensorBoard always, W&B when
    `wandb.project` is set."""
    out: list[Tracker] = [TensorBoardTracker(fileio.join(run_dir, "tensorboard"))]
    if cfg.wandb.project:
        out.append(WandbTracker(run_dir, project=cfg.wandb.project, entity=cfg.wandb.entity, name=cfg.wandb.name,
                                mode=cfg.wandb.mode, config=cfg.to_dict()))
    return out


class MetricsWriter:
    """Writes `{"phase", "step", **scalars}` training records and evaluation records to every
    tracker (JSONL + TensorBoard by default). A no-op on processes other than 0."""

    def __init__(self, run_dir: str, trackers: Sequence[Tracker] | Callable[[], Sequence[Tracker]] | None = None):
        """`trackers`: besides the JSONL journal (default: TensorBoard); a callable is called on
        process 0 only (so other processes open no W&B run)."""
        self.enabled = jax.process_index() == 0
        self.jsonl_path = fileio.join(run_dir, "metrics.jsonl")
        self.tb_dir = fileio.join(run_dir, "tensorboard")
        self._jsonl: JsonlTracker | None = None
        self._trackers: list[Tracker] = []
        if self.enabled:
            self._jsonl = JsonlTracker(self.jsonl_path)
            if callable(trackers):
                trackers = trackers()
            extra = list(trackers) if trackers is not None else [TensorBoardTracker(self.tb_dir)]
            self._trackers = [self._jsonl, *extra]

    def write(self, record: Mapping[str, Any], *, step: int | None = None, tb_prefix: str | None = None) -> None:
        """Writes one record; with `tb_prefix`, its numeric fields are also a curve at `step`."""
        if not self.enabled:
            return
        clean = {k: _plain(v) for k, v in record.items()}
        for t in self._trackers:
            t.log(clean, step=step, prefix=tb_prefix)

    def rewind(self, phase: str, step: int) -> None:
        """Drops the JSONL records of `phase` logged after `step`: a phase resumed from its
        step-`step` checkpoint logs those steps again. (TensorBoard shows the latest value.)"""
        if self._jsonl is not None:
            self._jsonl.rewind(phase, step)

    def flush(self) -> None:
        """Makes everything written so far durable (on GCS: rewrites the objects now)."""
        for t in self._trackers:
            t.flush()

    def close(self) -> None:
        for t in self._trackers:
            t.close()
        self._trackers = []
        self._jsonl = None


def _logged_after(line: bytes, phase: str, step: int) -> bool:
    try:
        rec = json.loads(line)
    except ValueError:
        return True
    return isinstance(rec, dict) and rec.get("phase") == phase and isinstance(rec.get("step"), int) and (
        rec["step"] > step)


def _plain(v: Any) -> Any:
    if isinstance(v, (np.generic, jax.Array)) or hasattr(v, "item") and np.ndim(v) == 0:
        v = np.asarray(v).item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def read_jsonl(path: str) -> list[dict[str, Any]]:
    return fileio.read_jsonl(path, missing_ok=True)


class _AppenderFactory:
    """tensorboardX writer factory for gs:// event files through `fileio.Appender` (the same GCS
    path as every other run-dir file, instead of tensorboardX's own google-cloud-storage writer)."""

    def open(self, path: str) -> fileio.Appender:
        return fileio.Appender(path, flush_every_s=30.0)

    def directory_check(self, path: str) -> None:
        del path  # object stores need no directories


def _register_gcs_writer() -> None:
    from tensorboardX import record_writer

    record_writer.register_writer_factory("gs", _AppenderFactory())
