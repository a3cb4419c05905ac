"""QLoRA's frozen base: the decoder's projection kernels quantized with qwix (int8, int4 or NF4),
dequantized on the fly, one layer at a time, where `Linear` uses them.

A quantized kernel is a `qwix.QArray` (integer `qvalue` of the kernel's shape, float `scale` per
output channel and per block of `block` input rows) in the parameter tree where the dense kernel
was, so the layer scan slices it like any stacked weight and the sharding rules place its parts
by the kernel's row (`sharding.logical_axes_for`). Only the projections are quantized (as
bitsandbytes' QLoRA does): embeddings, norms, the LM and reward heads stay dense. Quantized
kernels are frozen: LoRA adapters (`models.lora`) train on top of them.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import qwix

from apo_jax.models.config import ModelConfig
from apo_jax.settings import QUANT_TYPES

QArray = qwix.QArray


def is_quantized(x: Any) -> bool:
    return isinstance(x, qwix.QArray)


def dequantize(x: Any, dtype: Any = None) -> jax.Array:
    """A dense kernel from a quantized one (in `dtype`, default the scale's); dense ones pass through."""
    if is_quantized(x):
        x = qwix.dequantize(x)
    return x if dtype is None else x.astype(dtype)


def _quantize_kernel(kernel: jax.Array, n_in: int, qtype: str, block: int, scale_dtype: Any) -> QArray:
    """[L, in..., out...]: a scale per (layer, output channel, block of the last input axis)."""
    nd = kernel.ndim
    last_in = n_in  # axis index of the last input axis (axis 0 is the layer)
    channelwise = (0,) + tuple(range(n_in + 1, nd))
    size = kernel.shape[last_in]
    tile = block if size % block == 0 else size
    return qwix.quantize(kernel.astype(jnp.float32), qtype, channelwise_axes=channelwise,
                         tiled_axes={last_in: tile}, scale_dtype=scale_dtype)


def quantize_base(config: ModelConfig, params: Mapping[str, Any], qtype: str, block: int = 64) -> dict[str, Any]:
    """`params` with every projection kernel of the layer stack quantized to `qtype` (scales in
    `param_dtype`); adapters, biases and the rest unchanged."""
    from apo_jax.models.lora import LORA_MODULES

    if qtype not in QUANT_TYPES:
        raise ValueError(f"quantization={qtype!r}; expected one of {QUANT_TYPES}")
    out = dict(params)
    model = dict(out["model"])
    layers = dict(model["layers"])
    for name, (group, n_in) in LORA_MODULES.items():
        grp = dict(layers[group])
        mod = dict(grp[name])
        if not is_quantized(mod["kernel"]):
            mod["kernel"] = _quantize_kernel(jnp.asarray(mod["kernel"]), n_in, qtype, block, config.weight_dtype)
        grp[name] = mod
        layers[group] = grp
    model["layers"] = layers
    out["model"] = model
    return out


def dequantize_tree(params: Any) -> Any:
    """`params` with every quantized kernel dense again (exports)."""
    return jax.tree_util.tree_map(lambda x: dequantize(x) if is_quantized(x) else x, params,
                                  is_leaf=is_quantized)


def nbytes(params: Any) -> int:
    """Bytes the params hold (a 4-bit qvalue counts half a byte)."""
    total = 0
    for x in jax.tree_util.tree_leaves(params):
        bits = jnp.iinfo(x.dtype).bits if jnp.issubdtype(x.dtype, jnp.integer) else jnp.dtype(x.dtype).itemsize * 8
        total += x.size * bits // 8
    return total
