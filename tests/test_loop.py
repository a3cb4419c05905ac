"""The APO game end to end on a tiny synthetic world: two rounds of all four schedules on a
2x2x2 mesh of 8 fake CPU devices, its outputs, and kill-and-resume in each kind of phase."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

import faults
from apo_jax.game import loop
from apo_jax.io import checkpointing
from apo_jax.training import fit
from fake_gcs import fake_gcs_fixture  # noqa: F401  (the fixture "fake_gcs")
from loop_fixtures import REPO, TINY, tiny_config

MESH = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}

pytestmark = pytest.mark.e2e


def _records(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "summary.json")) as f:
        return json.load(f)["records"]


def _assert_same_records(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:
            if isinstance(ra[k], float):
                assert ra[k] == pytest.approx(rb[k], abs=1e-5, nan_ok=True), (k, ra, rb)
            else:
                assert ra[k] == rb[k], (k, ra, rb)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted two-round game on the 2x2x2 mesh (in this process: 8 fake devices)."""
    run_dir = str(tmp_path_factory.mktemp("ref") / "run")
    cfg = tiny_config(run_dir=run_dir, **{k.replace(".", "__"): v for k, v in MESH.items()})
    loop.run(cfg)
    return run_dir


def test_two_rounds_on_a_sharded_mesh_write_every_output(reference_run):
    run = reference_run
    for rel in ("tables.md", "figure2_rm_accuracy_vs_ece.png", "figure2_policy_scores.png", "metrics.jsonl",
                "summary.json", "config.json", "data/rm_pairs.jsonl"):
        assert os.path.getsize(os.path.join(run, rel)) > 0, rel
    assert not os.listdir(os.path.join(run, "ckpt"))  # step checkpoints go once each model is saved
    records = _records(run)
    policies = {(r["schedule"], r["round"]) for r in records if r["kind"] == "policy_eval"}
    assert policies == {("base", 0)} | {(s, r) for s in ("rjs", "apo", "apo_seq", "ablation") for r in (1, 2)}
    rms = {r["name"] for r in records if r["kind"] == "rm_eval"}
    assert rms == {"rm_base", "rm_test", "rm_apo_r1", "rm_ablation_r1", "rm_apo_r2", "rm_apo_seq_r2",
                   "rm_ablation_r2"}
    for r in records:
        if r["kind"] == "policy_eval":
            # The synthetic world's exact quality is reported (r* is below 0 for a marked bad answer).
            assert -1.0 <= r["true_reward"] <= 1.0 and 0.0 <= r["marker_rate"] <= 1.0
        elif r["kind"] == "rm_eval":
            assert 0.0 <= r["test_acc"] <= 1.0 and 0.0 <= r["dev_ece"] <= 1.0 and "marker_bias" in r
    kinds = {r["kind"] for r in records}
    assert kinds == {"rm_eval", "policy_eval", "rm_probe", "best_of_s"}
    sel = {r["name"]: r for r in records if r["kind"] == "best_of_s"}
    assert set(sel) == {"rjs_r1", "apo_r1", "ablation_r1", "rjs_r2", "apo_r2", "apo_seq_r2", "ablation_r2"}
    assert all(0.0 <= r["onpolicy_pair_acc"] <= 1.0 or r["onpolicy_pair_acc_pairs"] == 0 for r in sel.values())
    tables = open(os.path.join(run, "tables.md")).read()
    assert "Table 2" in tables and "Table 3" in tables and "RM_APO-v2-seq" in tables
    # Every round's samples: S answers per gold query from the policy that played the round.
    s = 4
    gold = [json.loads(x) for x in open(os.path.join(run, "data", "gold.jsonl"))]
    samples = [json.loads(x) for x in open(os.path.join(run, "samples", "policy_apo_r1_gold.jsonl"))]
    assert len(samples) == s * len(gold)
    best = [json.loads(x) for x in open(os.path.join(run, "best", "apo_r2.jsonl"))]
    llm = [json.loads(x) for x in open(os.path.join(run, "data", "llm_prompts.jsonl"))]
    assert len(best) == len(llm)
    # Best-of-S is the argmax of the recorded scores over the non-empty samples, per prompt.
    by_prompt = _scores(os.path.join(run, "scores", "rm_apo_r2__policy_apo_r1_llm.jsonl"),
                        os.path.join(run, "samples", "policy_apo_r1_llm.jsonl"), nonempty=True)
    for b in best:
        assert b["response"].strip() and b["score"] == pytest.approx(max(by_prompt[b["prompt_id"]]))


