"""A multi-seed study: N normal runs of one config, then mean +- SE tables and pre-registered checks.

    python -m apo_jax.study --config=configs/synthetic_study.py --seeds=5 --out=runs/study
                            [--first_seed=0] [--config.x=y ...]

Each seed k is exactly a normal run, `python -m apo_jax.main --config=... --config.seed=k
--config.run_dir=DIR/seed_<k> [overrides]` in a subprocess (log in DIR/seed_<k>.log), so each is
resumable on its own; a seed whose summary.json exists is skipped, and rerunning the study resumes
the unfinished ones. Then DIR/study.json and DIR/study.md hold, over the finished seeds:

- mean +- SE (SE = sd with ddof=1 / sqrt(n)) of every numeric field of every record;
- paired differences per round (APO - RJS, APO - ablation, APO - oracle; with DPO arms APO-DPO -
  RJS-DPO and DPO - SFT per selector; each schedule - policy_0) of the policy fields, SE = sd of
  the per-seed paired difference / sqrt(N);
- the pre-registered checks P1-P4 and H1-H4 (issue #14) as PASS / FAIL lines, or "N/A (missing
  <what>)" where the records they need are absent;
- DIR/study_true_reward.png: true reward (and marker rate) per round per schedule, with error bars.

Records read from each seed's summary.json `records` (and, for kinds absent there, from its
metrics.jsonl, the last record per key). The field names this module reads:

- {"kind": "policy_eval", "schedule", "round", "true_reward", "content_reward", "marker_rate",
   "avg_score" (RM_Test's score), optional "rm_base_score" (RM_Base's score of the same answers)}:
   policy_0 is schedule "base" round 0; the oracle arm is schedule "oracle".
- {"kind": "rm_eval", "model", "schedule", "round", "test_acc", "test_ece", ...}
- {"kind": "best_of_s", "schedule", "round", "rm", "true_reward_picked", "true_reward_mean_sample",
   "true_reward_oracle_pick", "headroom", "onpolicy_pair_acc", "onpolicy_pair_acc_marker_free",
   "marker_rate_samples", "marker_rate_picks"}: `round` is the round whose policy update the picks
   feed, so round 1 judges policy_0's samples (older records carry "name": "<schedule>_r<round>").
- {"kind": "rm_probe", "model", "schedule", "round", "marker_bias"}: RM_Base is model "RM_Base"; an
   rm_eval record carrying "marker_bias" counts as one.

The checks (L = the last round):
- P1 headroom of policy_0's samples (best_of_s, round 1) >= 0.10.
- P2 RM_Base's onpolicy_pair_acc_marker_free (best_of_s rjs, round 1) >= 0.60.
- P3 b(RM_Base) (rm_probe marker_bias) > 0.
- P4 true_reward of oracle at L - policy_0 >= 0.05.
- H1 RJS at L - policy_0: its RM_Base score (rm_base_score, else RM_Test's avg_score) and its
  marker_rate each rise by > 2 SE, and its true_reward does not rise (mean difference <= 0).
- H2 APO - RJS true_reward at L > max(2 SE, 0.02).
- H3 at round 1, where both RMs judge policy_0's samples: APO's RM - RM_Base onpolicy_pair_acc
  > 2 SE, and b(RM_Base) - b(APO's round-1 RM) > 2 SE.
- H4 APO - ablation true_reward at L > 2 SE.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
from typing import Any, Callable, Iterable, Sequence

import numpy as np

Record = dict[str, Any]
Key = tuple[Any, ...]
CommandFn = Callable[[int, str], list[str]]
Runner = Callable[[list[str], str], int]

POLICY_FIELDS_FIRST = ("true_reward", "content_reward", "marker_rate", "avg_score", "rm_base_score")
CONTRASTS = (("apo", "rjs"), ("apo", "ablation"), ("apo", "oracle"),
             # DPO as the policy update (#15): the RM's effect under DPO, and DPO vs SFT per RM.
             ("apo-dpo", "rjs-dpo"), ("rjs-dpo", "rjs"), ("apo-dpo", "apo"), ("oracle-dpo", "oracle"))


# ------------------------------------------------------------------------------------ running


def main_command(config: str, overrides: Sequence[str] = (), python: str = sys.executable) -> CommandFn:
    """The per-seed command: a normal `apo_jax.main` run of `config` with seed and run_dir set."""
    def command(seed: int, run_dir: str) -> list[str]:
        return [python, "-m", "apo_jax.main", f"--config={config}", f"--config.seed={seed}",
                f"--config.run_dir={run_dir}", *overrides]
    return command


def subprocess_runner(cmd: list[str], log_path: str) -> int:
    """Runs `cmd`, appending its stdout and stderr to `log_path`; returns its exit code."""
    with open(log_path, "ab") as log:
        log.write(f"\n$ {' '.join(cmd)}\n".encode())
        log.flush()
        return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False).returncode


def seed_dir(out: str, seed: int) -> str:
    return os.path.join(out, f"seed_{seed}")


def run_seeds(out: str, seeds: Iterable[int], command: CommandFn, runner: Runner = subprocess_runner,
              echo: Callable[[str], None] = print) -> dict[int, str]:
    """Runs every seed without a summary.json; returns seed -> "done" | "skipped" | "failed (exit N)"."""
    os.makedirs(out, exist_ok=True)
    status: dict[int, str] = {}
    for seed in seeds:
        run_dir = seed_dir(out, seed)
        if os.path.exists(os.path.join(run_dir, "summary.json")):
            status[seed] = "skipped"
            echo(f"study: seed {seed}: finished earlier ({run_dir})")
            continue
        echo(f"study: seed {seed}: running {run_dir} (log {run_dir}.log)")
        rc = runner(command(seed, run_dir), f"{run_dir}.log")
        done = rc == 0 and os.path.exists(os.path.join(run_dir, "summary.json"))
        status[seed] = "done" if done else f"failed (exit {rc})"
        echo(f"study: seed {seed}: {status[seed]}")
    return status


# ------------------------------------------------------------------------------------ records


def record_key(rec: Record) -> Key | None:
    """The identity of a record across seeds, or None for kinds the study does not tabulate."""
    kind = rec.get("kind")
    if kind == "rm_eval":
        return (kind, rec.get("model"))
    if kind in ("policy_eval", "best_of_s", "rm_probe"):
        sched, rnd = rec.get("schedule"), rec.get("round")
        if (sched is None or rnd is None) and isinstance(rec.get("name"), str):
            m = re.fullmatch(r"(.+)_r(\d+)", rec["name"])
            if m:
                sched, rnd = m.group(1), int(m.group(2))
        if kind == "rm_probe":
            return (kind, rec.get("model"), sched, rnd)
        return (kind, sched, rnd)
    return None


def normalise(records: Iterable[Record]) -> list[Record]:
    """The records with schedule/round filled in from their key (older best_of_s records only
    have a name "<schedule>_r<round>")."""
    out = []
    for rec in records:
        key = record_key(rec)
        if key is not None and key[0] in ("policy_eval", "best_of_s"):
            rec = {**rec, "schedule": key[1], "round": key[2]}
        if key is not None and key[0] == "best_of_s" and "headroom" not in rec and \
                {"true_reward_oracle_pick", "true_reward_mean_sample"} <= set(rec):
            rec["headroom"] = rec["true_reward_oracle_pick"] - rec["true_reward_mean_sample"]  # mean of differences
        out.append(rec)
        if rec.get("kind") == "rm_eval" and "marker_bias" in rec:  # the game records the probe with Table 2
            out.append({"kind": "rm_probe", **{k: rec.get(k) for k in ("model", "schedule", "round", "marker_bias",
                                                                        "marker_bias_se") if k in rec}})
    return out


def load_seed(run_dir: str) -> list[Record]:
    """A finished run's records: summary.json's, plus metrics.jsonl's of kinds summary.json lacks."""
    with open(os.path.join(run_dir, "summary.json")) as f:
        records = [r for r in json.load(f).get("records", []) if isinstance(r, dict)]
    kinds = {r.get("kind") for r in records}
    metrics = os.path.join(run_dir, "metrics.jsonl")
    extra: dict[Key, Record] = {}
    if os.path.exists(metrics):
        with open(metrics) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a line cut by a crash
                key = record_key(rec) if isinstance(rec, dict) else None
                if key is not None and rec["kind"] not in kinds:
                    extra[key] = rec  # the last one wins: a resumed phase logs again
    return normalise(records + list(extra.values()))


