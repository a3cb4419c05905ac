"""A functional Flax (linen) LLaMA with two heads: the LM head (policy) and a scalar reward head (RM).

Numerics follow `transformers`' `modeling_llama` so Hugging Face weights load without any
permutation: RMSNorm in float32, rotate-half RoPE (with the `linear`, `dynamic` and `llama3`
scalings), grouped-query attention by reshape + einsum (K/V heads are never copied), SwiGLU MLP.

Parameters are an explicit pytree; the layer stack is always stored stacked along a leading
`layers` axis (so one HF key table maps every checkpoint) and run with `nn.scan`:

    {"model": {"embed": {"embedding": [V, D]},
               "layers": {"attn_norm": {"scale": [L, D]},
                          "attn": {"q_proj": {"kernel": [L, D, H, Dh]},
                                   "k_proj": {"kernel": [L, D, K, Dh]},
                                   "v_proj": {"kernel": [L, D, K, Dh]},
                                   "o_proj": {"kernel": [L, H, Dh, D]}},
                          "mlp_norm": {"scale": [L, D]},
                          "mlp": {"gate_proj": {"kernel": [L, D, F]},
                                  "up_proj": {"kernel": [L, D, F]},
                                  "down_proj": {"kernel": [L, F, D]}}},
               "final_norm": {"scale": [D]}},
     "lm_head": {"kernel": [D, V]},     # absent when embeddings are tied
     "score": {"kernel": [D, 1]}}       # the reward head; absent for a policy

Shape suffixes: b batch, t query length, s key length (cache slots), d model width, n query heads,
k key/value heads, g query heads per K/V head, h head dim, f MLP width, v vocabulary, l layers.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from apo_jax import sharding

Params = Mapping[str, Any]
Cache = dict[str, jax.Array]

REMAT_POLICIES = ("auto", "none", "minimal", "full", "dots", "dots_no_batch")
ATTENTION_IMPLS = ("xla", "cudnn")
ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture (the HF `config.json` fields) plus how to run it (dtypes, scan, remat)."""

    vocab_size: int = 32000
    """Number of token embeddings."""
    hidden_size: int = 4096
    """Model width D."""
    intermediate_size: int = 11008
    """SwiGLU width F."""
    num_hidden_layers: int = 32
    """Number of decoder blocks L."""
    num_attention_heads: int = 32
    """Query heads H."""
    num_key_value_heads: int = 32
    """Key/value heads K (H % K == 0; K < H is grouped-query attention)."""
    head_dim: int = 0
    """Per-head width; 0 means hidden_size // num_attention_heads."""
    max_position_embeddings: int = 2048
    """Context length the model was trained for (used by dynamic RoPE scaling)."""
    rms_norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    rope_theta: float = 10000.0
    """RoPE base."""
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    """HF `rope_scaling` as sorted (key, value) pairs (hashable); None for plain RoPE."""
    tie_word_embeddings: bool = False
    """Whether the LM head reuses the embedding matrix."""
    bos_token_id: int | None = 1
    """Beginning-of-sequence id."""
    eos_token_id: int | tuple[int, ...] | None = 2
    """End-of-sequence id (or ids, as LLaMA-3 configs have)."""
    pad_token_id: int | None = None
    """Padding id (written to exported RM configs so HF pools the right token)."""
    # How to run it; not part of the checkpoint.
    param_dtype: str = "float32"
    """Storage dtype of parameters: float32 (master weights) or bfloat16."""
    dtype: str = "float32"
    """Compute dtype of activations and matmuls: float32 or bfloat16."""
    scan_layers: bool = True
    """Run the layer stack as a rolled `scan` (fast compiles); False unrolls it."""
    remat_policy: str = "auto"
    """Rematerialisation per layer (see `remat_for`): auto (by activation size), none, minimal,
    full, dots, dots_no_batch."""
    attention_impl: str = "xla"
    """xla (portable einsum attention) or cudnn (`jax.nn.dot_product_attention`, GPU only)."""

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if isinstance(self.rope_scaling, Mapping):
            object.__setattr__(self, "rope_scaling", _freeze(self.rope_scaling))
        problems = []
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            problems.append(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.remat_policy not in REMAT_POLICIES:
            problems.append(f"remat_policy={self.remat_policy!r}; expected one of {REMAT_POLICIES}")
        if self.attention_impl not in ATTENTION_IMPLS:
            problems.append(
                f"attention_impl={self.attention_impl!r}; expected one of {ATTENTION_IMPLS}"
            )
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in _DTYPES:
                problems.append(f"{name}={getattr(self, name)!r}; expected one of {tuple(_DTYPES)}")
        rope_type = self.rope_scaling_dict.get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            problems.append(f"rope_scaling type {rope_type!r} is not supported; expected {ROPE_TYPES}")
        if problems:
            raise ValueError("Invalid LlamaConfig: " + "; ".join(problems))

    @property
    def rope_scaling_dict(self) -> dict[str, Any]:
        return dict(self.rope_scaling or ())

    @property
    def compute_dtype(self) -> jnp.dtype:
        return _DTYPES[self.dtype]

    @property
    def weight_dtype(self) -> jnp.dtype:
        return _DTYPES[self.param_dtype]

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    def replace(self, **changes: Any) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict of every field (the inverse of `from_json`)."""
        d = dataclasses.asdict(self)
        d["rope_scaling"] = [list(kv) for kv in self.rope_scaling] if self.rope_scaling else None
        if isinstance(self.eos_token_id, tuple):
            d["eos_token_id"] = list(self.eos_token_id)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "LlamaConfig":
        """The config `to_json` wrote (lists back to the tuples a hashable config needs)."""
        d = dict(d)
        if d.get("rope_scaling"):
            d["rope_scaling"] = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in d["rope_scaling"])
        if isinstance(d.get("eos_token_id"), list):
            d["eos_token_id"] = tuple(d["eos_token_id"])
        return cls(**d)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], **runtime: Any) -> "LlamaConfig":
        """Builds a config from a HF LLaMA `config.json` dict (transformers 4.x or 5.x layout)."""
        model_type = hf.get("model_type")
        if model_type not in ("llama", None):
            raise ValueError(f"config.json has model_type={model_type!r}; apo_jax reads 'llama' models")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config.json has hidden_act={hf['hidden_act']!r}; LLaMA uses 'silu'")
        for flag in ("attention_bias", "mlp_bias"):
            if hf.get(flag):
                raise ValueError(f"config.json sets {flag}=true; biases are not supported")
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size",
                               "num_hidden_layers", "num_attention_heads") if k not in hf]
        if missing:
            raise ValueError(f"config.json lacks required LLaMA fields: {', '.join(missing)}")
        # transformers>=5 folds rope_theta and rope_scaling into `rope_parameters`.
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
        if "type" in rope and "rope_type" not in rope:
            rope["rope_type"] = rope.pop("type")
        rope.pop("type", None)
        scaling = None if rope.get("rope_type", "default") == "default" else _freeze(rope)
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=hf["num_attention_heads"],
            num_key_value_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=hf.get("head_dim") or 0,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
            **runtime,
        )

    def to_hf(self) -> dict[str, Any]:
        """The HF `config.json` dict (readable by transformers 4.x and 5.x)."""
        rope = self.rope_scaling_dict
        eos = self.eos_token_id if not isinstance(self.eos_token_id, tuple) else list(self.eos_token_id)
        out = {
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope or None,
            "rope_parameters": {"rope_type": "default", **rope, "rope_theta": self.rope_theta},
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": False,
            "mlp_bias": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": self.param_dtype,
        }
        return out


def _freeze(d: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in d.items()))


# --------------------------------------------------------------------------------------------
# Rotary embeddings (transformers' `_compute_*_parameters` + `rotate_half`).


def rope_inv_freq(config: LlamaConfig, seq_len: jax.Array | None = None) -> jax.Array:
    """Inverse frequencies [h/2] in float32 for the configured RoPE scaling.

    `seq_len` (a traced scalar: max position + 1 in the batch) only matters for `dynamic`
    scaling, which grows the base once sequences exceed the trained context.
    """
    dim = config.head_dim
    base = config.rope_theta
    exponents = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
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


def rope_cos_sin(config: LlamaConfig, positions_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, h] in float32, each frequency repeated twice as in HF (rotate-half)."""
    seq_len = jnp.max(positions_bt) + 1 if config.rope_scaling_dict.get("rope_type") == "dynamic" else None
    inv_freq = rope_inv_freq(config, seq_len)
    angles = positions_bt.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x_btnh: jax.Array, cos_bth: jax.Array, sin_bth: jax.Array) -> jax.Array:
    half = x_btnh.shape[-1] // 2
    rotated = jnp.concatenate([-x_btnh[..., half:], x_btnh[..., :half]], axis=-1)
    cos, sin = cos_bth[:, :, None, :], sin_bth[:, :, None, :]
    return (x_btnh.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x_btnh.dtype)


