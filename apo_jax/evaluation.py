"""Reward-model evaluation (paper Section 4.1): preference accuracy and calibration (ECE).

Host-side NumPy: these run once per evaluation over a few thousand scores.
"""

from __future__ import annotations

import numpy as np


def preference_accuracy(r_good, r_bad) -> float:
    """Fraction of pairs with r(good) > r(bad); ties count as wrong."""
    r_good, r_bad = np.asarray(r_good, np.float64), np.asarray(r_bad, np.float64)
    if r_good.size == 0:
        return float("nan")
    return float(np.mean(r_good > r_bad))


def calibration_bins(r_good, r_bad, num_bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-bin (count, observed fraction o_b, mean predicted probability e_b).

    Q = sigmoid(r_good - r_bad) is the RM's probability that `good` is preferred. Each pair is
    counted in both orders, (Q, 1) and (1 - Q, 0), as Bai et al. (2022) and the official APO code
    do. Bin b holds Q in [b/B, (b+1)/B) (the last bin includes 1.0). Empty bins have o_b = e_b = 0.
    """
    diff = np.asarray(r_good, np.float64) - np.asarray(r_bad, np.float64)
    q = 1.0 / (1.0 + np.exp(-diff))
    probs = np.concatenate([q, 1.0 - q])
    labels = np.concatenate([np.ones_like(q), np.zeros_like(q)])
    idx = np.clip(np.floor(probs * num_bins).astype(int), 0, num_bins - 1)
    counts = np.bincount(idx, minlength=num_bins).astype(np.float64)
    safe = np.maximum(counts, 1.0)
    observed = np.bincount(idx, weights=labels, minlength=num_bins) / safe
    expected = np.bincount(idx, weights=probs, minlength=num_bins) / safe
    return counts, observed, expected


def expected_calibration_error(r_good, r_bad, num_bins: int = 10, weighted: bool = False) -> float:
    """ECE of the RM's preference probabilities.

    weighted=False: the paper's form, (1/B) * sum over non-empty bins of |o_b - e_b| (an empty
    bin adds nothing but still counts in B).
    weighted=True: the usual count-weighted form, sum_b (n_b / N) |o_b - e_b| (the official
    code's).
    """
    if np.asarray(r_good).size == 0:
        return float("nan")
    counts, observed, expected = calibration_bins(r_good, r_bad, num_bins)
    gaps = np.abs(observed - expected) * (counts > 0)
    if weighted:
        return float(np.sum(counts * gaps) / np.sum(counts))
    return float(np.sum(gaps) / num_bins)
