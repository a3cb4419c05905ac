"""`ModelConfig`: the decoder's architecture switches (what families differ by) and how to run it.

One config describes every supported family (LLaMA, Qwen2/2.5, Qwen3, Mistral, Gemma 2, Gemma 3):
the HF `config.json` fields that change the math are switches here, and a family file
(`apo_jax/models/families/<name>.py`) maps its `config.json` to and from them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

from apo_jax.settings import ATTENTION_IMPLS, QUANT_TYPES, REMAT_POLICIES
ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "gelu")
LAYER_TYPES = ("full_attention", "sliding_attention")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture (the HF `config.json` fields, as switches) plus how to run it (dtypes, scan, remat)."""

    model_type: str = "llama"
    """The HF `model_type` of the family (a key of `models.FAMILIES`); exports write its classes."""
    vocab_size: int = 32000
    """Number of token embeddings."""
    hidden_size: int = 4096
    """Model width D."""
    intermediate_size: int = 11008
    """Gated-MLP width F."""
    num_hidden_layers: int = 32
    """Number of decoder blocks L."""
    num_attention_heads: int = 32
    """Query heads H."""
    num_key_value_heads: int = 32
    """Key/value heads K (H % K == 0; K < H is grouped-query attention)."""
    head_dim: int = 0
    """Per-head width; 0 means hidden_size // num_attention_heads (Qwen3 and Gemma set their own)."""
    max_position_embeddings: int = 2048
    """Context length the model was trained for (used by dynamic RoPE scaling)."""
    rms_norm_eps: float = 1e-6
    """RMSNorm epsilon (the block norms, the final norm and the q/k norms)."""
    rope_theta: float = 10000.0
    """RoPE base (of the global layers when `rope_local_theta` is set)."""
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    """HF `rope_scaling` as sorted (key, value) pairs (hashable); None for plain RoPE. Global layers only
    when `rope_local_theta` is set."""
    rope_local_theta: float | None = None
    """RoPE base of the sliding-window layers, with no scaling (Gemma 3's `rope_local_base_freq`);
    None: every layer uses `rope_theta` and `rope_scaling`."""
    tie_word_embeddings: bool = False
    """Whether the LM head reuses the embedding matrix."""
    hidden_act: str = "silu"
    """The gated MLP's activation: silu (SwiGLU), gelu_pytorch_tanh (Gemma's GeGLU) or gelu."""
    qkv_bias: bool = False
    """Biases on the q/k/v projections (Qwen2; LLaMA/Qwen3/Gemma `attention_bias`)."""
    o_bias: bool = False
    """A bias on the output projection (LLaMA/Qwen3/Gemma `attention_bias`; not Qwen2)."""
    mlp_bias: bool = False
    """Biases on the MLP projections (LLaMA `mlp_bias`)."""
    qk_norm: bool = False
    """RMSNorm over each head's q and k before RoPE (Qwen3, Gemma 3)."""
    norm_unit_offset: bool = False
    """RMSNorm scales by (1 + w) in float32 (Gemma), not by w in the compute dtype (LLaMA)."""
    sandwich_norms: bool = False
    """Norms after attention and after the MLP too, before each residual add (Gemma 2 and 3)."""
    scale_embeddings: bool = False
    """Embeddings multiplied by sqrt(hidden_size) (Gemma)."""
    query_pre_attn_scalar: float | None = None
    """Attention logits scaled by query_pre_attn_scalar ** -0.5 (Gemma); None: head_dim ** -0.5."""
    attn_logit_softcapping: float | None = None
    """Attention logits capped as c * tanh(x / c) (Gemma 2); None: no cap."""
    final_logit_softcapping: float | None = None
    """LM logits capped as c * tanh(x / c) (Gemma 2); None: no cap. The reward head is never capped."""
    sliding_window: int | None = None
    """Keys a sliding-window layer's query sees: itself and the W - 1 before it (HF's convention)."""
    layer_types: tuple[str, ...] | None = None
    """Per layer "full_attention" or "sliding_attention"; None: every layer sliding when
    `sliding_window` is set (Mistral), else every layer full."""
    bos_token_id: int | None = 1
    """Beginning-of-sequence id."""
    eos_token_id: int | tuple[int, ...] | None = 2
    """End-of-sequence id (or ids, as LLaMA-3 and Gemma configs have)."""
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
    """Rematerialisation per layer (see `decoder.remat_for`): auto (by activation size), none, minimal,
    full, dots, dots_no_batch."""
    attention_impl: str = "xla"
    """xla (portable einsum attention) or cudnn (`jax.nn.dot_product_attention`, GPU only; layers
    it cannot run, soft-capped ones, take the XLA path: `attention.layer_impls`)."""
    lora_rank: int = 0
    """LoRA rank r of the adapters on `lora_targets` (0: no adapters, every weight trains; see docs/lora.md)."""
    lora_alpha: float = 16.0
    """LoRA scale numerator: an adapter adds (alpha / r) * x A B (PEFT's convention)."""
    lora_targets: tuple[str, ...] = ()
    """The projections that carry adapters, by module name (`models.lora.LORA_MODULES`), in every layer."""
    quantization: str = ""
    """QLoRA: the frozen projection kernels stored quantized ("int8", "int4", "nf4"; `models.quant`);
    "" keeps them dense. Needs lora_rank > 0 (a quantized kernel never trains)."""

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if isinstance(self.rope_scaling, Mapping):
            object.__setattr__(self, "rope_scaling", freeze(self.rope_scaling))
        if self.layer_types is None:
            kind = "sliding_attention" if self.sliding_window else "full_attention"
            object.__setattr__(self, "layer_types", (kind,) * self.num_hidden_layers)
        elif not isinstance(self.layer_types, tuple):
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if not isinstance(self.lora_targets, tuple):
            object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        problems = self._problems()
        if problems:
            raise ValueError("Invalid ModelConfig: " + "; ".join(problems))

    def _problems(self) -> list[str]:
        problems = []
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                            f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            problems.append(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.remat_policy not in REMAT_POLICIES:
            problems.append(f"remat_policy={self.remat_policy!r}; expected one of {REMAT_POLICIES}")
        if self.attention_impl not in ATTENTION_IMPLS:
            problems.append(f"attention_impl={self.attention_impl!r}; expected one of {ATTENTION_IMPLS}")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in _DTYPES:
                problems.append(f"{name}={getattr(self, name)!r}; expected one of {tuple(_DTYPES)}")
        rope_type = self.rope_scaling_dict.get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            problems.append(f"rope_scaling type {rope_type!r} is not supported; expected one of {ROPE_TYPES}")
        if self.hidden_act not in ACTIVATIONS:
            problems.append(f"hidden_act={self.hidden_act!r}; expected one of {ACTIVATIONS}")
        if len(self.layer_types) != self.num_hidden_layers:
            problems.append(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        unknown = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if unknown:
            problems.append(f"layer_types {unknown} not supported; expected {LAYER_TYPES}")
        if "sliding_attention" in self.layer_types and not (self.sliding_window and self.sliding_window > 0):
            problems.append(f"sliding_attention layers need sliding_window > 0 (got {self.sliding_window})")
        for name in ("attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                problems.append(f"{name}={value} must be positive (or None)")
        if self.lora_rank < 0:
            problems.append(f"lora_rank={self.lora_rank} must be >= 0")
        if self.quantization and self.quantization not in QUANT_TYPES:
            problems.append(f"quantization={self.quantization!r}; expected '' or one of {QUANT_TYPES}")
        if self.quantization and not self.lora_rank:
            problems.append(f"quantization={self.quantization!r} needs lora_rank > 0 (a quantized base is frozen)")
        if self.lora_rank and not self.lora_targets:
            problems.append(f"lora_rank={self.lora_rank} with no lora_targets")
        return problems

    # Derived views.

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

    @property
    def attention_scale(self) -> float:
        """The factor on q.k: query_pre_attn_scalar ** -0.5 (Gemma) or head_dim ** -0.5."""
        return float(self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def sliding_layers(self) -> tuple[bool, ...]:
        """Per layer: whether it attends through the sliding window."""
        return tuple(t == "sliding_attention" for t in self.layer_types)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # Our own JSON (run-dir metadata); the HF config.json goes through `models.config_to_hf`.

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict of every field (the inverse of `from_json`)."""
        d = dataclasses.asdict(self)
        d["rope_scaling"] = [list(kv) for kv in self.rope_scaling] if self.rope_scaling else None
        d["layer_types"] = list(self.layer_types)
        d["lora_targets"] = list(self.lora_targets)
        if isinstance(self.eos_token_id, tuple):
            d["eos_token_id"] = list(self.eos_token_id)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "ModelConfig":
        """The config `to_json` wrote (lists back to the tuples a hashable config needs); fields
        added since (the family switches) take their LLaMA defaults."""
        d = dict(d)
        if d.get("rope_scaling"):
            d["rope_scaling"] = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in d["rope_scaling"])
        for key in ("eos_token_id", "layer_types", "lora_targets"):
            if isinstance(d.get(key), list):
                d[key] = tuple(d[key])
        return cls(**d)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], **runtime: Any) -> "ModelConfig":
        """The config of a HF `config.json` dict, through its family (`models.config_from_hf`)."""
        from apo_jax.models.families import config_from_hf

        return config_from_hf(hf, **runtime)

    def to_hf(self) -> dict[str, Any]:
        """The HF `config.json` dict of this config's family (`models.config_to_hf`)."""
        from apo_jax.models.families import config_to_hf

        return config_to_hf(self)


def freeze(d: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    """A hashable form of a small dict (sorted (key, value) pairs, lists as tuples)."""
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in d.items()))