def _numeric(rec: Record) -> dict[str, float]:
    skip = {"round", "num_answers"}
    return {k: float(v) for k, v in rec.items()
            if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool)}


def mean_se(values: Sequence[float]) -> dict[str, float]:
    """{"mean", "se", "sd", "n"} of finite `values`; SE = sd (ddof=1) / sqrt(n), NaN for n < 2."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], np.float64)
    if v.size == 0:
        return {"mean": float("nan"), "se": float("nan"), "sd": float("nan"), "n": 0}
    sd = float(v.std(ddof=1)) if v.size > 1 else float("nan")
    return {"mean": float(v.mean()), "se": sd / math.sqrt(v.size) if v.size > 1 else float("nan"), "sd": sd,
            "n": int(v.size)}


def index(per_seed: dict[int, list[Record]]) -> dict[Key, dict[int, Record]]:
    """key -> seed -> record."""
    out: dict[Key, dict[int, Record]] = {}
    for seed, records in per_seed.items():
        for rec in records:
            key = record_key(rec)
            if key is not None:
                out.setdefault(key, {})[seed] = rec
    return out


SCHEDULE_ORDER = ("base", "rjs", "apo", "apo_seq", "ablation", "oracle", "random")


def _sort_key(key: Key) -> tuple:
    """policy_0 first, then the paper's schedules, the oracle, any others; then by round."""
    parts = []
    for part in key:
        if part in SCHEDULE_ORDER:
            parts.append((0, SCHEDULE_ORDER.index(part), ""))
        elif isinstance(part, int):
            parts.append((1, part, ""))
        else:
            parts.append((2, 0, str(part)))
    return tuple(parts)


