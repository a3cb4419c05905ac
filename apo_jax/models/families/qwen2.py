"""Qwen2 / Qwen2.5: LLaMA's block with biases on the q/k/v projections (always; none on o), tied
embeddings at small sizes, an optional sliding window on layers >= `max_window_layers`."""

from __future__ import annotations

from typing import Any, Mapping

from apo_jax.models.config import ModelConfig
from apo_jax.models.families.base import (BIAS_AXES, LLAMA_NORMS, Family, activation, decoder_keys,
                                          windowed_qwen_from_hf, windowed_qwen_to_hf)


def from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
    return dict(hidden_act=activation(hf, "hidden_act", "silu", ("silu",)), qkv_bias=True,
                **windowed_qwen_from_hf(hf))


def to_hf(config: ModelConfig) -> dict[str, Any]:
    if not config.qkv_bias or config.o_bias:
        raise ValueError("qwen2: the q/k/v projections always have biases and o_proj none")
    return {"hidden_act": config.hidden_act, **windowed_qwen_to_hf(config)}


FAMILY = Family(
    model_type="qwen2", label="Qwen2 / Qwen2.5", causal_lm="Qwen2ForCausalLM",
    sequence_classification="Qwen2ForSequenceClassification", from_hf=from_hf, to_hf=to_hf,
    switches=frozenset({"qkv_bias", "sliding_window"}), keys=decoder_keys(LLAMA_NORMS), param_axes=BIAS_AXES,
)
