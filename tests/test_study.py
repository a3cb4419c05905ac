"""The multi-seed study: aggregation and paired differences against NumPy on fabricated summaries,
the pre-registered checks on fabricated numbers, and resume of a partly finished study."""

from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
import pytest

from apo_jax import study

SCHEDULES = ("rjs", "apo", "ablation", "oracle", "rjs-dpo", "apo-dpo")


def _records(v: dict[str, float], rounds: int = 2) -> list[dict]:
    """A seed's summary records, every number taken from `v` (keys "<schedule>.<round>.<field>",
    "bos.<schedule>.<field>", "probe.<model>.<field>"), missing ones left out."""
    recs = [{"kind": "rm_eval", "model": "RM_Base", "schedule": "rjs", "round": 0, "test_acc": v.get("rm.acc", 0.7)}]
    for sched, rnd in [("base", 0)] + [(s, r) for s in SCHEDULES for r in range(1, rounds + 1)]:
        rec = {"kind": "policy_eval", "policy": f"policy_{sched}_r{rnd}", "schedule": sched, "round": rnd,
               "num_answers": 200}
        for field in ("true_reward", "content_reward", "marker_rate", "avg_score"):
            if f"{sched}.{rnd}.{field}" in v:
                rec[field] = v[f"{sched}.{rnd}.{field}"]
        recs.append(rec)
    for sched in ("rjs", "apo"):
        rec = {"kind": "best_of_s", "schedule": sched, "round": 1, "rm": "rm_base"}
        rec.update({k.split(".", 2)[2]: x for k, x in v.items() if k.startswith(f"bos.{sched}.")})
        recs.append(rec)
    for model, sched, rnd in (("RM_Base", "rjs", 0), ("RM_APO-v1", "apo", 1)):
        if f"probe.{model}.marker_bias" in v:
            recs.append({"kind": "rm_probe", "model": model, "schedule": sched, "round": rnd,
                         "marker_bias": v[f"probe.{model}.marker_bias"]})
    return recs


def _passing(seed: int) -> dict[str, float]:
    """Numbers for which every check passes, with a little per-seed noise."""
    e = np.random.default_rng(seed).normal(0, 0.005, 64)
    v = {"base.0.true_reward": 0.50 + e[0], "base.0.marker_rate": 0.2 + e[1], "base.0.avg_score": 0.5 + e[2],
         "base.0.content_reward": 0.53 + e[3]}
    for r in (1, 2):
        v.update({f"rjs.{r}.true_reward": 0.45 - 0.05 * r + e[4 + r], f"rjs.{r}.marker_rate": 0.3 + 0.25 * r + e[6 + r],
                  f"rjs.{r}.avg_score": 0.6 + 0.1 * r + e[8 + r], f"rjs.{r}.content_reward": 0.55 + e[10 + r],
                  f"apo.{r}.true_reward": 0.52 + e[12 + r], f"apo.{r}.marker_rate": 0.1 + e[14 + r],
                  f"apo.{r}.content_reward": 0.56 + e[16 + r], f"apo.{r}.avg_score": 0.55 + e[18 + r],
                  f"ablation.{r}.true_reward": 0.40 + e[20 + r], f"oracle.{r}.true_reward": 0.55 + 0.05 * r + e[22 + r],
                  f"rjs-dpo.{r}.true_reward": 0.48 + e[40 + r], f"apo-dpo.{r}.true_reward": 0.53 + e[42 + r]})
    v.update({"bos.rjs.headroom": 0.15 + e[30], "bos.rjs.onpolicy_pair_acc_marker_free": 0.65 + e[31],
              "bos.rjs.onpolicy_pair_acc": 0.55 + e[32], "bos.apo.onpolicy_pair_acc": 0.62 + e[33],
              "probe.RM_Base.marker_bias": 0.3 + e[34], "probe.RM_APO-v1.marker_bias": 0.05 + e[35]})
    return v