def aggregate(per_seed: dict[int, list[Record]]) -> list[dict[str, Any]]:
    """Mean +- SE across seeds of every numeric field of every record key."""
    rows = []
    for key, by_seed in sorted(index(per_seed).items(), key=lambda kv: _sort_key(kv[0])):
        fields: dict[str, list[float]] = {}
        for rec in by_seed.values():
            for name, value in _numeric(rec).items():
                fields.setdefault(name, []).append(value)
        rows.append({"key": list(key), "seeds": sorted(by_seed), "fields": {k: mean_se(v) for k, v in fields.items()}})
    return rows


def paired(per_seed: dict[int, list[Record]], a: Key, b: Key, field: str) -> dict[str, Any]:
    """mean_se of rec_a[field] - rec_b[field] over the seeds holding both (plus those seeds)."""
    idx = index(per_seed)
    ra, rb = idx.get(a, {}), idx.get(b, {})
    seeds = sorted(s for s in ra if s in rb and field in ra[s] and field in rb[s])
    diffs = [float(ra[s][field]) - float(rb[s][field]) for s in seeds]
    return {**mean_se(diffs), "seeds": seeds, "values": diffs}


def _policy_key(schedule: str, rnd: int) -> Key:
    return ("policy_eval", schedule, rnd)


def policy_fields(per_seed: dict[int, list[Record]]) -> list[str]:
    """Policy fields to compare: r*, content, the score fields, and every marker field present."""
    present = {k for recs in per_seed.values() for r in recs if r.get("kind") == "policy_eval" for k in _numeric(r)}
    return [f for f in POLICY_FIELDS_FIRST if f in present] + sorted(f for f in present - set(POLICY_FIELDS_FIRST)
                                                                     if "marker" in f)


