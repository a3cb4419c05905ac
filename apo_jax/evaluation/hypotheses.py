"""Pre-registered hypothesis tests over seeds: paired t-tests, equivalence (TOST), Holm correction.

A `Hypothesis` names a per-seed quantity (a function of the records of every study variant, paired
by seed: the same seed number in two variants is the same world but for the variant's change) and a
test of its mean:

- "greater" / "less": one-sided one-sample t-test of the per-seed values against 0;
- "equivalent": two one-sided tests (TOST) that the mean lies within +- `margin`;
- "two-sided": a two-sided t-test (secondary, reported whatever the sign).

`evaluate(plan, per_variant)` returns one result per hypothesis: n, mean, SE, the 95% CI of the
mean, t, p, the Holm-adjusted p within its family, and the verdict at `alpha` (SUPPORTED / NOT
SUPPORTED, or N/A with the reason when the records are missing).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from scipy import stats as sps

Records = Mapping[int, Sequence[dict]]  # seed -> that seed's records
PerVariant = Mapping[str, Records]
TESTS = ("greater", "less", "equivalent", "two-sided")


@dataclasses.dataclass(frozen=True)
class Hypothesis:
    name: str
    statement: str
    values: Callable[[PerVariant], dict[int, float]]
    """seed -> the paired quantity (seeds lacking a record are left out)."""
    test: str = "greater"
    margin: float = 0.0
    """The equivalence margin of an "equivalent" test."""
    family: str = "primary"
    """Holm's correction runs within a family."""

    def __post_init__(self) -> None:
        if self.test not in TESTS:
            raise ValueError(f"{self.name}: test={self.test!r}; expected one of {TESTS}")
        if self.test == "equivalent" and not self.margin > 0:
            raise ValueError(f"{self.name}: an equivalence test needs a margin > 0")


def t_test(values: Sequence[float], test: str, margin: float = 0.0) -> dict[str, float]:
    """n, mean, se, 95% CI, t and p of the per-seed `values` under `test` (module docstring)."""
    v = np.asarray(values, np.float64)
    n = v.size
    if n < 2:
        raise ValueError(f"a t-test needs >= 2 seeds, got {n}")
    mean, se = float(v.mean()), float(v.std(ddof=1) / math.sqrt(n))
    df = n - 1
    half = float(sps.t.ppf(0.975, df)) * se
    out = {"n": n, "mean": mean, "se": se, "ci95_low": mean - half, "ci95_high": mean + half}
    if se == 0.0:  # every seed gave the same value: the test is decided by the sign alone
        t = math.copysign(math.inf, mean) if mean else 0.0
    else:
        t = mean / se
    if test == "greater":
        p = float(sps.t.sf(t, df))
    elif test == "less":
        p = float(sps.t.cdf(t, df))
    elif test == "two-sided":
        p = float(2 * sps.t.sf(abs(t), df))
    else:  # TOST: H0 mean <= -margin or mean >= margin
        t_low = (mean + margin) / se if se else math.inf
        t_high = (mean - margin) / se if se else -math.inf
        p = max(float(sps.t.sf(t_low, df)), float(sps.t.cdf(t_high, df)))
        t = min(t_low, -t_high)
    return {**out, "t": float(t), "p": min(max(p, 0.0), 1.0)}


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (step-down; monotone; capped at 1), in the input order."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def evaluate(plan: Sequence[Hypothesis], per_variant: PerVariant, alpha: float = 0.05) -> list[dict[str, Any]]:
    """Every hypothesis's test and verdict, Holm-corrected within its family (module docstring)."""
    results = []
    for h in plan:
        row: dict[str, Any] = {"name": h.name, "statement": h.statement, "test": h.test, "family": h.family,
                               "margin": h.margin}
        try:
            values = h.values(per_variant)
        except KeyError as e:
            values, row["missing"] = {}, str(e.args[0]) if e.args else "records"
        row["seeds"] = sorted(values)
        row["values"] = [values[s] for s in row["seeds"]]
        if len(values) >= 2:
            row.update(t_test(row["values"], h.test, h.margin))
        results.append(row)
    for family in {r["family"] for r in results}:
        tested = [r for r in results if r["family"] == family and "p" in r]
        for r, adj in zip(tested, holm([r["p"] for r in tested])):
            r["p_holm"] = adj
    for r in results:
        if "p_holm" not in r:
            r["verdict"] = f"N/A ({r.get('missing') or 'fewer than 2 seeds'})"
        else:
            r["verdict"] = "SUPPORTED" if r["p_holm"] < alpha else "NOT SUPPORTED"
    return results


def render(results: Sequence[dict[str, Any]], alpha: float = 0.05) -> str:
    """A markdown table of `evaluate`'s results."""
    lines = [f"| hypothesis | test | n | mean (95% CI) | t | p | p (Holm) | verdict at alpha = {alpha} |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        test = r["test"] + (f" (margin {r['margin']})" if r["test"] == "equivalent" else "")
        if "p" in r:
            est = f"{r['mean']:+.4f} ({r['ci95_low']:+.4f}, {r['ci95_high']:+.4f})"
            lines.append(f"| **{r['name']}** {r['statement']} | {test} | {r['n']} | {est} | {r['t']:.2f} | "
                         f"{r['p']:.4f} | {r['p_holm']:.4f} | {r['verdict']} |")
        else:
            lines.append(f"| **{r['name']}** {r['statement']} | {test} | {len(r['seeds'])} | - | - | - | - | "
                         f"{r['verdict']} |")
    return "\n".join(lines) + "\n"
