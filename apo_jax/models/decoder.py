"""The decoder: blocks, the layer stack (scanned or per layer), remat policies, the KV cache, and
parameter initialisation.

Parameters are an explicit pytree; the layer stack is stored stacked along a leading `layers` axis
(so one HF key table maps every checkpoint) and run with `nn.scan`. Entries marked * exist only
when their switch is on (`ModelConfig`):

    {"model": {"embed": {"embedding": [V, D]},
               "layers": {"attn_norm": {"scale": [L, D]},
                          "attn": {"q_proj": {"kernel": [L, D, H, Dh], "bias"*: [L, H, Dh]},
                                   "k_proj": {"kernel": [L, D, K, Dh], "bias"*: [L, K, Dh]},
                                   "v_proj": {"kernel": [L, D, K, Dh], "bias"*: [L, K, Dh]},
                                   "o_proj": {"kernel": [L, H, Dh, D], "bias"*: [L, D]},
                                   "q_norm"*: {"scale": [L, Dh]}, "k_norm"*: {"scale": [L, Dh]}},
                          "post_attn_norm"*: {"scale": [L, D]},
                          "mlp_norm": {"scale": [L, D]},
                          "mlp": {"gate_proj": {"kernel": [L, D, F], "bias"*: [L, F]},
                                  "up_proj": {"kernel": [L, D, F], "bias"*: [L, F]},
                                  "down_proj": {"kernel": [L, F, D], "bias"*: [L, D]}},
                          "post_mlp_norm"*: {"scale": [L, D]}},
               "final_norm": {"scale": [D]}},
     "lm_head": {"kernel": [D, V]},     # absent when embeddings are tied
     "score": {"kernel": [D, 1]}}       # the reward head; absent for a policy

Shape suffixes: b batch, t query length, s key length (cache slots), d model width, n query heads,
k key/value heads, g query heads per K/V head, h head dim, f MLP width, v vocabulary, l layers.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from apo_jax import sharding
from apo_jax.models.attention import FULL_WINDOW, Attention, Cache, Window, log_attention_plan
from apo_jax.models import lora, quant
from apo_jax.models.config import ModelConfig
from apo_jax.models.layers import MLP, Embed, RMSNorm
from apo_jax.models.rope import rope_tables

Params = Mapping[str, Any]


def layer_window(config: ModelConfig, layer: jax.Array | int) -> Window:
    """The sliding window of layer `layer`: None for a full layer (or a stack without sliding
    layers), the width W where every layer slides or `layer` is a Python int, else (a traced index
    into a mixed stack) a traced scalar with full layers at `FULL_WINDOW`."""
    sliding = config.sliding_layers
    if not any(sliding):
        return None
    if all(sliding):
        return config.sliding_window
    if isinstance(layer, int):
        return config.sliding_window if sliding[layer] else None
    table = [config.sliding_window if s else FULL_WINDOW for s in sliding]
    return jnp.asarray(table, jnp.int32)[layer]


def _layer_rope(config: ModelConfig, rope_kbth: jax.Array, layer: jax.Array | int) -> tuple[jax.Array, jax.Array]:
    """The layer's cos, sin [B, T, h] from `rope.rope_tables` (kind 1 = the local RoPE of sliding layers)."""
    if rope_kbth.shape[0] == 1:
        return rope_kbth[0, 0], rope_kbth[0, 1]
    if isinstance(layer, int):
        kind = int(config.sliding_layers[layer])
    else:
        kind = jnp.asarray(config.sliding_layers, jnp.int32)[layer]
    table = jax.lax.dynamic_index_in_dim(rope_kbth, kind, 0, keepdims=False)
    return table[0], table[1]