def test_exports_load_in_transformers_with_the_same_rewards(reference_run):
    from apo_jax import models
    from apo_jax.io import hf

    export = os.path.join(reference_run, "export")
    rm_dir, policy_dir = os.path.join(export, "rm_apo_seq_r2"), os.path.join(export, "policy_apo_seq_r2")
    rm, info = transformers.LlamaForSequenceClassification.from_pretrained(rm_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    lm, info = transformers.LlamaForCausalLM.from_pretrained(policy_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    tok = transformers.AutoTokenizer.from_pretrained(rm_dir)
    enc = tok(["\n\nHuman: Sort the letters of cab.\n\nAssistant: abc.", "\n\nHuman: x\n\nAssistant: y"],
              padding=True, return_tensors="np")
    config, params = hf.load_pretrained(rm_dir)
    ours = np.asarray(models.rewards(config, params, enc["input_ids"], enc["attention_mask"]))
    with torch.no_grad():
        ref = rm(input_ids=torch.tensor(enc["input_ids"]), attention_mask=torch.tensor(enc["attention_mask"])).logits
    np.testing.assert_allclose(ours, ref[:, 0].numpy(), atol=1e-4)


def _scores(scores_path, samples_path, nonempty: bool = False) -> dict[str, list[float]]:
    """prompt_id -> the RM scores of its samples (`nonempty`: of those with a non-empty answer,
    the ones best-of-S may pick)."""
    text = {(r["prompt_id"], r["sample"]): r["response"] for r in map(json.loads, open(samples_path))}
    out: dict[str, list[float]] = {}
    for row in map(json.loads, open(scores_path)):
        if not nonempty or text[(row["prompt_id"], row["sample"])].strip():
            out.setdefault(row["prompt_id"], []).append(row["score"])
    return out


def _main(run_dir: str, fault: str | None) -> subprocess.CompletedProcess:
    # The session's persistent compilation cache (conftest) is shared by the restarts.
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([REPO, os.path.join(REPO, "tests"), env.get("PYTHONPATH", "")])
    args = ["--config=configs/synthetic.py", f"--config.run_dir={run_dir}", *TINY,
            *[f"--config.{k}={v}" for k, v in MESH.items()]]
    return subprocess.run(faults.main_command(sys.executable, args, fault), cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


def test_killed_in_each_phase_kind_and_restarted_ends_with_identical_metrics(reference_run, tmp_path):
    run_dir = str(tmp_path / "run")
    # A crash inside RM training, inside a sampling phase, and inside an SFT phase; each restart
    # is the same command and goes on from the last checkpoint.
    for fault in ("rm_base:3", "samples:policy_0:llm:1", "policy_apo_r1:3"):
        proc = _main(run_dir, fault)
        assert proc.returncode == 42, (fault, proc.stderr[-3000:])
        assert "fault hook: killing the process" in proc.stderr
    proc = _main(run_dir, None)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed at step 2" in proc.stderr or "resumed at step 2" in proc.stdout
    _assert_same_records(_records(run_dir), _records(reference_run))
    samples = os.path.join(run_dir, "samples", "policy_0_llm.jsonl")
    ref_samples = os.path.join(reference_run, "samples", "policy_0_llm.jsonl")
    assert open(samples).read() == open(ref_samples).read()  # no duplicated or lost batch
    # The training curves of the resumed phases are logged once per step, as in the reference.
    assert _train_steps(run_dir) == _train_steps(reference_run)
    assert not os.listdir(os.path.join(run_dir, "ckpt"))  # finished phases leave no step checkpoints


def _train_steps(run_dir: str) -> list[tuple[str, int]]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    return sorted((r["phase"], r["step"]) for r in recs if "step" in r)


def test_gcs_run_dir_preempted_and_resumed_ends_with_the_reference_results(reference_run, fake_gcs, monkeypatch,
                                                                           tmp_path):
    """run_dir=gs://...: Orbax checkpoints go through TensorStore's GCS driver, every other file
    through epath; a preemption inside RM training saves to the bucket, one inside a sampling
    phase stops at a batch boundary, and the restarted run resumes from there (a replacement VM
    has only the bucket) and ends with the reference's numbers."""
    monkeypatch.setenv("APO_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    url = fake_gcs.url("bucket", "runs/apo")
    bucket_run = fake_gcs.root / "bucket" / "runs" / "apo"
    cfg = tiny_config(run_dir=url, **{k.replace(".", "__"): v for k, v in MESH.items()})

    def preempt_at(where: tuple[str, int]):
        def hook(phase: str, step: int) -> None:
            if (phase, step) == where:
                checkpointing._SIGNALLED.set()  # what the SIGTERM handler does
        return hook

    def run_until_preempted(where: tuple[str, int], message: str) -> None:
        remove = fit.add_progress_hook(preempt_at(where))
        try:
            with pytest.raises(checkpointing.Preempted, match=message):
                loop.run(cfg)
        finally:
            remove()
            checkpointing._SIGNALLED.clear()
            checkpointing._PREEMPTED.clear()

    run_until_preempted(("rm_base", 2), "rm_base step 3")
    assert sorted(p.name for p in (bucket_run / "ckpt" / "rm_base").iterdir() if p.name.isdigit()) == ["2", "3"]
    assert any(r.kind == "upload" and "rm_base" in r.query.get("name", "") for r in fake_gcs.requests), \
        "Orbax's arrays did not go through the GCS driver"
    # Preempted again inside a sampling phase: it stops at that batch boundary with the finished
    # batches in the bucket (the resumed file is compared with the reference's below).
    run_until_preempted(("samples:policy_0:llm", 1), "samples:policy_0:llm after batch 1 of")
    assert len((bucket_run / "samples" / "policy_0_llm.jsonl").read_text().splitlines()) > 0
    # A crash inside a sampling phase (raised here by its progress hook after the first batch, within
    # the Appender's 60 s between uploads) leaves that batch in the bucket too: the file is closed,
    # so uploaded, on the way out.
    def crash(phase: str, step: int) -> None:
        if (phase, step) == ("samples:policy_0:gold", 1):
            raise RuntimeError("simulated crash")

    remove = fit.add_progress_hook(crash)
    try:
        with pytest.raises(RuntimeError, match="simulated crash"):
            loop.run(cfg)
    finally:
        remove()
    assert len((bucket_run / "samples" / "policy_0_gold.jsonl").read_text().splitlines()) > 0

    text = loop.run(cfg)
    assert f"Outputs in {url}:" in text
    summary = json.loads((bucket_run / "summary.json").read_text())
    _assert_same_records(summary["records"], _records(reference_run))
    assert _train_steps(str(bucket_run)) == _train_steps(reference_run)
    for rel in ("tables.md", "figure2_policy_scores.png", "config.json", "data/splits.json",
                "samples/policy_0_llm.jsonl", "export/rm_apo_seq_r2/config.json"):
        assert (bucket_run / rel).stat().st_size > 0, rel
    assert (bucket_run / "samples" / "policy_0_llm.jsonl").read_bytes() == open(
        os.path.join(reference_run, "samples", "policy_0_llm.jsonl"), "rb").read()
    assert not [p for p in (bucket_run / "ckpt").iterdir()]  # removed once the models were saved
    assert not os.path.exists(tmp_path / "gs:")  # nothing written to a local "gs:" directory
    # The export reads back through the gs:// checkpoint path (downloaded once into the cache).
    from apo_jax.io import hf

    local = hf.resolve_checkpoint_dir(f"{url}/export/rm_apo_seq_r2")
    assert local.startswith(str(tmp_path / "cache"))
    rm = transformers.LlamaForSequenceClassification.from_pretrained(local)
    ref = transformers.LlamaForSequenceClassification.from_pretrained(
        os.path.join(reference_run, "export", "rm_apo_seq_r2"))
    for (k, a), (_, b) in zip(rm.state_dict().items(), ref.state_dict().items()):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0, msg=k)


def test_random_pick_is_uniform_and_a_function_of_seed_and_policy():
    """The random arm's selection scores: argmax uniform over the S samples, the same draws for the
    same seed and policy (a resumed run picks the same answers), others for another policy."""
    import types

    from apo_jax.game import phases

    ctx = types.SimpleNamespace(settings=types.SimpleNamespace(seed=3), data=types.SimpleNamespace(true_reward=None))
    p_count, s = 4000, 4
    rows = [{"prompt_id": p, "sample": k, "prompt": "x", "response": "y"} for p in range(p_count) for k in range(s)]
    scores, true = phases._judge(ctx, "random", None, rows, "policy_0")
    assert scores.shape == (p_count, s) and true is None
    counts = np.bincount(np.argmax(scores, axis=1), minlength=s)
    sd = np.sqrt(p_count * (1 / s) * (1 - 1 / s))
    assert np.all(np.abs(counts - p_count / s) < 4.5 * sd), counts
    np.testing.assert_array_equal(scores, phases._judge(ctx, "random", None, rows, "policy_0")[0])
    assert not np.array_equal(scores, phases._judge(ctx, "random", None, rows, "policy_rjs_r1")[0])


def test_a_new_schedule_is_one_table_row(tmp_path):
    """A toy arm defined here alone (APO from the previous round's RM, with its own optimizer
    section) is trained, labelled and reported by a 1-round game; no apo_jax file changes."""
    from apo_jax.game import schedules

    row = schedules.Schedule("toy_seq", "Toy (RM_Toy-vR)", schedules.RMUpdate(
        init="previous", apo_pairs=True, optimizer="rm.toy", name="rm_toy_r{round}", label="RM_Toy-v{round}"))
    schedules.register(row)
    try:
        cfg = tiny_config(run_dir=str(tmp_path / "run"), apo__rounds=1,
                          apo__schedules=("rjs", "toy_seq", "apo-dpo", "oracle", "random"), eval__overopt_samples=4)
        cfg.dpo.lrs = (1e-3,)
        cfg.rm.toy = cfg.rm.apo.copy_and_resolve_references()
        cfg.rm.toy.lr = 3e-3
        from apo_jax import config as config_lib

        config_lib.validate(cfg, 8)
        loop.run(cfg)
    finally:
        schedules.unregister("toy_seq")
    records = _records(str(tmp_path / "run"))
    rm = [r for r in records if r["kind"] == "rm_eval" and r["schedule"] == "toy_seq"]
    assert [(r["name"], r["model"], r["round"]) for r in rm] == [("rm_toy_r1", "RM_Toy-v1", 1)]
    pol = {(r["schedule"], r["round"]): r["policy"] for r in records if r["kind"] == "policy_eval"}
    assert pol == {("base", 0): "policy_0", ("rjs", 1): "policy_rjs_r1", ("toy_seq", 1): "policy_toy_seq_r1",
                   ("apo-dpo", 1): "policy_apo-dpo_r1", ("oracle", 1): "policy_oracle_r1",
                   ("random", 1): "policy_random_r1"}
    # The DPO arm shares round 1's APO RM recipe (init RM_Base, D_P + D_APO of policy_0), so it is
    # trained under the first name it was given; its policy learns best over worst pairs.
    assert {r["name"] for r in records if r["kind"] == "rm_eval"} == {"rm_base", "rm_test", "rm_toy_r1",
                                                                        "rm_apo-dpo_r1"}
    run = tmp_path / "run"
    pairs = [json.loads(x) for x in open(run / "pairs" / "apo-dpo_r1.jsonl")]
    paths = run / "scores" / "rm_apo-dpo_r1__policy_0_llm.jsonl", run / "samples" / "policy_0_llm.jsonl"
    scores, nonempty = _scores(*paths), _scores(*paths, nonempty=True)
    assert pairs and all(p["chosen"] != p["rejected"] for p in pairs)
    for p in pairs:  # the best non-empty and the worst of the RM's scores of that prompt's samples
        assert p["chosen"].strip() and p["score_chosen"] == pytest.approx(max(nonempty[p["prompt_id"]]))
        assert p["score_rejected"] == pytest.approx(min(scores[p["prompt_id"]]))
    dpo_steps = [json.loads(x) for x in open(run / "metrics.jsonl") if '"phase": "policy_apo-dpo_r1"' in x]
    assert dpo_steps and {"reward_accuracy", "reward_margin", "kl_proxy"} <= set(dpo_steps[-1])
    # The oracle arm picks argmax r* among each prompt's samples.
    from apo_jax.data import synthetic

    world = synthetic.World.from_config(synthetic.resolve_config(cfg.data.synthetic))
    samples = [json.loads(x) for x in open(run / "samples" / "policy_0_llm.jsonl")]
    best_true = {}
    for row in samples:
        best_true[row["prompt_id"]] = max(best_true.get(row["prompt_id"], -1.0),
                                          world.true_reward(row["prompt"], row["response"]))
    picks = [json.loads(x) for x in open(run / "best" / "oracle_r1.jsonl")]
    assert len(picks) == len(best_true)
    for p in picks:
        assert world.true_reward(p["prompt"], p["response"]) == pytest.approx(best_true[p["prompt_id"]])
    # The random arm picks one of each prompt's non-empty samples, trains no RM, and its policy is
    # fine-tuned on those picks.
    by_prompt = {}
    for row in samples:
        by_prompt.setdefault(row["prompt_id"], []).append(row["response"])
    picks = [json.loads(x) for x in open(run / "best" / "random_r1.jsonl")]
    assert len(picks) == len(by_prompt)
    assert all(p["response"] in by_prompt[p["prompt_id"]] for p in picks)
    assert all(p["response"].strip() or not any(r.strip() for r in by_prompt[p["prompt_id"]]) for p in picks)
    # Over-optimization curves over policy_0's test samples: every RM, r* (oracle) and a random pick,
    # each the best-of-n estimate of that RM's own score file against r* of the same samples.
    from apo_jax.evaluation import overopt

    (oo,) = [r for r in records if r["kind"] == "overopt"]
    assert oo["policy"] == "policy_0" and oo["n"] == [1, 2, 4] and oo["gold"] == "true reward r*"
    labels = {r["model"] for r in records if r["kind"] == "rm_eval"}
    assert "RM_Toy-v1" in labels and set(oo["curves"]) == labels | {"oracle", "random"}
    oo_rows = [json.loads(x) for x in open(run / "samples" / "policy_0_overopt.jsonl")]
    gold = np.asarray([world.true_reward(r["prompt"], r["response"]) for r in oo_rows]).reshape(-1, 4)
    rm_scores = np.asarray([json.loads(x)["score"] for x in open(run / "scores" / "rm_toy_r1__policy_0_overopt.jsonl")])
    np.testing.assert_allclose(oo["curves"]["RM_Toy-v1"], overopt.best_of_n(rm_scores.reshape(-1, 4), gold, (1, 2, 4)))
    assert oo["curves"]["random"] == [pytest.approx(gold.mean())] * 3
    assert oo["curves"]["oracle"][-1] == pytest.approx(gold.max(axis=1).mean())
    assert (run / "figure_overopt_policy_0.png").exists()
    tables = open(tmp_path / "run" / "tables.md").read()
    assert "Toy (RM_Toy-vR)" in tables and "RM_Toy-v1" in tables
    # Its RM was trained with its own optimizer section (the logged lr peaks at rm.toy.lr).
    lrs = [json.loads(x)["lr"] for x in open(tmp_path / "run" / "metrics.jsonl") if '"phase": "rm_toy_r1"' in x]
    assert lrs and max(lrs) == pytest.approx(3e-3, rel=1e-5)