def _write_seed(out: str, seed: int, v: dict[str, float], **kw) -> None:
    run_dir = study.seed_dir(out, seed)
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump({"records": _records(v, **kw)}, f)


def test_table_entries_are_mean_and_standard_error_over_seeds(tmp_path):
    rng = np.random.default_rng(0)
    values = {s: {k: x + rng.normal(0, 0.05) for k, x in _passing(s).items()} for s in range(5)}
    for s, v in values.items():
        _write_seed(str(tmp_path), s, v)
    got = study.summarise(str(tmp_path), list(range(6)), "cfg.py")  # seed 5 never ran
    assert got["seeds_used"] == [0, 1, 2, 3, 4] and got["seeds_missing"] == [5]
    rows = {tuple(r["key"]): r for r in got["table"]}
    for key, field, name in ((("policy_eval", "apo", 2), "true_reward", "apo.2.true_reward"),
                             (("policy_eval", "rjs", 1), "marker_rate", "rjs.1.marker_rate"),
                             (("best_of_s", "rjs", 1), "headroom", "bos.rjs.headroom"),
                             (("rm_probe", "RM_Base", "rjs", 0), "marker_bias", "probe.RM_Base.marker_bias")):
        x = np.array([values[s][name] for s in range(5)])
        stat = rows[key]["fields"][field]
        assert stat["mean"] == pytest.approx(x.mean()) and stat["n"] == 5
        assert stat["se"] == pytest.approx(np.std(x, ddof=1) / np.sqrt(5))
    # Paired differences: the SE is of the per-seed differences, not of the two means.
    diffs = {(d["round"], d["contrast"]): d["fields"] for d in got["differences"]}
    for rnd in (1, 2):
        for a, b in (("apo", "rjs"), ("apo", "ablation"), ("apo", "oracle"),
                     ("apo-dpo", "rjs-dpo"), ("rjs-dpo", "rjs"), ("apo-dpo", "apo")):
            d = np.array([values[s][f"{a}.{rnd}.true_reward"] - values[s][f"{b}.{rnd}.true_reward"] for s in range(5)])
            stat = diffs[(rnd, f"{a} - {b}")]["true_reward"]
            assert stat["mean"] == pytest.approx(d.mean()) and stat["se"] == pytest.approx(d.std(ddof=1) / np.sqrt(5))
        d = np.array([values[s][f"rjs.{rnd}.marker_rate"] - values[s]["base.0.marker_rate"] for s in range(5)])
        assert diffs[(rnd, "rjs - policy_0")]["marker_rate"]["mean"] == pytest.approx(d.mean())
    assert "oracle - policy_0" in {c for _, c in diffs}
    # The outputs exist and the Markdown carries the checks and the tables.
    md = (tmp_path / "study.md").read_text()
    assert "**P1** PASS" in md and "## Paired differences" in md and "## Policies" in md
    assert json.loads((tmp_path / "study.json").read_text())["seeds_used"] == [0, 1, 2, 3, 4]
    assert (tmp_path / "study_true_reward.png").stat().st_size > 1000


def _checks(values: list[dict[str, float]]) -> dict[str, dict]:
    per_seed = {s: study.normalise(_records(v)) for s, v in enumerate(values)}
    return {c["check"]: c for c in study.checks(per_seed)}


def test_every_check_passes_on_numbers_built_to_pass():
    got = _checks([_passing(s) for s in range(5)])
    assert {k: c["status"] for k, c in got.items()} == {
        "P1": "PASS", "P2": "PASS", "P3": "PASS", "P4": "PASS", "H1": "PASS", "H2": "PASS", "H2c": "INFO",
        "H3": "PASS", "H4": "PASS"}


