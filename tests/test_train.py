"""Train steps: they learn, they shard, they accumulate exactly, and they refuse NaNs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax

from apo_jax import models, sharding
from apo_jax.inference import scoring
from apo_jax.training import losses, train
from apo_jax.training.objectives import SFT, Ranking

CFG = models.ModelConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
GOOD, BAD = 5, 6


def _single_mesh():
    return sharding.make_mesh(sharding.MeshConfig(1, 1, 1), jax.devices()[:1])


def _rm_batch(rng, n=16, t=12, planted=True):
    """Random responses; the chosen one contains token GOOD somewhere, the rejected one BAD."""
    c = rng.randint(7, 32, (n, t)).astype(np.int32)
    r = rng.randint(7, 32, (n, t)).astype(np.int32)
    mask = np.ones((n, t), np.int32)
    lengths = rng.randint(6, t + 1, n)
    for i, n_i in enumerate(lengths):
        mask[i, n_i:] = 0
        if planted:
            c[i, rng.randint(1, n_i)] = GOOD
            r[i, rng.randint(1, n_i)] = BAD
    c, r = c * mask, r * mask
    return dict(chosen_ids=c, chosen_mask=mask, rejected_ids=r, rejected_mask=mask.copy(),
                weight=np.ones(n, np.float32), is_apo=(rng.rand(n) < 0.5).astype(np.int32))


def _rm_params(seed=0):
    p = models.init_params(CFG, jax.random.PRNGKey(seed), lm_head=False)
    return train.rm_params_from(CFG, p, jax.random.PRNGKey(seed + 1), std=0.02)


def test_rm_learns_a_planted_preference():
    mesh = _single_mesh()
    opt = train.OptimizerConfig(lr=3e-3, warmup_steps=10, total_steps=150, schedule="cosine")
    state = train.init_state(CFG, _rm_params(), opt, mesh)
    step = train.make_train_step(CFG, Ranking(1.0, 1.0), opt, mesh)
    rng = np.random.RandomState(0)
    for _ in range(150):
        state, metrics = step(state, _rm_batch(rng))
    held = _rm_batch(np.random.RandomState(123), n=256)
    score = scoring.make_reward_fn(CFG, mesh)
    good = np.asarray(score(state.params, held["chosen_ids"], held["chosen_mask"]))
    bad = np.asarray(score(state.params, held["rejected_ids"], held["rejected_mask"]))
    assert np.mean(good > bad) > 0.95


def test_sft_fits_a_fixed_set():
    mesh = _single_mesh()
    rng = np.random.RandomState(1)
    ids = rng.randint(3, 32, (8, 10)).astype(np.int32)
    mask = np.ones_like(ids)
    loss_mask = np.zeros_like(ids)
    loss_mask[:, 4:] = 1
    batch = dict(input_ids=ids, attention_mask=mask, loss_mask=loss_mask, weight=np.ones(8, np.float32))
    params = models.init_params(CFG, jax.random.PRNGKey(2))
    opt = train.OptimizerConfig(lr=1e-2, warmup_steps=5, total_steps=200, schedule="constant")
    state = train.init_state(CFG, params, opt, mesh)
    step = train.make_train_step(CFG, SFT(), opt, mesh)
    first = None
    for _ in range(200):
        state, m = step(state, batch)
        first = float(m["loss"]) if first is None else first
    assert first > 2.0 and float(m["loss"]) < 0.05


def _assert_trees_close(a, b, atol):
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol), a, b)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake CPU) devices")
def test_sharded_step_equals_single_device_step():
    # eps = 1: Adam's update ~ lr * g (see the grad-accumulation test), so params compare gradients.
    opt = train.OptimizerConfig(lr=1.0, total_steps=10, eps=1.0)
    batch = _rm_batch(np.random.RandomState(2))
    results = []
    for mesh in (_single_mesh(), sharding.make_mesh(sharding.MeshConfig(2, 2, 2))):
        state = train.init_state(CFG, _rm_params(), opt, mesh)
        step = train.make_train_step(CFG, Ranking(0.025, 1.0), opt, mesh)
        for _ in range(2):
            state, m = step(state, sharding.shard_batch(batch, mesh))
        results.append((jax.device_get(state.params), float(m["loss"]), state))
    (p1, l1, _), (p8, l8, s8) = results
    assert l1 == pytest.approx(l8, rel=1e-5)
    _assert_trees_close(p1, p8, atol=1e-5)  # float32 reduction order differs across shards
    q = s8.params["model"]["layers"]["attn"]["q_proj"]["kernel"]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    mu = s8.opt_state[1].mu["model"]["layers"]["attn"]["q_proj"]["kernel"]
    assert mu.sharding.spec == q.sharding.spec  # Adam moments sharded like their params


@pytest.mark.parametrize("kind", ["rm", "sft"])
def test_grad_accumulation_equals_one_big_batch(kind):
    mesh = _single_mesh()
    # eps = 1 makes Adam's first update ~ lr * g / (|g| + 1) ~ lr * g, linear in the gradient, so the
    # updated params compare the accumulated gradient itself. (With the default eps, Adam's first step
    # is lr * g/|g|: an element whose gradient is ~0 can flip sign under float32 summation-order noise.)
    opt = train.OptimizerConfig(lr=1.0, total_steps=10, grad_clip=0.0, eps=1.0)
    rng = np.random.RandomState(3)
    if kind == "rm":
        batch = _rm_batch(rng)
        batch["weight"][[1, 6, 7]] = 0.0  # uneven filler across micro-batches
        make = lambda k: train.make_train_step(CFG, Ranking(0.3, 1.0), opt, mesh, grad_accum=k)  # noqa: E731
        params = _rm_params()
    else:
        ids = rng.randint(3, 32, (8, 10)).astype(np.int32)
        loss_mask = (rng.rand(8, 10) < 0.5).astype(np.int32)
        batch = dict(input_ids=ids, attention_mask=np.ones_like(ids), loss_mask=loss_mask,
                     weight=np.ones(8, np.float32))
        make = lambda k: train.make_train_step(CFG, SFT(), opt, mesh, grad_accum=k)  # noqa: E731
        params = models.init_params(CFG, jax.random.PRNGKey(4))
    out = []
    for k in (1, 4):
        state = train.init_state(CFG, params, opt, mesh)
        state, m = make(k)(state, batch)
        out.append((jax.device_get(state.params), float(m["loss"])))
    assert out[0][1] == pytest.approx(out[1][1], rel=1e-5)
    _assert_trees_close(out[0][0], out[1][0], atol=1e-6)
    # The step did move the params (by the gradient), so the comparison above is not vacuous.
    moved = jax.tree_util.tree_map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), out[0][0],
                                   jax.device_get(params))
    assert max(jax.tree_util.tree_leaves(moved)) > 1e-4


def test_nan_loss_is_reported_with_step_and_update_skipped():
    mesh = _single_mesh()
    opt = train.OptimizerConfig(lr=1e-2, total_steps=10)
    params = _rm_params()
    state = train.init_state(CFG, params, opt, mesh)
    step = train.make_train_step(CFG, Ranking(), opt, mesh)
    batch = _rm_batch(np.random.RandomState(4))
    batch["weight"][0] = np.nan  # poisons the loss
    state, m = step(state, batch)
    assert float(m["finite"]) == 0.0
    assert int(state.step) == 0
    _assert_trees_close(jax.device_get(state.params), params, atol=0)
    with pytest.raises(train.NonFiniteLossError, match="step 17"):
        train.check_finite(jax.device_get(m), 17, "rm_base")


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_traced_lr_schedule_equals_optax_schedule(schedule):
    opt = train.OptimizerConfig(lr=3e-4, warmup_steps=7, total_steps=40, schedule=schedule)
    ref = train.make_schedule(opt)
    hyper = jnp.asarray([opt.lr, opt.warmup_steps, opt.total_steps], jnp.float32)
    for step in range(0, 45):
        assert float(train.lr_at(jnp.int32(step), hyper, schedule)) == pytest.approx(float(ref(step)), rel=1e-5,
                                                                                      abs=1e-12), step


def test_rm_step_equals_optax_adamw_on_the_bt_loss():
    """Three steps of our step == optax.adamw(make_schedule) with clipping on jax.grad of the loss."""
    mesh = _single_mesh()
    opt = train.OptimizerConfig(lr=1e-2, warmup_steps=2, total_steps=6, schedule="cosine", weight_decay=0.1,
                                grad_clip=0.5, eps=0.1)
    batches = [_rm_batch(np.random.RandomState(10 + i)) for i in range(3)]
    params = _rm_params()
    state = train.init_state(CFG, params, opt, mesh)
    step = train.make_train_step(CFG, Ranking(0.3, 1.0), opt, mesh)
    for b in batches:
        state, _ = step(state, b)

    def loss(p, b):
        ids = jnp.concatenate([b["chosen_ids"], b["rejected_ids"]])
        mask = jnp.concatenate([b["chosen_mask"], b["rejected_mask"]])
        r = models.rewards(CFG, p, ids, mask)
        n = b["chosen_ids"].shape[0]
        s = losses.rm_stats(r[:n], r[n:], b["is_apo"], b["weight"], apo_weight=0.3, human_weight=1.0)
        return s["loss_num"] / s["loss_den"]

    mask = lambda p: jax.tree_util.tree_map(lambda x: x.ndim > 1, p)  # noqa: E731
    tx = optax.chain(optax.clip_by_global_norm(0.5),
                     optax.adamw(train.make_schedule(opt), b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=0.1,
                                 mask=mask))
    ref, ref_state = params, tx.init(params)
    grad = jax.jit(jax.grad(loss))
    for b in batches:
        g = grad(ref, b)
        updates, ref_state = tx.update(g, ref_state, ref)
        ref = optax.apply_updates(ref, updates)
    _assert_trees_close(jax.device_get(state.params), ref, atol=2e-6)


def test_phases_with_different_learning_rates_share_one_compiled_step():
    from apo_jax import compiled

    compiled.clear()  # a fresh cache: `a` is built (and traced) here
    mesh = _single_mesh()
    batch = _rm_batch(np.random.RandomState(5))
    rm = Ranking(0.1, 1.0)
    a = train.train_step(CFG, rm, train.OptimizerConfig(lr=1e-3, total_steps=10), mesh, 1)
    b = train.train_step(CFG, rm, train.OptimizerConfig(lr=5e-5, warmup_steps=3, total_steps=99), mesh, 1)
    state = train.init_state(CFG, _rm_params(), train.OptimizerConfig(), mesh)
    assert a.jitted(state, batch) is b.jitted(state, batch)
    c = train.train_step(CFG, rm, train.OptimizerConfig(lr=1e-3, total_steps=10, b2=0.999), mesh, 1)
    assert c.jitted(state, batch) is not a.jitted(state, batch)  # a static optimizer field differs
    d = train.train_step(CFG, Ranking(0.2, 1.0), train.OptimizerConfig(lr=1e-3, total_steps=10), mesh, 1)
    assert d.jitted(state, batch) is not a.jitted(state, batch)  # the objective's settings differ
    # Both bound schedules really are used: one step of each from the same state differs.
    s1, m1 = a(train.init_state(CFG, _rm_params(), train.OptimizerConfig(), mesh), batch)
    s2, m2 = b(train.init_state(CFG, _rm_params(), train.OptimizerConfig(), mesh), batch)
    assert float(m1["lr"]) == pytest.approx(1e-3) and float(m2["lr"]) == pytest.approx(0.0)  # b: warmup from 0
    assert a.compiles == 1
