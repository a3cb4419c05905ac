"""Direct preference optimisation on the policy's own pairs (iterative / online DPO).

Each round the schedule's RM (or r*) picks the best and the worst of the policy's S samples per
prompt; the policy takes DPO steps on those pairs against a frozen reference, the policy the
round started from. The reference's log-probabilities are computed once per phase, before
training, in one forward pass over the pairs (`prepare`), and travel with each pair, so a step
never holds a second copy of the policy.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from apo_jax import compiled, models, sharding
from apo_jax.training import losses
from apo_jax.training.objectives.base import Objective, Stats, register


@register
@dataclasses.dataclass(frozen=True)
class DPO(Objective):
    """-log sigmoid(beta * [log-ratio(y_w) - log-ratio(y_l)]) (+ label smoothing, + SFT on y_w)."""

    name = "dpo"
    head = "lm"

    beta: float = 0.1
    """Inverse temperature of the implicit reward beta * log(pi / pi_ref)."""
    label_smoothing: float = 0.0
    """Conservative DPO: the probability that a pair's preference label is flipped."""
    sft_weight: float = 0.0
    """Weight of the mean token NLL of y_w added to each pair's loss."""

    def __post_init__(self) -> None:
        problems = []
        if self.beta <= 0:
            problems.append(f"dpo.beta: {self.beta} must be > 0")
        if not 0.0 <= self.label_smoothing < 0.5:
            problems.append(f"dpo.label_smoothing: {self.label_smoothing} must be in [0, 0.5)")
        if self.sft_weight < 0:
            problems.append(f"dpo.sft_weight: {self.sft_weight} must be >= 0")
        if problems:
            raise ValueError("\n".join(problems))

    @classmethod
    def settings_from(cls, cfg: Any) -> dict[str, Any]:
        return {"beta": float(cfg.dpo.beta), "label_smoothing": float(cfg.dpo.label_smoothing),
                "sft_weight": float(cfg.dpo.sft_weight)}

    def examples(self, tokenizer: Any, records: Sequence[dict], data_cfg: Any) -> Any:
        """Pairs {prompt, chosen, rejected, [weight]} -> chosen_/rejected_ ids, mask, response_mask
        int32 [B, T]; weight f32 [B]; after `prepare`: ref_chosen, ref_rejected f32 [B]."""
        from apo_jax.data import pipeline

        return pipeline.pair_lm_set(tokenizer, records, data_cfg)

    def prepare(self, examples: Any, config: models.ModelConfig, params: Any, mesh: jax.sharding.Mesh,
                batch_size: int) -> Any:
        """Adds the reference (= `params`, the phase's starting policy) log-probs of both responses."""
        logp = _sequence_logprobs_fn(config, mesh)

        def both(g):
            return {side: logp(params, g[f"{side}_ids"], g[f"{side}_mask"], g[f"{side}_response_mask"])
                    for side in ("chosen", "rejected")}

        for side, values in sharding.map_batches(both, examples.batch, len(examples), mesh, batch_size).items():
            examples.extras[f"ref_{side}"] = values.astype(np.float32)
        return examples

    def batch_layout(self, rows: int, length: int) -> dict[str, tuple[tuple[int, ...], Any]]:
        i32, f32 = np.dtype(np.int32), np.dtype(np.float32)
        out = {f"{side}_{part}": ((rows, length), i32) for side in ("chosen", "rejected")
               for part in ("ids", "mask", "response_mask")}
        return {**out, "weight": ((rows,), f32), "ref_chosen": ((rows,), f32), "ref_rejected": ((rows,), f32)}

    def stats(self, config: models.ModelConfig, params: Any, batch: Mapping[str, jax.Array]) -> Stats:
        # Chosen and rejected run through the model as one [2B, T] forward.
        ids = jnp.concatenate([batch["chosen_ids"], batch["rejected_ids"]], axis=0)
        mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]], axis=0)
        resp = jnp.concatenate([batch["chosen_response_mask"], batch["rejected_response_mask"]], axis=0)
        logp = models.sequence_logprobs(config, params, ids, mask, resp)
        n = batch["chosen_ids"].shape[0]
        return losses.dpo_stats(logp[:n], logp[n:], batch["ref_chosen"], batch["ref_rejected"], batch["weight"],
                                jnp.sum(batch["chosen_response_mask"], axis=-1), beta=self.beta,
                                label_smoothing=self.label_smoothing, sft_weight=self.sft_weight)

    def metrics(self, stats: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        return losses.dpo_metrics(stats)


@compiled.cached("logprobs")
def _sequence_logprobs_fn(config: models.ModelConfig, mesh: jax.sharding.Mesh):
    """Jitted `(params, ids, mask, response_mask) -> log pi(y|x) [B]` on the mesh (one per model
    config and mesh, as `scoring.make_reward_fn`)."""

    def fn(params, ids, mask, resp):
        compiled.count("logprobs")
        with sharding.activation_sharding(mesh):
            return models.sequence_logprobs(config, params, ids, mask, resp)

    return jax.jit(fn)
