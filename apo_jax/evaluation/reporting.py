"""The paper's outputs for a run: Table 2 (reward models), Table 3 (policies), Figure 2 (plots).

Inputs are the evaluation records the loop writes to `metrics.jsonl`:

- RM records:     {"kind": "rm_eval", "model", "schedule", "round", "test_acc", "test_ece",
                   "test_ece_weighted", "dev_acc", "dev_ece", "dev_ece_weighted",
                   optional "dev_true_acc", "test_true_acc" (synthetic world: order by r*)}
- policy records: {"kind": "policy_eval", "schedule", "round", "avg_score",
                   optional "true_reward" (synthetic world: mean r* of the answers)}
"""

from __future__ import annotations

import io
import math
from typing import Any, Iterable, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from apo_jax.game import schedules as schedule_table  # noqa: E402
from apo_jax.io import fileio


def _label(schedule: str) -> str:
    return schedule_table.label(schedule)


def _order(schedule: str) -> int:
    names = list(schedule_table.SCHEDULES)
    return names.index(schedule) if schedule in names else len(names)


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _markdown(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def table2(rm_records: Sequence[dict[str, Any]]) -> str:
    """Table 2: each reward model's preference accuracy and calibration on HH_Test and HH_Dev.

    ECE is the paper's unweighted form; the count-weighted form (the official code's) follows.
    """
    has_true = any("test_true_acc" in r for r in rm_records)
    header = ["Reward model", "Round", "Test Acc", "Test ECE", "Dev Acc", "Dev ECE",
              "Test ECE (weighted)", "Dev ECE (weighted)"]
    has_probe = any("marker_bias" in r for r in rm_records)
    if has_true:
        header += ["Test Acc vs r*", "Dev Acc vs r*"]
    if has_probe:
        header += ["b(RM): marker effect"]
    rows = []
    for r in rm_records:
        row = [r["model"], r.get("round", 0), r.get("test_acc"), r.get("test_ece"), r.get("dev_acc"),
               r.get("dev_ece"), r.get("test_ece_weighted"), r.get("dev_ece_weighted")]
        if has_true:
            row += [r.get("test_true_acc"), r.get("dev_true_acc")]
        if has_probe:
            row += [r.get("marker_bias")]
        rows.append(row)
    title = "## Table 2: reward models (accuracy up is better, ECE down is better)\n\n"
    return title + _markdown(header, rows)


def table3(policy_records: Sequence[dict[str, Any]], scorer: str = "RM_Test") -> str:
    """Table 3: average RM score (and, on the synthetic world, true reward) per round and schedule."""
    schedules = sorted({r["schedule"] for r in policy_records if r["schedule"] != "base"}, key=_order)
    rounds = sorted({r["round"] for r in policy_records})
    by_key = {(r["schedule"], r["round"]): r for r in policy_records}
    out = [f"## Table 3: policies' average score on HH_Test queries ({scorer})\n\n"]
    header = ["Round"] + [_label(s) for s in schedules]
    rows = []
    for rnd in rounds:
        base = by_key.get(("base", rnd))
        rows.append([f"v{rnd}"] + [
            (base or by_key.get((s, rnd)) or {}).get("avg_score") for s in schedules
        ])
    out.append(_markdown(header, rows))
    extra = (("true_reward", "True reward r* of the same answers (synthetic world)"),
             ("content_reward", "Content reward (r* without the marker penalty)"),
             ("marker_rate", "Marker rate: share of answers carrying the spurious marker"),
             ("rm_base_score", "RM_Base's score of the same answers (what the fixed RM believes)"))
    for field, title in extra:
        if any(field in r for r in policy_records):
            out.append(f"\n{title}:\n\n")
            rows = [[f"v{rnd}"] + [((by_key.get(("base", rnd)) or by_key.get((s, rnd)) or {}).get(field))
                                   for s in schedules] for rnd in rounds]
            out.append(_markdown(header, rows))
    return "".join(out)


def selection_table(records: Sequence[dict[str, Any]]) -> str:
    """Hacking diagnostics of every best-of-S phase: does the selector rank the policy's own samples
    as r* does, how much of the oracle's headroom its picks capture, and how often they carry the
    spurious marker."""
    if not records:
        return ""
    header = ["Picks", "Selector", "On-policy pair acc", "... marker-free pairs", "r* picked", "r* mean sample",
              "r* oracle pick", "Marker rate samples", "Marker rate picks"]
    rows = [[r["name"], r.get("rm"), r.get("onpolicy_pair_acc"), r.get("onpolicy_pair_acc_marker_free"),
             r.get("true_reward_picked"), r.get("true_reward_mean_sample"), r.get("true_reward_oracle_pick"),
             r.get("marker_rate_samples"), r.get("marker_rate_picks")]
            for r in sorted(records, key=lambda r: (r.get("round", 0), _order(r.get("schedule", ""))))]
    return "## Best-of-S: hacking diagnostics (synthetic world)\n\n" + _markdown(header, rows)


def figure2(
    rm_records: Sequence[dict[str, Any]],
    policy_records: Sequence[dict[str, Any]],
    out_dir: str,
) -> tuple[str, str]:
    """Figure 2's two plots as PNG: RM accuracy against -ECE on Dev; average score per round."""
    calib_path = fileio.join(out_dir, "figure2_rm_accuracy_vs_ece.png")
    score_path = fileio.join(out_dir, "figure2_policy_scores.png")

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for schedule in dict.fromkeys(r["schedule"] for r in rm_records):
        recs = [r for r in rm_records if r["schedule"] == schedule and r.get("dev_acc") is not None]
        xs = [-r["dev_ece"] for r in recs]
        ys = [r["dev_acc"] for r in recs]
        name = "RM_Test (evaluation RM)" if schedule == "eval" else _label(schedule)
        ax.plot(xs, ys, marker="o", linestyle="-" if len(recs) > 1 else "none", label=name)
        for k, (r, x, y) in enumerate(zip(recs, xs, ys)):
            # Alternate the labels above and below their points so neighbours do not overlap.
            ax.annotate(r["model"], (x, y), textcoords="offset points", xytext=(5, 6 if k % 2 == 0 else -11),
                        fontsize=7)
    ax.set_xlabel("-ECE on Dev (higher is better calibrated)")
    ax.set_ylabel("Preference accuracy on Dev")
    ax.set_title("Reward models: accuracy vs calibration")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save_png(fig, calib_path)

    fig, ax = plt.subplots(figsize=(6, 4.5))
    base = {r["round"]: r for r in policy_records if r["schedule"] == "base"}
    for schedule in dict.fromkeys(r["schedule"] for r in policy_records if r["schedule"] != "base"):
        recs = sorted([r for r in policy_records if r["schedule"] == schedule], key=lambda r: r["round"])
        recs = [base[k] for k in sorted(base)] + recs
        ax.plot([r["round"] for r in recs], [r["avg_score"] for r in recs], marker="o",
                label=_label(schedule))
    ax.set_xlabel("Round")
    ax.set_ylabel("Average score on test queries (RM_Test)")
    ax.set_title("Policies: average score per round")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save_png(fig, score_path)
    return calib_path, score_path


def write_reports(records: Sequence[dict[str, Any]], out_dir: str) -> dict[str, str]:
    """Writes tables.md and the two Figure 2 PNGs; returns their paths by name."""
    rm = [r for r in records if r.get("kind") == "rm_eval"]
    pol = [r for r in records if r.get("kind") == "policy_eval"]
    sel = [r for r in records if r.get("kind") == "best_of_s"]
    tables_path = fileio.join(out_dir, "tables.md")
    fileio.write_text(tables_path, "\n".join(t for t in (table2(rm), table3(pol), selection_table(sel)) if t))
    calib, scores = figure2(rm, pol, out_dir)
    out = {"tables": tables_path, "figure2_rm": calib, "figure2_policy": scores}
    if any("true_reward" in r for r in pol):
        out["true_reward_plot"] = true_reward_figure(pol, out_dir)
    for r in records:
        if r.get("kind") == "overopt":
            out[f"overopt_{r['policy']}"] = overopt_figure(r, out_dir)
    return out


def overopt_figure(record: dict[str, Any], out_dir: str,
                   spread: dict[str, Sequence[float]] | None = None) -> str:
    """Gao et al.'s Figure 1 axes: the gold reward of the best-of-n pick under each selector
    against KL_bon, for one policy's samples (`spread`: a +- band per selector, e.g. the SE over
    seeds)."""
    path = fileio.join(out_dir, f"figure_overopt_{record['policy']}.png")
    fig, ax = plt.subplots(figsize=(6.0, 4.4))
    kl = record["kl_bon"]
    for name, ys in record["curves"].items():
        line, = ax.plot(kl, ys, marker="o", label=name, linestyle="--" if name in ("random", "oracle") else "-")
        if spread and name in spread:
            lo = [y - e for y, e in zip(ys, spread[name])]
            hi = [y + e for y, e in zip(ys, spread[name])]
            ax.fill_between(kl, lo, hi, color=line.get_color(), alpha=0.15)
    ax.set_xlabel("KL_bon = log n - (n-1)/n (nats); n = " + ", ".join(str(n) for n in record["n"]))
    ax.set_ylabel(f"{record['gold']} of the best-of-n pick")
    ax.set_title(f"Best-of-n over {record['policy']}'s samples", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save_png(fig, path)
    return path


def true_reward_figure(policy_records: Sequence[dict[str, Any]], out_dir: str) -> str:
    """True reward r* and marker rate of each schedule's policy per round (the synthetic world)."""
    path = fileio.join(out_dir, "figure_true_reward.png")
    fields = [f for f in ("true_reward", "marker_rate") if any(f in r for r in policy_records)]
    fig, axes = plt.subplots(1, len(fields), figsize=(5.5 * len(fields), 4.2), squeeze=False)
    base = {r["round"]: r for r in policy_records if r["schedule"] == "base"}
    schedules = sorted({r["schedule"] for r in policy_records if r["schedule"] != "base"}, key=_order)
    for ax, field in zip(axes[0], fields):
        for schedule in schedules:
            recs = [base[k] for k in sorted(base)] + sorted(
                [r for r in policy_records if r["schedule"] == schedule], key=lambda r: r["round"])
            ax.plot([r["round"] for r in recs], [r.get(field) for r in recs], marker="o", label=_label(schedule))
        ax.set_xlabel("Round")
        ax.set_ylabel({"true_reward": "True reward r* of test answers", "marker_rate": "Marker rate"}[field])
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    _save_png(fig, path)
    return path


def _save_png(fig: Any, path: str) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    fileio.write_bytes(path, buf.getvalue())