@pytest.mark.parametrize("check,change", [
    ("P1", {"bos.rjs.headroom": 0.09}),
    ("P2", {"bos.rjs.onpolicy_pair_acc_marker_free": 0.59}),
    ("P3", {"probe.RM_Base.marker_bias": -0.01, "probe.RM_APO-v1.marker_bias": -0.2}),
    ("P4", {"oracle.2.true_reward": 0.54}),  # +0.04 over policy_0's 0.50
    ("H1", {"rjs.2.marker_rate": 0.19}),  # the marker rate did not rise
    ("H2", {"apo.2.true_reward": 0.365, "ablation.2.true_reward": 0.3}),  # APO - RJS = +0.015 < 0.02
    ("H3", {"probe.RM_APO-v1.marker_bias": 0.3}),  # no smaller b
    ("H4", {"ablation.2.true_reward": 0.52}),
])
def test_each_check_fails_when_its_number_misses(check, change):
    values = []
    for s in range(5):
        v = _passing(s)
        v.update({k: x + 0.001 * s for k, x in change.items()})  # a little spread so the SE is finite
        values.append(v)
    got = _checks(values)
    assert got[check]["status"] == "FAIL", got[check]
    assert all(c["status"] in ("PASS", "INFO") for k, c in got.items() if k != check), got


def test_a_difference_within_two_standard_errors_fails():
    # APO - ablation = +0.02 on average but varying by +-0.05 between seeds: SE 0.022 > 0.02 / 2.
    values = []
    for s, noise in enumerate((-0.05, 0.05, -0.05, 0.05, 0.0)):
        v = _passing(s)
        v["ablation.2.true_reward"] = v["apo.2.true_reward"] - 0.02 + noise
        values.append(v)
    assert _checks(values)["H4"]["status"] == "FAIL"


def test_missing_records_give_not_applicable_lines():
    values = []
    for s in range(3):
        v = {k: x for k, x in _passing(s).items() if not k.startswith(("probe.", "oracle.")) and "marker" not in k}
        values.append(v)
    got = _checks(values)
    for name in ("P3", "P4", "H1", "H3"):
        assert got[name]["status"] == "N/A" and "N/A (missing" in got[name]["detail"], got[name]
    assert got["P1"]["status"] == "PASS" and got["H2"]["status"] == "PASS"
    assert {c["status"] for c in study.checks({})} == {"N/A"}


_STUB = r"""
import json, os, sys
run_dir, seed = sys.argv[1], int(sys.argv[2])
with open(os.path.join(os.path.dirname(run_dir), "calls.txt"), "a") as f:
    f.write(f"{seed}\n")
fail_flag = os.path.join(os.path.dirname(run_dir), f"fail_{seed}")
os.makedirs(run_dir, exist_ok=True)
if os.path.exists(fail_flag):  # a killed run: no summary.json yet
    os.remove(fail_flag)
    sys.exit(3)
recs = [{"kind": "policy_eval", "schedule": "base", "round": 0, "true_reward": 0.5 + seed / 100},
        {"kind": "policy_eval", "schedule": "apo", "round": 1, "true_reward": 0.6 + seed / 50},
        {"kind": "policy_eval", "schedule": "rjs", "round": 1, "true_reward": 0.4}]
with open(os.path.join(run_dir, "summary.json"), "w") as f:
    json.dump({"records": recs}, f)
"""


def test_rerunning_a_partly_finished_study_resumes_only_the_unfinished_seeds(tmp_path):
    stub = tmp_path / "stub.py"
    stub.write_text(_STUB)
    out = tmp_path / "study"
    out.mkdir()
    (out / "fail_1").write_text("")  # seed 1 dies the first time

    def command(seed: int, run_dir: str) -> list[str]:
        return [sys.executable, str(stub), run_dir, str(seed)]

    lines: list[str] = []
    first, status = study.run_study("cfg.py", [0, 1, 2], str(out), command=command, echo=lines.append)
    assert status == {0: "done", 1: "failed (exit 3)", 2: "done"}
    assert first["seeds_used"] == [0, 2] and first["seeds_missing"] == [1]
    second, status = study.run_study("cfg.py", [0, 1, 2], str(out), command=command, echo=lines.append)
    assert status == {0: "skipped", 1: "done", 2: "skipped"}
    assert (out / "calls.txt").read_text().split() == ["0", "1", "2", "1"]  # only seed 1 ran again
    assert second["seeds_used"] == [0, 1, 2]
    diff = {(d["round"], d["contrast"]): d["fields"]["true_reward"] for d in second["differences"]}
    apo_rjs = np.array([0.2 + s / 50 for s in range(3)])
    assert diff[(1, "apo - rjs")]["mean"] == pytest.approx(apo_rjs.mean())
    assert diff[(1, "apo - rjs")]["se"] == pytest.approx(apo_rjs.std(ddof=1) / math.sqrt(3))
    assert (out / "seed_1.log").exists()


