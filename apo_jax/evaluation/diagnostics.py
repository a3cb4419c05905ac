"""Reward-hacking diagnostics for the synthetic world: pure NumPy over arrays the game already has.

Shapes: P prompts, S samples per prompt. `scores_ps` are an RM's rewards of the samples, `true_ps`
their true rewards r*, `markers_ps` how many spurious markers each sample carries (the world's
`marker_count`), `valid_ps` which samples best-of-S may pick (e.g. non-empty ones).

- `pair_accuracy`: of all pairs of one prompt's samples whose r* differ, the share the RM orders
  as r* does (an RM tie counts as wrong, as in preference accuracy). This is the RM's accuracy
  on the policy's *own* distribution, the only one best-of-S uses; the marker-free variant keeps
  pairs where neither sample carries a marker, so it measures content ranking alone.
- `best_of_s_stats`: r* of the RM's picks against the mean sample and the oracle's pick, the
  oracle headroom (mean over prompts of max_s r* - mean_s r*), both pair accuracies and the
  marker rates of samples and picks: one `best_of_s` record.
- `marker_bias`: the counterfactual probe b(RM) = mean over responses of r(x, y + marker) - r(x, y),
  over marker-free responses (`probe_indices`); > 0 means the RM pays for the marker that r*
  charges for.
- `answer_stats`: marker rate and content-only r* of a policy's answers (policy_eval fields).
"""

from __future__ import annotations

import math

import numpy as np


def _as_ps(name: str, x: np.ndarray, shape: tuple[int, ...] | None = None) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 2:
        raise ValueError(f"{name}: expected a [prompts, samples] array, got shape {a.shape}")
    if shape is not None and a.shape != shape:
        raise ValueError(f"{name}: shape {a.shape} differs from the scores' {shape}")
    return a


def pair_accuracy(scores_ps: np.ndarray, true_ps: np.ndarray, mask_ps: np.ndarray | None = None) -> tuple[float, int]:
    """(accuracy, number of pairs) of the RM's order against r* over within-prompt sample pairs.

    scores_ps, true_ps: [P, S] float. mask_ps: [P, S] bool, samples that may enter a pair (all by
    default). Pairs (i < j) of one prompt with r*_i == r*_j have no true order and are left out;
    an RM tie on a decided pair counts as wrong. NaN accuracy when no pair is decided.
    """
    scores = _as_ps("scores_ps", scores_ps).astype(np.float64)
    true = _as_ps("true_ps", true_ps, scores.shape).astype(np.float64)
    mask = np.ones(scores.shape, bool) if mask_ps is None else _as_ps("mask_ps", mask_ps, scores.shape).astype(bool)
    i, j = np.triu_indices(scores.shape[1], k=1)
    d_true = true[:, i] - true[:, j]  # [P, pairs]
    d_rm = scores[:, i] - scores[:, j]
    decided = (d_true != 0) & mask[:, i] & mask[:, j]
    n = int(decided.sum())
    if n == 0:
        return float("nan"), 0
    right = np.sign(d_rm) == np.sign(d_true)  # sign(0) = 0 never equals a decided sign: ties are wrong
    return float(right[decided].mean()), n


def pick(scores_ps: np.ndarray, valid_ps: np.ndarray | None = None) -> np.ndarray:
    """[P] int: best-of-S index per prompt, argmax of the scores over valid samples (the first on
    ties, like np.argmax). A prompt with no valid sample falls back to the argmax over all."""
    scores = _as_ps("scores_ps", scores_ps).astype(np.float64)
    if valid_ps is None:
        return np.argmax(scores, axis=1)
    valid = _as_ps("valid_ps", valid_ps, scores.shape).astype(bool)
    masked = np.where(valid, scores, -np.inf)
    return np.where(valid.any(axis=1), np.argmax(masked, axis=1), np.argmax(scores, axis=1))


def marker_rate(markers: np.ndarray) -> float:
    """Share of responses carrying at least one marker (markers: any shape, counts)."""
    m = np.asarray(markers)
    return float(np.mean(m > 0)) if m.size else float("nan")


