"""Weights & Biases as a tracker beside TensorBoard (the `wandb` extra), offline: what the run's
config asks for reaches the W&B run file, read back with an independent reader of its record
format (a LevelDB-style log of protobuf records) rather than through apo_jax."""

from __future__ import annotations

import glob
import json
import struct
import time

import pytest

from apo_jax import config as config_lib
from apo_jax.evaluation import metrics

wandb = pytest.importorskip("wandb", reason="the wandb extra is not installed (pip install 'apo_jax[wandb]')")


def _records(path: str) -> list:
    """The protobuf records of a .wandb file: a 7-byte file header, then 32 KiB blocks of
    [crc32, length, type] chunks (FULL=1, FIRST=2, MIDDLE=3, LAST=4)."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, block, out, pending = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + length > len(data):
            break  # a record still being written
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(pending)
            out.append(rec)
    return out


def test_a_run_config_with_a_wandb_project_logs_curves_and_evaluations_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = config_lib.base_config()
    cfg.wandb.project, cfg.wandb.mode, cfg.seed = "apo", "offline", 7
    run_dir = str(tmp_path / "run")
    writer = metrics.MetricsWriter(run_dir, lambda: metrics.trackers_from_config(cfg, run_dir))
    writer.write({"phase": "rm_base", "step": 1, "loss": 0.7, "accuracy": 0.5}, step=1, tb_prefix="rm_base")
    writer.write({"phase": "rm_base", "step": 2, "loss": 0.6, "accuracy": float("nan")}, step=2, tb_prefix="rm_base")
    writer.write({"phase": "sft", "step": 1, "loss": 2.0}, step=1, tb_prefix="sft")
    writer.write({"name": "rm_test", "label": "RM_Test", "accuracy": 0.8, "ece": 0.1})
    writer.close()

    [path] = glob.glob(f"{run_dir}/wandb/offline-run-*/run-*.wandb")
    deadline = time.monotonic() + 60
    while True:  # wandb's service process may still be writing the file when finish() returns
        recs = _records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in recs) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    [run] = [r.run for r in recs if r.WhichOneof("record_type") == "run"]
    assert run.project == "apo" and run.display_name == "run"
    assert {u.key: json.loads(u.value_json) for u in run.config.update}["seed"] == 7
    history = [{k: v for k, v in ((i.key or "/".join(i.nested_key), json.loads(i.value_json)) for i in r.history.item)
                if not k.startswith("_")} for r in recs if r.WhichOneof("record_type") == "history"]
    assert history == [
        {"rm_base/step": 1, "rm_base/loss": 0.7, "rm_base/accuracy": 0.5},
        {"rm_base/step": 2, "rm_base/loss": 0.6},  # NaN is left out (the JSONL keeps it as "nan")
        {"sft/step": 1, "sft/loss": 2.0},  # each phase against its own step axis
        {"eval/rm_test/accuracy": 0.8, "eval/rm_test/ece": 0.1},
    ]
    # The same run dir continues the same W&B run (a resumed game).
    again = metrics.WandbTracker(run_dir, project="apo", mode="offline")
    assert again._run.id == run.run_id
    again.close()


def test_wandb_fields_are_checked_at_start_up():
    cfg = config_lib.base_config()
    cfg.wandb.mode = "sometimes"
    with pytest.raises(config_lib.ConfigError, match="wandb.mode: 'sometimes'"):
        config_lib.validate(cfg, num_devices=1)