def test_default_command_is_a_normal_run_of_the_config():
    cmd = study.main_command("configs/synthetic.py", ["--config.apo.rounds=1"], python="py")(3, "/o/seed_3")
    assert cmd == ["py", "-m", "apo_jax.main", "--config=configs/synthetic.py", "--config.seed=3",
                   "--config.run_dir=/o/seed_3", "--config.apo.rounds=1"]


def test_command_line_errors_name_the_argument(tmp_path, capsys):
    with pytest.raises(SystemExit):
        study.main(["--config", str(tmp_path / "nope.py"), "--seeds", "2", "--out", str(tmp_path)])
    assert "--config" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        study.main(["--config", __file__, "--seeds", "0", "--out", str(tmp_path)])
    assert "--seeds" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        study.main(["--config", __file__, "--seeds", "1", "--out", str(tmp_path), "--bogus=1"])
    assert "--bogus=1" in capsys.readouterr().err


def test_one_seed_gives_no_standard_error_so_the_se_checks_are_not_applicable():
    got = _checks([_passing(0)])
    for name in ("H1", "H2", "H3", "H4"):
        assert got[name]["status"] == "N/A" and "2 seeds" in got[name]["detail"], got[name]
    assert got["P1"]["status"] == got["P4"]["status"] == "PASS"  # thresholds without an SE still apply


def test_headroom_is_derived_from_older_best_of_s_records():
    rec = {"kind": "best_of_s", "name": "rjs_r1", "rm": "rm_base", "true_reward_picked": 0.5,
           "true_reward_mean_sample": 0.55, "true_reward_oracle_pick": 0.8}
    (got,) = study.normalise([rec])
    assert (got["schedule"], got["round"]) == ("rjs", 1) and got["headroom"] == pytest.approx(0.25)


def test_probe_recorded_on_rm_eval_records_counts_as_an_rm_probe():
    values = []
    for seed in range(3):
        v = _passing(seed)
        recs = [r for r in _records(v) if r["kind"] != "rm_probe"]
        recs = [dict(r, marker_bias=v["probe.RM_Base.marker_bias"]) if r["kind"] == "rm_eval" else r for r in recs]
        recs.append({"kind": "rm_eval", "model": "RM_APO-v1", "schedule": "apo", "round": 1,
                     "marker_bias": v["probe.RM_APO-v1.marker_bias"]})
        values.append(study.normalise(recs))
    got = {c["check"]: c["status"] for c in study.checks(dict(enumerate(values)))}
    assert got["P3"] == "PASS" and got["H3"] == "PASS"


# ------------------------------------------------------------------------------------ pre-registered analysis