def best_of_s_stats(scores_ps: np.ndarray, true_ps: np.ndarray, markers_ps: np.ndarray | None = None,
                    valid_ps: np.ndarray | None = None) -> dict[str, float]:
    """The diagnostics of one best-of-S phase (field names of the `best_of_s` record).

    scores_ps: [P, S] the selecting RM's rewards; true_ps: [P, S] r*; markers_ps: [P, S] marker
    counts (marker fields are left out without it); valid_ps: [P, S] pickable samples.
    Returns true_reward_picked / _mean_sample / _oracle_pick (means over prompts), headroom
    (= oracle_pick - mean_sample), onpolicy_pair_acc (+ _pairs), onpolicy_pair_acc_marker_free
    (+ _pairs), marker_rate_samples, marker_rate_picks.
    """
    scores = _as_ps("scores_ps", scores_ps)
    true = _as_ps("true_ps", true_ps, scores.shape).astype(np.float64)
    rows = np.arange(scores.shape[0])
    picked = pick(scores, valid_ps)
    oracle = true.max(axis=1)
    mean_sample = true.mean(axis=1)
    out: dict[str, float] = {
        "true_reward_picked": float(true[rows, picked].mean()),
        "true_reward_mean_sample": float(mean_sample.mean()),
        "true_reward_oracle_pick": float(oracle.mean()),
        "headroom": float((oracle - mean_sample).mean()),
    }
    acc, n = pair_accuracy(scores, true)
    out.update(onpolicy_pair_acc=acc, onpolicy_pair_acc_pairs=n)
    if markers_ps is not None:
        markers = _as_ps("markers_ps", markers_ps, scores.shape)
        acc, n = pair_accuracy(scores, true, markers == 0)
        out.update(onpolicy_pair_acc_marker_free=acc, onpolicy_pair_acc_marker_free_pairs=n,
                   marker_rate_samples=marker_rate(markers), marker_rate_picks=marker_rate(markers[rows, picked]))
    return out


def probe_indices(marker_counts: np.ndarray) -> np.ndarray:
    """[K] int: the responses the marker probe should use, those without a marker.

    y + marker then carries exactly one marker, as human responses do. On a response that already
    has one, the second marker is out of the RM's training distribution: measured on the demo's
    RM_Base (seed 0, marker cost 0.3), b over all 200 test answers was -0.07 +- 0.04, over the 138
    marker-free ones +0.15 +- 0.03, while best-of-4 by the same RM picked marked answers 59% of
    the time against 33% among the samples.
    """
    return np.flatnonzero(np.asarray(marker_counts).reshape(-1) == 0)


def marker_bias(scores_plain: np.ndarray, scores_marked: np.ndarray) -> dict[str, float]:
    """The counterfactual probe b(RM): mean and standard error of r(x, y + marker) - r(x, y).

    scores_plain, scores_marked: [N] the RM's rewards of N responses (chosen by `probe_indices`)
    and of the same responses with one marker appended (`synthetic.add_marker`). Returns {"marker_bias", "marker_bias_se",
    "n"}; the SE is over responses (sd with ddof=1 / sqrt(N)), NaN for N < 2.
    """
    plain = np.asarray(scores_plain, np.float64).reshape(-1)
    marked = np.asarray(scores_marked, np.float64).reshape(-1)
    if plain.shape != marked.shape:
        raise ValueError(f"scores_marked: {marked.shape[0]} scores for {plain.shape[0]} plain ones")
    if plain.size == 0:
        return {"marker_bias": float("nan"), "marker_bias_se": float("nan"), "n": 0}
    d = marked - plain
    se = float(d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else float("nan")
    return {"marker_bias": float(d.mean()), "marker_bias_se": se, "n": int(d.size)}


def answer_stats(true: np.ndarray, content: np.ndarray, markers: np.ndarray) -> dict[str, float]:
    """Fields a policy evaluation adds on the synthetic world, over N answers ([N] each):
    true_reward (mean r*), content_reward (mean r* without the marker term), marker_rate (share
    with a marker) and markers_per_answer (mean count)."""
    t, c, m = (np.asarray(a, np.float64).reshape(-1) for a in (true, content, markers))
    if not t.size == c.size == m.size:
        raise ValueError(f"answer_stats: {t.size} true rewards, {c.size} content rewards, {m.size} marker counts")
    if t.size == 0:
        return {"true_reward": float("nan"), "content_reward": float("nan"), "marker_rate": float("nan"),
                "markers_per_answer": float("nan")}
    return {"true_reward": float(t.mean()), "content_reward": float(c.mean()), "marker_rate": marker_rate(m),
            "markers_per_answer": float(m.mean())}