# --------------------------------------------------------------------------------------------
# Layers.


class RMSNorm(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x_btd: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x_btd.shape[-1],), self.config.weight_dtype)
        x = x_btd.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.config.rms_norm_eps)
        # As HF: normalise in float32, cast back, then scale in the parameter dtype.
        return scale.astype(self.config.compute_dtype) * x.astype(self.config.compute_dtype)


class _Proj(nn.Module):
    """One projection matrix under its HF module name, so param paths read `attn/q_proj/kernel`."""

    config: LlamaConfig
    shape: tuple[int, ...]

    @nn.compact
    def __call__(self) -> jax.Array:
        w = self.param("kernel", nn.initializers.normal(stddev=0.02), self.shape, self.config.weight_dtype)
        return w.astype(self.config.compute_dtype)


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


class Attention(nn.Module):
    config: LlamaConfig

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
    ) -> tuple[jax.Array, Cache | None]:
        """Queries sit at slots [cache_index, cache_index + T); each attends the slots s <= its own
        whose `kv_mask_bs` is True (no cache: S = T, cache_index = 0, kv_mask = the padding mask)."""
        cfg = self.config
        d, n, k, h = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q_btnh = project(x_btd, _Proj(cfg, (d, n, h), name="q_proj")())
        k_btkh = project(x_btd, _Proj(cfg, (d, k, h), name="k_proj")())
        v_btkh = project(x_btd, _Proj(cfg, (d, k, h), name="v_proj")())
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

        if cfg.attention_impl == "cudnn" and cache is None:
            out_btnh = causal_length_attention(q_btnh, k_bskh, v_bskh, kv_mask_bs, "cudnn")
        elif cache is None and q_btnh.shape[1] > ATTENTION_BLOCK:
            out_btnh = _blocked_causal_attention(q_btnh, k_bskh, v_bskh, kv_mask_bs)
        else:
            # Forwards with a cache (left-padded prefill, one-token decode) take the XLA path under
            # either setting: their visible slots are not a prefix, so cuDNN would need the dense
            # mask as a bias, and decode (T = 1) is bound by reading the cache, not by this math.
            out_btnh = _xla_attention(q_btnh, k_bskh, v_bskh, kv_mask_bs, cache_index)
        out_btnh = checkpoint_name(sharding.constrain(out_btnh, sharding.ACT_HEADS), "attn_out")
        o_nhd = _Proj(cfg, (n, h, d), name="o_proj")()
        return project(out_btnh, o_nhd, n_in=2), cache


