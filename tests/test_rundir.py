"""Run-dir integrity (issue #16): the config fingerprint and the run-dir lock / gs:// lease."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from apo_jax import config as config_lib
from apo_jax.io import rundir
from fake_gcs import fake_gcs_fixture  # noqa: F401  (the fixture "fake_gcs")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(**changes):
    c = config_lib.base_config()
    for key, value in changes.items():
        *parents, leaf = key.split("__")
        node = c
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


# ------------------------------------------------------------------------------------------
# The fingerprint.


def test_changed_seed_rerun_is_refused_with_the_field_diff(tmp_path):
    assert rundir.check_fingerprint(_cfg(), str(tmp_path)) == []
    recorded = json.loads((tmp_path / rundir.FINGERPRINT_NAME).read_text())["fields"]
    assert recorded["seed"] == 0 and recorded["rm.base.lr"] == 1e-6 and "run_dir" not in recorded
    with pytest.raises(rundir.RunDirError) as e:
        rundir.check_fingerprint(_cfg(seed=1, rm__base__lr=1e-3), str(tmp_path))
    msg = str(e.value)
    assert "\n" not in msg
    assert "seed 0 -> 1" in msg and "rm.base.lr 1e-06 -> 0.001" in msg, msg
    assert "--config.run_dir" in msg and "--allow_config_change" in msg, msg
    # Refused means untouched: the record still holds the first run's config.
    assert json.loads((tmp_path / rundir.FINGERPRINT_NAME).read_text())["fields"] == recorded


def test_unchanged_rerun_passes_and_cadence_or_layout_may_change(tmp_path):
    rundir.check_fingerprint(_cfg(), str(tmp_path))
    before = (tmp_path / rundir.FINGERPRINT_NAME).stat().st_mtime_ns
    same = _cfg(log_every_steps=1, checkpoint__save_every_steps=7, mesh__fsdp=2, eval__batch_size=8,
                run_dir="/elsewhere", rm__remat_policy="full")
    assert rundir.check_fingerprint(same, str(tmp_path)) == []
    assert (tmp_path / rundir.FINGERPRINT_NAME).stat().st_mtime_ns == before
    # A moved input is reported, not refused (the same checkpoint on another disk).
    notes = rundir.check_fingerprint(_cfg(policy__checkpoint="/models/a"), str(tmp_path))
    assert notes == ['policy.checkpoint moved: "" -> "/models/a" (assumed to hold the same input)']


def test_a_new_field_is_fingerprinted_by_default(tmp_path):
    c = _cfg()
    c.unlock()
    c.data.some_future_option = 3  # a field added after this module was written
    rundir.check_fingerprint(c, str(tmp_path))
    c.data.some_future_option = 4
    with pytest.raises(rundir.RunDirError, match=r"data.some_future_option 3 -> 4"):
        rundir.check_fingerprint(c, str(tmp_path))


def test_more_rounds_continue_only_through_the_documented_override(tmp_path):
    d = str(tmp_path)
    rundir.check_fingerprint(_cfg(apo__rounds=2, sft__lrs=(5e-6, 2e-6)), d)
    more = _cfg(apo__rounds=3, sft__lrs=(5e-6, 2e-6, 9e-7))
    with pytest.raises(rundir.RunDirError, match=r"apo.rounds 2 -> 3"):
        rundir.check_fingerprint(more, d)
    notes = rundir.check_fingerprint(more, d, allow_changes=["apo.rounds", "sft.lrs"])
    assert any("apo.rounds 2 -> 3" in n for n in notes), notes
    record = json.loads((tmp_path / rundir.FINGERPRINT_NAME).read_text())
    assert record["fields"]["apo.rounds"] == 3 and record["history"][-1]["changed"]["apo.rounds"] == [2, 3]
    assert rundir.check_fingerprint(more, d) == []  # the continued config is now the recorded one
    # Unsafe even when named: fewer rounds, a played round's learning rate, any other field.
    with pytest.raises(rundir.RunDirError, match="may only increase"):
        rundir.check_fingerprint(_cfg(apo__rounds=2, sft__lrs=(5e-6, 2e-6, 9e-7)), d, ["apo.rounds"])
    with pytest.raises(rundir.RunDirError, match="already played"):
        rundir.check_fingerprint(_cfg(apo__rounds=4, sft__lrs=(1e-5, 2e-6, 9e-7, 1e-7)), d,
                                 ["apo.rounds", "sft.lrs"])
    with pytest.raises(rundir.RunDirError, match="seed cannot change"):
        rundir.check_fingerprint(_cfg(apo__rounds=3, seed=5), d, ["seed"])


def test_a_run_dir_from_before_fingerprints_is_compared_with_its_config_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_cfg().to_dict(), default=str))
    with pytest.raises(rundir.RunDirError, match="seed 0 -> 3"):
        rundir.check_fingerprint(_cfg(seed=3), str(tmp_path))
    assert rundir.check_fingerprint(_cfg(), str(tmp_path)) == []
    assert (tmp_path / rundir.FINGERPRINT_NAME).exists()


# ------------------------------------------------------------------------------------------
# The local lock.

_HOLD = """
import os, sys, time
from apo_jax.io import rundir
lock = rundir.LocalLock(sys.argv[1])
print("READY", flush=True)
while not os.path.exists(sys.argv[2]):  # all contenders try at the same moment
    time.sleep(0.005)