class Block(nn.Module):
    """Pre-norm decoder block; with `sandwich_norms` (Gemma) the attention and MLP outputs are
    normed again before their residual adds."""

    config: ModelConfig

    @nn.compact
    def __call__(self, carry, rope_kbth, kv_mask_bs, cache_index):
        """carry: (hidden states, the whole stacked KV cache or None, this block's layer index)."""
        cfg = self.config
        x_btd, cache, layer = carry
        cos_bth, sin_bth = _layer_rope(cfg, rope_kbth, layer)
        attn_out, cache = Attention(cfg, name="attn")(
            RMSNorm(cfg, name="attn_norm")(x_btd), cos_bth, sin_bth, kv_mask_bs, cache, cache_index, layer,
            layer_window(cfg, layer))
        if cfg.sandwich_norms:
            attn_out = RMSNorm(cfg, name="post_attn_norm")(attn_out)
        x_btd = sharding.constrain(x_btd + attn_out, sharding.ACT_EMBED)
        mlp_out = MLP(cfg, name="mlp")(RMSNorm(cfg, name="mlp_norm")(x_btd))
        if cfg.sandwich_norms:
            mlp_out = RMSNorm(cfg, name="post_mlp_norm")(mlp_out)
        return (sharding.constrain(x_btd + mlp_out, sharding.ACT_EMBED), cache, layer + 1), None


# Weight projections go through `project` (a custom VJP, which the dot-based policies cannot see
# into), so each policy that keeps weight matmuls names their outputs ("proj") as well.
_SAVE_PROJ = jax.checkpoint_policies.save_only_these_names("proj")
_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.save_from_both_policies(jax.checkpoint_policies.checkpoint_dots, _SAVE_PROJ),
    "dots_no_batch": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable, _SAVE_PROJ),
    # Every projection's output (the weight matmuls) and the attention output; the norms, RoPE,
    # the gated MLP's elementwise product and the attention probabilities are recomputed.
    # No weight matmul runs twice, so it costs a few percent of a step, while a layer keeps
    # ~(4D + 2F + 2Kh) values per token instead of ~(8D + 6F): 0.35-0.4x the residuals of "none".
    "minimal": jax.checkpoint_policies.save_only_these_names("proj", "attn_out"),
}

# "auto" keeps every activation ("none") while the layers' residuals under "none" stay below this
# many bytes, and switches to "minimal" above it: small models and batches (tests, the synthetic
# demo) compile the plain program, real models (SmolLM2-135M at 4k tokens: ~7 GiB) do not pay
# 2.5x the activation memory for a few percent of speed.
AUTO_REMAT_BYTES = 1 << 30


def remat_for(config: ModelConfig, batch: int, length: int) -> str:
    """The remat policy a forward over [batch, length] tokens runs with ("auto" resolved).

    The estimate counts what a layer keeps per token under "none": about 8 D-wide and 6 F-wide
    values (norm inputs and outputs, q/k/v, the residuals, gate, up, the activation, their product).
    """
    if config.remat_policy != "auto":
        return config.remat_policy
    per_token = (8 * config.hidden_size + 6 * config.intermediate_size) * jnp.dtype(config.compute_dtype).itemsize
    saved = batch * length * config.num_hidden_layers * per_token
    return "none" if saved <= AUTO_REMAT_BYTES else "minimal"


PER_LAYER_PREFIX = "layer_"
"""Key prefix of the per-layer blocks in `params_for_generation`'s layout ("layer_0", ...)."""


