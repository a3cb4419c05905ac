"""Supervised fine-tuning on response tokens (paper eq. 6): the policy's rejection-sampling update."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from apo_jax import models
from apo_jax.training import losses
from apo_jax.training.objectives.base import Objective, Stats, register


@register
@dataclasses.dataclass(frozen=True)
class SFT(Objective):
    """Masked next-token NLL of the response tokens (and the appended EOS)."""

    name = "sft"
    head = "lm"

    normalize: str = "token"
    """"token": every response token of the batch counts equally; "sequence": every sequence."""

    def __post_init__(self) -> None:
        if self.normalize not in losses.SFT_NORMALIZE:
            raise ValueError(f"sft.normalize: {self.normalize!r}; expected one of {losses.SFT_NORMALIZE}")

    @classmethod
    def settings_from(cls, cfg: Any) -> dict[str, Any]:
        return {"normalize": cfg.sft.normalize}

    def examples(self, tokenizer: Any, records: Sequence[dict], data_cfg: Any) -> Any:
        """Records {prompt, response, [weight]} -> input_ids, attention_mask, loss_mask int32 [B, T];
        weight f32 [B]."""
        from apo_jax.data import pipeline

        return pipeline.sft_set(tokenizer, records, data_cfg)

    def batch_layout(self, rows: int, length: int) -> dict[str, tuple[tuple[int, ...], Any]]:
        i32 = np.dtype(np.int32)
        return {"input_ids": ((rows, length), i32), "attention_mask": ((rows, length), i32),
                "loss_mask": ((rows, length), i32), "weight": ((rows,), np.dtype(np.float32))}

    def stats(self, config: models.ModelConfig, params: Any, batch: Mapping[str, jax.Array]) -> Stats:
        # Chunked over the sequence: no [B, T, V] float32 logits in the forward or the backward.
        # The loss is linear in the token log-probabilities, so the head's gradient is formed in
        # the forward pass (`weighted_logprob_sum`): no recomputed logits in the backward.
        coeff = losses.sft_loss_coefficients(batch["loss_mask"], batch["weight"], self.normalize)
        total, logp, hit = models.weighted_logprob_sum(
            config, params, batch["input_ids"], batch["attention_mask"], coeff)
        stats = losses.sft_stats_from_logprobs(logp, hit, batch["loss_mask"], batch["weight"], self.normalize)
        return {**stats, "loss_num": -total}

    def metrics(self, stats: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        return losses.sft_metrics(stats)
