"""Metrics records (JSONL + TensorBoard events read back by hand), and the paper's tables and plots."""

from __future__ import annotations

import json
import struct

import numpy as np

from apo_jax.evaluation import metrics, reporting


def _crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), bit by bit: the reference for TFRecord framing."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    return crc ^ 0xFFFFFFFF


def _masked(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _read_tfrecords(path) -> list[bytes]:
    data, out, i = open(path, "rb").read(), [], 0
    while i < len(data):
        (length,) = struct.unpack("<Q", data[i:i + 8])
        assert struct.unpack("<I", data[i + 8:i + 12])[0] == _masked(_crc32c(data[i:i + 8]))
        payload = data[i + 12:i + 12 + length]
        assert struct.unpack("<I", data[i + 12 + length:i + 16 + length])[0] == _masked(_crc32c(payload))
        out.append(payload)
        i += 16 + length
    return out


def test_crc_reference_known_vector():
    assert _crc32c(b"123456789") == 0xE3069283  # RFC 3720 / the classic CRC-32C check value


def test_metrics_writer_writes_jsonl_and_valid_tensorboard_events(tmp_path):
    from tensorboardX.proto import event_pb2

    w = metrics.MetricsWriter(str(tmp_path))
    w.write({"phase": "rm", "step": 3, "loss": np.float32(0.25), "acc": 1.0}, step=3, tb_prefix="rm")
    w.write({"kind": "rm_eval", "test_acc": 0.5})  # an evaluation record: JSONL only
    w.close()
    rows = metrics.read_jsonl(str(tmp_path / "metrics.jsonl"))
    assert rows == [{"acc": 1.0, "loss": 0.25, "phase": "rm", "step": 3}, {"kind": "rm_eval", "test_acc": 0.5}]
    [events_file] = list((tmp_path / "tensorboard").iterdir())
    scalars = {}
    for payload in _read_tfrecords(events_file):
        event = event_pb2.Event.FromString(payload)
        for v in event.summary.value:
            scalars[v.tag] = (event.step, v.simple_value)
    assert scalars == {"rm/loss": (3, 0.25), "rm/acc": (3, 1.0), "rm/step": (3, 3.0)}


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