def differences(per_seed: dict[int, list[Record]]) -> list[dict[str, Any]]:
    """Paired differences per round: the CONTRASTS both of whose arms ran, each schedule - policy_0."""
    keys = {k for k in index(per_seed) if k[0] == "policy_eval"}
    rounds = sorted({k[2] for k in keys if isinstance(k[2], int) and k[2] > 0})
    schedules = sorted({k[1] for k in keys if k[1] != "base"})
    out = []
    for rnd in rounds:
        pairs = [(f"{a} - {b}", _policy_key(a, rnd), _policy_key(b, rnd)) for a, b in CONTRASTS]
        pairs += [(f"{s} - policy_0", _policy_key(s, rnd), _policy_key("base", 0)) for s in schedules]
        for name, a, b in pairs:
            if a in keys and b in keys:
                out.append({"round": rnd, "contrast": name,
                            "fields": {f: paired(per_seed, a, b, f) for f in policy_fields(per_seed)}})
    return out


# ------------------------------------------------------------------------------------ checks


def _find(per_seed: dict[int, list[Record]], kind: str, **match: Any) -> Key | None:
    """The key of the records of `kind` whose fields equal `match` (the first such key)."""
    for recs in per_seed.values():
        for r in recs:
            if r.get("kind") == kind and all(r.get(k) == v for k, v in match.items()):
                return record_key(r)
    return None


def _field_values(per_seed: dict[int, list[Record]], key: Key | None, field: str) -> list[float] | None:
    if key is None:
        return None
    vals = [float(r[field]) for r in index(per_seed).get(key, {}).values() if field in r and r[field] is not None]
    return vals or None


def _fmt(stat: dict[str, Any]) -> str:
    se = f"{stat['se']:.4f}" if math.isfinite(stat["se"]) else "n/a (one seed)"
    return f"{stat['mean']:+.4f} +- {se} (n={stat['n']})"


def _above(stat: dict[str, Any], threshold: float) -> bool | None:
    """mean > threshold, or None (N/A) when the threshold needs an SE that one seed cannot give."""
    return None if not math.isfinite(threshold) else bool(stat["mean"] > threshold)