def causal_slot_mask(kv_mask_bs: jax.Array, t: int, q_start: jax.Array | int = 0) -> jax.Array:
    """[B, T, S] boolean: query t (at slot q_start + t) sees slot s iff s <= its slot and kv_mask."""
    s = kv_mask_bs.shape[-1]
    causal_ts = jnp.arange(s)[None, :] <= (q_start + jnp.arange(t))[:, None]
    return causal_ts[None] & kv_mask_bs.astype(bool)[:, None, :]


def causal_length_attention(
    q_btnh: jax.Array, k_btkh: jax.Array, v_btkh: jax.Array, mask_bt: jax.Array, implementation: str | None
) -> jax.Array:
    """Causal attention over right-padded rows, given as sequence lengths, with no dense mask.

    This is cuDNN's causal flash path (PADDING_CAUSAL: masked blocks are skipped, no [B, 1, T, S]
    bias is read or differentiated). It needs each row's real tokens to be a prefix, which every
    forward without a cache has here (`data.tokenize.pad_right`); a row padded otherwise comes
    out NaN (so a loss shows it) rather than silently wrong. An all-padding row gets length 1
    (its outputs are never used; length 0 gives NaNs that a 0 weight would not cancel).
    """
    mask_bt = mask_bt.astype(jnp.int32)
    lengths_b = jnp.sum(mask_bt, axis=-1)
    prefix_b = jnp.all(mask_bt == (jnp.arange(mask_bt.shape[-1])[None, :] < lengths_b[:, None]), axis=-1)
    lengths_b = jnp.maximum(lengths_b, 1)
    out_btnh = jax.nn.dot_product_attention(
        q_btnh, k_btkh, v_btkh, is_causal=True, query_seq_lengths=lengths_b,
        key_value_seq_lengths=lengths_b, implementation=implementation,
    )
    return jnp.where(prefix_b[:, None, None, None], out_btnh, jnp.nan)


