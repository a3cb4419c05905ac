"""Run-directory integrity: one writer per run dir, and one config per run dir.

`open_run(cfg)` is called by `main` before the game starts. On process 0 it

1. makes the run dir (a read-only path, a file, or a path under a file stop here, named);
2. takes the run-dir lock: `run.lock`, a `flock`-ed file holding the holder's host, pid and start
   time on a local or shared disk (the kernel drops it when the holder dies, so a lock left by a
   killed run is simply taken over), or on `gs://` an object *lease* written with a generation
   precondition, carrying an expiry that a background thread renews while the run lives (a lease
   from a dead process on the same host, or an expired one, is taken over);
3. checks the config fingerprint: `fingerprint.json` records every config field that changes
   what the run computes. A rerun whose fingerprint differs stops, naming each differing field
   (old -> new) and the two ways out: a new `run_dir`, or `--allow_config_change` for the few
   changes that keep every result already on disk valid (`ALLOWED_CHANGES`).

The fingerprint is everything *except* `EXCLUDED` (where the run writes, how often it logs and
checkpoints, how work is laid out on devices), so a field added to the config later is guarded
by default. Input locations (`INPUT_PATHS`) are recorded but may change (the same checkpoint or
data moved to another disk or a bucket); a change is reported, not refused.
Other processes of a multi-process run wait for process 0's verdict (one broadcast).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any, Sequence

import ml_collections

from apo_jax.io import fileio

log = logging.getLogger("apo_jax")

FINGERPRINT_NAME = "fingerprint.json"
LOCK_NAME = "run.lock"
LEASE_TTL_S = 120.0  # a gs:// lease not renewed for this long is free to take
NAME_WAIT_S = 2.0  # how long a refused process waits for the lock holder to write its name

# Config fields (dotted; a prefix covers its subtree) that do not change what a run computes.
EXCLUDED: tuple[str, ...] = (
    "run_dir",  # where the run writes
    "mesh",  # a resumed run may use another slice; the layout changes float rounding only
    "log_every_steps",
    "compilation_cache_dir",  # compiled programs are the same, only where they are kept
    "checkpoint",  # save cadence, async saves, how many to keep
    "eval.batch_size",  # scoring rows are independent of their batch
    "policy.remat_policy", "rm.remat_policy",  # memory/speed trade-offs, same math
    "policy.attention_impl", "rm.attention_impl",
)
# Where the inputs are read from: recorded, and a change is reported but allowed.
INPUT_PATHS: tuple[str, ...] = (
    "data.hh_train", "data.hh_test", "data.train", "data.test", "data.prompts", "data.gold", "data.tokenizer",
    "rm.tokenizer", "policy.checkpoint", "rm.init_checkpoint", "rm.base_checkpoint", "rm.test_checkpoint",
)
# The changes `--allow_config_change` accepts: each keeps every finished phase valid, because
# rounds are played in order and round r reads only rounds < r and sft.lrs[r - 1].
ALLOWED_CHANGES: dict[str, str] = {
    "apo.rounds": "may only increase (continue the game with more rounds)",
    "sft.lrs": "may change only after the rounds already played (the first apo.rounds entries stay)",
}


class RunDirError(RuntimeError):
    """The run dir cannot be used by this run (message: one line naming the cause and the way out)."""


class RunDirLocked(RunDirError):
    """Another live process holds the run dir."""


# --------------------------------------------------------------------------------------------
# The fingerprint.


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in sorted(d):
        name = f"{prefix}{key}"
        value = d[key]
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = json.loads(json.dumps(value, default=str))  # tuples -> lists, as stored
    return out


def _covered(name: str, fields: Sequence[str]) -> bool:
    return any(name == f or name.startswith(f + ".") for f in fields)


def fingerprint(cfg: ml_collections.ConfigDict | dict) -> dict[str, Any]:
    """Dotted field -> JSON value of every field that changes results (all but EXCLUDED/INPUT_PATHS)."""
    flat = _flatten(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    return {k: v for k, v in flat.items() if not _covered(k, EXCLUDED + INPUT_PATHS)}


def input_paths(cfg: ml_collections.ConfigDict | dict) -> dict[str, Any]:
    flat = _flatten(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    return {k: v for k, v in flat.items() if _covered(k, INPUT_PATHS)}


_ABSENT = "(absent)"


def diff(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Fields whose values differ: name -> (old, new); a field missing on one side shows as '(absent)'."""
    return {k: (old.get(k, _ABSENT), new.get(k, _ABSENT)) for k in sorted(set(old) | set(new))
            if old.get(k, _ABSENT) != new.get(k, _ABSENT)}


