"""LoRA: low-rank adapters on the decoder's projections, the trainable/frozen split, and merging.

An adapter lives in the parameter tree beside the kernel it adapts, under the same module, so
the layer scan stacks it with the layer's other weights and one key table places it:

    "attn": {"q_proj": {"kernel": [L, D, H, h], "lora_a": [L, D, r], "lora_b": [L, r, H, h]}, ...}
    "attn": {"o_proj": {"kernel": [L, H, h, D], "lora_a": [L, H, h, r], "lora_b": [L, r, D]}}
    "mlp":  {"down_proj": {"kernel": [L, F, D], "lora_a": [L, F, r], "lora_b": [L, r, D]}, ...}

`Linear` adds (alpha / r) * (x A) B to a projection whose params hold `lora_a` (PEFT's
convention: A kaiming-uniform, B zero, so a fresh adapter leaves the model unchanged). Adapters
are float32 whatever `param_dtype` the frozen base has. With `lora_rank > 0` only the adapters
and the reward head (`score`) train: `split` gives the two trees the train step differentiates
and holds (`training.train`), `merge_adapters` folds them into the kernels (exports, sampling).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from apo_jax.models import quant
from apo_jax.models.config import ModelConfig
from apo_jax.settings import LORA_MODULES  # noqa: F401  (the targets' table, importable without jax)
from apo_jax.settings import lora_module_path as module_path
from apo_jax.settings import resolve_lora_targets as resolve_targets

Params = Mapping[str, Any]

ADAPTER_LEAVES = ("lora_a", "lora_b")
TRAINED_HEADS = ("score",)
"""Top-level param entries trained fully beside the adapters (the reward head)."""


def module_shape(config: ModelConfig, name: str) -> tuple[int, ...]:
    """One layer's kernel shape of projection `name`."""
    d, f, n, k, h = (config.hidden_size, config.intermediate_size, config.num_attention_heads,
                     config.num_key_value_heads, config.head_dim)
    return {"q_proj": (d, n, h), "k_proj": (d, k, h), "v_proj": (d, k, h), "o_proj": (n, h, d),
            "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}[name]


def check(config: ModelConfig) -> None:
    """ValueError (one line) for a rank larger than a targeted projection's width or an unknown
    target; a no-op without LoRA."""
    if not config.lora_rank:
        return
    resolve_targets(config.lora_targets)
    for name in config.lora_targets:
        shape = module_shape(config, name)
        n_in = LORA_MODULES[name][1]
        width = min(math.prod(shape[:n_in]), math.prod(shape[n_in:]))
        if config.lora_rank > width:
            raise ValueError(f"lora.rank={config.lora_rank} is larger than {name}'s width {width} "
                             f"({math.prod(shape[:n_in])} -> {math.prod(shape[n_in:])})")


def is_trainable(config: ModelConfig, path: str) -> bool:
    """Whether the parameter at '/'-joined `path` trains: every one without LoRA; with it, the
    adapters and the reward head."""
    if not config.lora_rank:
        return True
    parts = path.split("/")
    return parts[-1] in ADAPTER_LEAVES or parts[0] in TRAINED_HEADS


def _walk(tree: Params, keep, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        path = f"{prefix}/{k}" if prefix else k
        if isinstance(v, Mapping):
            sub = _walk(v, keep, path)
            if sub:
                out[k] = sub
        elif keep(path):
            out[k] = v
    return out


def split(config: ModelConfig, params: Params) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(trainable, frozen) subtrees of `params` (nested dicts, each holding only its leaves);
    without LoRA (everything trains) frozen is None."""
    if not config.lora_rank:
        return dict(params), None
    trainable = _walk(params, lambda p: is_trainable(config, p))
    frozen = _walk(params, lambda p: not is_trainable(config, p))
    return trainable, frozen


def combine(a: Params, b: Params | None) -> dict[str, Any]:
    """The union of two disjoint nested-dict trees (the inverse of `split`)."""
    if b is None:
        return dict(a)
    out = dict(b)
    for k, v in a.items():
        out[k] = combine(v, out[k]) if isinstance(v, Mapping) and k in out else v
    return out


def has_adapters(params: Params) -> bool:
    return any(path_leaf in ADAPTER_LEAVES for path_leaf in _leaf_names(params))


def _leaf_names(tree: Params):
    for k, v in tree.items():
        if isinstance(v, Mapping):
            yield from _leaf_names(v)
        else:
            yield k


def _modules(params: Params):
    """(the module's param dict, its name, n_in) of every projection holding an adapter, in the
    stacked ("layers") and per-layer ("layer_<i>") layouts."""
    model = params.get("model", {})
    for key, block in model.items():
        if not (key == "layers" or key.startswith("layer_")):
            continue
        for name, (group, n_in) in LORA_MODULES.items():
            mod = block.get(group, {}).get(name)
            if mod is not None and "lora_a" in mod:
                yield key, group, name, n_in, mod


def delta(config: ModelConfig, module: Params, n_in: int) -> jax.Array:
    """(alpha / r) A B in the kernel's layout (float32), stacked or one layer's."""
    a, b = module["lora_a"].astype(jnp.float32), module["lora_b"].astype(jnp.float32)
    scale = config.lora_alpha / a.shape[-1]
    one = lambda a_, b_: jnp.tensordot(a_, b_, axes=1)  # noqa: E731
    if a.ndim == n_in + 2:  # stacked [L, in..., r]
        return scale * jax.vmap(one)(a, b)
    return scale * one(a, b)


def merge_adapters(config: ModelConfig, params: Params, *, keep_quantized: bool = False) -> dict[str, Any]:
    """`params` with every adapter folded into its kernel (W + (alpha / r) A B, in the kernel's
    dtype) and the adapter leaves removed: what exports and the sampler read. A quantized kernel
    (`models.quant`) becomes dense, or with `keep_quantized` keeps its adapter unmerged."""
    out = {k: v for k, v in params.items()}
    model = dict(out.get("model", {}))
    for key, group, name, n_in, mod in list(_modules(params)):
        if keep_quantized and quant.is_quantized(mod["kernel"]):
            continue
        block = dict(model[key])
        grp = dict(block[group])
        kernel = quant.dequantize(mod["kernel"])
        merged = (kernel.astype(jnp.float32) + delta(config, mod, n_in)).astype(kernel.dtype)
        grp[name] = {k: v for k, v in mod.items() if k not in ADAPTER_LEAVES} | {"kernel": merged}
        block[group] = grp
        model[key] = block
    if model:
        out["model"] = model
    return out


def add_adapters(config: ModelConfig, params: Params, rng: jax.Array) -> dict[str, Any]:
    """`params` with fresh adapters (A kaiming-uniform, B zero) on every target of `config` that
    has none, and a float32 reward head: the starting point of a LoRA phase. Adapters on
    projections that are not targets are merged into their kernels first."""
    if not config.lora_rank:
        return merge_adapters(config, params) if has_adapters(params) else dict(params)
    check(config)
    layers_present = {name for _, _, name, _, _ in _modules(params)}
    stale = layers_present - set(config.lora_targets)
    params = merge_adapters(config, params) if stale else dict(params)
    model = dict(params["model"])
    block = dict(model["layers"])
    num_layers = config.num_hidden_layers
    for i, name in enumerate(config.lora_targets):
        group, n_in = LORA_MODULES[name]
        if group not in block or name not in block[group]:
            raise ValueError(f"lora.targets: the model has no {module_path(name)}")
        mod = dict(block[group][name])
        if "lora_a" in mod:
            continue
        shape = module_shape(config, name)
        bound = 1.0 / math.sqrt(math.prod(shape[:n_in]))
        key = jax.random.fold_in(rng, i)
        mod["lora_a"] = jax.random.uniform(key, (num_layers,) + shape[:n_in] + (config.lora_rank,), jnp.float32,
                                           -bound, bound)
        mod["lora_b"] = jnp.zeros((num_layers, config.lora_rank) + shape[n_in:], jnp.float32)
        grp = dict(block[group])
        grp[name] = mod
        block[group] = grp
    model["layers"] = block
    params["model"] = model
    if "score" in params:
        params["score"] = {"kernel": params["score"]["kernel"].astype(jnp.float32)}
    if config.quantization:  # QLoRA: the frozen kernels quantized (those already are stay as they are)
        params = quant.quantize_base(config, params, config.quantization)
    return params


def count(config: ModelConfig, params: Params) -> tuple[int, int]:
    """(trainable, total) parameter counts of `params` (arrays or ShapeDtypeStructs)."""
    trainable, frozen = split(config, params)
    size = lambda t: sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(t))  # noqa: E731
    n_train = size(trainable)
    return n_train, n_train + (size(frozen) if frozen else 0)
