"""The memory wins of issue 18, pinned on XLA's buffer assignment of the compiled programs.

Each bound sits between what the program needs now and what the code before issue 18 needed
for the same program (both measured on CPU, jax 0.10.2, and written beside each bound), so a
change that brings back a per-layer float32 [B, H, T, S] attention residual or [B, T, V] float32
logits fails here. Compiles only (abstract shapes), a 2-layer model with a 4096-token vocabulary
at T = 256: the temporaries are dominated by the activations, not the weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from apo_jax import models, sharding
from apo_jax.training import losses, objectives, train

MiB = 2**20
T = 256
SHAPE = dict(vocab_size=4096, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)
OPT = train.OptimizerConfig(lr=1e-5, warmup_steps=0, total_steps=100, schedule="linear", grad_clip=1.0)


def _mesh() -> jax.sharding.Mesh:
    return sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])


def _abstract_params(cfg: models.ModelConfig, *, lm_head: bool, reward_head: bool):
    return jax.eval_shape(lambda: models.init_params(cfg, jax.random.PRNGKey(0), lm_head=lm_head,
                                                     reward_head=reward_head))


def _rm_step_temp(cfg: models.ModelConfig, pairs: int) -> int:
    params = _abstract_params(cfg, lm_head=False, reward_head=True)
    state = train.TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                             opt_state=jax.eval_shape(train.make_optimizer(OPT).init, params))
    ids = jax.ShapeDtypeStruct((pairs, T), jnp.int32)
    batch = {"chosen_ids": ids, "chosen_mask": ids, "rejected_ids": ids, "rejected_mask": ids,
             "weight": jax.ShapeDtypeStruct((pairs,), jnp.float32), "is_apo": jax.ShapeDtypeStruct((pairs,), jnp.int32)}
    step = train.make_train_step(cfg, objectives.get("ranking"), OPT, _mesh())
    compiled = step.jitted(state, batch).lower(state, batch, step._hyper).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_rm_step_keeps_no_attention_probabilities():
    """RM step, 4 pairs x 256 tokens, remat "auto" (= none at this size): 83.5 MiB of temporaries
    with the attention core rematerialised, 116.5 MiB before (float32 logits and probabilities
    [2B, H, T, T] kept per layer)."""
    cfg = models.ModelConfig(**SHAPE, dtype="float32")
    assert models.remat_for(cfg, 8, T) == "none"
    assert _rm_step_temp(cfg, pairs=4) < 95 * MiB


def test_minimal_remat_keeps_fewer_residuals_than_none():
    """The same step under remat "minimal" (what "auto" picks for real models): 56.4 MiB vs
    83.5 MiB for "none" (at the SmolLM2-135M shape, 8 pairs x 256: 3.4 GiB vs 7.3 GiB, and
    9.4 GiB before issue 18)."""
    cfg = models.ModelConfig(**SHAPE, dtype="float32", remat_policy="minimal")
    assert _rm_step_temp(cfg, pairs=4) < 65 * MiB


@pytest.mark.parametrize("chunk_size", [32])
def test_sft_loss_gradient_never_holds_full_vocabulary_logits(chunk_size):
    """SFT NLL and its gradient over 8 sequences x 256 tokens: through `token_logprobs` (chunks of
    32 positions) 80.0 MiB of temporaries (109.9 MiB as one chunk); through `lm_logits` +
    log-softmax ([8, 256, 4096] float32 logits, 32 MiB each, several alive for the backward)
    205.7 MiB, and 239.4 MiB before issue 18's attention change. The SFT objective's fused head
    (`weighted_logprob_sum`, its gradient formed in the forward pass) needs no more than the
    chunked one (70.6 MiB each on 2026-12-01)."""
    cfg = models.ModelConfig(**SHAPE, dtype="float32")
    params = _abstract_params(cfg, lm_head=True, reward_head=False)
    ids = jax.ShapeDtypeStruct((8, T), jnp.int32)

    def chunked(p, ids, mask):
        logp, _ = models.token_logprobs(cfg, p, ids, mask, chunk_size=chunk_size)
        return -jnp.sum(logp * mask)

    def full(p, ids, mask):
        logits = models.lm_logits(cfg, p, ids, mask)
        return losses.sft_stats(logits, ids, mask, jnp.ones((ids.shape[0],)))["loss_num"]

    def temp(f):
        return jax.jit(jax.value_and_grad(f)).lower(params, ids, ids).compile().memory_analysis().temp_size_in_bytes

    def fused(p, ids, mask):  # what the SFT objective runs: the head's gradient formed in the forward
        return -models.weighted_logprob_sum(cfg, p, ids, mask, mask.astype(jnp.float32), chunk_size=chunk_size)[0]

    lean = temp(chunked)
    assert lean < 95 * MiB
    assert lean < 0.5 * temp(full)
    assert temp(fused) < 95 * MiB
