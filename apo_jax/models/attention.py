"""Attention: the block (q/k/v/o projections, q/k norms, RoPE, KV cache) and its kernels.

Kernels: `_xla_attention` (dense grouped-query softmax, the decode and short-sequence path),
`_blocked_causal_attention` (128-row query blocks, no dense T x T logits; long forwards without a
cache) and `causal_length_attention` (`jax.nn.dot_product_attention`, cuDNN's flash path on GPU).
Every kernel takes a sliding `window` (None, a Python int, or a traced per-layer scalar inside the
layer scan: full layers of a mixed stack get `FULL_WINDOW`) and the attention-logit soft cap.
"""

from __future__ import annotations

import functools
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from apo_jax import sharding
from apo_jax.models.config import ModelConfig
from apo_jax.models.layers import Linear, RMSNorm, softcap
from apo_jax.models.rope import apply_rope

Cache = dict[str, jax.Array]
Window = int | jax.Array | None

FULL_WINDOW = 1 << 30
"""The window of a full-attention layer in a stack that mixes kinds (no query sees that far back)."""


class Attention(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(
        self,
        x_btd: jax.Array,
        cos_bth: jax.Array,
        sin_bth: jax.Array,
        kv_mask_bs: jax.Array,
        cache: Cache | None,
        cache_index: jax.Array | int,
        layer: jax.Array | int = 0,
        window: Window = None,
    ) -> tuple[jax.Array, Cache | None]:
        """Queries sit at slots [cache_index, cache_index + T); each attends the slots s <= its own
        (and, with a `window` W, s > its own - W) whose `kv_mask_bs` is True (no cache: S = T,
        cache_index = 0, kv_mask = the padding mask)."""
        cfg = self.config
        d, n, k, h = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q_btnh = Linear(cfg, (d, n, h), bias=cfg.qkv_bias, name="q_proj")(x_btd)
        k_btkh = Linear(cfg, (d, k, h), bias=cfg.qkv_bias, name="k_proj")(x_btd)
        v_btkh = Linear(cfg, (d, k, h), bias=cfg.qkv_bias, name="v_proj")(x_btd)
        if cfg.qk_norm:
            q_btnh = RMSNorm(cfg, name="q_norm")(q_btnh)
            k_btkh = RMSNorm(cfg, name="k_norm")(k_btkh)
        q_btnh = sharding.constrain(apply_rope(q_btnh, cos_bth, sin_bth), sharding.ACT_HEADS)
        k_btkh = sharding.constrain(apply_rope(k_btkh, cos_bth, sin_bth), sharding.ACT_KV_HEADS)
        v_btkh = sharding.constrain(v_btkh, sharding.ACT_KV_HEADS)

        if cache is not None:
            # The stacked cache [L, B, S, K, h] holds every layer and slot; this call writes layer
            # `layer`'s slots [cache_index, cache_index + T) in place (the cache is a loop carry, so
            # XLA updates its buffer rather than copying it) and reads that layer back.
            start = (layer, 0, cache_index, 0, 0)
            cache = {
                "k": jax.lax.dynamic_update_slice(cache["k"], k_btkh.astype(cache["k"].dtype)[None], start),
                "v": jax.lax.dynamic_update_slice(cache["v"], v_btkh.astype(cache["v"].dtype)[None], start),
            }
            k_bskh = jax.lax.dynamic_index_in_dim(cache["k"], layer, 0, keepdims=False)
            v_bskh = jax.lax.dynamic_index_in_dim(cache["v"], layer, 0, keepdims=False)
        else:
            k_bskh, v_bskh = k_btkh, v_btkh
        k_bskh = k_bskh.astype(cfg.compute_dtype)
        v_bskh = v_bskh.astype(cfg.compute_dtype)

        scale, cap = cfg.attention_scale, cfg.attn_logit_softcapping
        if cfg.attention_impl == "cudnn" and cap is None and cache is None:
            out_btnh = causal_length_attention(q_btnh, k_bskh, v_bskh, kv_mask_bs, "cudnn", scale=scale,
                                               window=window, width=cfg.sliding_window)
        elif cache is None and q_btnh.shape[1] > ATTENTION_BLOCK:
            out_btnh = _remat(_blocked_causal_attention, window, q_btnh, k_bskh, v_bskh, kv_mask_bs,
                              scale=scale, cap=cap)
        else:
            # Forwards with a cache (left-padded prefill, one-token decode) take the XLA path under
            # either setting: their visible slots are not a prefix, so cuDNN would need the dense
            # mask as a bias, and decode (T = 1) is bound by reading the cache, not by this math.
            out_btnh = _remat(_xla_attention, window, q_btnh, k_bskh, v_bskh, kv_mask_bs, cache_index,
                              scale=scale, cap=cap)
        out_btnh = checkpoint_name(sharding.constrain(out_btnh, sharding.ACT_HEADS), "attn_out")
        return Linear(cfg, (n, h, d), n_in=2, bias=cfg.o_bias, name="o_proj")(out_btnh), cache


def layer_impls(config: ModelConfig) -> tuple[str, ...]:
    """The attention path each layer's forward without a cache takes: "cudnn" where asked for and
    cuDNN can run it, else "xla" (soft-capped attention logits: cuDNN has no tanh cap)."""
    if config.attention_impl != "cudnn":
        return ("xla",) * config.num_hidden_layers
    if config.attn_logit_softcapping is not None:
        return ("xla",) * config.num_hidden_layers
    return ("cudnn",) * config.num_hidden_layers


@functools.lru_cache(maxsize=None)
def log_attention_plan(config: ModelConfig) -> None:
    """Logs once per config which attention path its layers take, when that is not what was asked."""
    impls = layer_impls(config)
    if config.attention_impl == "cudnn" and "xla" in impls:
        logging.info("attention_impl='cudnn': %d of %d layers take the XLA path (attention-logit soft-capping "
                     "%s, which cuDNN does not run)", impls.count("xla"), len(impls), config.attn_logit_softcapping)


def causal_slot_mask(kv_mask_bs: jax.Array, t: int, q_start: jax.Array | int = 0, window: Window = None) -> jax.Array:
    """[B, T, S] boolean: query t (at slot q_start + t) sees slot s iff s <= its slot, kv_mask, and
    (with a window W) s > its slot - W."""
    s = kv_mask_bs.shape[-1]
    q_slot = (q_start + jnp.arange(t))[:, None]
    visible_ts = jnp.arange(s)[None, :] <= q_slot
    if window is not None:
        visible_ts = visible_ts & (jnp.arange(s)[None, :] > q_slot - window)
    return visible_ts[None] & kv_mask_bs.astype(bool)[:, None, :]


def causal_length_attention(
    q_btnh: jax.Array, k_btkh: jax.Array, v_btkh: jax.Array, mask_bt: jax.Array, implementation: str | None,
    *, scale: float | None = None, window: Window = None, width: int | None = None,
) -> jax.Array:
    """Causal attention over right-padded rows, given as sequence lengths, with no dense mask.

    This is cuDNN's causal flash path (PADDING_CAUSAL: masked blocks are skipped, no [B, 1, T, S]
    bias is read or differentiated). It needs each row's real tokens to be a prefix, which every
    forward without a cache has here (`data.tokenize.pad_right`); a row padded otherwise comes
    out NaN (so a loss shows it) rather than silently wrong. An all-padding row gets length 1
    (its outputs are never used; length 0 gives NaNs that a 0 weight would not cancel). A sliding
    `window` W is cuDNN's local window (W - 1 keys back); a traced per-layer window (a stack that
    mixes kinds, whose sliding layers have the window `width`) picks the windowed or the full program
    per layer with `lax.cond`.
    """
    mask_bt = mask_bt.astype(jnp.int32)
    lengths_b = jnp.sum(mask_bt, axis=-1)
    prefix_b = jnp.all(mask_bt == (jnp.arange(mask_bt.shape[-1])[None, :] < lengths_b[:, None]), axis=-1)
    lengths_b = jnp.maximum(lengths_b, 1)

    def run(local: int | None) -> jax.Array:
        return jax.nn.dot_product_attention(
            q_btnh, k_btkh, v_btkh, scale=scale, is_causal=True, query_seq_lengths=lengths_b,
            key_value_seq_lengths=lengths_b, local_window_size=None if local is None else (local - 1, 0),
            implementation=implementation)

    if window is None or isinstance(window, int):
        out_btnh = run(window)
    else:
        out_btnh = jax.lax.cond(window < FULL_WINDOW, lambda: run(width), lambda: run(None))
    return jnp.where(prefix_b[:, None, None, None], out_btnh, jnp.nan)


def _logits(q_rows: jax.Array, k_keys: jax.Array, spec: str, scale: float | None, cap: float | None) -> jax.Array:
    """float32 attention logits q.k * scale (default head_dim ** -0.5), soft-capped (Gemma 2) before
    masking, as HF does."""
    scale = q_rows.shape[-1] ** -0.5 if scale is None else scale
    return softcap(jnp.einsum(spec, q_rows, k_keys, preferred_element_type=jnp.float32) * np.float32(scale), cap)


def _remat(kernel, window: Window, *arrays: jax.Array, **static) -> jax.Array:
    """`kernel(*arrays, window=window, **static)` rematerialised (`jax.checkpoint`): the backward
    recomputes the float32 logits and probabilities from q, k, v (already kept for their
    projections' gradients) instead of keeping them per layer. A static window (None or an int)
    stays a Python value, so the blocked kernel can skip key blocks with it."""
    if window is None or isinstance(window, int):
        return jax.checkpoint(lambda *a: kernel(*a, window=window, **static))(*arrays)
    return jax.checkpoint(lambda w, *a: kernel(*a, window=w, **static))(window, *arrays)


# Rematerialised (`_remat`): the backward recomputes the float32 [B, K, G, T, S] logits and probabilities
# from q, k, v (already kept for their projections' gradients) instead of keeping them per layer.
# That is the bulk of a layer's residuals at T = S = 256 and grows as T^2; recomputing costs one
# QK^T and a softmax, a few percent of a layer's FLOPs (the projections and MLP dominate).
def _xla_attention(
    q_btnh: jax.Array, k_bskh: jax.Array, v_bskh: jax.Array, kv_mask_bs: jax.Array, q_start: jax.Array | int,
    window: Window = None, *, scale: float | None = None, cap: float | None = None,
) -> jax.Array:
    """Grouped-query softmax attention: query heads are reshaped into groups, K/V never copied.

    The [B, T, S] mask is built here from the [B, S] slot mask (an iota compare XLA fuses into the
    select), not passed in: nothing of size T x S is kept or carried through the layer scan.
    """
    b, t, n, h = q_btnh.shape
    mask_bts = causal_slot_mask(kv_mask_bs, t, q_start, window)
    k = k_bskh.shape[2]
    q_btkgh = q_btnh.reshape(b, t, k, n // k, h)
    logits_bkgts = _logits(q_btkgh, k_bskh, "btkgh,bskh->bkgts", scale, cap)
    # A finite floor instead of -inf keeps fully masked (padding) rows NaN-free.
    logits_bkgts = jnp.where(mask_bts[:, None, None], logits_bkgts, jnp.finfo(jnp.float32).min)
    probs_bkgts = jax.nn.softmax(logits_bkgts, axis=-1).astype(v_bskh.dtype)
    out_btkgh = jnp.einsum("bkgts,bskh->btkgh", probs_bkgts, v_bskh)
    return out_btkgh.reshape(b, t, n, h)


ATTENTION_BLOCK = 128
"""Query rows per block of `_blocked_causal_attention` (grown so a sequence has at most 16 blocks).
Forwards of at most this many tokens without a cache take the dense `_xla_attention`."""


def attention_block(t: int) -> int:
    """The query block of a T-token forward: 128 rows, or T / 16 rounded up to a multiple of 128."""
    blocks = -(-t // ATTENTION_BLOCK)
    return ATTENTION_BLOCK * -(-blocks // 16) if blocks > 16 else ATTENTION_BLOCK


# Rematerialised like `_xla_attention` (`_remat`). Queries go in blocks of `attention_block(T)` rows; block i
# reads only the keys before its end (the causal triangle's blocks above the diagonal are never
# computed), and with a static sliding window only those after its start - W (the band), so it
# does ~(n + 1) / 2n of the dense work for n blocks, and its float32 logits are a block's, not the
# whole [B, K, G, T, T]: a dense T x T tensor is freshly allocated memory on every call, which on a
# CPU costs as much as the arithmetic (on 2 cores, SmolLM2 width, 16 x 256 tokens: ~72 ms forward
# and ~150 ms forward + backward, against 154 and 277 ms dense).
def _blocked_causal_attention(
    q_btnh: jax.Array, k_btkh: jax.Array, v_btkh: jax.Array, kv_mask_bt: jax.Array, window: Window = None,
    *, scale: float | None = None, cap: float | None = None,
) -> jax.Array:
    """Causal grouped-query attention with no cache (S = T): query t sees the slots s <= t (and
    s > t - W with a window W) whose `kv_mask_bt` is True. Equal to `_xla_attention(..., q_start=0)`
    on every query that sees at least one slot (a query that sees none, a padding position,
    averages its block's visible values instead of all T; its output is never read).

    Queries are laid out [B, K, T, G, h], so a block's queries of one KV head are G x block
    contiguous rows and both products are plain batched matmuls over (B, K) (forward + backward
    ~8% faster on CPU than with G as a batch axis; the same values)."""
    b, t, n, h = q_btnh.shape
    kh = k_btkh.shape[2]
    g = n // kh
    block = attention_block(t)
    q_bktgh = jnp.transpose(q_btnh.reshape(b, t, kh, g, h), (0, 2, 1, 3, 4))
    k_bksh = jnp.transpose(k_btkh, (0, 2, 1, 3))
    v_bksh = jnp.transpose(v_btkh, (0, 2, 1, 3))
    kv_mask_bt = kv_mask_bt.astype(bool)
    outs = []
    for start in range(0, t, block):
        end = min(start + block, t)
        # A static window lets the block skip the keys every one of its queries is past.
        lo = max(0, start - window + 1) if isinstance(window, int) else 0
        rows_bkrh = q_bktgh[:, :, start:end].reshape(b, kh, (end - start) * g, h)
        logits_bkrs = _logits(rows_bkrh, k_bksh[:, :, lo:end], "bkrh,bksh->bkrs", scale, cap)
        logits_bkqgs = logits_bkrs.reshape(b, kh, end - start, g, end - lo)
        mask_bqs = causal_slot_mask(kv_mask_bt[:, lo:end], end - start, start - lo, window)
        logits_bkqgs = jnp.where(mask_bqs[:, None, :, None], logits_bkqgs, jnp.finfo(jnp.float32).min)
        probs_bkrs = jax.nn.softmax(logits_bkqgs, axis=-1).astype(v_bksh.dtype).reshape(b, kh, -1, end - lo)
        out_bkrh = jnp.einsum("bkrs,bksh->bkrh", probs_bkrs, v_bksh[:, :, lo:end])
        outs.append(out_bkrh.reshape(b, kh, end - start, g, h))
    out_bktgh = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=2)
    return jnp.transpose(out_bktgh, (0, 2, 1, 3, 4)).reshape(b, t, n, h)