def _show(v: Any) -> str:
    return v if v == _ABSENT else json.dumps(v)


def _change_problem(field: str, old: Any, new: Any, old_fields: dict[str, Any]) -> str | None:
    """Why an allowed-by-name change is still unsafe, or None."""
    if field == "apo.rounds":
        if not (isinstance(old, int) and isinstance(new, int) and new > old):
            return f"apo.rounds {_show(old)} -> {_show(new)}: {ALLOWED_CHANGES[field]}"
    if field == "sft.lrs":
        played = int(old_fields.get("apo.rounds", 0))
        if not (isinstance(old, list) and isinstance(new, list) and old[:played] == new[:played]):
            return f"sft.lrs {_show(old)} -> {_show(new)}: the first {played} (already played) must stay"
    return None


def check_fingerprint(cfg: ml_collections.ConfigDict, run_dir: str,
                      allow_changes: Sequence[str] = ()) -> list[str]:
    """Compares `cfg` with the run dir's recorded fingerprint and records it (new or allowed change).

    Returns notes to print (accepted changes, moved inputs); raises RunDirError with the field
    diff when the configs differ in a way `allow_changes` does not cover. A run dir from before
    fingerprints were recorded is compared with its `config.json`.
    """
    allow = [a.strip() for a in allow_changes if a.strip()]
    bad = [a for a in allow if a not in ALLOWED_CHANGES]
    if bad:
        raise RunDirError(
            f"--allow_config_change: {', '.join(bad)} cannot change on an existing run dir (only "
            f"{', '.join(ALLOWED_CHANGES)} can: the results on disk depend on everything else); use a new run_dir")
    path = fileio.join(run_dir, FINGERPRINT_NAME)
    new_fields, new_inputs = fingerprint(cfg), input_paths(cfg)
    record: dict[str, Any] = {"fields": new_fields, "inputs": new_inputs, "history": []}
    notes: list[str] = []
    old: dict[str, Any] | None = None
    if fileio.exists(path):
        try:
            old = json.loads(fileio.read_text(path))
            old_fields = old["fields"]
        except (ValueError, KeyError, TypeError) as e:
            raise RunDirError(f"{path}: unreadable ({type(e).__name__}: {e}); restore it or use a new run_dir") from None
    elif fileio.exists(fileio.join(run_dir, "config.json")):
        try:
            legacy = json.loads(fileio.read_text(fileio.join(run_dir, "config.json")))
        except ValueError as e:
            raise RunDirError(f"{fileio.join(run_dir, 'config.json')}: unreadable ({e}); use a new run_dir") from None
        old = {"fields": fingerprint(legacy), "inputs": input_paths(legacy), "history": []}
        old_fields = old["fields"]
    if old is not None:
        changed = diff(old_fields, new_fields)
        refused = [f for f in changed if f not in allow]
        if refused:
            shown = ", ".join(f"{f} {_show(changed[f][0])} -> {_show(changed[f][1])}" for f in refused[:8])
            more = f" and {len(refused) - 8} more" if len(refused) > 8 else ""
            raise RunDirError(
                f"{run_dir} holds a run made with a different config ({shown}{more}): use a new "
                "--config.run_dir, or, to continue this run with more rounds, --allow_config_change=apo.rounds,sft.lrs")
        problems = [p for f in changed if (p := _change_problem(f, *changed[f], old_fields))]
        if problems:
            raise RunDirError(f"{run_dir}: --allow_config_change refused: {'; '.join(problems)}; use a new run_dir")
        for f, (a, b) in changed.items():
            notes.append(f"continuing {run_dir} with {f} {_show(a)} -> {_show(b)} (--allow_config_change)")
        for f, (a, b) in diff(old.get("inputs", {}), new_inputs).items():
            notes.append(f"{f} moved: {_show(a)} -> {_show(b)} (assumed to hold the same input)")
        if not changed and not notes and fileio.exists(path):
            return notes  # unchanged: nothing to record
        record["history"] = list(old.get("history", [])) + [
            {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             "changed": {f: [a, b] for f, (a, b) in changed.items()}}]
    fileio.write_json(path, record, indent=1, sort_keys=True)
    return notes


