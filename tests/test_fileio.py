"""fileio on a local disk: atomic replace, appends, torn lines, errors, and the start-up check
for gs:// run dirs. (The same functions on gs:// paths: test_gcs.py.)"""

from __future__ import annotations

import os

import pytest

from apo_jax import config as config_lib
from apo_jax.io import fileio
from loop_fixtures import tiny_config


def test_path_makes_local_paths_absolute_and_keeps_urls(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert os.fspath(fileio.path("runs/a")) == str(tmp_path / "runs" / "a")
    assert os.fspath(fileio.path("gs://bucket/run")) == "gs://bucket/run"
    assert fileio.join("gs://bucket/run", "ckpt", "rm") == "gs://bucket/run/ckpt/rm"
    assert fileio.is_remote("gs://b/x") and not fileio.is_remote(str(tmp_path))


def test_write_replaces_atomically_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "sub" / "state.json"
    fileio.write_json(str(target), {"a": 1})
    fileio.write_json(str(target), {"a": 2})
    assert target.read_text() == '{"a": 2}'
    assert os.listdir(target.parent) == ["state.json"]


def test_jsonl_round_trip_and_bad_line_names_file_and_line(tmp_path):
    path = str(tmp_path / "x.jsonl")
    rows = [{"a": "é"}, {"b": [1, 2]}]
    fileio.write_jsonl(path, rows)
    assert fileio.read_jsonl(path) == rows
    with open(path, "a") as f:
        f.write("{oops\n")
    with pytest.raises(ValueError, match=rf"{path}: line 3: not valid JSON"):
        fileio.read_jsonl(path)
    assert fileio.read_jsonl(str(tmp_path / "missing.jsonl"), missing_ok=True) == []


def test_appender_and_truncate_drop_a_torn_last_line(tmp_path):
    path = str(tmp_path / "samples.jsonl")
    app = fileio.Appender(path)
    app.write_jsonl([{"i": 0}, {"i": 1}])
    app.write('{"i": 2')  # a crash mid-line
    assert fileio.complete_lines(path) == [b'{"i": 0}\n', b'{"i": 1}\n']
    fileio.truncate_lines(path, 1)
    assert open(path).read() == '{"i": 0}\n'
    fileio.Appender(path).write_jsonl([{"i": 1}])
    assert fileio.read_jsonl(path) == [{"i": 0}, {"i": 1}]


def test_gs_run_dir_without_the_gcs_extra_fails_at_start_up(monkeypatch):
    import importlib.util
    import sys
    import types

    import fsspec

    # Neither google-cloud-storage (Orbax's) nor gcsfs (epath's) installed: what this machine has.
    monkeypatch.setitem(sys.modules, "google.cloud.storage", None)  # `import` raises ImportError
    with pytest.raises(config_lib.ConfigError) as info:
        config_lib.validate(tiny_config(run_dir="gs://bucket/run"), 8)
    assert "run_dir: 'gs://bucket/run' needs google-cloud-storage (for Orbax) and gcsfs" in str(info.value)
    assert "pip install 'apo_jax[gcs]'" in str(info.value)

    # The storage client present, the fsspec filesystem missing (and no TensorFlow).
    google = sys.modules.get("google") or types.ModuleType("google")
    cloud = types.ModuleType("google.cloud")
    cloud.storage = types.ModuleType("google.cloud.storage")
    monkeypatch.setitem(sys.modules, "google", google)
    monkeypatch.setattr(google, "cloud", cloud, raising=False)
    monkeypatch.setitem(sys.modules, "google.cloud", cloud)
    monkeypatch.setitem(sys.modules, "google.cloud.storage", cloud.storage)

    def unavailable(protocol):
        raise ImportError("Install gcsfs to access Google Storage")

    monkeypatch.setattr(fsspec, "get_filesystem_class", unavailable)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(config_lib.ConfigError) as info:
        config_lib.validate(tiny_config(run_dir="gs://bucket/run", policy__checkpoint="gs://bucket/llama"), 8)
    assert "run_dir: 'gs://bucket/run' needs a GCS filesystem for etils.epath" in str(info.value)
    assert "policy.checkpoint: 'gs://bucket/llama' needs a GCS filesystem" in str(info.value)


@pytest.mark.parametrize("run_dir, message", [
    ("s3://bucket/run", "the only remote scheme supported is gs://"),
    ("gs://", "the only remote scheme supported is gs://"),
    ("", "run_dir: empty"),
])
def test_unsupported_run_dirs_fail_at_start_up(run_dir, message):
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.validate(tiny_config(run_dir=run_dir), 8)