def checks(per_seed: dict[int, list[Record]]) -> list[dict[str, str]]:
    """P1-P4 and H1-H4 (module docstring): [{"check", "status": PASS|FAIL|N/A, "detail"}]."""
    idx = index(per_seed)
    rounds = sorted({k[2] for k in idx if k[0] == "policy_eval" and isinstance(k[2], int) and k[2] > 0})
    last = rounds[-1] if rounds else None
    base = _policy_key("base", 0)
    out: list[dict[str, str]] = []

    def add(name: str, what: str, ok: bool | None, detail: str, info: bool = False) -> None:
        status = "INFO" if info else "N/A" if ok is None else ("PASS" if ok else "FAIL")
        if ok is None and not info and "N/A" not in detail:
            detail += " (N/A: the SE needs >= 2 seeds)"
        out.append({"check": name, "what": what, "status": status, "detail": detail})

    def level(name: str, what: str, key: Key | None, field: str, test: Callable[[dict], bool], missing: str) -> None:
        vals = _field_values(per_seed, key, field)
        if vals is None:
            add(name, what, None, f"N/A (missing {missing})")
            return
        stat = mean_se(vals)
        add(name, what, bool(test(stat)), f"{field} = {_fmt(stat)}")

    def diff(a: Key | None, b: Key | None, field: str, missing: str) -> tuple[dict | None, str]:
        if a is None or b is None or a not in idx or b not in idx:
            return None, f"N/A (missing {missing})"
        stat = paired(per_seed, a, b, field)
        if stat["n"] == 0:
            return None, f"N/A (missing {field} in {missing})"
        return stat, _fmt(stat)

    bos1 = _find(per_seed, "best_of_s", round=1, schedule="rjs") or _find(per_seed, "best_of_s", round=1)
    level("P1", "oracle headroom of policy_0's samples >= 0.10", bos1, "headroom", lambda s: s["mean"] >= 0.10,
          "best_of_s round 1 headroom")
    level("P2", "RM_Base on-policy pair accuracy (marker-free) >= 0.60", _find(per_seed, "best_of_s", round=1,
          schedule="rjs"), "onpolicy_pair_acc_marker_free", lambda s: s["mean"] >= 0.60,
          "best_of_s rjs round 1 onpolicy_pair_acc_marker_free")
    probe_base = _find(per_seed, "rm_probe", model="RM_Base")
    level("P3", "b(RM_Base) > 0", probe_base, "marker_bias", lambda s: s["mean"] > 0, "rm_probe RM_Base marker_bias")
    if last is None:
        for name in ("P4", "H1", "H2", "H4"):
            add(name, "", None, "N/A (missing policy_eval records of a round >= 1)")
    else:
        stat, text = diff(_policy_key("oracle", last), base, "true_reward", f"policy_eval oracle r{last} / base r0")
        add("P4", f"oracle improves r* over policy_0 by >= 0.05 (round {last})",
            None if stat is None else stat["mean"] >= 0.05, f"true_reward diff = {text}")

        rjs = _policy_key("rjs", last)
        parts, oks = [], []
        score_field = "rm_base_score" if _field_values(per_seed, rjs, "rm_base_score") else "avg_score"
        for field, test in ((score_field, lambda s: _above(s, 2 * s["se"])),
                            ("marker_rate", lambda s: _above(s, 2 * s["se"])),
                            ("true_reward", lambda s: s["mean"] <= 0)):
            stat, text = diff(rjs, base, field, f"policy_eval rjs r{last} / base r0 {field}")
            parts.append(f"{field} {text}")
            oks.append(None if stat is None else test(stat))
        add("H1", f"RJS hacked: score and marker rate up > 2 SE, r* not up (round {last} - policy_0)",
            None if None in oks else all(oks), "; ".join(parts))

        stat, text = diff(_policy_key("apo", last), rjs, "true_reward", f"policy_eval apo/rjs r{last}")
        add("H2", f"APO - RJS true reward > max(2 SE, 0.02) (round {last})",
            None if stat is None else _above(stat, max(2 * stat["se"], 0.02)), f"true_reward diff = {text}")
        cstat, ctext = diff(_policy_key("apo", last), rjs, "content_reward", f"policy_eval apo/rjs r{last}")
        if cstat is not None:
            add("H2c", f"(report) APO - RJS content-only reward (round {last})", None, f"content_reward diff = {ctext}",
                info=True)

        stat, text = diff(_policy_key("apo", last), _policy_key("ablation", last), "true_reward",
                          f"policy_eval apo/ablation r{last}")
        add("H4", f"APO - ablation true reward > 2 SE (round {last})",
            None if stat is None else _above(stat, 2 * stat["se"]), f"true_reward diff = {text}")

    acc, acc_text = diff(_find(per_seed, "best_of_s", round=1, schedule="apo"),
                         _find(per_seed, "best_of_s", round=1, schedule="rjs"), "onpolicy_pair_acc",
                         "best_of_s apo/rjs round 1 onpolicy_pair_acc")
    b, b_text = diff(probe_base, _find(per_seed, "rm_probe", schedule="apo", round=1), "marker_bias",
                     "rm_probe RM_Base / apo round 1 marker_bias")
    oks = [None if x is None else _above(x, 2 * x["se"]) for x in (acc, b)]
    ok = None if None in oks else all(oks)
    add("H3", "APO's RM beats RM_Base: on-policy pair acc up and b down, each > 2 SE (round 1)", ok,
        f"pair acc diff = {acc_text}; b(RM_Base) - b(APO) = {b_text}")
    order = ["P1", "P2", "P3", "P4", "H1", "H2", "H2c", "H3", "H4"]
    return sorted(out, key=lambda c: order.index(c["check"]))


# ------------------------------------------------------------------------------------ outputs


