"""The decoder's small layers: RMSNorm, weight projections (with their hand-written backward),
the gated MLP, embeddings, and the tanh soft cap."""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from apo_jax import sharding
from apo_jax.models import quant
from apo_jax.models.config import ModelConfig


class RMSNorm(nn.Module):
    """RMSNorm over the last axis. LLaMA's form: normalise in float32, cast to the compute dtype,
    scale by w. Gemma's (`norm_unit_offset`): scale by (1 + w) in float32, then cast."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        init = nn.initializers.zeros if cfg.norm_unit_offset else nn.initializers.ones
        scale = self.param("scale", init, (x.shape[-1],), cfg.weight_dtype)
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + cfg.rms_norm_eps)
        if cfg.norm_unit_offset:
            return (xf * (1.0 + scale.astype(jnp.float32))).astype(cfg.compute_dtype)
        return scale.astype(cfg.compute_dtype) * xf.astype(cfg.compute_dtype)


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """cap * tanh(x / cap) (Gemma 2's attention and final logits); identity for cap None."""
    return x if cap is None else cap * jnp.tanh(x / cap)


class Linear(nn.Module):
    """One projection under its HF module name (param paths read `attn/q_proj/kernel`): the kernel
    [in..., out...] and, with `bias`, a bias of the output shape, both cast to the compute dtype."""

    config: ModelConfig
    shape: tuple[int, ...]
    n_in: int = 1
    bias: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        w = self.param("kernel", nn.initializers.normal(stddev=0.02), self.shape, cfg.weight_dtype)
        # A QLoRA base kernel (`models.quant`) is dequantized here, this layer's only.
        y = project(x, quant.dequantize(w, cfg.compute_dtype), self.n_in)
        if self.bias:
            b = self.param("bias", nn.initializers.zeros, self.shape[self.n_in:], cfg.weight_dtype)
            y = y + b.astype(cfg.compute_dtype)
        # A LoRA adapter (`models.lora`): present in the params (a loaded, trained or fresh adapter),
        # or created by `init_params` on a targeted projection. Merged params have none.
        if self.has_variable("params", "lora_a") or (
                self.is_initializing() and cfg.lora_rank and self.name in cfg.lora_targets):
            y = y + lora_delta(self, x)
        return y


def lora_delta(linear: "Linear", x: jax.Array) -> jax.Array:
    """(alpha / r) * (x A) B: A [in..., r] (PEFT's kaiming-uniform init), B [r, out...] (zeros),
    both float32 master weights cast to the compute dtype; r is read from A's shape."""
    cfg = linear.config
    rank = cfg.lora_rank
    fan_in = math.prod(linear.shape[:linear.n_in])
    bound = 1.0 / math.sqrt(fan_in)
    a_init = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)  # noqa: E731
    a = linear.param("lora_a", a_init, linear.shape[:linear.n_in] + (rank,), jnp.float32)
    b = linear.param("lora_b", nn.initializers.zeros, (a.shape[-1],) + linear.shape[linear.n_in:], jnp.float32)
    scale = cfg.lora_alpha / a.shape[-1]
    # x A [.., r] is named "proj" (kept by the remat policies: r values a token); (x A) B, as wide
    # as the projection's own output, is not: keeping it would double what a layer saves.
    xa = project(x, a.astype(cfg.compute_dtype), linear.n_in)
    return (scale * _project(xa, b.astype(cfg.compute_dtype), 1, None)).astype(x.dtype)


def project(x: jax.Array, w: jax.Array, n_in: int = 1, preferred_element_type: Any = None) -> jax.Array:
    """`x @ w` over x's last `n_in` axes and w's first: every weight projection of a layer, and the
    LM head (with `preferred_element_type=float32`: float32 logits from bfloat16 operands).

    The output is named "proj" for the remat policies. The forward is the plain `dot_general`; the
    backward is written out (`_project`) so the weight gradient contracts over batch x length with
    the narrower of (x, dy) on the left. With the autodiff rule XLA's CPU backend transposed the
    wider one ([B*T, F] of the MLP) inside the elementwise fusion before it, a strided write that
    took as long as the matmul itself; on GPU and TPU the order is immaterial.
    """
    return checkpoint_name(_project(x, w, n_in, preferred_element_type), "proj")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _project(x: jax.Array, w: jax.Array, n_in: int, preferred_element_type: Any) -> jax.Array:
    return jnp.tensordot(x, w, axes=n_in, preferred_element_type=preferred_element_type)


def _project_fwd(x: jax.Array, w: jax.Array, n_in: int, preferred_element_type: Any) -> tuple[jax.Array, tuple]:
    return _project(x, w, n_in, preferred_element_type), (x, w)


def _project_bwd(n_in: int, preferred_element_type: Any, res: tuple, dy: jax.Array) -> tuple[jax.Array, jax.Array]:
    # dy has the output's dtype (float32 under `preferred_element_type`): the products below are
    # taken in it, as autodiff's own rule for a dot with a preferred type does.
    del preferred_element_type
    x, w = res
    n_out = w.ndim - n_in
    n_batch = x.ndim - n_in
    out_axes = tuple(range(n_in, w.ndim))
    dx = jnp.tensordot(dy, w, axes=(tuple(range(n_batch, dy.ndim)), out_axes)).astype(x.dtype)
    batch_axes = tuple(range(n_batch))
    if math.prod(x.shape[n_batch:]) <= math.prod(dy.shape[n_batch:]):
        dw = jnp.tensordot(x, dy, axes=(batch_axes, batch_axes))
    else:
        dw_out_in = jnp.tensordot(dy, x, axes=(batch_axes, batch_axes))
        dw = jnp.transpose(dw_out_in, tuple(range(n_out, w.ndim)) + tuple(range(n_out)))
    return dx, dw.astype(w.dtype)


_project.defvjp(_project_fwd, _project_bwd)

_ACTIVATIONS = {
    "silu": nn.silu,
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
}


class MLP(nn.Module):
    """The gated MLP: down(act(gate(x)) * up(x)); SwiGLU (silu) or GeGLU (tanh-GELU)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_btd: jax.Array) -> jax.Array:
        cfg = self.config
        d, f, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        gate_btf = Linear(cfg, (d, f), bias=bias, name="gate_proj")(x_btd)
        up_btf = Linear(cfg, (d, f), bias=bias, name="up_proj")(x_btd)
        hidden_btf = sharding.constrain(_ACTIVATIONS[cfg.hidden_act](gate_btf) * up_btf, sharding.ACT_MLP)
        return Linear(cfg, (f, d), bias=bias, name="down_proj")(hidden_btf)


class Embed(nn.Module):
    """Token embeddings [V, D], times sqrt(D) in the parameter dtype with `scale_embeddings` (Gemma)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, input_ids_bt: jax.Array) -> jax.Array:
        cfg = self.config
        shape = (cfg.vocab_size, cfg.hidden_size)
        embedding = self.param("embedding", nn.initializers.normal(stddev=0.02), shape, cfg.weight_dtype)
        x_btd = jnp.take(embedding, input_ids_bt, axis=0)
        if cfg.scale_embeddings:
            x_btd = x_btd * jnp.asarray(math.sqrt(cfg.hidden_size), embedding.dtype)
        return x_btd.astype(cfg.compute_dtype)