class Decoder(nn.Module):
    """The trunk: embeddings, L decoder blocks, final norm. Returns hidden states.

    The blocks' parameters are stacked [L, ...] under "layers" and run by `nn.scan` (training,
    scoring, checkpoints), or, with `per_layer`, held as L separate trees "layer_0" ... and run
    by an unrolled Python loop: the decode layout of `params_for_generation`, where each step's
    dots read a layer's weights where they lie instead of a `dynamic-slice` copy of them (and each
    layer's window and RoPE kind are static).
    """

    config: ModelConfig
    per_layer: bool = False

    @nn.compact
    def __call__(
        self,
        input_ids_bt: jax.Array,
        positions_bt: jax.Array,
        kv_mask_bs: jax.Array,
        cache: Cache | None = None,
        cache_index: jax.Array | int = 0,
    ) -> tuple[jax.Array, Cache | None]:
        """`kv_mask_bs`: which key slots hold real tokens (without a cache, the padding mask [B, T])."""
        cfg = self.config
        log_attention_plan(cfg)
        x_btd = Embed(cfg, name="embed")(input_ids_bt)
        x_btd = sharding.constrain(x_btd, sharding.ACT_EMBED)
        rope_kbth = rope_tables(cfg, positions_bt)

        block = Block
        # Only a differentiated forward keeps residuals; decoding with a cache never does.
        policy = "none" if cache is not None else remat_for(cfg, *input_ids_bt.shape)
        if policy != "none":
            block = nn.remat(Block, policy=_REMAT[policy], prevent_cse=not cfg.scan_layers or self.per_layer)
        if self.per_layer:
            carry = (x_btd, cache, 0)  # a static layer index: each layer's cache slice is a fixed offset
            for i in range(cfg.num_hidden_layers):
                carry, _ = block(cfg, name=f"{PER_LAYER_PREFIX}{i}")(carry, rope_kbth, kv_mask_bs, cache_index)
            x_btd, cache, _ = carry
            return RMSNorm(cfg, name="final_norm")(x_btd), cache
        stack = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
            length=cfg.num_hidden_layers,
            unroll=1 if cfg.scan_layers else cfg.num_hidden_layers,
        )
        # The KV cache rides in the carry, whole: each layer updates its slice in place. (As a
        # scanned input/output it would be sliced into per-layer copies and restacked every call,
        # a few full-cache copies per decoded token.)
        (x_btd, cache, _), _ = stack(cfg, name="layers")((x_btd, cache, jnp.int32(0)), rope_kbth, kv_mask_bs,
                                                         cache_index)
        return RMSNorm(cfg, name="final_norm")(x_btd), cache


def _trunk(config: ModelConfig, model_params: Params) -> Decoder:
    """The trunk for these parameters: scanned (stacked "layers") or per-layer ("layer_0", ...)."""
    return Decoder(config, per_layer="layers" not in model_params)


def positions_from_mask(attention_mask_bt: jax.Array) -> jax.Array:
    """RoPE positions [B, T]: 0,1,2,... over real tokens; padding gets 0 (it is never attended)."""
    mask = attention_mask_bt.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)


def hidden_states(
    config: ModelConfig,
    params: Params,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    positions: jax.Array | None = None,
) -> jax.Array:
    """Final-normed hidden states [B, T, D] (compute dtype) for a padded batch, no cache.

    Rows may be padded on either side with the xla attention; `attention_impl="cudnn"` reads the
    mask as sequence lengths and needs right padding (`attention.causal_length_attention`).
    """
    if positions is None:
        positions = positions_from_mask(attention_mask)
    hidden, _ = _trunk(config, params["model"]).apply({"params": params["model"]}, input_ids, positions, attention_mask)
    return hidden


def init_params(
    config: ModelConfig,
    rng: jax.Array,
    *,
    lm_head: bool = True,
    reward_head: bool = False,
    reward_head_std: float = 0.0,
) -> dict[str, Any]:
    """Random parameters (normal(0.02) matrices, zero biases, identity norms) in `config.param_dtype`.

    `lm_head` adds the untied output projection (ignored when embeddings are tied); `reward_head`
    adds `score` initialised with normal(reward_head_std) (0.0 gives a zero head).
    """
    trunk_rng, lm_rng, score_rng = jax.random.split(rng, 3)
    ids = jnp.zeros((1, 1), jnp.int32)
    variables = Decoder(config).init(trunk_rng, ids, ids, jnp.ones((1, 1), bool))
    params: dict[str, Any] = {"model": dict(variables["params"])}
    if lm_head and not config.tie_word_embeddings:
        kernel = 0.02 * jax.random.normal(lm_rng, (config.hidden_size, config.vocab_size), jnp.float32)
        params["lm_head"] = {"kernel": kernel.astype(config.weight_dtype)}
    if reward_head:
        params["score"] = {"kernel": new_reward_head(config, score_rng, reward_head_std)}
    if config.quantization:
        params = quant.quantize_base(config, params, config.quantization)
    return params


