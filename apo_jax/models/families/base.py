"""What every family file fills in (`Family`), and the pieces families share: the common
`config.json` fields, RoPE parameters in transformers 4 and 5 layouts, the decoder's HF key table
and the partition rules of the optional parameters."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from apo_jax.models.config import ModelConfig, freeze

KeyRow = tuple[str, tuple[str, ...], str]
"""(HF key pattern, {i} = layer; our param path; layout kind: same | linear | qkv | o | heads_bias)."""
AxesRow = tuple[str, tuple[str | None, ...]]
"""(regex over a param path, logical axes per dimension): a row of `sharding.PARAM_AXES`' form."""

_DEFAULTS = ModelConfig(num_hidden_layers=1)


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family: its HF classes, its `config.json` both ways, its weight keys, its sharding rows."""

    model_type: str
    """The HF `model_type` this family reads and writes."""
    label: str
    """Human-readable name (README table, error messages)."""
    causal_lm: str
    """The transformers class a policy exports as."""
    sequence_classification: str
    """The transformers class a reward model (one label, `score` head) exports as."""
    from_hf: Callable[[Mapping[str, Any]], dict[str, Any]]
    """config.json -> this family's `ModelConfig` switches (the common fields are read for it)."""
    to_hf: Callable[[ModelConfig], dict[str, Any]]
    """ModelConfig -> this family's own config.json fields (the common ones are written for it)."""
    switches: frozenset[str]
    """The `ModelConfig` switches this family may set away from LLaMA's; exporting a config with
    any other switch set is refused (the family's class would silently compute something else)."""
    keys: tuple[KeyRow, ...]
    """The HF weight keys; rows whose parameter the config does not have are skipped."""
    param_axes: tuple[AxesRow, ...] = ()
    """Partition rules of the parameters only some families have (registered with `sharding`)."""


def family_switches(config: ModelConfig) -> set[str]:
    """The switches of `config` that differ from LLaMA's defaults."""
    names = ("hidden_act", "qkv_bias", "o_bias", "mlp_bias", "qk_norm", "norm_unit_offset", "sandwich_norms",
             "scale_embeddings", "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping",
             "sliding_window", "rope_local_theta")
    return {n for n in names if getattr(config, n) != getattr(_DEFAULTS, n)}


# --------------------------------------------------------------------------------------------
# config.json: the common fields.

REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def common_from_hf(hf: Mapping[str, Any], rope: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The fields every family shares (sizes, norms' epsilon, RoPE, tying, special ids). `rope`: the
    global layers' RoPE parameters when the family keeps them elsewhere (Gemma 3)."""
    missing = [k for k in REQUIRED if k not in hf]
    if missing:
        raise ValueError(f"{', '.join(missing)}: missing (required for a {hf.get('model_type')} model)")
    theta, scaling = rope_from_hf(hf, rope)
    return dict(
        model_type=hf["model_type"],
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=hf["num_attention_heads"],
        num_key_value_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or 0,
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"),
    )


def rope_from_hf(hf: Mapping[str, Any], rope: Mapping[str, Any] | None = None) -> tuple[float, Any]:
    """(theta, frozen scaling or None) from `rope` when the family found its parameters elsewhere,
    else from transformers 5's `rope_parameters` or 4's `rope_theta` + `rope_scaling` (old configs
    say `type` for `rope_type`)."""
    rope = dict(rope if rope is not None else hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    if "type" in rope and "rope_type" not in rope:
        rope["rope_type"] = rope.pop("type")
    rope.pop("type", None)
    return float(theta), None if rope.get("rope_type", "default") == "default" else freeze(rope)


def common_to_hf(config: ModelConfig, family: Family) -> dict[str, Any]:
    """The HF fields every family shares (readable by transformers 4.x and 5.x)."""
    rope = config.rope_scaling_dict
    eos = list(config.eos_token_id) if isinstance(config.eos_token_id, tuple) else config.eos_token_id
    return {
        "model_type": family.model_type,
        "architectures": [family.causal_lm],
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": rope or None,
        "rope_parameters": {"rope_type": "default", **rope, "rope_theta": config.rope_theta},
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": eos,
        "pad_token_id": config.pad_token_id,
        "torch_dtype": config.param_dtype,
    }


def activation(hf: Mapping[str, Any], field: str, default: str, allowed: tuple[str, ...]) -> str:
    """The MLP activation named by `field`, checked against what the family computes."""
    act = hf.get(field) or default
    if act not in allowed:
        raise ValueError(f"{field}: {act!r} is not supported for {hf.get('model_type')}; expected one of {allowed}")
    return act


def layer_types_from_hf(hf: Mapping[str, Any], window: int | None, default: Callable[[int], str]) -> tuple[str, ...]:
    """Per-layer kinds: `layer_types` when config.json has them, else `default(i)`; every layer
    full when the family has no window."""
    n = hf["num_hidden_layers"]
    if window is None:
        return ("full_attention",) * n
    types = hf.get("layer_types")
    if types is None:
        return tuple(default(i) for i in range(n))
    return tuple(types)


def windowed_qwen_from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
    """Qwen2/Qwen3's sliding window: only with `use_sliding_window`, on layers >= `max_window_layers`
    (or as `layer_types` says)."""
    window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    first = hf.get("max_window_layers", hf["num_hidden_layers"])
    types = layer_types_from_hf(hf, window, lambda i: "sliding_attention" if i >= first else "full_attention")
    return dict(sliding_window=window if "sliding_attention" in types else None, layer_types=types)


def windowed_qwen_to_hf(config: ModelConfig) -> dict[str, Any]:
    sliding = config.sliding_layers
    return {
        "use_sliding_window": any(sliding),
        "sliding_window": config.sliding_window if any(sliding) else None,
        "max_window_layers": sliding.index(True) if any(sliding) else config.num_hidden_layers,
        "layer_types": list(config.layer_types),
    }


# --------------------------------------------------------------------------------------------
# Weight keys.

LLAMA_NORMS = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
"""Our block norms -> HF module names, pre-norm blocks (LLaMA, Mistral, Qwen)."""
GEMMA_NORMS = {"attn_norm": "input_layernorm", "post_attn_norm": "post_attention_layernorm",
               "mlp_norm": "pre_feedforward_layernorm", "post_mlp_norm": "post_feedforward_layernorm"}
"""Our block norms -> HF module names, sandwich-norm blocks (Gemma 2 and 3): HF's
`post_attention_layernorm` is the norm *after* attention here, not the one before the MLP."""


def decoder_keys(norms: Mapping[str, str]) -> tuple[KeyRow, ...]:
    """The HF key table of the shared decoder under this family's norm names."""
    layer = "model.layers.{i}."
    rows: list[KeyRow] = [("model.embed_tokens.weight", ("model", "embed", "embedding"), "same")]
    rows += [(f"{layer}{hf_name}.weight", ("model", "layers", ours, "scale"), "same") for ours, hf_name in norms.items()]
    for proj in ("q", "k", "v", "o"):
        path = ("model", "layers", "attn", f"{proj}_proj")
        rows.append((f"{layer}self_attn.{proj}_proj.weight", path + ("kernel",), "o" if proj == "o" else "qkv"))
        rows.append((f"{layer}self_attn.{proj}_proj.bias", path + ("bias",), "same" if proj == "o" else "heads_bias"))
    for proj in ("q", "k"):
        rows.append((f"{layer}self_attn.{proj}_norm.weight", ("model", "layers", "attn", f"{proj}_norm", "scale"), "same"))
    for proj in ("gate", "up", "down"):
        path = ("model", "layers", "mlp", f"{proj}_proj")
        rows.append((f"{layer}mlp.{proj}_proj.weight", path + ("kernel",), "linear"))
        rows.append((f"{layer}mlp.{proj}_proj.bias", path + ("bias",), "same"))
    rows += [
        ("model.norm.weight", ("model", "final_norm", "scale"), "same"),
        ("lm_head.weight", ("lm_head", "kernel"), "linear"),
        ("score.weight", ("score", "kernel"), "linear"),
    ]
    return tuple(rows)


# --------------------------------------------------------------------------------------------
# Partition rules of the optional parameters (the core ones are `sharding.PARAM_AXES`).

BIAS_AXES: tuple[AxesRow, ...] = (
    (r"attn/q_proj/bias$", ("layers", "heads", "head_dim")),
    (r"attn/(k|v)_proj/bias$", ("layers", "kv_heads", "head_dim")),
    (r"attn/o_proj/bias$", ("layers", "norm")),
    (r"mlp/(gate|up)_proj/bias$", ("layers", "mlp")),
    (r"mlp/down_proj/bias$", ("layers", "norm")),
)
QK_NORM_AXES: tuple[AxesRow, ...] = ((r"attn/(q|k)_norm/scale$", ("layers", "head_dim")),)
SANDWICH_NORM_AXES: tuple[AxesRow, ...] = ((r"post_(attn|mlp)_norm/scale$", ("layers", "norm")),)
