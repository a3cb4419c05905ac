"""TensorBoard event encoding against known vectors, and the paper's tables and plots."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from apo_jax import metrics, reporting


def test_crc32c_known_vectors():
    # RFC 3720 test vector and the classic check value for CRC-32C.
    assert metrics.crc32c(b"123456789") == 0xE3069283
    assert metrics.crc32c(bytes(32)) == 0x8A9136AA


def test_scalar_event_is_a_valid_tfrecord_protobuf():
    rec = metrics.tfrecord(metrics.encode_scalar_event(1.5, 7, "rm/loss", 0.25))
    (length,) = struct.unpack("<Q", rec[:8])
    data = rec[12:12 + length]
    assert len(rec) == 12 + length + 4
    # Hand-decoded protobuf: field 1 (double wall_time), field 2 (varint step), field 5 (summary).
    assert data[0] == (1 << 3 | 1) and struct.unpack("<d", data[1:9])[0] == 1.5
    assert data[9] == (2 << 3 | 0) and data[10] == 7
    assert data[11] == (5 << 3 | 2)
    summary = data[13:]
    assert summary[0] == (1 << 3 | 2)  # Summary.value
    value = summary[2:]
    assert value[0] == (1 << 3 | 2) and value[2:2 + value[1]] == b"rm/loss"
    tail = value[2 + value[1]:]
    assert tail[0] == (2 << 3 | 5) and struct.unpack("<f", tail[1:5])[0] == 0.25


def test_metrics_writer_jsonl(tmp_path):
    w = metrics.MetricsWriter(str(tmp_path))
    w.write({"phase": "rm", "loss": np.float32(0.5), "acc": 1.0}, step=3, tb_prefix="rm")
    w.close()
    rows = metrics.read_jsonl(str(tmp_path / "metrics.jsonl"))
    assert rows == [{"acc": 1.0, "loss": 0.5, "phase": "rm"}]
    assert len(list((tmp_path / "tensorboard").iterdir())) == 1



def test_rewind_drops_the_steps_a_resumed_phase_logs_again(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"phase": "rm", "step": 1}, {"phase": "sft", "step": 5}, {"phase": "rm", "step": 2},
             {"kind": "rm_eval", "name": "rm"}, {"phase": "rm", "step": 3}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"phase": "rm", "st')  # torn by a crash
    w = metrics.MetricsWriter(str(tmp_path))
    w.rewind("rm", 1)
    w.write({"phase": "rm", "step": 2, "loss": 0.1})
    w.close()
    assert metrics.read_jsonl(str(path)) == [lines[0], lines[1], lines[3], {"phase": "rm", "step": 2, "loss": 0.1}]


RM = [
    {"kind": "rm_eval", "model": "RM_Base", "schedule": "rjs", "round": 0, "test_acc": 0.6, "test_ece": 0.05,
     "dev_acc": 0.61, "dev_ece": 0.04, "test_ece_weighted": 0.03, "dev_ece_weighted": 0.02},
    {"kind": "rm_eval", "model": "RM_APO-v1", "schedule": "apo", "round": 1, "test_acc": 0.62, "test_ece": 0.03,
     "dev_acc": 0.63, "dev_ece": 0.02, "test_ece_weighted": 0.02, "dev_ece_weighted": 0.01},
]
POL = [
    {"kind": "policy_eval", "schedule": "base", "round": 0, "avg_score": 1.0, "true_reward": 0.3},
    {"kind": "policy_eval", "schedule": "rjs", "round": 1, "avg_score": 1.5, "true_reward": 0.4},
    {"kind": "policy_eval", "schedule": "apo", "round": 1, "avg_score": 1.7, "true_reward": 0.5},
]


def test_tables_hold_every_number():
    t2 = reporting.table2(RM)
    assert "| RM_APO-v1 | 1 | 0.6200 | 0.0300 | 0.6300 | 0.0200 |" in t2
    t3 = reporting.table3(POL)
    assert "| v0 | 1.0000 | 1.0000 |" in t3  # round 0 is the shared initial policy
    assert "| v1 | 1.5000 | 1.7000 |" in t3
    assert "| v1 | 0.4000 | 0.5000 |" in t3  # true reward table


def test_reports_write_pngs(tmp_path):
    out = reporting.write_reports(RM + POL, str(tmp_path))
    for key in ("figure2_rm", "figure2_policy"):
        with open(out[key], "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "Table 2" in open(out["tables"]).read()
