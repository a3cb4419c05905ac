"""The one cache of compiled programs.

Every jitted program the game runs (train steps, prefill and decode, RM scoring, the DPO
reference log-probs) is built by a builder keyed by what the program depends on: the model
config, the mesh and the static settings, all hashable. `program` keeps one per (kind, key) for
the process, so phases, runs and tests in one process that need the same program share it (the
learning-rate schedule of a train step is a traced input, so phases that differ only in lr share
one step). `TRACES` counts the traces of each kind (one per input shape), which the game reports
and the tests read to check that nothing recompiles.
"""

from __future__ import annotations

import collections
import functools
import threading
from typing import Any, Callable, Hashable, TypeVar

T = TypeVar("T")

MAX_PROGRAMS = 256
"""How many builders' results are kept (least recently used dropped first)."""

TRACES: collections.Counter[str] = collections.Counter()
"""kind -> traces so far in this process (incremented at trace time by `count`)."""

_programs: collections.OrderedDict[tuple[str, Hashable], Any] = collections.OrderedDict()
_lock = threading.Lock()


def program(kind: str, key: Hashable, build: Callable[[], T]) -> T:
    """The program of `kind` for `key`, built by `build()` the first time it is asked for."""
    slot = (kind, key)
    with _lock:
        if slot in _programs:
            _programs.move_to_end(slot)
            return _programs[slot]
    built = build()  # outside the lock: a builder may ask for other programs
    with _lock:
        built = _programs.setdefault(slot, built)
        _programs.move_to_end(slot)
        while len(_programs) > MAX_PROGRAMS:
            _programs.popitem(last=False)
    return built


def cached(kind: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Decorates a builder `f(*hashable_args) -> program` so its programs live in the one cache,
    keyed by its arguments."""

    def wrap(build: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(build)
        def get(*args: Hashable) -> T:
            return program(kind, (build.__module__, build.__qualname__, args), lambda: build(*args))

        return get

    return wrap


def count(kind: str) -> None:
    """Called inside a function being traced: one more trace of `kind`."""
    TRACES[kind] += 1


def clear() -> None:
    """Drops every kept program (the traces counted so far stay)."""
    with _lock:
        _programs.clear()