# Rematerialised: the backward recomputes the float32 [B, K, G, T, S] logits and probabilities
# from q, k, v (already kept for their projections' gradients) instead of keeping them per layer.
# That is the bulk of a layer's residuals at T = S = 256 and grows as T^2; recomputing costs one
# QK^T and a softmax, a few percent of a layer's FLOPs (the projections and MLP dominate).
@jax.checkpoint
def _xla_attention(
    q_btnh: jax.Array, k_bskh: jax.Array, v_bskh: jax.Array, kv_mask_bs: jax.Array, q_start: jax.Array | int
) -> jax.Array:
    """Grouped-query softmax attention: query heads are reshaped into groups, K/V never copied.

    The [B, T, S] mask is built here from the [B, S] slot mask (an iota compare XLA fuses into the
    select), not passed in: nothing of size T x S is kept or carried through the layer scan.
    """
    b, t, n, h = q_btnh.shape
    mask_bts = causal_slot_mask(kv_mask_bs, t, q_start)
    k = k_bskh.shape[2]
    q_btkgh = q_btnh.reshape(b, t, k, n // k, h)
    logits_bkgts = jnp.einsum(
        "btkgh,bskh->bkgts", q_btkgh, k_bskh, preferred_element_type=jnp.float32
    ) / np.sqrt(h).astype(np.float32)
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


# Rematerialised like `_xla_attention`. Queries go in blocks of `attention_block(T)` rows; block i
# reads only the keys before its end (the causal triangle's blocks above the diagonal are never
# computed), so it does ~(n + 1) / 2n of the dense work for n blocks, and its float32 logits are a
# block's, not the whole [B, K, G, T, T]: a dense T x T tensor is freshly allocated memory on every
# call, which on a CPU costs as much as the arithmetic (on 2 cores, SmolLM2 width, 16 x 256 tokens:
# ~72 ms forward and ~150 ms forward + backward, against 154 and 277 ms dense).
@jax.checkpoint
def _blocked_causal_attention(
    q_btnh: jax.Array, k_btkh: jax.Array, v_btkh: jax.Array, kv_mask_bt: jax.Array
) -> jax.Array:
    """Causal grouped-query attention with no cache (S = T): query t sees the slots s <= t whose
    `kv_mask_bt` is True. Equal to `_xla_attention(..., q_start=0)` on every query that sees at
    least one slot (a query that sees none, a padding position, averages its block's visible
    values instead of all T; its output is never read).

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
        rows_bkrh = q_bktgh[:, :, start:end].reshape(b, kh, (end - start) * g, h)
        logits_bkrs = jnp.einsum(
            "bkrh,bksh->bkrs", rows_bkrh, k_bksh[:, :, :end], preferred_element_type=jnp.float32
        ) / np.sqrt(h).astype(np.float32)
        logits_bkqgs = logits_bkrs.reshape(b, kh, end - start, g, end)
        mask_bqs = causal_slot_mask(kv_mask_bt[:, :end], end - start, start)
        logits_bkqgs = jnp.where(mask_bqs[:, None, :, None], logits_bkqgs, jnp.finfo(jnp.float32).min)
        probs_bkrs = jax.nn.softmax(logits_bkqgs, axis=-1).astype(v_bksh.dtype).reshape(b, kh, -1, end)
        out_bkrh = jnp.einsum("bkrs,bksh->bkrh", probs_bkrs, v_bksh[:, :, :end])
        outs.append(out_bkrh.reshape(b, kh, end - start, g, h))
    out_bktgh = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=2)
    return jnp.transpose(out_bktgh, (0, 2, 1, 3, 4)).reshape(b, t, n, h)


class MLP(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x_btd: jax.Array) -> jax.Array:
        cfg = self.config
        d, f = cfg.hidden_size, cfg.intermediate_size
        gate_btf = project(x_btd, _Proj(cfg, (d, f), name="gate_proj")())
        up_btf = project(x_btd, _Proj(cfg, (d, f), name="up_proj")())
        hidden_btf = sharding.constrain(nn.silu(gate_btf) * up_btf, sharding.ACT_MLP)
        return project(hidden_btf, _Proj(cfg, (f, d), name="down_proj")())


class Block(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, carry, cos_bth, sin_bth, kv_mask_bs, cache_index):
        """carry: (hidden states, the whole stacked KV cache or None, this block's layer index)."""
        x_btd, cache, layer = carry
        attn_out, cache = Attention(self.config, name="attn")(
            RMSNorm(self.config, name="attn_norm")(x_btd), cos_bth, sin_bth, kv_mask_bs, cache, cache_index, layer
        )
        x_btd = sharding.constrain(x_btd + attn_out, sharding.ACT_EMBED)
        x_btd = x_btd + MLP(self.config, name="mlp")(RMSNorm(self.config, name="mlp_norm")(x_btd))
        return (sharding.constrain(x_btd, sharding.ACT_EMBED), cache, layer + 1), None


# Weight projections go through `project` (a custom VJP, which the dot-based policies cannot see
# into), so each policy that keeps weight matmuls names their outputs ("proj") as well.
_SAVE_PROJ = jax.checkpoint_policies.save_only_these_names("proj")
_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.save_from_both_policies(jax.checkpoint_policies.checkpoint_dots, _SAVE_PROJ),
    "dots_no_batch": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable, _SAVE_PROJ),
    # Every projection's output (the weight matmuls) and the attention output; the norms, RoPE,
    # SwiGLU's elementwise product and the attention probabilities are recomputed.
    # No weight matmul runs twice, so it costs a few percent of a step, while a layer keeps
    # ~(4D + 2F + 2Kh) values per token instead of ~(8D + 6F): 0.35-0.4x the residuals of "none".
    "minimal": jax.checkpoint_policies.save_only_these_names("proj", "attn_out"),
}

