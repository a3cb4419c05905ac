"""DPO: the loss, gradient and metrics against PyTorch from the formula; a step learns; sharded
equals single device; best-vs-worst pair selection."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from apo_jax import models, sharding
from apo_jax.training import losses, train
from apo_jax.training.objectives import DPO

CFG = models.ModelConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def _torch_dpo(pw, pl, rw, rl, weight, tokens_w, beta, ls, sft_w):
    """DPO written from the formula (Rafailov et al. eq. 7; conservative DPO; + SFT on y_w)."""
    z = beta * ((pw - rw) - (pl - rl))
    nll = -(1 - ls) * F.logsigmoid(z) - ls * F.logsigmoid(-z)
    per = nll + sft_w * (-pw / tokens_w.clamp(min=1.0))
    valid = (weight > 0).float()
    loss = (weight * per).sum() / weight.sum()
    metrics = {
        "loss": loss,
        "reward_accuracy": (valid * (z > 0).float()).sum() / valid.sum(),
        "reward_margin": (valid * z).sum() / valid.sum(),
        "reward_chosen": (valid * beta * (pw - rw)).sum() / valid.sum(),
        "reward_rejected": (valid * beta * (pl - rl)).sum() / valid.sum(),
        "kl_proxy": (valid * ((rw - pw) + (rl - pl))).sum() / (2 * valid.sum()),
    }
    return loss, metrics


@pytest.mark.parametrize("ls,sft_w", [(0.0, 0.0), (0.1, 0.0), (0.2, 0.5)])
def test_dpo_loss_gradient_and_metrics_equal_torch(ls, sft_w):
    rng = np.random.RandomState(0)
    n, beta = 12, 0.3
    pw, pl, rw, rl = (rng.randn(n).astype(np.float32) * 5 - 20 for _ in range(4))
    weight = np.ones(n, np.float32)
    weight[[3, 7]] = 0.0  # filler rows
    tokens_w = rng.randint(1, 9, n).astype(np.float32)

    def ours(pw_, pl_):
        s = losses.dpo_stats(pw_, pl_, rw, rl, weight, tokens_w, beta=beta, label_smoothing=ls, sft_weight=sft_w)
        return s["loss_num"] / s["loss_den"], losses.dpo_metrics(s)

    (loss, m), (gw, gl) = jax.value_and_grad(ours, argnums=(0, 1), has_aux=True)(jnp.asarray(pw), jnp.asarray(pl))
    tw, tl = torch.tensor(pw, requires_grad=True), torch.tensor(pl, requires_grad=True)
    ref_loss, ref_m = _torch_dpo(tw, tl, torch.tensor(rw), torch.tensor(rl), torch.tensor(weight),
                                 torch.tensor(tokens_w), beta, ls, sft_w)
    ref_loss.backward()
    np.testing.assert_allclose(float(loss), ref_loss.item(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(gw), tw.grad.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(gl), tl.grad.numpy(), rtol=1e-4, atol=1e-6)
    for k, v in ref_m.items():
        np.testing.assert_allclose(float(m[k]), v.item(), rtol=1e-5, atol=1e-6, err_msg=k)
    assert float(gw[3]) == 0.0  # a filler row adds no gradient
    if ls == 0.0 and sft_w == 0.0:  # the stable API: the plain batch mean
        full = losses.dpo_loss(pw[weight > 0], pl[weight > 0], rw[weight > 0], rl[weight > 0], beta=beta)
        np.testing.assert_allclose(float(full), ref_loss.item(), rtol=1e-5)


def _pair_batch(seed: int, n: int = 8, t: int = 12) -> dict[str, np.ndarray]:
    rng = np.random.RandomState(seed)
    out: dict[str, np.ndarray] = {}
    for side in ("chosen", "rejected"):
        ids = rng.randint(3, 32, (n, t)).astype(np.int32)
        mask = np.ones((n, t), np.int32)
        resp = np.zeros((n, t), np.int32)
        for i in range(n):
            length = rng.randint(7, t + 1)
            mask[i, length:] = 0
            resp[i, 4:length] = 1  # a 4-token prompt, then the response
        out[f"{side}_ids"], out[f"{side}_mask"], out[f"{side}_response_mask"] = ids * mask, mask, resp
    out["weight"] = np.ones(n, np.float32)
    return out


def _with_ref(batch, params):
    """Reference log-probs from `params` (the phase's starting policy), as `DPO.prepare` stores them."""
    b = dict(batch)
    for side in ("chosen", "rejected"):
        b[f"ref_{side}"] = np.asarray(models.sequence_logprobs(
            CFG, params, b[f"{side}_ids"], b[f"{side}_mask"], b[f"{side}_response_mask"]), np.float32)
    return b


def _single_mesh():
    return sharding.make_mesh(sharding.MeshConfig(1, 1, 1), jax.devices()[:1])


def test_dpo_steps_reduce_the_loss_on_their_batch():
    mesh = _single_mesh()
    params = models.init_params(CFG, jax.random.PRNGKey(0))
    batch = _with_ref(_pair_batch(1), params)  # reference = start: the first loss is log 2 exactly
    opt = train.OptimizerConfig(lr=1e-2, total_steps=30, schedule="constant")
    state = train.init_state(CFG, params, opt, mesh)
    step = train.make_train_step(CFG, DPO(beta=5.0), opt, mesh)
    state, first = step(state, batch)
    assert float(first["loss"]) == pytest.approx(np.log(2.0), abs=1e-5)
    assert float(first["reward_margin"]) == pytest.approx(0.0, abs=1e-5)
    for _ in range(10):
        state, m = step(state, batch)
    assert float(m["loss"]) < 0.5 * float(first["loss"])
    assert float(m["reward_accuracy"]) == 1.0 and float(m["reward_margin"]) > 0


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake CPU) devices")
def test_sharded_dpo_step_equals_single_device_step():
    opt = train.OptimizerConfig(lr=1.0, total_steps=10, eps=1.0)  # eps=1: params compare gradients
    params = models.init_params(CFG, jax.random.PRNGKey(2))
    batch = _pair_batch(3)
    batch = _with_ref(batch, jax.tree_util.tree_map(lambda x: x * 1.01, params))  # a nonzero start margin
    results = []
    for mesh in (_single_mesh(), sharding.make_mesh(sharding.MeshConfig(2, 2, 2))):
        state = train.init_state(CFG, params, opt, mesh)
        step = train.make_train_step(CFG, DPO(beta=0.5, label_smoothing=0.1, sft_weight=0.2), opt, mesh)
        for _ in range(2):
            state, m = step(state, sharding.shard_batch(batch, mesh))
        results.append((jax.device_get(state.params), float(m["loss"])))
    (p1, l1), (p8, l8) = results
    assert l1 == pytest.approx(l8, rel=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), p1, p8)
