"""Runs a Python snippet in N local JAX processes (jax.distributed on 127.0.0.1, CPU, fake devices).

Used by the multi-process tests: each process runs `python -c <code>` with JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID set (what `sharding.maybe_initialize_distributed` reads).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

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
                  module: str | None = None) -> list[subprocess.CompletedProcess]:
    """Starts the processes, waits for all, returns their results (stdout/stderr as text).

    With `module`, runs `python -m module *args` instead of the snippet (the prelude's settings
    then come from the environment: XLA_FLAGS and JAX_PLATFORMS).
    """
    port = free_port()
    procs = []
    for i in range(num_processes):
        env = dict(os.environ, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(num_processes),
                   JAX_PROCESS_ID=str(i), JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}",
                   PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests"), os.environ.get("PYTHONPATH", "")]),
                   **(extra_env or {}))
        if module is None:
            cmd = [sys.executable, "-c", PRELUDE % devices_per_process + code, *(args or [])]
        else:
            cmd = [sys.executable, "-m", module, *(args or [])]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return results
