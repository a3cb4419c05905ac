"""Pre-registered analysis plans: the hypotheses of a study, as code (`hypotheses.Hypothesis` rows).

`PLANS["labeller"]` is the biased-labeller study's plan, registered in
docs/studies/labeller_prereg.md before its confirmatory run; the document and this table say the
same thing (a test checks that every hypothesis here is named there). Records are those the study
module reads (`apo_jax.study.load_seed`): policy_eval (schedule, round, true_reward, excess_length,
avg_score), rm_eval (model, test_acc, test_ece, test_true_acc).
"""

from __future__ import annotations

from typing import Callable, Sequence

from apo_jax.evaluation.hypotheses import Hypothesis, PerVariant

SeedValues = Callable[[PerVariant], dict[int, float]]


def _find(records: Sequence[dict], **match) -> dict | None:
    for r in records:
        if all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def field(variant: str, field_name: str, **match) -> SeedValues:
    """seed -> `field_name` of the record matching `match` in `variant`'s runs (KeyError naming what
    is missing when the variant did not run)."""
    def values(per_variant: PerVariant) -> dict[int, float]:
        if variant not in per_variant or not per_variant[variant]:
            raise KeyError(f"no finished runs of variant {variant!r}")
        out = {}
        for seed, records in per_variant[variant].items():
            rec = _find(records, **match)
            if rec is not None and rec.get(field_name) is not None:
                out[seed] = float(rec[field_name])
        if not out:
            raise KeyError(f"{variant}: no {field_name} in records matching {match}")
        return out
    return values


def minus(a: SeedValues, b: SeedValues, scale_b: float = 1.0) -> SeedValues:
    """seed -> a - scale_b * b over the seeds holding both."""
    def values(per_variant: PerVariant) -> dict[int, float]:
        va, vb = a(per_variant), b(per_variant)
        return {s: va[s] - scale_b * vb[s] for s in sorted(va) if s in vb}
    return values


def policy(variant: str, schedule: str, rnd: int, name: str) -> SeedValues:
    return field(variant, name, kind="policy_eval", schedule=schedule, round=rnd)


def rm(variant: str, model: str, name: str) -> SeedValues:
    return field(variant, name, kind="rm_eval", model=model)


def _labeller_plan(last: int = 3, margin: float = 0.02) -> tuple[Hypothesis, ...]:
    def arms(variant: str, a: str, b: str, name: str = "true_reward") -> SeedValues:
        return minus(policy(variant, a, last, name), policy(variant, b, last, name))

    return (
        # Primary family (Holm across H1-H4).
        Hypothesis("H1", f"main: r*(random) - r*(RJS) at round {last} > 0 (RJS hacks the labeller's bias beyond "
                         "what self-training alone gives)", arms("main", "random", "rjs")),
        Hypothesis("H2", f"main: r*(APO) - r*(RJS) at round {last} > 0", arms("main", "apo", "rjs")),
        Hypothesis("H2e", f"lambda0: r*(APO) - r*(RJS) at round {last} within +-{margin} (no bias, no APO effect)",
                   arms("lambda0", "apo", "rjs"), test="equivalent", margin=margin),
        Hypothesis("H3", f"(APO - RJS r* at round {last}) with the labeller's gold - half of it with true gold > 0 "
                         "(the advantage at most halves when gold shares the bias; paired by seed)",
                   minus(arms("gold_labeller", "apo", "rjs"), arms("main", "apo", "rjs"), scale_b=0.5)),
        Hypothesis("H4", f"main: excess length(APO) - excess length(RJS) at round {last} < 0",
                   arms("main", "apo", "rjs", "excess_length"), test="less"),
        # Secondary (two-sided, reported whatever the sign; Holm within the family).
        Hypothesis("T2acc", "main: test accuracy (labels) of RM_APO-v1 - RM_Base (Table 2 analogue)",
                   minus(rm("main", "RM_APO-v1", "test_acc"), rm("main", "RM_Base", "test_acc")),
                   test="two-sided", family="secondary"),
        Hypothesis("T2true", "main: accuracy against r* of RM_APO-v1 - RM_Base",
                   minus(rm("main", "RM_APO-v1", "test_true_acc"), rm("main", "RM_Base", "test_true_acc")),
                   test="two-sided", family="secondary"),
        Hypothesis("T2ece", "main: test ECE of RM_APO-v1 - RM_Base",
                   minus(rm("main", "RM_APO-v1", "test_ece"), rm("main", "RM_Base", "test_ece")),
                   test="two-sided", family="secondary"),
        Hypothesis("S1", f"main: r*(oracle) - r*(random) at round {last} (what selection can add)",
                   arms("main", "oracle", "random"), test="two-sided", family="secondary"),
        Hypothesis("S2", f"main: r*(APO) - r*(ablation) at round {last} (D_APO against the same RM schedule)",
                   arms("main", "apo", "ablation"), test="two-sided", family="secondary"),
        Hypothesis("S3", f"s4: r*(APO) - r*(RJS) at round {last} (less selection pressure: S = 4)",
                   arms("s4", "apo", "rjs"), test="two-sided", family="secondary"),
        Hypothesis("S4", f"learned: r*(APO) - r*(RJS) at round {last} (a learned labeller, no chosen bias)",
                   arms("learned", "apo", "rjs"), test="two-sided", family="secondary"),
        Hypothesis("S5", f"paper_rm: r*(APO) - r*(RJS) at round {last} (the paper's beta2 = 10 and APO learning "
                         "rate ratio 0.01)", arms("paper_rm", "apo", "rjs"), test="two-sided", family="secondary"),
    )


PLANS: dict[str, tuple[Hypothesis, ...]] = {"labeller": _labeller_plan()}
