"""Losses and their gradients against independent PyTorch computations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from apo_jax.training import losses


def test_bt_loss_and_grad_match_torch():
    rng = np.random.RandomState(0)
    g, b, w = rng.randn(9), rng.randn(9), rng.rand(9)
    w[[2, 5]] = 0.0  # filler rows
    tg, tb = torch.tensor(g, requires_grad=True), torch.tensor(b, requires_grad=True)
    tw = torch.tensor(w)
    ref = (tw * -torch.nn.functional.logsigmoid(tg - tb)).sum() / tw.sum()
    ref.backward()
    val, grads = jax.value_and_grad(lambda x, y: losses.bt_ranking_loss(x, y, jnp.asarray(w, jnp.float32)),
                                    argnums=(0, 1))(jnp.asarray(g, jnp.float32), jnp.asarray(b, jnp.float32))
    np.testing.assert_allclose(val, ref.item(), rtol=1e-6)
    np.testing.assert_allclose(grads[0], tg.grad.numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(grads[1], tb.grad.numpy(), rtol=1e-5, atol=1e-7)
    unweighted = losses.bt_ranking_loss(jnp.asarray(g), jnp.asarray(b))
    np.testing.assert_allclose(unweighted, np.mean(np.log1p(np.exp(-(g - b)))), rtol=1e-6)


@pytest.mark.parametrize("apo_w,human_w", [(0.1 / 4, 1.0), (1.0, 10.0)])
def test_apo_rm_loss_mixture_matches_numpy(apo_w, human_w):
    rng = np.random.RandomState(1)
    g, b = rng.randn(12), rng.randn(12)
    is_apo = (rng.rand(12) < 0.5).astype(np.int32)
    weight = np.ones(12, np.float32)
    weight[-2:] = 0.0
    g[3] = b[3]  # a tie counts as wrong
    loss, m = losses.apo_rm_loss(jnp.asarray(g), jnp.asarray(b), jnp.asarray(is_apo), jnp.asarray(weight),
                                 apo_weight=apo_w, human_weight=human_w)
    nll = np.log1p(np.exp(-(g - b)))
    coef = weight * np.where(is_apo == 1, apo_w, human_w)
    np.testing.assert_allclose(loss, (coef * nll).sum() / weight.sum(), rtol=1e-5)
    valid = weight > 0
    np.testing.assert_allclose(m["accuracy"], np.mean((g > b)[valid]), rtol=1e-6)
    apo = valid & (is_apo == 1)
    human = valid & (is_apo == 0)
    np.testing.assert_allclose(m["apo_loss"], nll[apo].mean(), rtol=1e-5)
    np.testing.assert_allclose(m["human_accuracy"], (g > b)[human].mean(), rtol=1e-6)
    np.testing.assert_allclose(m["margin"], (g - b)[valid].mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m["reward_chosen"], g[valid].mean(), rtol=1e-5, atol=1e-6)


def test_per_source_metrics_are_zero_when_source_absent():
    _, m = losses.apo_rm_loss(jnp.ones(4), jnp.zeros(4), jnp.zeros(4, jnp.int32), jnp.ones(4),
                              apo_weight=1.0, human_weight=1.0)
    assert float(m["apo_loss"]) == 0.0 and float(m["apo_accuracy"]) == 0.0
    assert np.isfinite(float(m["loss"]))


@pytest.mark.parametrize("normalize", ["token", "sequence"])
def test_sft_loss_and_grad_match_torch(normalize):
    rng = np.random.RandomState(2)
    b, t, v = 3, 7, 11
    logits = rng.randn(b, t, v).astype(np.float32)
    ids = rng.randint(0, v, (b, t))
    loss_mask = np.zeros((b, t), np.int32)
    loss_mask[0, 3:6] = 1  # right padding after position 5
    loss_mask[1, 2:7] = 1
    loss_mask[2, 4:5] = 1
    weight = np.array([1.0, 1.0, 0.0], np.float32)  # the last row is filler

    tl = torch.tensor(logits, requires_grad=True)
    nll = torch.nn.functional.cross_entropy(tl[:, :-1].reshape(-1, v), torch.tensor(ids[:, 1:]).reshape(-1),
                                            reduction="none").reshape(b, t - 1)
    m = torch.tensor(loss_mask[:, 1:] * weight[:, None], dtype=torch.float32)
    if normalize == "token":
        ref = (nll * m).sum() / m.sum()
    else:
        per_seq = (nll * m).sum(1) / m.sum(1).clamp(min=1)
        ref = per_seq[:2].mean()
    ref.backward()
    fn = lambda x: losses.sft_loss(x, jnp.asarray(ids), jnp.asarray(loss_mask), jnp.asarray(weight), normalize)[0]  # noqa: E731
    val, grad = jax.value_and_grad(fn)(jnp.asarray(logits))
    np.testing.assert_allclose(val, ref.item(), rtol=1e-5)
    np.testing.assert_allclose(grad, tl.grad.numpy(), atol=1e-6)
