"""LLaMA 1/2/3.x (and SmolLM, TinyLlama, ...): `LlamaForCausalLM`, pre-norm SwiGLU blocks,
optional `attention_bias` (q/k/v/o) and `mlp_bias`, RoPE scalings linear / dynamic / llama3."""

from __future__ import annotations

from typing import Any, Mapping

from apo_jax.models.config import ModelConfig
from apo_jax.models.families.base import BIAS_AXES, LLAMA_NORMS, Family, activation, decoder_keys


def from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
    bias = bool(hf.get("attention_bias"))
    return dict(hidden_act=activation(hf, "hidden_act", "silu", ("silu",)), qkv_bias=bias, o_bias=bias,
                mlp_bias=bool(hf.get("mlp_bias")))


def to_hf(config: ModelConfig) -> dict[str, Any]:
    if config.qkv_bias != config.o_bias:
        raise ValueError("llama: attention_bias covers q, k, v and o together (qkv_bias == o_bias)")
    return {"hidden_act": config.hidden_act, "attention_bias": config.qkv_bias, "mlp_bias": config.mlp_bias}


FAMILY = Family(
    model_type="llama", label="LLaMA 1/2/3.x", causal_lm="LlamaForCausalLM",
    sequence_classification="LlamaForSequenceClassification", from_hf=from_hf, to_hf=to_hf,
    switches=frozenset({"qkv_bias", "o_bias", "mlp_bias"}), keys=decoder_keys(LLAMA_NORMS), param_axes=BIAS_AXES,
)
