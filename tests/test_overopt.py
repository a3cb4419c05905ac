"""Best-of-n over-optimization curves against brute-force enumeration of every n-subset."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from apo_jax.evaluation import overopt


def _brute_force(selector: np.ndarray, gold: np.ndarray, n: int) -> float:
    """Mean over prompts and over every n-subset of the gold reward of the subset's argmax (ties:
    the mean gold reward of the tied samples, a random tie-break)."""
    per_prompt = []
    for s, g in zip(selector, gold):
        vals = []
        for subset in itertools.combinations(range(len(s)), n):
            top = max(s[i] for i in subset)
            tied = [g[i] for i in subset if s[i] == top]
            vals.append(np.mean(tied))
        per_prompt.append(np.mean(vals))
    return float(np.mean(per_prompt))


@pytest.mark.parametrize("ties", [False, True])
def test_best_of_n_equals_enumeration_of_subsets(ties):
    rng = np.random.RandomState(0)
    gold = rng.randn(5, 8)
    selector = gold + rng.randn(5, 8)
    if ties:
        selector = np.round(selector)  # many equal scores
    ns = overopt.powers_of_two(8)
    assert ns == (1, 2, 4, 8)
    got = overopt.best_of_n(selector, gold, ns)
    want = [_brute_force(selector, gold, n) for n in ns]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    # n = 1 is the policy's mean; n = N the selector's argmax (mean gold of its ties).
    assert got[0] == pytest.approx(gold.mean())


def test_an_exact_selector_climbs_and_an_adversarial_one_falls():
    rng = np.random.RandomState(1)
    gold = rng.rand(50, 16)
    ns = overopt.powers_of_two(16)
    up, down = overopt.best_of_n(gold, gold, ns), overopt.best_of_n(-gold, gold, ns)
    assert np.all(np.diff(up) > 0) and np.all(np.diff(down) < 0)
    c = overopt.curves({"oracle": gold}, gold, ns)
    assert c["random"] == [pytest.approx(gold.mean())] * len(ns) and c["oracle"] == pytest.approx(up.tolist())


def test_kl_bon_and_bad_input():
    np.testing.assert_allclose(overopt.kl_bon([1, 2, 64]), [0.0, np.log(2) - 0.5, np.log(64) - 63 / 64])
    assert overopt.powers_of_two(6) == (1, 2, 4, 6)
    with pytest.raises(ValueError, match=r"\[1, 4\]"):
        overopt.best_of_n(np.zeros((2, 4)), np.zeros((2, 4)), (8,))
    with pytest.raises(ValueError, match="same"):
        overopt.best_of_n(np.zeros((2, 4)), np.zeros((2, 3)), (1,))
