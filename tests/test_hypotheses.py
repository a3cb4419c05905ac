"""Pre-registered tests: paired t-tests, TOST and Holm against scipy's own tests and hand values."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from apo_jax.evaluation import hypotheses as hy


def test_one_sided_and_two_sided_t_tests_equal_scipy_ttest_1samp():
    v = [0.03, -0.01, 0.05, 0.02, 0.04, 0.00, 0.06, 0.01]
    for test, alt in (("greater", "greater"), ("less", "less"), ("two-sided", "two-sided")):
        got = hy.t_test(v, test)
        want = sps.ttest_1samp(v, 0.0, alternative=alt)
        assert got["t"] == pytest.approx(want.statistic) and got["p"] == pytest.approx(want.pvalue)
    got = hy.t_test(v, "greater")
    ci = sps.ttest_1samp(v, 0.0).confidence_interval(0.95)
    assert (got["ci95_low"], got["ci95_high"]) == (pytest.approx(ci.low), pytest.approx(ci.high))
    # By hand: mean 0.025, sd 0.0239, t = 2.958 on 7 df; t_{0.95,7} = 1.8946 < t, so p < 0.05.
    assert got["mean"] == pytest.approx(0.025) and got["n"] == 8 and got["p"] < 0.05


def test_tost_is_the_larger_of_two_shifted_one_sided_tests():
    v = np.asarray([0.004, -0.006, 0.01, -0.002, 0.0, 0.003, -0.004, 0.005])
    got = hy.t_test(v, "equivalent", margin=0.02)
    low = sps.ttest_1samp(v + 0.02, 0.0, alternative="greater").pvalue
    high = sps.ttest_1samp(v - 0.02, 0.0, alternative="less").pvalue
    assert got["p"] == pytest.approx(max(low, high)) and got["p"] < 0.001
    assert hy.t_test(v + 0.05, "equivalent", margin=0.02)["p"] > 0.99  # far outside the margin


def test_holm_matches_a_hand_computation():
    # Sorted 0.005, 0.01, 0.03, 0.04 -> 4x, 3x, 2x, 1x = 0.02, 0.03, 0.06, 0.04 -> monotone 0.06.
    assert hy.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert hy.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def test_evaluate_corrects_within_families_and_reports_missing_records():
    per_variant = {"main": {s: [{"x": 0.05 + 0.01 * s}] for s in range(6)}}

    def field(variant, name):
        return lambda pv: {s: recs[0][name] for s, recs in pv[variant].items()}

    plan = [hy.Hypothesis("A", "x > 0", field("main", "x")),
            hy.Hypothesis("B", "x < 0", field("main", "x"), test="less"),
            hy.Hypothesis("C", "x two-sided", field("main", "x"), test="two-sided", family="secondary"),
            hy.Hypothesis("D", "a missing variant", field("other", "x"))]
    res = {r["name"]: r for r in hy.evaluate(plan, per_variant)}
    assert res["A"]["verdict"] == "SUPPORTED" and res["B"]["verdict"] == "NOT SUPPORTED"
    assert res["A"]["p_holm"] == pytest.approx(min(1.0, 2 * res["A"]["p"]))  # two tested in the primary family
    assert res["C"]["p_holm"] == pytest.approx(res["C"]["p"])  # alone in its family
    assert res["D"]["verdict"].startswith("N/A") and "other" in res["D"]["verdict"]
    assert "| **A** x > 0 |" in hy.render(list(res.values()))
    with pytest.raises(ValueError, match="margin"):
        hy.Hypothesis("E", "", field("main", "x"), test="equivalent")
