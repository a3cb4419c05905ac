"""Rotary embeddings (transformers' `_compute_*_parameters` + `rotate_half`), per layer kind."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from apo_jax.models.config import ModelConfig


def rope_inv_freq(config: ModelConfig, seq_len: jax.Array | None = None, *, local: bool = False) -> jax.Array:
    """Inverse frequencies [h/2] in float32 for the configured RoPE scaling.

    `seq_len` (a traced scalar: max position + 1 in the batch) only matters for `dynamic`
    scaling, which grows the base once sequences exceed the trained context. `local`: the
    sliding-window layers' frequencies when they have their own base (`rope_local_theta`, unscaled).
    """
    dim = config.head_dim
    exponents = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
    if local and config.rope_local_theta is not None:
        return 1.0 / (config.rope_local_theta**exponents)
    base = config.rope_theta
    scaling = config.rope_scaling_dict
    rope_type = scaling.get("rope_type", "default")
    if rope_type == "linear":
        return 1.0 / (base**exponents) / scaling["factor"]
    if rope_type == "dynamic":
        factor = scaling["factor"]
        max_pos = config.max_position_embeddings  # as transformers does, not the "original" length
        seq_len = jnp.asarray(max_pos if seq_len is None else seq_len, jnp.float32)
        seq_len = jnp.maximum(seq_len, max_pos)
        dyn_base = base * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
        return 1.0 / (dyn_base**exponents)
    inv_freq = 1.0 / (base**exponents)
    if rope_type == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return jnp.where(is_medium, smoothed, scaled)
    return inv_freq


def rope_cos_sin(config: ModelConfig, positions_bt: jax.Array, *, local: bool = False) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, h] in float32, each frequency repeated twice as in HF (rotate-half)."""
    dynamic = config.rope_scaling_dict.get("rope_type") == "dynamic" and not (local and config.rope_local_theta)
    seq_len = jnp.max(positions_bt) + 1 if dynamic else None
    inv_freq = rope_inv_freq(config, seq_len, local=local)
    angles = positions_bt.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def rope_tables(config: ModelConfig, positions_bt: jax.Array) -> jax.Array:
    """cos and sin for every layer kind the stack has: [kinds, 2, B, T, h] float32; kind 0 is the
    global (full-attention) RoPE, kind 1, present only with `rope_local_theta`, the local one."""
    kinds = [rope_cos_sin(config, positions_bt)]
    if config.rope_local_theta is not None and any(config.sliding_layers):
        kinds.append(rope_cos_sin(config, positions_bt, local=True))
    return jnp.stack([jnp.stack(cs) for cs in kinds])


def apply_rope(x_btnh: jax.Array, cos_bth: jax.Array, sin_bth: jax.Array) -> jax.Array:
    half = x_btnh.shape[-1] // 2
    rotated = jnp.concatenate([-x_btnh[..., half:], x_btnh[..., :half]], axis=-1)
    cos, sin = cos_bth[:, :, None, :], sin_bth[:, :, None, :]
    return (x_btnh.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x_btnh.dtype)