def new_reward_head(config: ModelConfig, rng: jax.Array, std: float = 0.0) -> jax.Array:
    """A fresh [D, 1] score kernel: zeros (std=0) or normal(std)."""
    kernel = std * jax.random.normal(rng, (config.hidden_size, 1), jnp.float32)
    # Under LoRA the head trains beside float32 adapters over a frozen (maybe bfloat16) base.
    return kernel if config.lora_rank else kernel.astype(config.weight_dtype)


def params_for_generation(config: ModelConfig, params: Params) -> Params:
    """The LM's parameters for sampling: in the compute dtype, the layer stack split per layer
    (the reward head, read in float32, is dropped).

    Every LM-path use of a parameter casts it to the compute dtype first (`Linear`, `Embed`,
    `RMSNorm`, the LM head), so sampling with these gives the same samples while each decode step
    reads half the weight bytes of float32 master weights under bfloat16 compute. The stacked
    [L, ...] block weights become L trees "layer_0", ... (`Decoder(per_layer=True)`), so a
    decode step's dots read each layer's weights in place: from the stack, every step copied each
    layer's slice first (`dynamic-slice`, a quarter of a SmolLM2-135M decode step on CPU). The
    split is one copy of the block weights, made once per sampling phase, held on top of the
    training weights while the phase runs. Shardings of the weights' own axes are kept; params
    already split are only cast.
    """
    # LoRA adapters are folded into the kernels here, once per phase: this is already a copy of
    # the block weights, so decode steps run the plain projections at no extra memory.
    # A quantized (QLoRA) base stays quantized, its adapters applied unmerged.
    lm = lora.merge_adapters(config, {k: v for k, v in params.items() if k != "score"}, keep_quantized=True)
    model = dict(lm["model"])
    layers = model.pop("layers", None)
    if layers is not None:
        for i in range(config.num_hidden_layers):
            model[f"{PER_LAYER_PREFIX}{i}"] = jax.tree_util.tree_map(lambda x: x[i], layers)
    lm["model"] = model
    if config.compute_dtype == config.weight_dtype:
        return lm
    dtype = config.compute_dtype
    return jax.tree_util.tree_map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, lm)


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype: Any = None) -> Cache:
    """Zeroed KV cache {"k", "v"}: [L, B, S, K, h] each, in the compute dtype by default.

    Sliding-window layers keep every slot too (one stacked array for the layer scan); their
    queries read only the last W (`attention.causal_slot_mask`)."""
    shape = (config.num_hidden_layers, batch, max_len, config.num_key_value_heads, config.head_dim)
    dtype = dtype or config.compute_dtype
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def cached_forward(
    config: ModelConfig,
    params: Params,
    input_ids_bt: jax.Array,
    positions_bt: jax.Array,
    kv_mask_bs: jax.Array,
    cache: Cache,
    cache_index: jax.Array | int,
) -> tuple[jax.Array, Cache]:
    """Runs T new tokens written at cache slots [cache_index, cache_index + T).

    `kv_mask_bs` marks the cache slots that hold real tokens (prompt padding is False); a query
    at slot i attends slots s <= i with kv_mask True (and s > i - W in a sliding layer). Returns
    final hidden states [B, T, D] and the updated cache.
    """
    return _trunk(config, params["model"]).apply(
        {"params": params["model"]}, input_ids_bt, positions_bt, kv_mask_bs, cache, cache_index)