def _cell(stat: dict[str, Any]) -> str:
    if not stat or stat.get("n", 0) == 0 or not math.isfinite(stat["mean"]):
        return "-"
    se = f" ± {stat['se']:.3f}" if math.isfinite(stat["se"]) else ""
    return f"{stat['mean']:.3f}{se}"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def render_markdown(study: dict[str, Any]) -> str:
    """study.md: the seeds, the checks, the paired differences, then every record kind's table."""
    out = [f"# Study: {study['config']}\n",
           f"Seeds {study['seeds_used']} of {study['seeds_requested']} finished; every entry is mean ± SE over "
           "seeds (SE = sd / sqrt(n), ddof = 1); differences are paired by seed.\n"]
    if study["seeds_missing"]:
        out.append(f"Not finished (left out): seeds {study['seeds_missing']}.\n")
    out.append("\n## Pre-registered checks\n\n")
    out.append("".join(f"- **{c['check']}** {c['status']}: {c['what']}: {c['detail']}\n" for c in study["checks"]))
    if study["differences"]:
        fields = list(study["differences"][0]["fields"])
        out.append("\n## Paired differences (policy evaluation)\n\n")
        out.append(_table(["round", "contrast", *fields],
                          ([str(d["round"]), d["contrast"], *(_cell(d["fields"][f]) for f in fields)]
                           for d in study["differences"])))
    titles = {"policy_eval": "Policies", "rm_eval": "Reward models", "best_of_s": "Best-of-S phases",
              "rm_probe": "Marker probe b(RM)"}
    for kind, title in titles.items():
        rows = [r for r in study["table"] if r["key"][0] == kind]
        if not rows:
            continue
        fields = sorted({f for r in rows for f in r["fields"]},
                        key=lambda f: (POLICY_FIELDS_FIRST.index(f) if f in POLICY_FIELDS_FIRST else 99, f))
        keys = {"rm_eval": ["model"], "rm_probe": ["model", "schedule", "round"]}.get(kind, ["schedule", "round"])
        out.append(f"\n## {title}\n\n")
        out.append(_table([*keys, "seeds", *fields],
                          ([*(str(k) for k in r["key"][1:]), str(len(r["seeds"])),
                            *(_cell(r["fields"].get(f, {})) for f in fields)] for r in rows)))
    return "".join(out)


def plot(study: dict[str, Any], path: str) -> str | None:
    """True reward (and marker rate where recorded) per round per schedule, mean ± SE error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {(r["key"][1], r["key"][2]): r["fields"] for r in study["table"] if r["key"][0] == "policy_eval"}
    if not rows:
        return None
    panels = [f for f in ("true_reward", "marker_rate") if any(f in v for v in rows.values())]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    schedules = sorted({s for s, _ in rows if s != "base"}, key=lambda s: _sort_key((s,)))
    for ax, field in zip(axes[0], panels):
        for i, sched in enumerate(schedules):
            pts = sorted((r, f[field]) for (s, r), f in rows.items() if s == sched and field in f)
            if ("base", 0) in rows and field in rows[("base", 0)]:
                pts = [(0, rows[("base", 0)][field])] + pts
            x = np.asarray([p[0] for p in pts], float) + 0.03 * (i - len(schedules) / 2)  # no overlapping bars
            y = [p[1]["mean"] for p in pts]
            e = [p[1]["se"] if math.isfinite(p[1]["se"]) else 0.0 for p in pts]
            ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=sched)
        ax.set_xlabel("round (0 = policy_0)")
        ax.set_ylabel(f"{field} (mean ± SE over seeds)")
        ax.set_title(field.replace("_", " "))
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def summarise(out: str, seeds: Sequence[int], config: str = "") -> dict[str, Any]:
    """Reads the finished seeds under `out`, writes study.json, study.md and the plot; returns study.json."""
    per_seed = {s: load_seed(seed_dir(out, s)) for s in seeds
                if os.path.exists(os.path.join(seed_dir(out, s), "summary.json"))}
    study = {"config": config, "seeds_requested": list(seeds), "seeds_used": sorted(per_seed),
             "seeds_missing": [s for s in seeds if s not in per_seed], "table": aggregate(per_seed),
             "differences": differences(per_seed), "checks": checks(per_seed)}
    png = plot(study, os.path.join(out, "study_true_reward.png"))
    study["plot"] = os.path.basename(png) if png else None
    with open(os.path.join(out, "study.json"), "w") as f:
        json.dump(study, f, indent=1, allow_nan=True)
    with open(os.path.join(out, "study.md"), "w") as f:
        f.write(render_markdown(study))
    return study


def run_study(config: str, seeds: Sequence[int], out: str, overrides: Sequence[str] = (),
              command: CommandFn | None = None, runner: Runner = subprocess_runner,
              echo: Callable[[str], None] = print) -> tuple[dict[str, Any], dict[int, str]]:
    """Runs the unfinished seeds (`command(seed, run_dir)`, default a normal apo_jax.main run),
    then summarises every finished one. Returns (study.json content, seed -> run status)."""
    status = run_seeds(out, seeds, command or main_command(config, overrides), runner, echo)
    return summarise(out, seeds, config), status


# ------------------------------------------------------------------------------------ pre-registered analysis


def load_variants(out: str, seeds: Sequence[int]) -> dict[str, dict[int, list[Record]]]:
    """variant -> seed -> records, for every `out/<variant>/seed_<k>` with a summary.json."""
    per_variant: dict[str, dict[int, list[Record]]] = {}
    for variant in sorted(os.listdir(out)) if os.path.isdir(out) else []:
        for seed in seeds:
            run_dir = seed_dir(os.path.join(out, variant), seed)
            if os.path.exists(os.path.join(run_dir, "summary.json")):
                per_variant.setdefault(variant, {})[seed] = load_seed(run_dir)
    return per_variant


def _kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-a of two orderings of the same items (ties count 0)."""
    n, s = len(x), 0.0
    for i in range(n):
        for j in range(i + 1, n):
            s += np.sign(x[i] - x[j]) * np.sign(y[i] - y[j])
    return float(s / (n * (n - 1) / 2)) if n > 1 else float("nan")


