"""The one cache of compiled programs (`apo_jax.compiled`): one program per (kind, key), shared by
every caller in the process, least recently used dropped first, traces counted per kind."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apo_jax import compiled, models, sharding
from apo_jax.inference import scoring


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(compiled, "_programs", type(compiled._programs)())
    return compiled


def test_one_program_per_kind_and_key(fresh):
    builds = []

    def build(tag):
        builds.append(tag)
        return object()

    a = fresh.program("k", ("x", 1), lambda: build("a"))
    assert fresh.program("k", ("x", 1), lambda: build("b")) is a  # built once
    assert fresh.program("other", ("x", 1), lambda: build("c")) is not a  # another kind, another program
    assert fresh.program("k", ("x", 2), lambda: build("d")) is not a
    assert builds == ["a", "c", "d"]


def test_least_recently_used_is_dropped_first(fresh, monkeypatch):
    monkeypatch.setattr(fresh, "MAX_PROGRAMS", 2)
    first = fresh.program("k", 1, object)
    second = fresh.program("k", 2, object)
    assert fresh.program("k", 1, object) is first  # 1 is now the most recent
    fresh.program("k", 3, object)  # drops 2, not 1
    assert fresh.program("k", 1, object) is first
    assert fresh.program("k", 2, object) is not second


def test_cached_builders_key_by_their_arguments_and_count_traces(fresh):
    calls = []

    @fresh.cached("square")
    def make(scale):
        calls.append(scale)

        def f(x):
            fresh.count("square")
            return scale * x * x

        return jax.jit(f)

    before = fresh.TRACES["square"]
    f2 = make(2.0)
    assert make(2.0) is f2 and make(3.0) is not f2 and calls == [2.0, 3.0]
    np.testing.assert_allclose(np.asarray(f2(jnp.arange(3.0))), [0.0, 2.0, 8.0])
    f2(jnp.arange(3.0) + 1)  # same shape: no new trace
    f2(jnp.arange(4.0))  # new shape: one more
    assert fresh.TRACES["square"] - before == 2


def test_reward_programs_are_shared_between_equal_configs(fresh):
    """Two RMs of one shape (as the game's RM_Base and APO RMs) use one scoring program: a second,
    equal ModelConfig object finds the first one's program and traces nothing new."""
    def cfg():
        return models.ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                  pad_token_id=0, eos_token_id=1, bos_token_id=2)

    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    a, b = cfg(), cfg()
    assert a is not b and a == b
    params = models.init_params(a, jax.random.PRNGKey(0), lm_head=False, reward_head=True)
    ids, mask = jnp.ones((2, 8), jnp.int32), jnp.ones((2, 8), jnp.int32)
    before = fresh.TRACES["score"]
    ra = scoring.make_reward_fn(a, mesh)(params, ids, mask)
    rb = scoring.make_reward_fn(b, mesh)(params, ids, mask)
    assert scoring.make_reward_fn(b, mesh) is scoring.make_reward_fn(a, mesh)
    assert fresh.TRACES["score"] - before == 1
    np.testing.assert_array_equal(np.asarray(ra), np.asarray(rb))
