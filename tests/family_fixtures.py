"""Tiny random `transformers` models of every supported family, made by each family's own classes.

Each has 4 layers, random (not 0/1) norm weights and biases, and, where the family has one, a
sliding window (5) shorter than the test sequences, so a window, a bias, a norm or a cap that is
dropped or misplaced changes the outputs.
"""

from __future__ import annotations

import torch
import transformers

WINDOW = 5

COMMON = dict(vocab_size=97, hidden_size=32, intermediate_size=56, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, bos_token_id=1,
              eos_token_id=2, pad_token_id=0)

# family -> (config class, causal LM class, sequence-classification class, config overrides)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", "LlamaForSequenceClassification",
              dict(attention_bias=True, mlp_bias=True,
                   rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8})),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", "Qwen2ForSequenceClassification",
              dict(tie_word_embeddings=True, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2,
                   rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", "Qwen3ForSequenceClassification",
              dict(head_dim=16, attention_bias=True, use_sliding_window=True, sliding_window=WINDOW,
                   max_window_layers=1)),
    "mistral": ("MistralConfig", "MistralForCausalLM", "MistralForSequenceClassification",
                dict(sliding_window=WINDOW, head_dim=16)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", "Gemma2ForSequenceClassification",
               # Caps small enough to bite on random weights; query_pre_attn_scalar != head_dim.
               dict(head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=24, attn_logit_softcapping=2.0,
                    final_logit_softcapping=3.0, attention_bias=True)),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", "Gemma3TextForSequenceClassification",
                    dict(head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=24,
                         layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
                         rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4},
                                          "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}})),
}


def hf_config(family: str, **overrides) -> transformers.PreTrainedConfig:
    config_cls = getattr(transformers, FAMILIES[family][0])
    return config_cls(**{**COMMON, **FAMILIES[family][3], **overrides})


def random_model(family: str, *, reward: bool = False, seed: int = 0, **overrides) -> torch.nn.Module:
    """A random causal LM (or, with `reward`, a one-label sequence classifier) of `family`, eval mode."""
    _, lm_cls, rm_cls, _ = FAMILIES[family]
    torch.manual_seed(seed)
    config = hf_config(family, **({"num_labels": 1} if reward else {}), **overrides)
    if family.startswith("gemma"):
        config._attn_implementation = "eager"  # transformers' choice for soft-capped Gemma
    model = getattr(transformers, rm_cls if reward else lm_cls)(config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
            elif name == "score.weight":
                p.normal_(0.0, 0.5, generator=gen)
    return model
