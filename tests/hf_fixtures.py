"""Tiny random `transformers` LLaMA checkpoints made on the fly: the independent reference."""

from __future__ import annotations

import numpy as np
import torch
import transformers

BASE = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=56,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def hf_config(**overrides) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(**{**BASE, **overrides})


def random_causal_lm(seed: int = 0, **overrides) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(hf_config(**overrides)).eval()
    _randomise_norms(model, seed)
    return model


def random_reward_model(seed: int = 0, **overrides) -> transformers.LlamaForSequenceClassification:
    torch.manual_seed(seed)
    model = transformers.LlamaForSequenceClassification(hf_config(num_labels=1, **overrides)).eval()
    _randomise_norms(model, seed)
    with torch.no_grad():
        model.score.weight.normal_(0.0, 0.5)
    return model


def _randomise_norms(model: torch.nn.Module, seed: int) -> None:
    """Norm weights start at 1.0; perturb them so a swapped or dropped norm shows up."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))


def padded_batch(batch: int, length: int, vocab: int, side: str, seed: int = 0, min_len: int = 3):
    """Random ids [B, T] and a mask with rows of different real lengths, padded left or right."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, vocab, size=(batch, length)).astype(np.int32)
    mask = np.zeros((batch, length), np.int32)
    lengths = [length] + list(rng.randint(min_len, length, size=batch - 1))
    for i, n in enumerate(lengths):
        if side == "left":
            mask[i, length - n:] = 1
        else:
            mask[i, :n] = 1
    ids = np.where(mask == 1, ids, 0).astype(np.int32)
    return ids, mask


def torch_positions(mask: np.ndarray) -> torch.Tensor:
    return torch.tensor(np.maximum(np.cumsum(mask, -1) - 1, 0))


def torch_logits(model, ids: np.ndarray, mask: np.ndarray, keep: int = 0) -> np.ndarray:
    """The transformers model's float32 logits [B, T, V] of a padded batch (positions from the mask;
    `keep` > 0: only the last `keep` positions, transformers' `logits_to_keep`)."""
    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                     position_ids=torch_positions(mask), logits_to_keep=keep).logits.float().numpy()


def torch_rewards(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A one-label sequence classifier's float32 rewards [B] of a padded batch (positions from the mask)."""
    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                     position_ids=torch_positions(mask)).logits[:, 0].float().numpy()

