"""Preference accuracy and ECE against hand computations."""

from __future__ import annotations

import numpy as np
import pytest

from apo_jax import evaluation


def test_accuracy_counts_ties_as_wrong():
    assert evaluation.preference_accuracy([1.0, 2.0, 0.5, 3.0], [0.0, 2.0, 1.0, 1.0]) == 0.5


def _diff_for(q):
    return float(np.log(q / (1 - q)))  # sigmoid(diff) = q


def test_ece_hand_computed_with_empty_bins():
    # Three pairs with Q = 0.95, 0.95, 0.65 (r_bad = 0). Counted both ways:
    #   (0.95, 1), (0.95, 1), (0.65, 1), (0.05, 0), (0.05, 0), (0.35, 0)
    # Bins of width 0.1: bin 0 holds {0.05, 0.05} -> o=0, e=0.05; bin 3 holds {0.35} -> o=0, e=0.35;
    # bin 6 holds {0.65} -> o=1, e=0.65; bin 9 holds {0.95, 0.95} -> o=1, e=0.95; 6 bins are empty.
    good = [_diff_for(0.95), _diff_for(0.95), _diff_for(0.65)]
    bad = [0.0, 0.0, 0.0]
    gaps = [0.05, 0.35, 0.35, 0.05]
    paper = sum(gaps) / 10  # (1/B) * sum over non-empty bins
    weighted = (2 * 0.05 + 1 * 0.35 + 1 * 0.35 + 2 * 0.05) / 6
    assert evaluation.expected_calibration_error(good, bad, 10) == pytest.approx(paper, abs=1e-9)
    assert evaluation.expected_calibration_error(good, bad, 10, weighted=True) == pytest.approx(weighted, abs=1e-9)
    counts, observed, expected = evaluation.calibration_bins(good, bad, 10)
    assert counts.tolist() == [2, 0, 0, 1, 0, 0, 1, 0, 0, 2]


def test_perfectly_calibrated_is_near_zero():
    rng = np.random.RandomState(0)
    diff = rng.randn(200_000) * 2
    q = 1 / (1 + np.exp(-diff))
    # Label each pair by sampling from Q; swap so that "good" is the label-preferred one.
    keep = rng.rand(q.size) < q
    good = np.where(keep, diff, -diff)
    assert evaluation.expected_calibration_error(good, np.zeros_like(good), weighted=True) < 0.01
