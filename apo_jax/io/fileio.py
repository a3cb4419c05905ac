"""Run-directory I/O that works the same on a local disk and on object storage (`gs://`).

Everything a run writes (loop state, JSONL journals, metrics, tables, plots, Hugging Face
exports) goes through these functions and `etils.epath`, the path library Orbax itself uses,
so `--config.run_dir=gs://bucket/run` keeps the whole run, checkpoints included, in the bucket:
a preempted TPU VM's replacement resumes from there. Orbax writes `gs://` natively (TensorStore's
GCS driver); the small files here go through epath's fsspec backend (`pip install
"apo_jax[gcs]"`, which adds gcsfs) or TensorFlow's gfile where TensorFlow is installed.

Two differences between the stores are handled here rather than at every call site:
- *Atomic replace.* Local files are written to a temporary name, fsynced and renamed. A GCS
  object upload is already atomic (readers see the old or the new object), so it is written
  in place.
- *Append.* GCS objects cannot be appended to. `Appender` keeps what it wrote and rewrites the
  object at most every `flush_every_s` seconds (and on `close`); locally it appends and fsyncs
  each call. Resumable writers (samples, metrics) count what reached storage, so a line lost
  with an unflushed buffer is redone, not corrupted.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Iterable

from etils import epath

REMOTE_PREFIXES = ("gs://", "s3://")


def is_remote(path: str | os.PathLike) -> bool:
    return os.fspath(path).startswith(REMOTE_PREFIXES)


def remote_backend_problem(url: str) -> str | None:
    """Why `url` (gs://...) cannot be written from this process, or None if it can.

    epath reaches GCS through TensorFlow's gfile when TensorFlow is installed, else through
    fsspec's `gs` filesystem (gcsfs). Checked at start-up, so a missing package fails the run
    before any work rather than at its first save.
    """
    import importlib.util

    try:
        # Orbax asks the storage client about gs:// buckets (step listing, deletion).
        import google.cloud.storage  # noqa: F401
    except ImportError as e:
        return (f"{url!r} needs google-cloud-storage (for Orbax) and gcsfs (for etils.epath): "
                f"pip install 'apo_jax[gcs]' ({type(e).__name__}: {e})")
    if importlib.util.find_spec("tensorflow") is not None:
        return None
    try:
        import fsspec

        fsspec.get_filesystem_class(url.split("://", 1)[0])
    except (ImportError, ValueError) as e:
        return (f"{url!r} needs a GCS filesystem for etils.epath: pip install 'apo_jax[gcs]' (gcsfs) "
                f"or tensorflow ({type(e).__name__}: {e})")
    return None


def local_cache_dir(*parts: str) -> str:
    """A directory on this host's disk for copies of remote things: $APO_JAX_CACHE (default
    ~/.cache/apo_jax)/parts."""
    root = os.environ.get("APO_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "apo_jax")
    return os.path.join(root, *parts)


def local_copy(url: str) -> str:
    """A local path holding what `url` (gs://...: a file or a directory tree) holds, for readers
    that need local files (gzip, tokenizers, safetensors). Copied once into
    local_cache_dir("remote", bucket/path); a copy already there is reused. Each process copies
    into its own temporary name and renames it into place, so processes sharing a host never see
    a half-written copy. FileNotFoundError if `url` does not exist."""
    import shutil
    import tempfile

    src = path(url)
    if not src.exists():
        raise FileNotFoundError(f"{url}: no such file or directory")
    dest = local_cache_dir("remote", url.split("://", 1)[1].strip("/"))
    if os.path.exists(dest):
        return dest
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dest)}.part-", dir=os.path.dirname(dest))
    try:
        if src.is_dir():
            out = os.path.join(tmp, "tree")
            for f in _files_under(src):
                rel = os.fspath(f)[len(os.fspath(src).rstrip("/")):].lstrip("/")
                os.makedirs(os.path.dirname(os.path.join(out, rel)), exist_ok=True)
                with open(os.path.join(out, rel), "wb") as w:
                    w.write(f.read_bytes())
            os.makedirs(out, exist_ok=True)
        else:
            out = os.path.join(tmp, "file")
            with open(out, "wb") as w:
                w.write(src.read_bytes())
        try:
            os.rename(out, dest)
        except OSError:
            if not os.path.exists(dest):  # not another process's finished copy: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _files_under(directory: epath.Path) -> list[epath.Path]:
    out = []
    for child in directory.iterdir():
        out.extend(_files_under(child) if child.is_dir() else [child])
    return out


def path(p: str | os.PathLike) -> epath.Path:
    """An epath for `p`: remote URLs as given, local paths made absolute (user-expanded)."""
    s = os.fspath(p)
    if is_remote(s):
        return epath.Path(s)
    return epath.Path(os.path.abspath(os.path.expanduser(s)))


def join(p: str | os.PathLike, *parts: str) -> str:
    """`p / parts` as a string that `path` maps back to the same location."""
    return os.fspath(path(p).joinpath(*parts))


def makedirs(p: str | os.PathLike) -> None:
    path(p).mkdir(parents=True, exist_ok=True)


def exists(p: str | os.PathLike) -> bool:
    return path(p).exists()


def read_text(p: str | os.PathLike) -> str:
    return path(p).read_text(encoding="utf-8")


def read_bytes(p: str | os.PathLike) -> bytes:
    return path(p).read_bytes()


def write_bytes(p: str | os.PathLike, data: bytes) -> None:
    """Replaces `p` with `data` atomically: readers see the old or the new content, never part."""
    target = path(p)
    target.parent.mkdir(parents=True, exist_ok=True)
    if is_remote(target):
        target.write_bytes(data)  # one object upload: atomic on GCS
        return
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)


def write_text(p: str | os.PathLike, text: str) -> None:
    write_bytes(p, text.encode("utf-8"))


def write_json(p: str | os.PathLike, obj: Any, **kwargs: Any) -> None:
    write_text(p, json.dumps(obj, **kwargs))


def jsonl_bytes(rows: Iterable[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def write_jsonl(p: str | os.PathLike, rows: Iterable[dict]) -> None:
    write_bytes(p, jsonl_bytes(rows))


def read_jsonl(p: str | os.PathLike, *, missing_ok: bool = False) -> list[dict]:
    """The JSON objects of a JSONL file; a bad line raises `ValueError` naming file and line."""
    target = path(p)
    if missing_ok and not target.exists():
        return []
    out = []
    for i, line in enumerate(target.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}: line {i}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{p}: line {i}: not a JSON object")
            out.append(rec)
    return out


def complete_lines(p: str | os.PathLike) -> list[bytes]:
    """The newline-terminated lines of `p` (a torn last line from a crash is left out)."""
    target = path(p)
    return _complete(target.read_bytes()) if target.exists() else []


def _complete(data: bytes) -> list[bytes]:
    return [line for line in data.splitlines(keepends=True) if line.endswith(b"\n")]


def keep_lines(p: str | os.PathLike, select: Callable[[list[bytes]], list[bytes]]) -> bool:
    """Rewrites `p` (atomically) to `select(its complete lines)`, and only if that changes it (a
    torn last line is always dropped). Returns whether it was rewritten."""
    target = path(p)
    if not target.exists():
        return False
    raw = target.read_bytes()
    kept = b"".join(select(_complete(raw)))
    if kept == raw:
        return False
    write_bytes(target, kept)
    return True


def truncate_lines(p: str | os.PathLike, n: int) -> None:
    """Keeps the first `n` complete lines of `p`."""
    keep_lines(p, lambda lines: lines[:n])


class Appender:
    """Appends to one file. Local: append + fsync per call. Remote: rewrite of the whole object,
    at most every `flush_every_s` seconds and on `flush()`/`close()` (GCS has no append)."""

    def __init__(self, p: str | os.PathLike, *, flush_every_s: float = 30.0):
        self.path = path(p)
        self.remote = is_remote(self.path)
        self.flush_every_s = flush_every_s
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._content = bytearray()
        self._dirty = False
        self._last_flush = time.monotonic()
        if self.remote and self.path.exists():
            self._content += self.path.read_bytes()

    def write(self, data: bytes | str) -> None:
        if isinstance(data, str):
            data = data.encode("utf-8")
        if not self.remote:
            with open(self.path, "ab") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            return
        self._content += data
        self._dirty = True
        if time.monotonic() - self._last_flush >= self.flush_every_s:
            self.flush()

    def write_jsonl(self, rows: Iterable[dict]) -> None:
        self.write(jsonl_bytes(rows))

    def flush(self) -> None:
        if self.remote and self._dirty:
            self.path.write_bytes(bytes(self._content))
            self._dirty = False
        self._last_flush = time.monotonic()

    def close(self) -> None:
        self.flush()
