"""Gemma 2: embeddings scaled by sqrt(D), RMSNorm as (1 + w), GeGLU with tanh-GELU, norms before and
after attention and the MLP, `query_pre_attn_scalar`, attention-logit and final-logit soft-capping,
alternating sliding (even layers) and global layers."""

from __future__ import annotations

from typing import Any, Mapping

from apo_jax.models.config import ModelConfig
from apo_jax.models.families.base import (BIAS_AXES, GEMMA_NORMS, SANDWICH_NORM_AXES, Family, activation,
                                          decoder_keys, layer_types_from_hf)

GEMMA_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu")
GEMMA_BLOCK = {"norm_unit_offset": True, "sandwich_norms": True, "scale_embeddings": True}
"""The switches every Gemma block has on."""


def gemma_from_hf(hf: Mapping[str, Any], pattern: int) -> dict[str, Any]:
    """Gemma 2 and 3's shared fields; a layer i slides unless (i + 1) % `pattern` == 0."""
    bias = bool(hf.get("attention_bias"))
    window = hf.get("sliding_window")
    types = layer_types_from_hf(hf, window, lambda i: "full_attention" if (i + 1) % pattern == 0 else "sliding_attention")
    # transformers 4 wrote `hidden_act` beside (or instead of) `hidden_activation`.
    field = "hidden_activation" if hf.get("hidden_activation") else "hidden_act"
    return dict(
        GEMMA_BLOCK, hidden_act=activation(hf, field, "gelu_pytorch_tanh", GEMMA_ACTIVATIONS), qkv_bias=bias,
        o_bias=bias, query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256),
        attn_logit_softcapping=hf.get("attn_logit_softcapping"), final_logit_softcapping=hf.get("final_logit_softcapping"),
        sliding_window=window if "sliding_attention" in types else None, layer_types=types,
    )


def gemma_to_hf(config: ModelConfig) -> dict[str, Any]:
    if not all(getattr(config, k) == v for k, v in GEMMA_BLOCK.items()) or config.qkv_bias != config.o_bias:
        raise ValueError(f"{config.model_type}: the Gemma block needs {sorted(GEMMA_BLOCK)} on and qkv_bias == o_bias")
    return {
        "hidden_activation": config.hidden_act, "hidden_act": config.hidden_act, "attention_bias": config.qkv_bias,
        "query_pre_attn_scalar": config.query_pre_attn_scalar or config.head_dim,
        "attn_logit_softcapping": config.attn_logit_softcapping,
        "final_logit_softcapping": config.final_logit_softcapping,
        "sliding_window": config.sliding_window, "layer_types": list(config.layer_types),
    }


def from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
    return gemma_from_hf(hf, pattern=2)


GEMMA_SWITCHES = frozenset({"hidden_act", "qkv_bias", "o_bias", "norm_unit_offset", "sandwich_norms",
                            "scale_embeddings", "query_pre_attn_scalar", "attn_logit_softcapping",
                            "final_logit_softcapping", "sliding_window"})

FAMILY = Family(
    model_type="gemma2", label="Gemma 2", causal_lm="Gemma2ForCausalLM",
    sequence_classification="Gemma2ForSequenceClassification", from_hf=from_hf, to_hf=gemma_to_hf,
    switches=GEMMA_SWITCHES, keys=decoder_keys(GEMMA_NORMS), param_axes=BIAS_AXES + SANDWICH_NORM_AXES,
)
