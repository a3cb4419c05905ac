"""Bradley-Terry ranking of reward models: RM_Base on D_P, APO-RM on D_P + D_APO (paper eq. 15)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from apo_jax import models
from apo_jax.training import losses
from apo_jax.training.objectives.base import Objective, Stats, register


@register
@dataclasses.dataclass(frozen=True)
class Ranking(Objective):
    """-log sigmoid(r(x, y_good) - r(x, y_bad)) over a weighted mixture of APO and human pairs.

    Each pair is scaled by `apo_weight` (gold-vs-sample pairs) or `human_weight` (human pairs);
    see `losses.rm_stats` for how this covers both the paper's and the official code's form.
    """

    name = "ranking"
    head = "score"

    apo_weight: float = 1.0
    """Weight of each APO (gold vs policy sample) pair."""
    human_weight: float = 1.0
    """Weight of each human preference pair."""
    margin_from_data: bool = False
    """Subtract each pair's data margin (`margin` in the batch; 0 for APO pairs) inside the BT term."""
    center_coef: float = 0.0
    """TRL's reward centering coefficient (0 = off)."""

    @classmethod
    def settings_from(cls, cfg: Any) -> dict[str, Any]:
        from apo_jax.config import apo_pair_weight

        return {"apo_weight": apo_pair_weight(cfg), "human_weight": float(cfg.rm.human_weight),
                "margin_from_data": bool(cfg.rm.get("margin_from_data", False)),
                "center_coef": float(cfg.rm.get("center_rewards_coefficient", 0.0))}

    def examples(self, tokenizer: Any, records: Sequence[dict], data_cfg: Any) -> Any:
        """Pairs {prompt, chosen, rejected, [weight], [is_apo]} -> chosen/rejected inputs.

        Batch: chosen_ids, chosen_mask, rejected_ids, rejected_mask int32 [B, T]; weight, margin
        f32 [B]; is_apo int32 [B].
        """
        from apo_jax.data import pipeline

        return pipeline.rm_set(tokenizer, records, data_cfg)

    def batch_layout(self, rows: int, length: int) -> dict[str, tuple[tuple[int, ...], Any]]:
        i32, f32 = np.dtype(np.int32), np.dtype(np.float32)
        return {"chosen_ids": ((rows, length), i32), "chosen_mask": ((rows, length), i32),
                "rejected_ids": ((rows, length), i32), "rejected_mask": ((rows, length), i32),
                "weight": ((rows,), f32), "is_apo": ((rows,), i32), "margin": ((rows,), f32)}

    def stats(self, config: models.ModelConfig, params: Any, batch: Mapping[str, jax.Array]) -> Stats:
        # Chosen and rejected run through the model as one [2B, T] forward.
        ids = jnp.concatenate([batch["chosen_ids"], batch["rejected_ids"]], axis=0)
        mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]], axis=0)
        r = models.rewards(config, params, ids, mask)
        n = batch["chosen_ids"].shape[0]
        return losses.rm_stats(r[:n], r[n:], batch["is_apo"], batch["weight"], apo_weight=self.apo_weight,
                               human_weight=self.human_weight,
                               margin=batch["margin"] if self.margin_from_data else None,
                               center_coef=self.center_coef)

    def metrics(self, stats: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        return losses.rm_metrics(stats)

    def describe(self) -> str:
        return "RM"
