"""Gemma 3 (text, `gemma3_text`): Gemma 2's block with RMSNorm (1 + w) on each head's q and k, no
attention soft-capping by default, five sliding layers to one global (`layer_types`), and the
sliding layers' own RoPE base (`rope_local_base_freq`; scaling applies to global layers only)."""

from __future__ import annotations

from typing import Any, Mapping

from apo_jax.models.config import ModelConfig
from apo_jax.models.families.base import (BIAS_AXES, GEMMA_NORMS, QK_NORM_AXES, SANDWICH_NORM_AXES, Family,
                                          decoder_keys)
from apo_jax.models.families.gemma2 import GEMMA_SWITCHES, gemma_from_hf, gemma_to_hf


def from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
    rope = hf.get("rope_parameters") or {}
    per_kind = "full_attention" in rope or "sliding_attention" in rope  # transformers 5's layout
    fields = gemma_from_hf(hf, pattern=hf.get("sliding_window_pattern") or 6)
    if per_kind:
        glob = dict(rope.get("full_attention") or {})
        glob.setdefault("rope_theta", 1_000_000.0)
        local = float((rope.get("sliding_attention") or {}).get("rope_theta", 10_000.0))
    else:  # transformers 4: rope_theta + rope_scaling for global layers, rope_local_base_freq for local
        glob = dict(hf.get("rope_scaling") or {}, rope_theta=hf.get("rope_theta", 1_000_000.0))
        local = float(hf.get("rope_local_base_freq", 10_000.0))
    return dict(fields, qk_norm=True, rope_local_theta=local, global_rope=glob)


def to_hf(config: ModelConfig) -> dict[str, Any]:
    if not config.qk_norm:
        raise ValueError("gemma3_text: q/k norms are always on")
    glob = {"rope_type": "default", **config.rope_scaling_dict, "rope_theta": config.rope_theta}
    local = config.rope_local_theta if config.rope_local_theta is not None else config.rope_theta
    return {
        **gemma_to_hf(config),
        "rope_parameters": {"full_attention": glob, "sliding_attention": {"rope_type": "default", "rope_theta": local}},
        "rope_local_base_freq": local,  # transformers 4
        "use_bidirectional_attention": False,
    }


FAMILY = Family(
    model_type="gemma3_text", label="Gemma 3 (text)", causal_lm="Gemma3ForCausalLM",
    sequence_classification="Gemma3TextForSequenceClassification", from_hf=from_hf, to_hf=to_hf,
    switches=GEMMA_SWITCHES | {"qk_norm", "rope_local_theta"}, keys=decoder_keys(GEMMA_NORMS),
    param_axes=BIAS_AXES + QK_NORM_AXES + SANDWICH_NORM_AXES,
)