def evaluator_agreement(per_seed: dict[int, list[Record]]) -> dict[str, Any]:
    """Does Table 3's learned judge (RM_Test's avg_score) rank the arms of the last round as the true
    reward does? Per seed: Kendall's tau over the arms and whether the top arm is the same."""
    taus, same_top = [], []
    for records in per_seed.values():
        pol = [r for r in records if r.get("kind") == "policy_eval" and r.get("schedule") != "base"]
        if not pol:
            continue
        last = max(r["round"] for r in pol)
        arms = [r for r in pol if r["round"] == last and "true_reward" in r]
        if len(arms) < 2:
            continue
        score, true = [r["avg_score"] for r in arms], [r["true_reward"] for r in arms]
        taus.append(_kendall_tau(score, true))
        same_top.append(float(int(np.argmax(score)) == int(np.argmax(true))))
    return {"kendall_tau": mean_se(taus), "same_top_arm": mean_se(same_top)}


def overopt_curves(per_seed: dict[int, list[Record]]) -> dict[str, Any] | None:
    """Mean and SE across seeds of each selector's best-of-n curve (records of kind "overopt")."""
    recs = [r for records in per_seed.values() for r in records if r.get("kind") == "overopt"]
    if not recs:
        return None
    names = sorted(set.intersection(*(set(r["curves"]) for r in recs)))
    curves = {name: [mean_se([r["curves"][name][i] for r in recs]) for i in range(len(recs[0]["n"]))]
              for name in names}
    return {"policy": recs[0]["policy"], "gold": recs[0]["gold"], "n": recs[0]["n"], "kl_bon": recs[0]["kl_bon"],
            "seeds": len(recs), "curves": curves}


