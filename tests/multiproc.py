"""Runs a Python snippet in N local JAX processes (jax.distributed on 127.0.0.1, CPU, fake devices).

Used by the multi-process tests: each process runs `python -c <code>` (or `python -m <module>`)
with JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID set (what
`sharding.maybe_initialize_distributed` reads). Also the tiny APO game as `python -m apo_jax.main`
in one or N processes, and its single-process reference run shared by the tests of a session.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PRELUDE = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=%d"
import jax
jax.config.update("jax_platforms", "cpu")
try:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
except Exception:
    pass
from apo_jax import sharding
sharding.maybe_initialize_distributed()
assert jax.process_count() == int(os.environ["JAX_NUM_PROCESSES"]), jax.process_count()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(code: str, num_processes: int, devices_per_process: int, *, timeout: float = 300,
                  extra_env: dict[str, str] | None = None, args: list[str] | None = None,
                  module: str | None = None, xla_flags: str = "", bootstrap: str = "") -> list[subprocess.CompletedProcess]:
    """Starts the processes, waits for all, returns their results (stdout/stderr as text).

    With `module`, runs `python -m module *args` instead of the snippet (the prelude's settings
    then come from the environment: XLA_FLAGS and JAX_PLATFORMS). Output goes to temporary files,
    not pipes, so a chatty process never blocks the others on a full pipe. `bootstrap` is Python
    run before the module (e.g. `fake_gcs.install_in_child()`). If the group is still
    running after `timeout` seconds, all are killed and TimeoutExpired carries each one's output.
    """
    port = free_port()
    procs, files = [], []
    for i in range(num_processes):
        env = dict(os.environ, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(num_processes),
                   JAX_PROCESS_ID=str(i), JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process} {xla_flags}".strip(),
                   PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests"), os.environ.get("PYTHONPATH", "")]))
        env.update(extra_env or {})
        if module is None:
            cmd = [sys.executable, "-c", PRELUDE % devices_per_process + code, *(args or [])]
        elif bootstrap:
            run = f"import runpy; runpy.run_module({module!r}, run_name='__main__', alter_sys=True)"
            cmd = [sys.executable, "-c", f"{bootstrap}\n{run}", *(args or [])]
        else:
            cmd = [sys.executable, "-m", module, *(args or [])]
        out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        files.append((out, err))
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err, text=True))

    def read(i: int) -> tuple[str, str]:
        texts = []
        for f in files[i]:
            f.seek(0)
            texts.append(f.read())
        return texts[0], texts[1]

    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired as e:
        # A hung group (e.g. processes disagreeing on a collective): kill all, say where each was.
        for p in procs:
            p.kill()
            p.wait()
        tails = []
        for i in range(num_processes):
            out, err = read(i)
            tails.append(f"--- process {i} stdout (tail) ---\n{out[-2000:]}\n--- process {i} stderr (tail) ---\n"
                         f"{err[-4000:]}")
        raise subprocess.TimeoutExpired(e.cmd, timeout, output="\n".join(tails)) from None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    results = [subprocess.CompletedProcess(p.args, p.returncode, *read(i)) for i, p in enumerate(procs)]
    for out, err in files:
        out.close()
        err.close()
    return results


# --------------------------------------------------------------------------------------------
# The tiny APO game (loop_fixtures.TINY) as `python -m apo_jax.main` in one or N processes.


# One schedule, apo_seq: its two rounds hold every kind of phase (gold sampling, APO RM training
# from the previous round's RM, best-of-S, SFT, evaluation); the other schedules only combine the
# same phases differently, and each process group pays for every phase.
TINY_GAME = ("--config.apo.schedules=('apo_seq',)",)


def tiny_main_args(run_dir: str, *extra: str) -> list[str]:
    """Arguments of `python -m apo_jax.main` for the tiny game in `run_dir`, fsdp over all devices."""
    from loop_fixtures import TINY

    return ["--config=configs/synthetic.py", *TINY, *TINY_GAME, f"--config.run_dir={run_dir}",
            "--config.mesh.fsdp=-1", *extra]


# LLVM at -O0 for the tiny game's programs: ~30% less compile time, which is most of a run; the
# runs compared with each other all use it (same programs, only the process layout differs).
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def run_main(args: list[str], num_processes: int, devices_per_process: int, *, timeout: float = 600,
             extra_env: dict[str, str] | None = None, bootstrap: str = "") -> list[subprocess.CompletedProcess]:
    """`python -m apo_jax.main *args` in one plain process (no jax.distributed) or in N processes."""
    if num_processes > 1:
        return run_processes("", num_processes, devices_per_process, module="apo_jax.main", args=args,
                             timeout=timeout, extra_env=extra_env, xla_flags=FAST_COMPILE, bootstrap=bootstrap)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process} {FAST_COMPILE}")
    for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(key, None)
    env.update(extra_env or {})
    env["PYTHONPATH"] = os.pathsep.join([REPO, os.path.join(REPO, "tests"), env.get("PYTHONPATH", "")])
    if bootstrap:
        run = "import runpy; runpy.run_module('apo_jax.main', run_name='__main__', alter_sys=True)"
        cmd = [sys.executable, "-c", f"{bootstrap}\n{run}", *args]
    else:
        cmd = [sys.executable, "-m", "apo_jax.main", *args]
    return [subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)]


REFERENCE_DEVICES = 4


def reference_run(basetemp: str) -> str:
    """The tiny game in one process on 4 fake CPU devices, played once per pytest session.

    Kept under the session's base temp directory, so test_multiprocess (the single-process
    reference of the multi-process runs) and test_launch (the notebook's run on CPU) share it.
    """
    import fcntl

    if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest-xdist: the workers' base temps share a parent
        basetemp = os.path.dirname(str(basetemp))
    run_dir = os.path.join(str(basetemp), "tiny_game_1x4")
    with open(run_dir + ".lock", "w") as lock:  # one worker plays it, the others wait for it
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(os.path.join(run_dir, "summary.json")):
            [proc] = run_main(tiny_main_args(run_dir), 1, REFERENCE_DEVICES)
            assert proc.returncode == 0, proc.stderr[-4000:]
    return run_dir
