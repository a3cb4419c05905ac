"""The heads: LM logits (optionally soft-capped), the scalar reward head, and the chunked
log-probability heads of the SFT and DPO objectives (never a [B, T, V] float32 array)."""

from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from apo_jax import sharding
from apo_jax.models.config import ModelConfig
from apo_jax.models.decoder import hidden_states
from apo_jax.models.layers import project, softcap

Params = Mapping[str, Any]


def lm_head_kernel(config: ModelConfig, params: Params) -> jax.Array:
    """The [D, V] output projection (the transposed embedding when tied)."""
    if config.tie_word_embeddings:
        return params["model"]["embed"]["embedding"].T
    return params["lm_head"]["kernel"]


def logits_from_hidden(config: ModelConfig, params: Params, hidden_btd: jax.Array) -> jax.Array:
    """float32 logits [B, T, V], soft-capped where the family caps them (Gemma 2); the matmul runs in
    the compute dtype with float32 accumulation."""
    w_dv = lm_head_kernel(config, params).astype(config.compute_dtype)
    logits = jnp.einsum("btd,dv->btv", hidden_btd, w_dv, preferred_element_type=jnp.float32)
    return sharding.constrain(softcap(logits, config.final_logit_softcapping), sharding.ACT_VOCAB)


def lm_logits(
    config: ModelConfig,
    params: Params,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    positions: jax.Array | None = None,
) -> jax.Array:
    """float32 next-token logits [B, T, V] of a left- or right-padded batch."""
    return logits_from_hidden(config, params, hidden_states(config, params, input_ids, attention_mask, positions))


def last_token_index(attention_mask_bt: jax.Array) -> jax.Array:
    """Index [B] of the last real (mask == 1) token of each row, for left or right padding."""
    t = attention_mask_bt.shape[-1]
    return jnp.max(jnp.where(attention_mask_bt.astype(bool), jnp.arange(t), 0), axis=-1)


def rewards_from_hidden(params: Params, hidden_btd: jax.Array, attention_mask_bt: jax.Array) -> jax.Array:
    """float32 rewards [B]: the score head applied at each row's last real token."""
    idx_b = last_token_index(attention_mask_bt)
    last_bd = jnp.take_along_axis(hidden_btd, idx_b[:, None, None], axis=1)[:, 0]
    w_d1 = params["score"]["kernel"]
    return jnp.einsum("bd,do->bo", last_bd.astype(jnp.float32), w_d1.astype(jnp.float32))[:, 0]


def rewards(
    config: ModelConfig, params: Params, input_ids: jax.Array, attention_mask: jax.Array
) -> jax.Array:
    """float32 scalar rewards [B] read at the last real token of each (padded) sequence."""
    return rewards_from_hidden(params, hidden_states(config, params, input_ids, attention_mask), attention_mask)


# Each chunk's float32 logits [B, C, V] stay under this many elements (64 MiB); the default chunk
# length is derived from it, so a 128K vocabulary gets shorter chunks than a 32K one.
_LOGITS_CHUNK_ELEMENTS = 1 << 24