# --------------------------------------------------------------------------------------------
# The lock.


@dataclasses.dataclass
class Holder:
    """Who holds a run dir: written into the lock (file or gs:// object) as JSON."""

    host: str
    pid: int
    started: float  # unix time
    expires: float | None = None  # gs:// leases only
    token: str = ""

    @classmethod
    def me(cls, expires: float | None = None) -> "Holder":
        return cls(socket.gethostname(), os.getpid(), time.time(), expires, uuid.uuid4().hex)

    @classmethod
    def parse(cls, data: bytes) -> "Holder | None":
        try:
            d = json.loads(data.decode())
            return cls(str(d["host"]), int(d["pid"]), float(d["started"]), d.get("expires"), str(d.get("token", "")))
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            return None

    def dumps(self) -> bytes:
        return json.dumps(dataclasses.asdict(self)).encode()

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started))
        return f"host {self.host} pid {self.pid} (started {started})"

    def is_dead_here(self) -> bool:
        """True when the holder ran on this host and its process is gone."""
        if self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            return False
        return False


def _locked_error(run_dir: str, holder: Holder | None, extra: str = "") -> RunDirLocked:
    who = holder.describe() if holder else "another process (which has not written its name yet)"
    return RunDirLocked(f"{run_dir} is in use by {who}{extra}; wait for it to end, or use another --config.run_dir")


class LocalLock:
    """`run.lock` under a local or shared-disk run dir, held with `flock` for the process's life.

    The file is never deleted (deleting a flock-ed file lets two processes lock two inodes); its
    content names the holder. Where the file system has no flock (some FUSE mounts), the holder's
    pid is checked instead (best effort: a dead holder on this host is taken over).
    """

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, LOCK_NAME)
        self._fd: int | None = None
        self.took_over: Holder | None = None

    def acquire(self) -> None:
        import fcntl

        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunDirError(f"run_dir: {self.run_dir}: cannot write its lock file {LOCK_NAME} ({e.strerror}); "
                              "use a writable --config.run_dir") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            # The winner of a race writes its name just after taking the flock: wait briefly for it.
            holder = Holder.parse(os.pread(fd, 4096, 0))
            deadline = time.monotonic() + NAME_WAIT_S
            while holder is None and time.monotonic() < deadline:
                time.sleep(0.02)
                holder = Holder.parse(os.pread(fd, 4096, 0))
            os.close(fd)
            raise _locked_error(self.run_dir, holder) from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                os.close(fd)
                raise
            holder = Holder.parse(os.pread(fd, 4096, 0))
            if holder is not None and holder.pid != os.getpid() and not holder.is_dead_here():
                os.close(fd)
                raise _locked_error(self.run_dir, holder, " (no flock on this file system: pid check)") from None
        previous = Holder.parse(os.pread(fd, 4096, 0))
        if previous is not None:
            self.took_over = previous  # the lock was free, so its last holder ended without releasing it
        os.ftruncate(fd, 0)
        os.pwrite(fd, Holder.me().dumps(), 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)  # an empty lock file names nobody
        os.close(self._fd)  # closing drops the flock
        self._fd = None


