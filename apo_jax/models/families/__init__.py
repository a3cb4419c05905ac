"""The supported model families: one file each, one row each in `FAMILIES` (keyed by HF `model_type`).

Adding a family: a file here with its `FAMILY` (HF classes, `config.json` both ways, weight keys,
partition rows of any parameter only it has) and a row below; the shared decoder's switches
(`ModelConfig`) cover what it computes differently.
"""

from __future__ import annotations

from typing import Any, Mapping

from apo_jax import sharding
from apo_jax.models.config import ModelConfig
from apo_jax.models.families import gemma2, gemma3, llama, mistral, qwen2, qwen3
from apo_jax.models.families.base import Family, common_from_hf, common_to_hf, family_switches

FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (llama.FAMILY, qwen2.FAMILY, qwen3.FAMILY, mistral.FAMILY, gemma2.FAMILY, gemma3.FAMILY)
}

for _family in FAMILIES.values():
    sharding.register_param_axes(_family.param_axes)

# Features of config.json the shared decoder does not compute: refused by name, never ignored.
_UNSUPPORTED_FIELDS = {
    "num_experts": "mixture-of-experts layers",
    "num_local_experts": "mixture-of-experts layers",
    "vision_config": "a vision tower (load the text-only checkpoint, e.g. Gemma3ForCausalLM's)",
    "audio_config": "an audio tower",
}


def supported() -> str:
    return ", ".join(FAMILIES)


def family_for(model_type: str | None) -> Family:
    """The family of a `model_type` ("llama" when a config.json omits it, as early LLaMA ones did)."""
    family = FAMILIES.get(model_type or "llama")
    if family is None:
        raise ValueError(f"model_type: {model_type!r} is not supported; apo_jax reads {supported()}")
    return family


def config_from_hf(hf: Mapping[str, Any], **runtime: Any) -> ModelConfig:
    """The `ModelConfig` of a HF `config.json` dict; `runtime` sets the run fields (dtypes, remat, ...).

    Raises ValueError naming the field for an unsupported family or feature (the caller adds the
    file): MoE, vision/audio towers, bidirectional attention, an unknown RoPE type or activation."""
    hf = dict(hf, model_type=hf.get("model_type") or "llama")
    family = family_for(hf["model_type"])
    for field, what in _UNSUPPORTED_FIELDS.items():
        if hf.get(field):
            raise ValueError(f"{field}: {what} is not supported; apo_jax reads decoder-only {supported()} models")
    if hf.get("use_bidirectional_attention"):
        raise ValueError("use_bidirectional_attention: true is not supported; apo_jax runs causal decoders")
    own = dict(family.from_hf(hf))
    fields = {**common_from_hf(hf, own.pop("global_rope", None)), **own}
    try:
        return ModelConfig(**fields, **runtime)
    except ValueError as e:  # e.g. an unknown rope_type: name the field it came from
        raise ValueError(str(e).replace("Invalid ModelConfig: ", f"{family.model_type} config: ")) from None


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """The HF `config.json` dict of `config`'s family (its causal-LM class)."""
    family = family_for(config.model_type)
    foreign = sorted(family_switches(config) - family.switches)
    if foreign:
        raise ValueError(f"{family.model_type}: {', '.join(foreign)} set, which {family.causal_lm} does not "
                         "compute; set model_type to a family that has them")
    return {**common_to_hf(config, family), **family.to_hf(config)}


__all__ = ["FAMILIES", "Family", "config_from_hf", "config_to_hf", "family_for", "supported"]
