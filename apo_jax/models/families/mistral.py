"""Mistral: LLaMA's block with sliding-window attention on every layer (`sliding_window`; null
turns it off). transformers' Mistral class ignores `layer_types`, so it is ignored here too."""

from __future__ import annotations

from typing import Any, Mapping

from apo_jax.models.config import ModelConfig
from apo_jax.models.families.base import LLAMA_NORMS, Family, activation, decoder_keys


def from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
    window = hf.get("sliding_window")
    kind = "sliding_attention" if window else "full_attention"
    return dict(hidden_act=activation(hf, "hidden_act", "silu", ("silu",)), sliding_window=window or None,
                layer_types=(kind,) * hf["num_hidden_layers"])


def to_hf(config: ModelConfig) -> dict[str, Any]:
    if len(set(config.layer_types)) > 1:
        raise ValueError("mistral: every layer slides or none does (mixed layer_types need another family)")
    return {"hidden_act": config.hidden_act, "sliding_window": config.sliding_window}


FAMILY = Family(
    model_type="mistral", label="Mistral", causal_lm="MistralForCausalLM",
    sequence_classification="MistralForSequenceClassification", from_hf=from_hf, to_hf=to_hf,
    switches=frozenset({"sliding_window"}), keys=decoder_keys(LLAMA_NORMS),
)