def _default_chunk(batch: int, length: int, vocab: int) -> int:
    """The shortest chunk length that needs as few chunks as `_LOGITS_CHUNK_ELEMENTS` allows, so
    the padded tail is under one position per chunk (255 positions at SmolLM2's vocabulary and 8
    rows: 7 chunks of 37, not 7 of 42 with 39 padded positions computed for nothing)."""
    most = max(_LOGITS_CHUNK_ELEMENTS // max(batch * vocab, 1), 8)
    length = max(length, 1)
    chunks = -(-length // most)
    return -(-length // chunks)


def token_logprobs(
    config: ModelConfig,
    params: Params,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    *,
    chunk_size: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(logp_bt, argmax_bt) of a left- or right-padded batch [B, T].

    logp_bt float32 [B, T]: logp_bt[:, t] = log p(input_ids[:, t] | input_ids[:, :t]) for t >= 1,
    0 at t = 0. argmax_bt bool [B, T]: whether input_ids[:, t] is the model's argmax prediction
    from position t - 1 (False at t = 0). Positions under padding get values too; callers mask.

    The LM head and log-softmax run over `chunk_size` positions at a time (default: a length
    that keeps each chunk's float32 logits near 64 MiB) inside a `lax.scan` whose body is
    rematerialised, so neither the forward nor the backward ever holds [B, T, V] float32 logits:
    the backward recomputes one chunk's logits, turns them into that chunk's gradient, and
    accumulates the LM-head gradient across chunks.
    """
    if chunk_size is not None and chunk_size < 1:  # before the layers run, not after
        raise ValueError(f"chunk_size={chunk_size}; expected a positive number of positions")
    hidden_btd = hidden_states(config, params, input_ids, attention_mask)
    return logprobs_from_hidden(config, params, hidden_btd, input_ids, chunk_size=chunk_size)


def logprobs_from_hidden(
    config: ModelConfig, params: Params, hidden_btd: jax.Array, input_ids: jax.Array, *, chunk_size: int | None = None
) -> tuple[jax.Array, jax.Array]:
    """`token_logprobs` from the final hidden states [B, T, D]: the chunked LM head and log-softmax."""
    b, t = input_ids.shape
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size}; expected a positive number of positions")
    if t < 2:
        return jnp.zeros((b, t), jnp.float32), jnp.zeros((b, t), bool)
    n = t - 1  # position t - 1 predicts token t
    chunk = min(chunk_size or _default_chunk(b, n, config.vocab_size), n)
    w_dv = lm_head_kernel(config, params).astype(config.compute_dtype)

    cap = config.final_logit_softcapping

    @jax.checkpoint
    def one_chunk(h_bcd: jax.Array, y_bc: jax.Array) -> tuple[jax.Array, jax.Array]:
        _, logp_bc, hit_bc, _ = _head_chunk(h_bcd, w_dv, y_bc, cap)
        return logp_bc, hit_bc

    def body(carry: None, xs: tuple[jax.Array, jax.Array]) -> tuple[None, tuple[jax.Array, jax.Array]]:
        return carry, one_chunk(*xs)

    _, (logp_cbc, hit_cbc) = jax.lax.scan(body, None, _head_chunks(chunk, hidden_btd[:, :-1], input_ids[:, 1:]))
    return _from_position_one(_unchunk(logp_cbc, n), _unchunk(hit_cbc, n))


def weighted_logprob_sum(
    config: ModelConfig,
    params: Params,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    coeff_bt: jax.Array,
    *,
    chunk_size: int | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(total, logp_bt, argmax_bt): total = sum_t coeff_bt[:, t] * logp_bt[:, t], differentiable
    in the parameters; logp_bt and argmax_bt as `token_logprobs` returns them, as values only
    (no gradient flows through them). `coeff_bt` [B, T] is data (SFT's token weights), never
    differentiated; position 0 has no log-probability and its coefficient is ignored.

    For a loss linear in the token log-probabilities with known coefficients (SFT's NLL), the LM
    head's gradient is known in the forward pass: each chunk's logit gradient coeff * (onehot -
    softmax) is turned into the hidden states' and the head's gradients right there, and the
    backward only scales them by the incoming cotangent. The head costs three matmuls of [B, T]
    x [D, V] instead of `token_logprobs`' four (its backward recomputes each chunk's logits), and
    still never holds [B, T, V] float32 logits. The head's gradient [D, V] (float32) is kept from
    the forward to the backward.
    """
    if chunk_size is not None and chunk_size < 1:  # before the layers run, not after
        raise ValueError(f"chunk_size={chunk_size}; expected a positive number of positions")
    b, t = input_ids.shape
    hidden_btd = hidden_states(config, params, input_ids, attention_mask)
    if t < 2:
        zero = jnp.sum(hidden_btd) * 0.0
        return zero.astype(jnp.float32), jnp.zeros((b, t), jnp.float32), jnp.zeros((b, t), bool)
    n = t - 1
    chunk = min(chunk_size or _default_chunk(b, n, config.vocab_size), n)
    w_dv = lm_head_kernel(config, params).astype(config.compute_dtype)
    total, logp_bn, hit_bn = _fused_head(hidden_btd[:, :-1], w_dv, input_ids[:, 1:],
                                         coeff_bt[:, 1:].astype(jnp.float32), chunk, config.final_logit_softcapping)
    return (total,) + _from_position_one(jax.lax.stop_gradient(logp_bn), hit_bn)


def _from_position_one(logp_bn: jax.Array, hit_bn: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[B, T] log-probabilities and hits from those of positions 1..T-1 (position 0: 0, False)."""
    b = logp_bn.shape[0]
    return (jnp.concatenate([jnp.zeros((b, 1), jnp.float32), logp_bn], axis=1),
            jnp.concatenate([jnp.zeros((b, 1), bool), hit_bn], axis=1))


def _head_chunks(chunk: int, *xs_bn: jax.Array) -> tuple[jax.Array, ...]:
    """[chunks, B, C, ...] views of [B, N, ...] arrays for a scan over chunks of N positions, the
    tail padded with zeros (a zero coefficient; padded positions are dropped by `_unchunk`)."""
    b, n = xs_bn[0].shape[:2]
    chunks = -(-n // chunk)
    pad = chunks * chunk - n

    def split(x: jax.Array) -> jax.Array:
        x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
        return jnp.swapaxes(x.reshape((b, chunks, chunk) + x.shape[2:]), 0, 1)

    return tuple(split(x) for x in xs_bn)


def _unchunk(x_cbc: jax.Array, n: int) -> jax.Array:
    return jnp.swapaxes(x_cbc, 0, 1).reshape((x_cbc.shape[1], -1) + x_cbc.shape[3:])[:, :n]


def _head_chunk(h_bcd: jax.Array, w_dv: jax.Array, y_bc: jax.Array, cap: float | None):
    """One chunk's float32 (soft-capped) logits, log-probabilities of the targets, argmax hits,
    log-sum-exp.

    `project`: under autodiff (`logprobs_from_hidden`) its written-out gradient keeps XLA:CPU from
    transposing the [B, C, V] logit gradient for the LM head's weight gradient (SmolLM2
    vocabulary, 8 x 256 tokens on 2 cores: the head's loss and gradient 3.4 -> 2.5 s)."""
    logits_bcv = project(h_bcd, w_dv, preferred_element_type=jnp.float32)
    logits_bcv = sharding.constrain(softcap(logits_bcv, cap), sharding.ACT_VOCAB)
    lse_bc = jax.nn.logsumexp(logits_bcv, axis=-1)
    logp_bc = jnp.take_along_axis(logits_bcv, y_bc[..., None], axis=-1)[..., 0] - lse_bc
    return logits_bcv, logp_bc, jnp.argmax(logits_bcv, axis=-1) == y_bc, lse_bc


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _fused_head(h_bnd: jax.Array, w_dv: jax.Array, y_bn: jax.Array, c_bn: jax.Array, chunk: int,
                cap: float | None):
    """(sum c * logp, logp [B, N], hits [B, N]) over chunks of N positions, values only."""
    n = y_bn.shape[1]

    def body(total, xs):
        h_bcd, y_bc, c_bc = xs
        _, logp_bc, hit_bc, _ = _head_chunk(h_bcd, w_dv, y_bc, cap)
        return total + jnp.sum(c_bc * logp_bc), (logp_bc, hit_bc)

    total, (logp, hit) = jax.lax.scan(body, jnp.float32(0.0), _head_chunks(chunk, h_bnd, y_bn, c_bn))
    return total, _unchunk(logp, n), _unchunk(hit, n)


def _fused_head_fwd(h_bnd, w_dv, y_bn, c_bn, chunk, cap):
    n = y_bn.shape[1]

    def body(carry, xs):
        total, dw_dv = carry
        h_bcd, y_bc, c_bc = xs
        logits_bcv, logp_bc, hit_bc, lse_bc = _head_chunk(h_bcd, w_dv, y_bc, cap)
        # d(sum c * logp) / dlogits = c * (onehot(y) - softmax), float32.
        g_bcv = -jnp.exp(logits_bcv - lse_bc[..., None])
        g_bcv = g_bcv + jax.nn.one_hot(y_bc, g_bcv.shape[-1], dtype=g_bcv.dtype)
        g_bcv = g_bcv * c_bc[..., None]
        if cap is not None:  # through the cap: d(c tanh(z / c)) / dz = 1 - (capped / c)^2
            g_bcv = g_bcv * (1.0 - jnp.square(logits_bcv / cap))
        dh_bcd = jnp.einsum("bcv,dv->bcd", g_bcv, w_dv.astype(jnp.float32)).astype(h_bcd.dtype)
        # The narrower operand (h, D wide) on the left, as `_project_bwd` does: no transpose of g.
        dw_dv = dw_dv + jnp.tensordot(h_bcd.astype(jnp.float32), g_bcv, axes=((0, 1), (0, 1)))
        return (total + jnp.sum(c_bc * logp_bc), dw_dv), (logp_bc, hit_bc, dh_bcd)

    init = (jnp.float32(0.0), jnp.zeros(w_dv.shape, jnp.float32))
    (total, dw_dv), (logp, hit, dh) = jax.lax.scan(body, init, _head_chunks(chunk, h_bnd, y_bn, c_bn))
    out = (total, _unchunk(logp, n), _unchunk(hit, n))
    return out, (_unchunk(dh, n), dw_dv.astype(w_dv.dtype), y_bn, c_bn)


def _fused_head_bwd(chunk, cap, res, cotangents):
    del chunk, cap
    dh_bnd, dw_dv, y_bn, c_bn = res
    g = cotangents[0]  # the log-probabilities and hits are values only (stop_gradient outside)
    return ((g * dh_bnd).astype(dh_bnd.dtype), (g * dw_dv).astype(dw_dv.dtype),
            np.zeros(y_bn.shape, jax.dtypes.float0), jnp.zeros_like(c_bn))


_fused_head.defvjp(_fused_head_fwd, _fused_head_bwd)


def sequence_logprobs(
    config: ModelConfig,
    params: Params,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    response_mask: jax.Array,
) -> jax.Array:
    """[B] float32: sum over positions t with response_mask[:, t] == 1 of log p(ids[t] | ids[:t]).

    The policy log-likelihood of a response given its prompt (DPO's log pi(y|x)); t = 0 adds 0.
    """
    logp_bt, _ = token_logprobs(config, params, input_ids, attention_mask)
    return jnp.sum(logp_bt * response_mask.astype(jnp.float32), axis=-1)
