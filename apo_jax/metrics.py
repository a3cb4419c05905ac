"""Metrics out: a JSONL file and TensorBoard event files, written by process 0 only.

TensorBoard's event format is a TFRecord stream of `Event` protocol buffers. Writing scalars needs
only four message fields, so they are encoded here directly rather than pulling TensorFlow in.
"""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import time
from typing import Any, Mapping

import jax
import numpy as np

from apo_jax import fileio

# ------------------------------------------------------------------------------------------
# CRC-32C (Castagnoli), as TFRecord framing requires.

_CRC_TABLE = []
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
    _CRC_TABLE.append(_c)


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    return _varint((number << 3) | wire_type) + payload


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _field(number, 2, _varint(len(payload)) + payload)


def encode_scalar_event(wall_time: float, step: int, tag: str, value: float) -> bytes:
    """Event{wall_time=1: double, step=2: int64, summary=5: Summary{value=1: {tag=1, simple_value=2}}}."""
    summary_value = _length_delimited(1, tag.encode()) + _field(2, 5, struct.pack("<f", value))
    summary = _length_delimited(1, summary_value)
    return _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step)) + _length_delimited(5, summary)


def encode_file_version_event(wall_time: float) -> bytes:
    return _field(1, 1, struct.pack("<d", wall_time)) + _length_delimited(3, b"brain.Event:2")


def tfrecord(data: bytes) -> bytes:
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", _masked_crc(header)) + data + struct.pack("<I", _masked_crc(data))


class MetricsWriter:
    """Appends `{"phase", "step", **scalars}` lines to metrics.jsonl and scalars to TensorBoard."""

    def __init__(self, run_dir: str):
        self.enabled = jax.process_index() == 0
        self.jsonl_path = fileio.join(run_dir, "metrics.jsonl")
        self.tb_dir = fileio.join(run_dir, "tensorboard")
        self._jsonl = self._events = None
        if self.enabled:
            name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
            # Locally every record is appended at once; on GCS the objects are rewritten at most
            # every 30 s and at close (GCS cannot append).
            self._jsonl = fileio.Appender(self.jsonl_path, flush_every_s=30.0)
            self._events = fileio.Appender(fileio.join(self.tb_dir, name), flush_every_s=30.0)
            self._events.write(tfrecord(encode_file_version_event(time.time())))

    def write(self, record: Mapping[str, Any], *, step: int | None = None, tb_prefix: str | None = None) -> None:
        """Writes one JSON record; its numeric fields also go to TensorBoard as `prefix/field`."""
        if not self.enabled:
            return
        clean = {k: _plain(v) for k, v in record.items()}
        self._jsonl.write(json.dumps(clean, sort_keys=True) + "\n")
        if tb_prefix is not None:
            now = time.time()
            events = b"".join(
                tfrecord(encode_scalar_event(now, int(step or 0), f"{tb_prefix}/{key}", value))
                for key, value in clean.items()
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value))
            self._events.write(events)

    def rewind(self, phase: str, step: int) -> None:
        """Drops the JSONL records of `phase` logged after `step` (and a torn last line): a phase
        resumed from its step-`step` checkpoint logs those steps again."""
        if not self.enabled:
            return
        self._jsonl.flush()
        if fileio.keep_lines(self.jsonl_path, lambda lines: [x for x in lines if not _logged_after(x, phase, step)]):
            self._jsonl = fileio.Appender(self.jsonl_path, flush_every_s=self._jsonl.flush_every_s)

    def flush(self) -> None:
        """Makes everything written so far durable (on GCS: rewrites the objects now)."""
        for f in (self._jsonl, self._events):
            if f is not None:
                f.flush()

    def close(self) -> None:
        for f in (self._jsonl, self._events):
            if f is not None:
                f.close()
        self._jsonl = self._events = None


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