try:
    lock.acquire()
except rundir.RunDirLocked as e:
    print("REFUSED", e, flush=True)
    sys.exit(0)
print("ACQUIRED", flush=True)
sys.stdin.read()  # hold the lock until the test closes our stdin
"""


def _spawn(run_dir, go):
    p = subprocess.Popen([sys.executable, "-c", _HOLD, str(run_dir), str(go)], cwd=REPO,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "READY"
    return p


def test_processes_racing_for_one_run_dir_one_wins_the_others_name_it(tmp_path):
    go = tmp_path / "go"
    procs = [_spawn(tmp_path, go) for _ in range(3)]
    go.write_text("")
    outs = {p.pid: p.stdout.readline().strip() for p in procs}
    for p in procs:
        p.stdin.close()
        p.wait(timeout=60)
    winners = [pid for pid, out in outs.items() if out == "ACQUIRED"]
    assert len(winners) == 1, outs
    for pid, out in outs.items():
        if pid != winners[0]:
            assert out.startswith("REFUSED"), out
            assert f"host {socket.gethostname()} pid {winners[0]} (started " in out, out


def test_a_lock_of_a_killed_run_is_taken_over(tmp_path):
    (tmp_path / "go").write_text("")
    holder = _spawn(tmp_path, tmp_path / "go")
    assert holder.stdout.readline().strip() == "ACQUIRED"
    lock = rundir.LocalLock(str(tmp_path))
    with pytest.raises(rundir.RunDirLocked, match=f"pid {holder.pid} "):
        lock.acquire()
    holder.kill()  # kill -9: no chance to release
    holder.wait()
    lock.acquire()
    assert lock.took_over is not None and lock.took_over.pid == holder.pid
    assert json.loads((tmp_path / rundir.LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert (tmp_path / rundir.LOCK_NAME).read_text() == ""  # released: names nobody


def test_open_run_locks_checks_and_names_bad_run_dirs(tmp_path, monkeypatch):
    cfg = _cfg(run_dir=str(tmp_path / "run"))
    lock = rundir.open_run(cfg)
    try:
        assert (tmp_path / "run" / rundir.FINGERPRINT_NAME).exists()
        with pytest.raises(rundir.RunDirLocked, match=f"pid {os.getpid()} "):
            rundir.open_run(cfg)  # a second holder, even in this process, is refused
    finally:
        lock.release()
    rundir.open_run(cfg).release()  # released: free again
    (tmp_path / "file").write_text("x")
    with pytest.raises(rundir.RunDirError, match=r"run_dir: .*/file is a file"):
        rundir.open_run(_cfg(run_dir=str(tmp_path / "file")))
    with pytest.raises(rundir.RunDirError, match=r"is under .*/file, which is a file"):
        rundir.open_run(_cfg(run_dir=str(tmp_path / "file" / "run")))
    monkeypatch.setattr(os, "access", lambda *a, **k: False)  # root ignores chmod; pretend read-only
    with pytest.raises(rundir.RunDirError, match="is not writable"):
        rundir.open_run(_cfg(run_dir=str(tmp_path / "ro")))


# ------------------------------------------------------------------------------------------
# The gs:// lease.


def test_gcs_lease_is_exclusive_renewed_and_taken_over_when_expired_or_dead(fake_gcs):
    (fake_gcs.root / "bkt").mkdir(parents=True, exist_ok=True)
    url = fake_gcs.url("bkt", "runs/a")
    obj = fake_gcs.root / "bkt" / "runs" / "a" / rundir.LOCK_NAME
    first = rundir.GcsLease(url, ttl_s=600)
    first.acquire()
    held = json.loads(obj.read_text())
    assert held["pid"] == os.getpid() and held["expires"] > time.time() + 500
    with pytest.raises(rundir.RunDirLocked, match=r"in use by host .* pid \d+ .*lease expires in \d+ s"):
        rundir.GcsLease(url, ttl_s=600).acquire()
    assert first.renew() and json.loads(obj.read_text())["expires"] >= held["expires"]
    first.release()
    assert not obj.exists()

    # An expired lease (its holder stopped renewing) is taken over; the old holder learns it lost it.
    stale = rundir.GcsLease(url, ttl_s=0.5)
    stale.acquire()
    stale._stop.set()
    stale._thread.join()
    time.sleep(0.6)
    taker = rundir.GcsLease(url, ttl_s=600)
    taker.acquire()
    assert taker.took_over is not None and taker.took_over.token == stale._holder.token
    assert not stale.renew() and stale.lost
    taker.release()

    # A lease of a dead process on this host is taken over at once, long before it expires.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    obj.parent.mkdir(parents=True, exist_ok=True)
    obj.write_bytes(rundir.Holder(socket.gethostname(), dead.pid, time.time(), time.time() + 3600).dumps())
    lease = rundir.GcsLease(url, ttl_s=600)
    lease.acquire()
    assert lease.took_over.pid == dead.pid
    lease.release()


def test_gcs_lease_renews_in_the_background(fake_gcs):
    (fake_gcs.root / "bkt").mkdir(parents=True, exist_ok=True)
    url = fake_gcs.url("bkt", "runs/b")
    obj = fake_gcs.root / "bkt" / "runs" / "b" / rundir.LOCK_NAME
    lease = rundir.GcsLease(url, ttl_s=0.8)  # renewed every 0.2 s
    lease.acquire()
    first = json.loads(obj.read_text())["expires"]
    time.sleep(1.0)
    assert json.loads(obj.read_text())["expires"] > first + 0.3 and not lease.lost
    with pytest.raises(rundir.RunDirLocked):
        rundir.GcsLease(url).acquire()  # past the first expiry, still held: renewed
    lease.release()


def _verdict(stdout: str) -> str:
    return next((line for line in stdout.splitlines() if line.startswith(("OPEN", "REFUSED"))), stdout)


def test_multi_process_run_locks_on_process_0_and_all_share_its_verdict(tmp_path):
    from multiproc import run_processes

    code = (
        "from apo_jax import config as config_lib\nfrom apo_jax.io import rundir\n"
        "c = config_lib.base_config(); c.run_dir = sys.argv[1]\n"
        "try:\n"
        "    lock = rundir.open_run(c)\n"
        "    print('OPEN', type(lock).__name__, flush=True)\n"
        "except rundir.RunDirError as e:\n"
        "    print('REFUSED', e, flush=True)\n"
    )
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = rundir.LocalLock(str(run_dir))
    holder.acquire()  # another run holds the dir: both processes stop, none hangs
    results = run_processes(code, 2, 1, args=[str(run_dir)], timeout=240)
    outs = [_verdict(r.stdout) for r in results]
    assert all(r.returncode == 0 for r in results), [r.stderr[-2000:] for r in results]
    assert outs[0].startswith("REFUSED") and f"pid {os.getpid()} " in outs[0], outs
    assert outs[1].startswith("REFUSED") and "process 0 could not open the run dir" in outs[1], outs
    holder.release()
    outs = [_verdict(r.stdout) for r in run_processes(code, 2, 1, args=[str(run_dir)], timeout=240)]
    assert outs == ["OPEN LocalLock", "OPEN NoneType"], outs  # only process 0 holds the lock
    assert (run_dir / rundir.FINGERPRINT_NAME).exists()
