"""Deterministic, resumable batch order, and each process's slice of a global batch.

The order is a stream of epochs, each a permutation drawn from (seed, epoch); a batch is the
next `batch_size` positions of that stream, wrapping into the next epoch, so a data set smaller
than a batch still gives full batches. The iterator's whole state is one integer (the stream
position), saved with the train state, so a resumed phase sees exactly the batches an
uninterrupted one would.

Every process computes the same global row indices (cheap: integers only) and then reads,
tokenises and transfers only its own contiguous block of them (`process_rows`); the global
array is assembled by `jax.make_array_from_process_local_data` (`sharding.shard_batch`).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


class BatchIterator:
    """Global batches of row indices into a data set of `num_examples` rows."""

    def __init__(self, num_examples: int, batch_size: int, *, seed: int, shuffle: bool = True):
        if num_examples <= 0:
            raise ValueError("BatchIterator: the data set is empty")
        if batch_size <= 0:
            raise ValueError(f"BatchIterator: batch_size {batch_size} must be positive")
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.position = 0
        self._epoch_cache: tuple[int, np.ndarray] | None = None

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
            else:
                order = np.arange(self.num_examples)
            self._epoch_cache = (epoch, order)
        return self._epoch_cache[1]

    def peek_indices(self) -> np.ndarray:
        """The next global batch's row indices [batch_size], without advancing."""
        pos = self.position + np.arange(self.batch_size)
        epochs, offsets = np.divmod(pos, self.num_examples)
        return np.asarray([self._epoch_order(int(e))[int(o)] for e, o in zip(epochs, offsets)], np.int64)

    def next_indices(self) -> np.ndarray:
        rows = self.peek_indices()
        self.position += self.batch_size
        return rows

    @property
    def epoch(self) -> float:
        return self.position / self.num_examples

    def state(self) -> dict[str, Any]:
        return {"position": int(self.position), "num_examples": self.num_examples, "batch_size": self.batch_size,
                "seed": self.seed}

    def restore(self, state: dict[str, Any]) -> None:
        for key in ("num_examples", "batch_size", "seed"):
            if key in state and int(state[key]) != getattr(self, key):
                raise ValueError(
                    f"data iterator checkpoint has {key}={state[key]} but this run has {getattr(self, key)}: "
                    "the data or config changed since the checkpoint was written; use a new run_dir"
                )
        self.position = int(state["position"])


def process_block(num_rows: int, process_index: int, process_count: int) -> slice:
    """This process's contiguous block of a global batch's rows."""
    if num_rows % process_count:
        raise ValueError(f"a global batch of {num_rows} rows does not split over {process_count} processes")
    per = num_rows // process_count
    return slice(process_index * per, (process_index + 1) * per)


def process_rows(rows: Sequence[Any], process_index: int | None = None, process_count: int | None = None) -> Any:
    """This process's rows of a global batch (every process computes the same global order)."""
    import jax

    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    return rows[process_block(len(rows), pi, pc)]