# "auto" keeps every activation ("none") while the layers' residuals under "none" stay below this
# many bytes, and switches to "minimal" above it: small models and batches (tests, the synthetic
# demo) compile the plain program, real models (SmolLM2-135M at 4k tokens: ~7 GiB) do not pay
# 2.5x the activation memory for a few percent of speed.
AUTO_REMAT_BYTES = 1 << 30


def remat_for(config: LlamaConfig, batch: int, length: int) -> str:
    """The remat policy a forward over [batch, length] tokens runs with ("auto" resolved).

    The estimate counts what a layer keeps per token under "none": about 8 D-wide and 6 F-wide
    values (norm inputs and outputs, q/k/v, the residuals, gate, up, SiLU, their product).
    """
    if config.remat_policy != "auto":
        return config.remat_policy
    per_token = (8 * config.hidden_size + 6 * config.intermediate_size) * jnp.dtype(config.compute_dtype).itemsize
    saved = batch * length * config.num_hidden_layers * per_token
    return "none" if saved <= AUTO_REMAT_BYTES else "minimal"


class Embed(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, input_ids_bt: jax.Array) -> jax.Array:
        cfg = self.config
        shape = (cfg.vocab_size, cfg.hidden_size)
        embedding = self.param("embedding", nn.initializers.normal(stddev=0.02), shape, cfg.weight_dtype)
        return jnp.take(embedding, input_ids_bt, axis=0).astype(cfg.compute_dtype)


class LlamaModel(nn.Module):
    """The trunk: embeddings, L decoder blocks, final norm. Returns hidden states.

    The blocks' parameters are stacked [L, ...] under "layers" and run by `nn.scan` (training,
    scoring, checkpoints), or, with `per_layer`, held as L separate trees "layer_0" ... and run
    by an unrolled Python loop: the decode layout of `params_for_generation`, where each step's
    dots read a layer's weights where they lie instead of a `dynamic-slice` copy of them.
    """

    config: LlamaConfig
    per_layer: bool = False

    @nn.compact
    def __call__(
        self,
        input_ids_bt: jax.Array,
        positions_bt: jax.Array,
        kv_mask_bs: jax.Array,
        cache: Cache | None = None,
        cache_index: jax.Array | int = 0,
    ) -> tuple[jax.Array, Cache | None]:
        """`kv_mask_bs`: which key slots hold real tokens (without a cache, the padding mask [B, T])."""
        cfg = self.config
        x_btd = Embed(cfg, name="embed")(input_ids_bt)
        x_btd = sharding.constrain(x_btd, sharding.ACT_EMBED)
        cos_bth, sin_bth = rope_cos_sin(cfg, positions_bt)

        block = Block
        # Only a differentiated forward keeps residuals; decoding with a cache never does.
        policy = "none" if cache is not None else remat_for(cfg, *input_ids_bt.shape)
        if policy != "none":
            block = nn.remat(Block, policy=_REMAT[policy], prevent_cse=not cfg.scan_layers or self.per_layer)
        if self.per_layer:
            carry = (x_btd, cache, 0)  # a static layer index: each layer's cache slice is a fixed offset
            for i in range(cfg.num_hidden_layers):
                carry, _ = block(cfg, name=f"{PER_LAYER_PREFIX}{i}")(carry, cos_bth, sin_bth, kv_mask_bs, cache_index)
            x_btd, cache, _ = carry
            return RMSNorm(cfg, name="final_norm")(x_btd), cache
        stack = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
            length=cfg.num_hidden_layers,
            unroll=1 if cfg.scan_layers else cfg.num_hidden_layers,
        )
        # The KV cache rides in the carry, whole: each layer updates its slice in place. (As a
        # scanned input/output it would be sliced into per-layer copies and restacked every call,
        # a few full-cache copies per decoded token.)
        (x_btd, cache, _), _ = stack(cfg, name="layers")(
            (x_btd, cache, jnp.int32(0)), cos_bth, sin_bth, kv_mask_bs, cache_index)
        return RMSNorm(cfg, name="final_norm")(x_btd), cache


