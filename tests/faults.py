"""Fault injection for kill-and-restart tests: a progress hook (`apo_jax.training.fit.add_progress_hook`)
that a test installs in a child process, never an environment variable read by the library."""

from __future__ import annotations

import logging
import os

from apo_jax.training import fit


def install_kill_at(fault: str) -> None:
    """Exits the process with code 42 right after unit `fault` = "<phase>:<step>" (a train step or
    a sampling batch), as a crash there would."""

    def hook(phase: str, step: int) -> None:
        if f"{phase}:{step}" == fault:
            logging.getLogger("apo_jax").warning("fault hook: killing the process at %s step %d", phase, step)
            os._exit(42)

    fit.add_progress_hook(hook)


def install_signal_at(fault: str, signum: int) -> None:
    """Sends this process `signum` right after unit `fault` = "<phase>:<step>" (as Ctrl-C, a
    preemption notice or srun's forwarded time-limit warning would, between two steps)."""
    import signal

    def hook(phase: str, step: int) -> None:
        if f"{phase}:{step}" == fault:
            os.kill(os.getpid(), signal.Signals(signum))

    fit.add_progress_hook(hook)


def bootstrap(fault: str | None) -> str:
    """Python to run in a child before `apo_jax.main` (tests/ must be on its PYTHONPATH)."""
    return f"import faults; faults.install_kill_at({fault!r})" if fault else ""


def main_command(python: str, args: list[str], fault: str | None) -> list[str]:
    """`python -m apo_jax.main *args`, with the kill hook installed first when `fault` is set."""
    if not fault:
        return [python, "-m", "apo_jax.main", *args]
    run = "import runpy; runpy.run_module('apo_jax.main', run_name='__main__', alter_sys=True)"
    return [python, "-c", f"{bootstrap(fault)}\n{run}", *args]
