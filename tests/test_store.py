"""The run store and `fit` on fake phases: memo, typed keys, and exact resume after a crash."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apo_jax import sharding
from apo_jax.io import checkpointing
from apo_jax.training import fit, train
from apo_jax.game.store import ModelKey, PolicyEvalKey, RunStore, SamplesKey, ScoresKey


def _mesh():
    return sharding.make_mesh(sharding.MeshConfig(1, 1, 1), jax.devices()[:1])


def test_keys_are_typed_and_name_their_unit_of_work():
    assert ModelKey("rm_base").id == "model:rm_base"
    assert SamplesKey("policy_0", "llm").id == "samples:policy_0:llm"
    assert ScoresKey("rm_apo_r1", "policy_0_llm").id == "scores:rm_apo_r1:policy_0_llm"
    assert PolicyEvalKey("policy_apo_r1", "apo_seq").id == "policyeval:policy_apo_r1:apo_seq"
    assert ModelKey("a") == ModelKey("a") and ModelKey("a") != SamplesKey("a", "")


def test_once_runs_each_unit_once_across_restarts(tmp_path):
    calls = []
    store = RunStore(str(tmp_path / "run"), _mesh())
    assert store.once(SamplesKey("p", "llm"), lambda: calls.append(1) or {"n": 4}) == {"n": 4}
    assert store.once(SamplesKey("p", "llm"), lambda: calls.append(2) or {"n": 5}) == {"n": 4}
    store.close()
    again = RunStore(str(tmp_path / "run"), _mesh())  # a restarted run
    assert again.once(SamplesKey("p", "llm"), lambda: calls.append(3)) == {"n": 4}
    assert again.once(SamplesKey("p", "test"), lambda: calls.append(4) or 7) == 7
    assert calls == [1, 4]
    done = json.loads((tmp_path / "run" / "loop_state.json").read_text())["done"]
    assert done == {"samples:p:llm": {"n": 4}, "samples:p:test": 7}
    again.close()


class _Examples:
    """A fake tokenised set: row i is the number i."""

    def __len__(self) -> int:
        return 24

    def batch(self, rows):
        return {"x": np.asarray(rows, np.float32)}


def _step(state: train.TrainState, batch, hyper=None):
    # A deterministic "train step" whose result depends on every batch and its order.
    w = state.params["w"] * 0.9 + jnp.sum(batch["x"]) * 0.01 + state.step.astype(jnp.float32)
    new = train.TrainState(step=state.step + 1, params={"w": w}, opt_state=state.opt_state)
    return new, {"loss": jnp.mean(batch["x"]), "finite": jnp.float32(1)}


def _fit(tmp_path, store, kill_at=None):
    state = train.TrainState(step=jnp.zeros((), jnp.int32), params={"w": jnp.zeros((3,), jnp.float32)}, opt_state=())
    ckpt = checkpointing.TrainCheckpointer(store.checkpoint_dir("toy"), save_every=2, async_save=False)
    remove = fit.add_progress_hook(lambda phase, step: _crash(phase, step, kill_at))
    try:
        return fit.fit("toy", state, jax.jit(_step), _Examples(), batch_size=4, total_steps=9, seed=3, mesh=store.mesh,
                       checkpointer=ckpt, metrics=store.metrics, log_every=1, show_progress=False)
    finally:
        remove()


class _Crash(Exception):
    pass


def _crash(phase, step, kill_at):
    if kill_at == (phase, step):
        raise _Crash


def test_fit_killed_mid_phase_resumes_to_the_uninterrupted_result(tmp_path):
    ref_store = RunStore(str(tmp_path / "ref"), _mesh())
    ref = _fit(tmp_path, ref_store)
    ref_store.close()

    store = RunStore(str(tmp_path / "run"), _mesh())
    with pytest.raises(_Crash):
        _fit(tmp_path, store, kill_at=("toy", 5))  # after the step-4 checkpoint
    store.close()
    store = RunStore(str(tmp_path / "run"), _mesh())
    out = _fit(tmp_path, store)
    store.close()
    np.testing.assert_array_equal(np.asarray(out.params["w"]), np.asarray(ref.params["w"]))
    assert int(out.step) == int(ref.step) == 9

    def steps(run):
        return [(r["phase"], r["step"], r["loss"]) for r in map(json.loads, open(tmp_path / run / "metrics.jsonl"))]

    assert steps("run") == steps("ref")  # each step logged once, with the same batch


def test_the_public_api_resolves():
    import apo_jax

    for name in apo_jax.__all__:
        assert getattr(apo_jax, name) is not None, name
    with pytest.raises(AttributeError):
        apo_jax.not_an_api  # noqa: B018