PER_LAYER_PREFIX = "layer_"
"""Key prefix of the per-layer blocks in `params_for_generation`'s layout ("layer_0", ...)."""


def _trunk(config: LlamaConfig, model_params: Params) -> LlamaModel:
    """The trunk for these parameters: scanned (stacked "layers") or per-layer ("layer_0", ...)."""
    return LlamaModel(config, per_layer="layers" not in model_params)


# --------------------------------------------------------------------------------------------
# Functional API.


def positions_from_mask(attention_mask_bt: jax.Array) -> jax.Array:
    """RoPE positions [B, T]: 0,1,2,... over real tokens; padding gets 0 (it is never attended)."""
    mask = attention_mask_bt.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)


def hidden_states(
    config: LlamaConfig,
    params: Params,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    positions: jax.Array | None = None,
) -> jax.Array:
    """Final-normed hidden states [B, T, D] (compute dtype) for a padded batch, no cache.

    Rows may be padded on either side with the xla attention; `attention_impl="cudnn"` reads the
    mask as sequence lengths and needs right padding (`causal_length_attention`).
    """
    if positions is None:
        positions = positions_from_mask(attention_mask)
    hidden, _ = _trunk(config, params["model"]).apply({"params": params["model"]}, input_ids, positions, attention_mask)
    return hidden


def lm_head_kernel(config: LlamaConfig, params: Params) -> jax.Array:
    """The [D, V] output projection (the transposed embedding when tied)."""
    if config.tie_word_embeddings:
        return params["model"]["embed"]["embedding"].T
    return params["lm_head"]["kernel"]


def logits_from_hidden(config: LlamaConfig, params: Params, hidden_btd: jax.Array) -> jax.Array:
    """float32 logits [B, T, V]; the matmul runs in the compute dtype with float32 accumulation."""
    w_dv = lm_head_kernel(config, params).astype(config.compute_dtype)
    logits = jnp.einsum("btd,dv->btv", hidden_btd, w_dv, preferred_element_type=jnp.float32)
    return sharding.constrain(logits, sharding.ACT_VOCAB)


def lm_logits(
    config: LlamaConfig,
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
    config: LlamaConfig, params: Params, input_ids: jax.Array, attention_mask: jax.Array
) -> jax.Array:
    """float32 scalar rewards [B] read at the last real token of each (padded) sequence."""
    return rewards_from_hidden(params, hidden_states(config, params, input_ids, attention_mask), attention_mask)


def init_params(
    config: LlamaConfig,
    rng: jax.Array,
    *,
    lm_head: bool = True,
    reward_head: bool = False,
    reward_head_std: float = 0.0,
) -> dict[str, Any]:
    """Random parameters (normal(0.02) matrices, unit norms) in `config.param_dtype`.

    `lm_head` adds the untied output projection (ignored when embeddings are tied); `reward_head`
    adds `score` initialised with normal(reward_head_std) (0.0 gives a zero head).
    """
    trunk_rng, lm_rng, score_rng = jax.random.split(rng, 3)
    ids = jnp.zeros((1, 1), jnp.int32)
    variables = LlamaModel(config).init(trunk_rng, ids, ids, jnp.ones((1, 1), bool))
    params: dict[str, Any] = {"model": dict(variables["params"])}
    if lm_head and not config.tie_word_embeddings:
        kernel = 0.02 * jax.random.normal(lm_rng, (config.hidden_size, config.vocab_size), jnp.float32)
        params["lm_head"] = {"kernel": kernel.astype(config.weight_dtype)}
    if reward_head:
        params["score"] = {"kernel": new_reward_head(config, score_rng, reward_head_std)}
    return params