def analyze(out: str, plan_name: str, seeds: Sequence[int], alpha: float = 0.05) -> dict[str, Any]:
    """The pre-registered plan `plan_name` (`apo_jax.evaluation.plans`) over `out/<variant>/seed_<k>`:
    writes out/confirmatory.md and .json and one over-optimization figure per variant."""
    from apo_jax.evaluation import hypotheses, plans, reporting

    per_variant = load_variants(out, seeds)
    results = hypotheses.evaluate(plans.PLANS[plan_name], per_variant, alpha)
    variants = {}
    for variant, per_seed in per_variant.items():
        info: dict[str, Any] = {"seeds": sorted(per_seed), "evaluator_agreement": evaluator_agreement(per_seed)}
        curves = overopt_curves(per_seed)
        if curves is not None:
            info["overopt"] = curves
            record = {**curves, "policy": f"{curves['policy']}_{variant}",
                      "curves": {k: [c["mean"] for c in v] for k, v in curves["curves"].items()}}
            spread = {k: [c["se"] if math.isfinite(c["se"]) else 0.0 for c in v] for k, v in curves["curves"].items()}
            info["overopt_figure"] = os.path.basename(reporting.overopt_figure(record, out, spread))
        variants[variant] = info
    result = {"plan": plan_name, "seeds_requested": list(seeds), "alpha": alpha, "hypotheses": results,
              "variants": variants}
    lines = [f"# Pre-registered analysis: {plan_name}\n\n",
             f"Seeds requested {list(seeds)}; one-sided paired tests unless stated, Holm-corrected within each "
             f"family, alpha = {alpha}.\n\n", hypotheses.render(results, alpha)]
    for variant, info in variants.items():
        agree = info["evaluator_agreement"]
        lines.append(f"\n## {variant} (seeds {info['seeds']})\n\n")
        lines.append(f"- Table 3's judge (RM_Test) against r*, last round: Kendall tau "
                     f"{_cell(agree['kendall_tau'])}, same top arm in {_cell(agree['same_top_arm'])} of seeds\n")
        if "overopt" in info:
            c = info["overopt"]
            lines.append(f"- Best-of-n of {c['policy']}'s samples ({c['gold']}, mean ± SE over {c['seeds']} seeds), "
                         f"![]({info['overopt_figure']}):\n\n")
            lines.append(_table(["selector", *(f"n={n}" for n in c["n"])],
                                ([name, *(_cell(x) for x in v)] for name, v in c["curves"].items())))
    with open(os.path.join(out, "confirmatory.json"), "w") as f:
        json.dump(result, f, indent=1, allow_nan=True)
    with open(os.path.join(out, "confirmatory.md"), "w") as f:
        f.write("".join(lines))
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m apo_jax.study", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="config file (configs/*.py[:variant])")
    parser.add_argument("--analyze", default="", help="a pre-registered plan (apo_jax/evaluation/plans.py): "
                        "evaluate it over --out/<variant>/seed_<k> instead of running seeds")
    parser.add_argument("--seeds", type=int, required=True, help="number of seeds N (seeds first_seed..+N-1)")
    parser.add_argument("--out", required=True, help="study directory (one run dir per seed inside)")
    parser.add_argument("--first_seed", type=int, default=0)
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if not o.startswith("--config.")]
    if bad:
        parser.error(f"unknown arguments {bad}; only --config.<field>=<value> overrides are passed to the runs")
    if args.seeds < 1:
        parser.error(f"--seeds: {args.seeds} must be >= 1")
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    if args.analyze:
        from apo_jax.evaluation import plans

        if args.analyze not in plans.PLANS:
            parser.error(f"--analyze: unknown plan {args.analyze!r}; expected one of {sorted(plans.PLANS)}")
        result = analyze(args.out, args.analyze, seeds)
        for h in result["hypotheses"]:
            print(f"{h['name']:6s} {h['verdict']}: {h['statement']}")
        print(f"study: {os.path.join(args.out, 'confirmatory.md')}")
        return 0
    if not args.config:
        parser.error("--config is required (or --analyze=<plan>)")
    if not os.path.isfile(args.config.split(":")[0]):  # "file.py:arg" passes arg to get_config
        parser.error(f"--config: no such file {args.config}")
    study, status = run_study(args.config, seeds, args.out, overrides)
    for c in study["checks"]:
        print(f"{c['check']:4s} {c['status']:5s} {c['what']}: {c['detail']}")
    print(f"study: {os.path.join(args.out, 'study.md')}")
    failed = {s: st for s, st in status.items() if st.startswith("failed")}
    if failed:
        print(f"study: unfinished seeds {failed}; rerun the same command to resume them", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
