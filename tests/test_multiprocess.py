"""The APO game in several JAX processes: jax.distributed on 127.0.0.1, CPU, 2 fake devices each.

Each run is `python -m apo_jax.main --config=configs/synthetic.py` + `loop_fixtures.TINY` + the
apo_seq schedule alone (two rounds holding every kind of phase; `multiproc.TINY_GAME`) +
`--config.mesh.fsdp=-1`, all processes sharing one run_dir, as on a pod or a cluster with shared
storage. The 2-process run keeps its run dir on gs:// (a fake GCS), as a TPU pod does, and is
killed inside RM training and restarted. The reference is the same command in one process with 4
fake devices, (data, fsdp, tensor) = (1, 4, 1), shared with test_launch; the 2-process mesh is
(1, 8, 1): only the fsdp split, hence the order of float reductions, differs.
(Other multi-process paths: the run-dir lock in test_rundir, sampling with stop strings in
test_sampler, both in 2 processes.)

Tolerance: every float of every summary.json record (each RM's dev/test accuracy and ECE, each
policy's average RM_Test score and true reward) within 1e-5 of the reference; names, rounds and
counts equal; the sampled test answers identical. Collectives across processes (gloo) reduce in
another order than inside one process, so floats move in their last bits (at most 2e-7 seen); a
real difference is far larger (one pair of 16 flipped moves an accuracy by 0.0625).

Every process compiles its own programs, which is most of the runtime (hence
`multiproc.FAST_COMPILE`, LLVM at -O0, in every run here).
"""

from __future__ import annotations

import glob
import json
import os

import pytest

import faults
import multiproc
from fake_gcs import fake_gcs_fixture  # noqa: F401  (the fixture "fake_gcs")

pytestmark = pytest.mark.e2e

TOL = 1e-5
FAULT = "rm_base:3"  # inside RM training, after its step-2 checkpoint; policy_0 is in the model store


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> str:
    return multiproc.reference_run(tmp_path_factory.getbasetemp())


def _records(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "summary.json")) as f:
        return json.load(f)["records"]


def _lines(path: str) -> list[str]:
    with open(path) as f:
        return f.read().splitlines()


def _assert_same_results(run_dir: str, reference: str) -> None:
    got, ref = _records(run_dir), _records(reference)
    assert [(r["kind"], r.get("name", r.get("policy")), r["schedule"], r["round"]) for r in got] == [
        (r["kind"], r.get("name", r.get("policy")), r["schedule"], r["round"]) for r in ref]
    rms = {r.get("name") for r in ref if r["kind"] == "rm_eval"}
    # The game plays apo_seq alone: its round-1 RM and policy are named by its own row.
    assert rms == {"rm_base", "rm_test", "rm_apo_seq_r1", "rm_apo_seq_r2"}
    policies = {r.get("policy") for r in ref if r["kind"] == "policy_eval"}
    assert policies == {"policy_0", "policy_apo_seq_r1", "policy_apo_seq_r2"}
    for g, r in zip(got, ref):
        assert g.keys() == r.keys(), (g, r)
        for key, value in r.items():
            if isinstance(value, float):
                assert g[key] == pytest.approx(value, abs=TOL), (key, g, r)
            else:
                assert g[key] == value, (key, g, r)
    assert all("test_acc" in r and "dev_ece" in r for r in ref if r["kind"] == "rm_eval")
    assert all("avg_score" in r and "true_reward" in r for r in ref if r["kind"] == "policy_eval")
    for path in sorted(glob.glob(os.path.join(reference, "answers", "*_test.jsonl"))):
        assert _lines(path) == _lines(os.path.join(run_dir, "answers", os.path.basename(path))), path


