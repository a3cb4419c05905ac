"""Over-optimization curves (Gao et al. 2022, "Scaling laws for reward model overoptimization").

For one policy's N samples per prompt, the gold reward of the best-of-n pick under a selector (an
RM's scores, the true reward, or nothing: a random pick) for n = 1, 2, 4, ..., N, against
KL_bon(n) = log n - (n - 1) / n, the KL divergence of the best-of-n distribution from the policy.
A selector that shares the gold reward's order climbs with n; one the policy can exploit rises and
then falls (or never rises) while KL grows.

`best_of_n` is the unbiased estimator from N >= n samples: the expected gold reward of the
selector's argmax over a uniformly random n-subset of a prompt's samples, computed exactly from
ranks (the sample of rank i, 0-based ascending by selector score, is the subset's argmax with
probability C(i, n-1) / C(N, n)); ties in the selector's scores count as a random tie-break.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def kl_bon(n: int | np.ndarray) -> np.ndarray:
    """KL(best-of-n || policy) = log n - (n - 1) / n (nats)."""
    n = np.asarray(n, np.float64)
    return np.log(n) - (n - 1.0) / n


def powers_of_two(n_max: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to n_max (n_max itself last even when it is not a power of two)."""
    if n_max < 1:
        raise ValueError(f"n_max={n_max}; expected >= 1")
    ns = [1 << k for k in range(n_max.bit_length()) if (1 << k) <= n_max]
    return tuple(ns if ns[-1] == n_max else ns + [n_max])


def _rank_weights(num: int, n: int) -> np.ndarray:
    """[num]: P(the sample of rank i is the argmax of a uniform n-subset) = C(i, n-1) / C(num, n)."""
    total = math.comb(num, n)
    return np.asarray([math.comb(i, n - 1) / total for i in range(num)], np.float64)


def best_of_n(selector: np.ndarray, gold: np.ndarray, ns: Sequence[int]) -> np.ndarray:
    """Mean over prompts of the gold reward of the best-of-n pick by `selector`, for each n in `ns`.

    selector, gold: [P, N] (a prompt's N samples). Returns float64 [len(ns)].
    """
    selector, gold = np.asarray(selector, np.float64), np.asarray(gold, np.float64)
    if selector.shape != gold.shape or selector.ndim != 2:
        raise ValueError(f"selector {selector.shape} and gold {gold.shape} must be the same [prompts, samples]")
    num = selector.shape[1]
    if any(not 1 <= n <= num for n in ns):
        raise ValueError(f"n in {tuple(ns)} must lie in [1, {num}] (the samples per prompt)")
    order = np.argsort(selector, axis=1, kind="stable")
    s_sorted = np.take_along_axis(selector, order, axis=1)
    g_sorted = np.take_along_axis(gold, order, axis=1)
    # A random tie-break: within a run of equal selector scores every sample is equally likely to be
    # the pick, so each position carries the run's mean gold reward.
    for p in range(s_sorted.shape[0]):
        _, start, counts = np.unique(s_sorted[p], return_index=True, return_counts=True)
        for a, c in zip(start, counts):
            if c > 1:
                g_sorted[p, a:a + c] = g_sorted[p, a:a + c].mean()
    return np.asarray([float(np.mean(g_sorted @ _rank_weights(num, n))) for n in ns])


def curves(selectors: dict[str, np.ndarray], gold: np.ndarray, ns: Sequence[int]) -> dict[str, list[float]]:
    """`best_of_n` for every named selector, plus "random" (the policy's mean: no selection)."""
    out = {name: best_of_n(s, gold, ns).tolist() for name, s in selectors.items()}
    out.setdefault("random", [float(np.mean(gold))] * len(ns))
    return out
