"""The model: one decoder for every supported family, with two heads, the LM head (policy) and a
scalar reward head (RM), as pure functions over an explicit parameter pytree.

Numerics follow each family's `transformers` class so Hugging Face weights load without any
permutation. Layout by concern:

- `config`: `ModelConfig`, the switches families differ by, and how to run a model;
- `rope`, `layers` (norm, projections, MLP, embeddings), `attention` (the block and its kernels);
- `decoder`: blocks, the layer stack (scanned or per layer), remat, KV cache, initialisation;
- `lora`: LoRA adapters beside the kernels, the trainable/frozen split, merging;
- `heads`: LM logits, rewards, the chunked log-probability heads;
- `families/`: one file per family (`config.json` both ways, weight keys, partition rows) and the
  `FAMILIES` table keyed by HF `model_type`.
"""

from apo_jax.models import attention, decoder, heads, layers, lora, rope
from apo_jax.models.attention import (ATTENTION_BLOCK, attention_block, causal_length_attention, causal_slot_mask,
                                      layer_impls)
from apo_jax.models.config import ACTIVATIONS, ATTENTION_IMPLS, LAYER_TYPES, REMAT_POLICIES, ROPE_TYPES, ModelConfig
from apo_jax.models.decoder import (AUTO_REMAT_BYTES, PER_LAYER_PREFIX, Cache, Decoder, Params, cached_forward,
                                    hidden_states, init_cache, init_params, layer_window, new_reward_head,
                                    params_for_generation, positions_from_mask, remat_for)
from apo_jax.models.families import FAMILIES, Family, config_from_hf, config_to_hf, family_for
from apo_jax.models.heads import (last_token_index, lm_head_kernel, lm_logits, logits_from_hidden,
                                  logprobs_from_hidden, rewards, rewards_from_hidden, sequence_logprobs,
                                  token_logprobs, weighted_logprob_sum)
from apo_jax.models.layers import MLP, Embed, Linear, RMSNorm, project, softcap
from apo_jax.models.rope import apply_rope, rope_cos_sin, rope_inv_freq

__all__ = [  # the package's public surface (users' scripts import these names from apo_jax.models)
    'attention', 'decoder', 'heads', 'layers', 'lora', 'rope', 'ATTENTION_BLOCK', 'attention_block',
    'causal_length_attention', 'causal_slot_mask', 'layer_impls', 'ACTIVATIONS', 'ATTENTION_IMPLS', 'LAYER_TYPES',
    'REMAT_POLICIES', 'ROPE_TYPES', 'ModelConfig', 'AUTO_REMAT_BYTES', 'PER_LAYER_PREFIX', 'Cache', 'Decoder',
    'Params', 'cached_forward', 'hidden_states', 'init_cache', 'init_params', 'layer_window', 'new_reward_head',
    'params_for_generation', 'positions_from_mask', 'remat_for', 'FAMILIES', 'Family', 'config_from_hf',
    'config_to_hf', 'family_for', 'last_token_index', 'lm_head_kernel', 'lm_logits', 'logits_from_hidden',
    'logprobs_from_hidden', 'rewards', 'rewards_from_hidden', 'sequence_logprobs', 'token_logprobs',
    'weighted_logprob_sum', 'MLP', 'Embed', 'Linear', 'RMSNorm', 'project', 'softcap', 'apply_rope',
    'rope_cos_sin', 'rope_inv_freq',
]
