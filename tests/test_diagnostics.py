"""Reward-hacking diagnostics against hand computations and brute-force NumPy loops."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from apo_jax.evaluation import diagnostics as dg
from apo_jax.data import synthetic as syn


def _pair_accuracy_loop(scores, true, mask=None):
    """Every within-prompt pair by explicit loops: the independent reference."""
    right = total = 0
    for p in range(len(scores)):
        for i, j in itertools.combinations(range(len(scores[p])), 2):
            if true[p][i] == true[p][j] or (mask is not None and not (mask[p][i] and mask[p][j])):
                continue
            total += 1
            right += (scores[p][i] - scores[p][j]) * (true[p][i] - true[p][j]) > 0
    return (right / total if total else float("nan")), total


def test_pair_accuracy_by_hand():
    # Prompt 0: r* (0.2, 0.5, 0.9) ranked (1, 3, 2): pairs (0,1) right, (0,2) right, (1,2) wrong.
    # Prompt 1: r* (0.4, 0.4, 0.1): (0,1) undecided; RM (5, 5, 5) ties on (0,2) and (1,2): wrong.
    scores = np.array([[1.0, 3.0, 2.0], [5.0, 5.0, 5.0]])
    true = np.array([[0.2, 0.5, 0.9], [0.4, 0.4, 0.1]])
    acc, n = dg.pair_accuracy(scores, true)
    assert n == 5 and acc == pytest.approx(2 / 5)
    # Masking sample 2 of prompt 0 leaves pair (0,1) of prompt 0 and (0,1) of prompt 1 (undecided).
    mask = np.array([[True, True, False], [True, True, True]])
    acc, n = dg.pair_accuracy(scores, true, mask)
    assert n == 3 and acc == pytest.approx(1 / 3)
    assert math.isnan(dg.pair_accuracy(np.zeros((2, 3)), np.ones((2, 3)))[0])


def test_pair_accuracy_matches_loops_on_random_arrays():
    rng = np.random.default_rng(0)
    for _ in range(20):
        p, s = int(rng.integers(1, 6)), int(rng.integers(2, 6))
        scores = rng.integers(0, 4, (p, s)).astype(float)  # small integers: ties on both sides
        true = rng.integers(0, 3, (p, s)) / 2
        mask = rng.random((p, s)) < 0.7
        got, n = dg.pair_accuracy(scores, true, mask)
        want, m = _pair_accuracy_loop(scores, true, mask)
        assert n == m and (got == pytest.approx(want) or (math.isnan(got) and math.isnan(want)))


def test_best_of_s_record_by_hand():
    scores = np.array([[0.1, 0.9, 0.3, 0.2], [2.0, 1.0, 0.0, -1.0]])
    true = np.array([[0.5, 0.35, 1.0, 0.0], [0.2, 0.8, 0.4, 0.6]])
    markers = np.array([[0, 1, 0, 0], [0, 1, 1, 0]])
    rec = dg.best_of_s_stats(scores, true, markers)
    # Picks: sample 1 (0.35, marked) and sample 0 (0.2, unmarked).
    assert rec["true_reward_picked"] == pytest.approx((0.35 + 0.2) / 2)
    assert rec["true_reward_mean_sample"] == pytest.approx((1.85 / 4 + 2.0 / 4) / 2)
    assert rec["true_reward_oracle_pick"] == pytest.approx((1.0 + 0.8) / 2)
    assert rec["headroom"] == pytest.approx(((1.0 - 1.85 / 4) + (0.8 - 0.5)) / 2)
    assert rec["marker_rate_samples"] == pytest.approx(3 / 8) and rec["marker_rate_picks"] == pytest.approx(1 / 2)
    # Prompt 0 pairs (sign of RM difference vs sign of r* difference): (0,1) - vs + wrong,
    # (0,2) - vs - right, (0,3) - vs + wrong, (1,2) + vs - wrong, (1,3) + vs + right, (2,3) + vs +
    # right -> 3/6. Prompt 1: RM order 0 > 1 > 2 > 3, r* order 1 > 3 > 2 > 0: (0,1) wrong, (0,2)
    # wrong, (0,3) wrong, (1,2) right, (1,3) right, (2,3) wrong -> 2/6.
    assert rec["onpolicy_pair_acc"] == pytest.approx(5 / 12) and rec["onpolicy_pair_acc_pairs"] == 12
    # Marker-free: prompt 0 samples {0, 2, 3}: (0,2) right, (0,3) wrong, (2,3) right; prompt 1
    # samples {0, 3}: wrong -> 2/4.
    assert rec["onpolicy_pair_acc_marker_free"] == pytest.approx(2 / 4)
    assert rec["onpolicy_pair_acc_marker_free_pairs"] == 4
    # Without marker counts the marker fields are left out.
    assert "marker_rate_picks" not in dg.best_of_s_stats(scores, true)


def test_best_of_s_never_picks_an_invalid_sample():
    scores = np.array([[3.0, 1.0, 2.0], [1.0, 0.0, 0.5]])
    valid = np.array([[False, True, True], [False, False, False]])
    assert dg.pick(scores, valid).tolist() == [2, 0]  # a prompt with nothing valid keeps the argmax
    true = np.array([[0.0, 0.1, 0.7], [0.3, 0.2, 0.1]])
    assert dg.best_of_s_stats(scores, true, valid_ps=valid)["true_reward_picked"] == pytest.approx((0.7 + 0.3) / 2)


def test_oracle_scores_pick_the_argmax_of_true_reward():
    rng = np.random.default_rng(1)
    true = rng.random((50, 4))
    rec = dg.best_of_s_stats(true, true)
    assert rec["true_reward_picked"] == rec["true_reward_oracle_pick"] == pytest.approx(true.max(1).mean())
    assert rec["onpolicy_pair_acc"] == 1.0


def test_marker_bias_of_a_toy_reward_model():
    # A toy RM: content similarity to the answer plus 0.4 per marker, scored on real world texts.
    prompts = [syn.make_prompt(t) for t in ("Say abc.", "Write ab in capitals.", "Reverse the letters of abcd.")]
    responses = ["abc.", "AB :)", "dcb."]

    def toy_rm(prompt: str, response: str) -> float:
        return syn.content_reward(prompt, response) + 0.4 * syn.marker_count(response)

    plain = np.array([toy_rm(p, y) for p, y in zip(prompts, responses)])
    marked = np.array([toy_rm(p, syn.add_marker(y)) for p, y in zip(prompts, responses)])
    b = dg.marker_bias(plain, marked)
    assert b["marker_bias"] == pytest.approx(0.4) and b["n"] == 3 and b["marker_bias_se"] == pytest.approx(0.0)
    # r* itself, as an RM, has b = -marker_cost: it charges for the marker.
    plain = np.array([syn.true_reward(p, y) for p, y in zip(prompts, responses)])
    marked = np.array([syn.true_reward(p, syn.add_marker(y)) for p, y in zip(prompts, responses)])
    assert dg.marker_bias(plain, marked)["marker_bias"] == pytest.approx(-0.15)
    # SE by hand: differences (1, 3) -> mean 2, sd sqrt(2), SE 1.
    b = dg.marker_bias(np.array([0.0, 0.0]), np.array([1.0, 3.0]))
    assert (b["marker_bias"], b["marker_bias_se"]) == pytest.approx((2.0, 1.0))
    with pytest.raises(ValueError, match="scores_marked"):
        dg.marker_bias(np.zeros(3), np.zeros(2))


def test_answer_stats_by_hand():
    out = dg.answer_stats([0.85, 0.5, -0.15], [1.0, 0.5, 0.0], [1, 0, 1])
    assert out == pytest.approx({"true_reward": 0.4, "content_reward": 0.5, "marker_rate": 2 / 3,
                                 "markers_per_answer": 2 / 3})
    with pytest.raises(ValueError, match="marker counts"):
        dg.answer_stats([0.1], [0.1], [0, 1])


def test_shape_errors_name_the_argument():
    with pytest.raises(ValueError, match="true_ps"):
        dg.pair_accuracy(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="scores_ps"):
        dg.best_of_s_stats(np.zeros(3), np.zeros(3))


def test_probe_uses_the_marker_free_responses():
    counts = np.array([0, 1, 0, 2, 0])
    assert dg.probe_indices(counts).tolist() == [0, 2, 4]
    assert dg.probe_indices(np.zeros((2, 2), int)).tolist() == [0, 1, 2, 3]