class GcsLease:
    """`run.lock` as a `gs://` object lease: created/replaced only with a generation precondition
    (through TensorStore's GCS driver, the one Orbax writes with), holding an expiry that a daemon
    thread pushes forward every `ttl_s / 4` seconds while the run lives."""

    def __init__(self, run_dir: str, ttl_s: float = LEASE_TTL_S):
        import tensorstore as ts

        bucket, _, prefix = run_dir[len("gs://"):].partition("/")
        spec: dict[str, Any] = {"driver": "gcs", "bucket": bucket}
        if prefix.strip("/"):
            spec["path"] = prefix.strip("/") + "/"
        self.run_dir = run_dir
        self.ttl_s = ttl_s
        self._kv = ts.KvStore.open(spec).result()
        self._generation: bytes | None = None
        self._holder: Holder | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.took_over: Holder | None = None
        self.lost = False

    def acquire(self) -> None:
        for _ in range(3):  # a lost race re-reads the object once or twice
            current = self._kv.read(LOCK_NAME).result()
            if current.state != "missing":
                holder = Holder.parse(current.value)
                free = holder is None or (holder.expires or 0.0) < time.time() or holder.is_dead_here()
                if not free:
                    left = f"; its lease expires in {max(0, int((holder.expires or 0) - time.time()))} s unless renewed"
                    raise _locked_error(self.run_dir, holder, left)
                self.took_over = holder
            me = Holder.me(expires=time.time() + self.ttl_s)
            written = self._kv.write(LOCK_NAME, me.dumps(), if_equal=current.stamp.generation).result()
            if written.generation:  # empty: the precondition failed, someone else wrote first
                self._generation, self._holder = written.generation, me
                self._thread = threading.Thread(target=self._renew_loop, name="apo_jax-run-lease", daemon=True)
                self._thread.start()
                return
        current = self._kv.read(LOCK_NAME).result()
        raise _locked_error(self.run_dir, Holder.parse(current.value) if current.state != "missing" else None)

    def renew(self) -> bool:
        """Pushes the expiry forward; False (and `lost`) if someone else replaced the lease."""
        assert self._holder is not None and self._generation is not None
        holder = dataclasses.replace(self._holder, expires=time.time() + self.ttl_s)
        written = self._kv.write(LOCK_NAME, holder.dumps(), if_equal=self._generation).result()
        if not written.generation:
            self.lost = True
            log.error("apo_jax: the lease on %s was taken by another process; this run no longer owns its run dir",
                      self.run_dir)
            return False
        self._generation, self._holder = written.generation, holder
        return True

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                if not self.renew():
                    return
            except Exception as e:  # a network blip: the next tick retries well before expiry
                log.warning("apo_jax: renewing the lease on %s failed (%s); retrying", self.run_dir, e)

    def release(self) -> None:
        if self._generation is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if not self.lost:
            self._kv.write(LOCK_NAME, None, if_equal=self._generation).result()  # delete if still ours
        self._generation = None


def lock_for(run_dir: str, *, lease_ttl_s: float = LEASE_TTL_S) -> LocalLock | GcsLease:
    return GcsLease(run_dir, lease_ttl_s) if run_dir.startswith("gs://") else LocalLock(run_dir)


# --------------------------------------------------------------------------------------------
# Start-up.


def _make_run_dir(run_dir: str) -> None:
    """Creates the run dir; a file in the way or no write permission is a RunDirError."""
    if fileio.is_remote(run_dir):
        fileio.makedirs(run_dir)
        return
    parts = os.path.abspath(run_dir).split(os.sep)
    for i in range(2, len(parts) + 1):  # the first existing non-directory on the path
        p = os.sep.join(parts[:i])
        if os.path.exists(p) and not os.path.isdir(p):
            what = "is a file" if p == os.path.abspath(run_dir) else f"is under {p}, which is a file"
            raise RunDirError(f"run_dir: {run_dir} {what}; expected a directory")
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"run_dir: {run_dir}: cannot create it ({e.strerror})") from None
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise RunDirError(f"run_dir: {run_dir} is not writable by this user; use another --config.run_dir")


def _agree(ok: bool) -> bool:
    """Process 0's verdict, seen by every process (a no-op in a single-process run)."""
    import jax

    if jax.process_count() == 1:
        return ok
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))


def open_run(cfg: ml_collections.ConfigDict, *, allow_changes: Sequence[str] = (),
             lease_ttl_s: float = LEASE_TTL_S) -> LocalLock | GcsLease | None:
    """Makes, locks and fingerprint-checks the run dir (process 0); returns the held lock
    (None on other processes). Call `release()` on it when the run ends."""
    import jax

    run_dir = os.fspath(fileio.path(cfg.run_dir))
    lock: LocalLock | GcsLease | None = None
    error: RunDirError | None = None
    if jax.process_index() == 0:
        try:
            _make_run_dir(run_dir)
            lock = lock_for(run_dir, lease_ttl_s=lease_ttl_s)
            lock.acquire()
            notes = check_fingerprint(cfg, run_dir, allow_changes)
            if lock.took_over is not None:
                notes.insert(0, f"took over the lock of {lock.took_over.describe()} on {run_dir} (no longer running)")
            for note in notes:  # status lines, like the game's (stdout)
                print(f"apo_jax: {note}", flush=True)
        except RunDirError as e:
            error = e
            if lock is not None:
                lock.release()
            lock = None
    if not _agree(error is None):
        raise error or RunDirError(f"{run_dir}: process 0 could not open the run dir (see its message)")
    return lock
