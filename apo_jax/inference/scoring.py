"""Reward-model scoring of (prompt, response) texts, batched on a mesh.

The one place texts become rewards: the game's scoring phases, RM evaluation and
`evaluation.score_texts` all call `score_texts_with`, so an exported RM scores the same
everywhere it is used.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np

from apo_jax import compiled, models, sharding


@compiled.cached("score")
def make_reward_fn(config: models.ModelConfig, mesh: jax.sharding.Mesh):
    """Jitted `(params, ids, mask) -> rewards [B]` on the mesh (one per model config and mesh, so
    every RM of a run shares its compiled programs)."""

    def score(params, ids, mask):
        compiled.count("score")
        with sharding.activation_sharding(mesh):
            return models.rewards(config, params, ids, mask)

    return jax.jit(score)


def score_texts_with(
    config: models.ModelConfig,
    params: Any,
    tokenizer: Any,
    texts: Sequence[tuple[str, str]],
    data_cfg: Any,
    mesh: jax.sharding.Mesh,
    batch_size: int,
) -> np.ndarray:
    """float32 rewards [N] of (prompt, response) texts, tokenised exactly like RM training inputs.

    In padded global batches (`sharding.map_batches`: one transfer at the end, the last batch's
    filler rows dropped).
    """
    from apo_jax.data import pipeline

    if not texts:
        return np.zeros((0,), np.float32)
    score_fn = make_reward_fn(config, mesh)
    examples = pipeline.score_set(tokenizer, texts, data_cfg)
    return sharding.map_batches(lambda g: score_fn(params, g["input_ids"], g["input_mask"]), examples.batch,
                                len(texts), mesh, batch_size)


def reward_stats(rewards: Sequence[float]) -> dict[str, float]:
    """{reward_mean, reward_std, reward_count} of rewards on a reference set: the normalisation an
    RM export records (`evaluation.score_texts(normalize=True)` gives (r - mean) / std)."""
    r = np.asarray(rewards, np.float64)
    if r.size == 0:
        raise ValueError("reward_stats: no rewards (the reference set is empty)")
    return {"reward_mean": float(r.mean()), "reward_std": float(r.std()), "reward_count": int(r.size)}


def normalize_rewards(rewards: np.ndarray, stats: dict[str, float]) -> np.ndarray:
    """(r - mean) / std with an export's `reward_stats` (std floored at 1e-8)."""
    return ((np.asarray(rewards, np.float64) - stats["reward_mean"]) / max(stats["reward_std"], 1e-8)).astype(np.float32)
