"""Qwen3 (dense): LLaMA's block with RMSNorm on each head's q and k before RoPE, a `head_dim` of its
own, optional `attention_bias` (q/k/v/o), an optional sliding window as Qwen2's."""

from __future__ import annotations

from typing import Any, Mapping

from apo_jax.models.config import ModelConfig
from apo_jax.models.families.base import (BIAS_AXES, LLAMA_NORMS, QK_NORM_AXES, Family, activation, decoder_keys,
                                          windowed_qwen_from_hf, windowed_qwen_to_hf)


def from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
    bias = bool(hf.get("attention_bias"))
    return dict(hidden_act=activation(hf, "hidden_act", "silu", ("silu",)), qk_norm=True, qkv_bias=bias,
                o_bias=bias, **windowed_qwen_from_hf(hf))


def to_hf(config: ModelConfig) -> dict[str, Any]:
    if not config.qk_norm or config.qkv_bias != config.o_bias:
        raise ValueError("qwen3: q/k norms are always on, and attention_bias covers q, k, v and o together")
    return {"hidden_act": config.hidden_act, "attention_bias": config.qkv_bias, **windowed_qwen_to_hf(config)}


FAMILY = Family(
    model_type="qwen3", label="Qwen3", causal_lm="Qwen3ForCausalLM",
    sequence_classification="Qwen3ForSequenceClassification", from_hf=from_hf, to_hf=to_hf,
    switches=frozenset({"qk_norm", "qkv_bias", "o_bias", "sliding_window"}), keys=decoder_keys(LLAMA_NORMS),
    param_axes=BIAS_AXES + QK_NORM_AXES,
)