def _assert_shared_outputs_written_once(run_dir: str, reference: str, procs, launches: int) -> None:
    """Process 0 alone writes tables, plots, JSONL and exports; the others print nothing of it."""
    for rel in ("tables.md", "figure2_rm_accuracy_vs_ece.png", "figure2_policy_scores.png", "summary.json"):
        assert os.path.getsize(os.path.join(run_dir, rel)) > 0, rel
    assert open(os.path.join(run_dir, "tables.md")).read() == open(os.path.join(reference, "tables.md")).read()
    # Appended JSONL: as many lines as one process writes (N writers would multiply them).
    for rel in ("samples/policy_0_gold.jsonl", "samples/policy_apo_seq_r1_llm.jsonl", "samples/policy_0_test.jsonl"):
        assert len(_lines(os.path.join(run_dir, rel))) == len(_lines(os.path.join(reference, rel))), rel
    assert len(glob.glob(os.path.join(run_dir, "tensorboard", "events.out.tfevents.*"))) == launches
    assert sorted(os.listdir(os.path.join(run_dir, "export"))) == sorted(os.listdir(os.path.join(reference, "export")))
    assert "apo_jax: run finished" in procs[0].stdout
    for p in procs[1:]:
        assert "run finished" not in p.stdout and "[apo_jax" not in p.stdout, p.stdout[-2000:]


def _assert_each_process_wrote_its_shards(checkpoint_dir: str, num_processes: int) -> None:
    # Orbax (OCDBT): one sub-store per process holding that process's shards.
    found = sorted(os.path.basename(p) for p in glob.glob(os.path.join(checkpoint_dir, "ocdbt.process_*")))
    assert found == [f"ocdbt.process_{i}" for i in range(num_processes)], (checkpoint_dir, found)


def _ok(procs) -> None:
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{p.stderr[-4000:]}"


def test_two_processes_on_gcs_killed_together_resume_and_match_one_process(reference, fake_gcs):
    """A pod's run: 2 processes x 4 devices (4 x 2 took twice the time on 2 cores: 289 vs 147 s),
    the run dir a gs:// URL (a fake GCS: TensorStore's GCS driver over HTTP to this test's server,
    epath through fsspec on the same files), every process writes its own checkpoint shards there,
    all are killed inside RM training, and the restart (the same command) reads only what the
    bucket holds and ends with the one-process results."""
    run_dir = str(fake_gcs.local_path("bucket", "runs/apo"))  # what the bucket holds, on disk
    args = multiproc.tiny_main_args(fake_gcs.url("bucket", "runs/apo"))
    bootstrap = "import fake_gcs; fake_gcs.install_in_child()"
    n = 2

    killed = multiproc.run_main(args, n, 8 // n, bootstrap=f"{bootstrap}\n{faults.bootstrap(FAULT)}")
    assert killed[0].returncode == 42, killed[0].stderr[-4000:]
    for i, p in enumerate(killed):
        # Each process dies at the same step; one that loses the coordinator (process 0) first
        # may die of that instead, but none finishes.
        assert p.returncode != 0, f"process {i} finished despite {FAULT}"
        if p.returncode == 42:  # and its log line says which process it was
            assert f"[process {i}/{n}] fault hook: killing the process at rm_base step 3" in p.stderr
    with open(os.path.join(run_dir, "loop_state.json")) as f:
        done = json.load(f)["done"]
    assert "model:policy_0" in done and "model:rm_base" not in done
    _assert_each_process_wrote_its_shards(os.path.join(run_dir, "ckpt", "rm_base", "2", "state"), n)
    _assert_each_process_wrote_its_shards(os.path.join(run_dir, "models", "policy_0"), n)

    uploads = {r.query.get("name", "") for r in fake_gcs.requests if r.kind == "upload"}
    for i in range(1, n):
        assert any(f"ocdbt.process_{i}" in name for name in uploads), f"process {i}'s shards did not go through GCS"

    resumed = multiproc.run_main(args, n, 8 // n, bootstrap=bootstrap)  # the same command again
    _ok(resumed)
    assert "rm_base: resumed at step 2/5" in resumed[0].stdout + resumed[0].stderr
    _assert_same_results(run_dir, reference)
    _assert_shared_outputs_written_once(run_dir, reference, resumed, launches=2)
    _assert_each_process_wrote_its_shards(os.path.join(run_dir, "models", "rm_base"), n)

    # metrics.jsonl: every logged step and evaluation once, as in the one-process run (the
    # resumed phase goes on from its checkpoint without logging a step twice).
    def logged(path: str) -> list[str]:
        recs = [json.loads(line) for line in _lines(path)]
        return sorted(json.dumps([r.get("phase"), r.get("step"), r.get("kind"), r.get("name", r.get("policy"))])
                      for r in recs)

    assert logged(os.path.join(run_dir, "metrics.jsonl")) == logged(os.path.join(reference, "metrics.jsonl"))