def new_reward_head(config: LlamaConfig, rng: jax.Array, std: float = 0.0) -> jax.Array:
    """A fresh [D, 1] score kernel: zeros (std=0) or normal(std)."""
    kernel = std * jax.random.normal(rng, (config.hidden_size, 1), jnp.float32)
    return kernel.astype(config.weight_dtype)


def params_for_generation(config: LlamaConfig, params: Params) -> Params:
    """The LM's parameters for sampling: in the compute dtype, the layer stack split per layer
    (the reward head, read in float32, is dropped).

    Every LM-path use of a parameter casts it to the compute dtype first (`_Proj`, `Embed`,
    `RMSNorm`, the LM head), so sampling with these gives the same samples while each decode step
    reads half the weight bytes of float32 master weights under bfloat16 compute. The stacked
    [L, ...] block weights become L trees "layer_0", ... (`LlamaModel(per_layer=True)`), so a
    decode step's dots read each layer's weights in place: from the stack, every step copied each
    layer's slice first (`dynamic-slice`, a quarter of a SmolLM2-135M decode step on CPU). The
    split is one copy of the block weights, made once per sampling phase, held on top of the
    training weights while the phase runs. Shardings of the weights' own axes are kept; params
    already split are only cast.
    """
    lm = {k: v for k, v in params.items() if k != "score"}
    model = dict(lm["model"])
    layers = model.pop("layers", None)
    if layers is not None:
        for i in range(config.num_hidden_layers):
            model[f"{PER_LAYER_PREFIX}{i}"] = jax.tree_util.tree_map(lambda x: x[i], layers)
    lm["model"] = model
    if config.compute_dtype == config.weight_dtype:
        return lm
    dtype = config.compute_dtype
    return jax.tree_util.tree_map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, lm)


# --------------------------------------------------------------------------------------------
# KV-cache forward (the sampler's building block).


def init_cache(config: LlamaConfig, batch: int, max_len: int, dtype: Any = None) -> Cache:
    """Zeroed KV cache {"k", "v"}: [L, B, S, K, h] each, in the compute dtype by default."""
    shape = (config.num_hidden_layers, batch, max_len, config.num_key_value_heads, config.head_dim)
    dtype = dtype or config.compute_dtype
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def cached_forward(
    config: LlamaConfig,
    params: Params,
    input_ids_bt: jax.Array,
    positions_bt: jax.Array,
    kv_mask_bs: jax.Array,
    cache: Cache,
    cache_index: jax.Array | int,
) -> tuple[jax.Array, Cache]:
    """Runs T new tokens written at cache slots [cache_index, cache_index + T).

    `kv_mask_bs` marks the cache slots that hold real tokens (prompt padding is False); a query
    at slot i attends slots s <= i with kv_mask True. Returns final hidden states [B, T, D] and
    the updated cache.
    """
    return _trunk(config, params["model"]).apply(
        {"params": params["model"]}, input_ids_bt, positions_bt, kv_mask_bs, cache, cache_index)


# --------------------------------------------------------------------------------------------
# Token log-probabilities without [B, T, V] float32 logits (SFT and DPO objectives).

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
    config: LlamaConfig,
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
    config: LlamaConfig, params: Params, hidden_btd: jax.Array, input_ids: jax.Array, *, chunk_size: int | None = None
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

    @jax.checkpoint
    def one_chunk(h_bcd: jax.Array, y_bc: jax.Array) -> tuple[jax.Array, jax.Array]:
        _, logp_bc, hit_bc, _ = _head_chunk(h_bcd, w_dv, y_bc)
        return logp_bc, hit_bc

    def body(carry: None, xs: tuple[jax.Array, jax.Array]) -> tuple[None, tuple[jax.Array, jax.Array]]:
        return carry, one_chunk(*xs)

    _, (logp_cbc, hit_cbc) = jax.lax.scan(body, None, _head_chunks(chunk, hidden_btd[:, :-1], input_ids[:, 1:]))
    return _from_position_one(_unchunk(logp_cbc, n), _unchunk(hit_cbc, n))