def _labeller_records(seed: int, rng: np.random.RandomState, variant: str) -> list[dict]:
    """Round-3 policy records of the five arms, two RM records and an overopt record."""
    true = {"rjs": 0.50, "apo": 0.56, "ablation": 0.52, "oracle": 0.70, "random": 0.53}
    if variant == "lambda0":
        true["apo"] = true["rjs"]
    if variant == "gold_labeller":
        true["apo"] = 0.535
    recs = [{"kind": "policy_eval", "schedule": "base", "round": 0, "true_reward": 0.4, "avg_score": 0.3}]
    for arm, r in true.items():
        r = r + rng.normal(0, 0.002)
        recs.append({"kind": "policy_eval", "schedule": arm, "round": 3, "true_reward": r,
                     "excess_length": 0.3 if arm == "rjs" else 0.1, "avg_score": 2 * r + (1.0 if arm == "random" else 0)})
    recs += [{"kind": "rm_eval", "model": m, "test_acc": 0.6 + rng.normal(0, 0.01), "test_true_acc": 0.7,
              "test_ece": 0.05} for m in ("RM_Base", "RM_APO-v1")]
    recs.append({"kind": "overopt", "policy": "policy_0", "gold": "true reward r*", "n": [1, 2, 4],
                 "kl_bon": [0.0, 0.19, 0.64], "curves": {"RM_Base": [0.4, 0.45 + 0.01 * seed, 0.5], "random": [0.4] * 3}})
    return recs


def test_pre_registered_analysis_matches_scipy_on_the_paired_seed_values(tmp_path):
    from scipy import stats as sps

    rng = np.random.RandomState(0)
    seeds = list(range(6))
    for variant in ("main", "lambda0", "gold_labeller"):
        for seed in seeds:
            run_dir = study.seed_dir(str(tmp_path / variant), seed)
            os.makedirs(run_dir)
            with open(os.path.join(run_dir, "summary.json"), "w") as f:
                json.dump({"records": _labeller_records(seed, rng, variant)}, f)
    res = study.analyze(str(tmp_path), "labeller", seeds)
    by = {h["name"]: h for h in res["hypotheses"]}
    per = study.load_variants(str(tmp_path), seeds)

    def arm(variant, schedule, field="true_reward"):
        return np.asarray([next(r[field] for r in per[variant][s] if r.get("schedule") == schedule and r["round"] == 3)
                           for s in seeds])

    d = arm("main", "apo") - arm("main", "rjs")
    assert by["H2"]["mean"] == pytest.approx(d.mean())
    assert by["H2"]["p"] == pytest.approx(sps.ttest_1samp(d, 0, alternative="greater").pvalue)
    h3 = (arm("gold_labeller", "apo") - arm("gold_labeller", "rjs")) - 0.5 * d
    assert by["H3"]["mean"] == pytest.approx(h3.mean())
    assert by["H1"]["verdict"] == "SUPPORTED" and by["H4"]["verdict"] == "SUPPORTED"
    assert by["H2e"]["test"] == "equivalent" and by["H2e"]["verdict"] == "SUPPORTED"
    primary = [h for h in res["hypotheses"] if h["family"] == "primary"]
    assert [h["name"] for h in primary] == ["H1", "H2", "H2e", "H3", "H4"]
    # Holm: the smallest p is multiplied by the family's size.
    smallest = min(primary, key=lambda h: h["p"])
    assert smallest["p_holm"] == pytest.approx(min(1.0, 5 * smallest["p"]))
    # Table 3's judge: RM_Test puts `random` first though r* puts the oracle first, in every seed; tau by hand:
    # scores rank random > oracle > apo > ablation > rjs, r* oracle > apo > random > ablation > rjs: 2 of 10
    # pairs discordant -> tau = (8 - 2) / 10.
    agree = res["variants"]["main"]["evaluator_agreement"]
    assert agree["same_top_arm"]["mean"] == 0.0 and agree["kendall_tau"]["mean"] == pytest.approx(0.6)
    oo = res["variants"]["main"]["overopt"]["curves"]["RM_Base"]
    assert oo[1]["mean"] == pytest.approx(0.45 + 0.01 * np.mean(seeds)) and oo[1]["n"] == 6
    text = open(tmp_path / "confirmatory.md").read()
    assert "| **H1**" in text and (tmp_path / "figure_overopt_policy_0_main.png").exists()


def test_the_registration_document_names_every_hypothesis_of_its_plan():
    from apo_jax.evaluation import plans

    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "studies", "labeller_prereg.md")).read()
    for h in plans.PLANS["labeller"]:
        assert f"**{h.name}**" in doc, h.name