def weighted_logprob_sum(
    config: LlamaConfig,
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
                                         coeff_bt[:, 1:].astype(jnp.float32), chunk)
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


def _head_chunk(h_bcd: jax.Array, w_dv: jax.Array, y_bc: jax.Array):
    """One chunk's float32 logits, log-probabilities of the targets, argmax hits, log-sum-exp.

    `project`: under autodiff (`logprobs_from_hidden`) its written-out gradient keeps XLA:CPU from
    transposing the [B, C, V] logit gradient for the LM head's weight gradient (SmolLM2
    vocabulary, 8 x 256 tokens on 2 cores: the head's loss and gradient 3.4 -> 2.5 s)."""
    logits_bcv = sharding.constrain(project(h_bcd, w_dv, preferred_element_type=jnp.float32), sharding.ACT_VOCAB)
    lse_bc = jax.nn.logsumexp(logits_bcv, axis=-1)
    logp_bc = jnp.take_along_axis(logits_bcv, y_bc[..., None], axis=-1)[..., 0] - lse_bc
    return logits_bcv, logp_bc, jnp.argmax(logits_bcv, axis=-1) == y_bc, lse_bc


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused_head(h_bnd: jax.Array, w_dv: jax.Array, y_bn: jax.Array, c_bn: jax.Array, chunk: int):
    """(sum c * logp, logp [B, N], hits [B, N]) over chunks of N positions, values only."""
    n = y_bn.shape[1]

    def body(total, xs):
        h_bcd, y_bc, c_bc = xs
        _, logp_bc, hit_bc, _ = _head_chunk(h_bcd, w_dv, y_bc)
        return total + jnp.sum(c_bc * logp_bc), (logp_bc, hit_bc)

    total, (logp, hit) = jax.lax.scan(body, jnp.float32(0.0), _head_chunks(chunk, h_bnd, y_bn, c_bn))
    return total, _unchunk(logp, n), _unchunk(hit, n)


def _fused_head_fwd(h_bnd, w_dv, y_bn, c_bn, chunk):
    n = y_bn.shape[1]

    def body(carry, xs):
        total, dw_dv = carry
        h_bcd, y_bc, c_bc = xs
        logits_bcv, logp_bc, hit_bc, lse_bc = _head_chunk(h_bcd, w_dv, y_bc)
        # d(sum c * logp) / dlogits = c * (onehot(y) - softmax), float32.
        g_bcv = -jnp.exp(logits_bcv - lse_bc[..., None])
        g_bcv = g_bcv + jax.nn.one_hot(y_bc, g_bcv.shape[-1], dtype=g_bcv.dtype)
        g_bcv = g_bcv * c_bc[..., None]
        dh_bcd = jnp.einsum("bcv,dv->bcd", g_bcv, w_dv.astype(jnp.float32)).astype(h_bcd.dtype)
        # The narrower operand (h, D wide) on the left, as `_project_bwd` does: no transpose of g.
        dw_dv = dw_dv + jnp.tensordot(h_bcd.astype(jnp.float32), g_bcv, axes=((0, 1), (0, 1)))
        return (total + jnp.sum(c_bc * logp_bc), dw_dv), (logp_bc, hit_bc, dh_bcd)

    init = (jnp.float32(0.0), jnp.zeros(w_dv.shape, jnp.float32))
    (total, dw_dv), (logp, hit, dh) = jax.lax.scan(body, init, _head_chunks(chunk, h_bnd, y_bn, c_bn))
    out = (total, _unchunk(logp, n), _unchunk(hit, n))
    return out, (_unchunk(dh, n), dw_dv.astype(w_dv.dtype), y_bn, c_bn)


def _fused_head_bwd(chunk, res, cotangents):
    del chunk
    dh_bnd, dw_dv, y_bn, c_bn = res
    g = cotangents[0]  # the log-probabilities and hits are values only (stop_gradient outside)
    return ((g * dh_bnd).astype(dh_bnd.dtype), (g * dw_dv).astype(dw_dv.dtype),
            np.zeros(y_bn.shape, jax.dtypes.float0), jnp.zeros_like(c_bn))


_fused_head.defvjp(_fused_head_fwd, _fused_head_bwd)


def sequence_logprobs(
    config: LlamaConfig,
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
