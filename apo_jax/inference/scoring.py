"""Reward-model scoring of (prompt, response) texts, batched on a mesh.

The one place texts become rewards: the game's scoring phases, RM evaluation and
`evaluation.score_texts` all call `score_texts_with`, so an exported RM scores the same
everywhere it is used.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import numpy as np

from apo_jax import models, sharding


@functools.lru_cache(maxsize=32)
def make_reward_fn(config: models.ModelConfig, mesh: jax.sharding.Mesh):
    """Jitted `(params, ids, mask) -> rewards [B]` on the mesh (one per model config and mesh, so
    every RM of a run shares its compiled programs)."""

    def score(params, ids, mask):
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

    Batches stay on device until one transfer at the end, so the host builds the next batch while
    the device scores. The last batch is filled up with repeats (their scores are dropped).
    """
    from apo_jax.data import pipeline

    if not texts:
        return np.zeros((0,), np.float32)
    score_fn = make_reward_fn(config, mesh)
    examples = pipeline.score_set(tokenizer, texts, data_cfg)
    out = []
    for i in range(0, len(texts), batch_size):
        rows = np.arange(i, i + batch_size) % len(texts)
        g = sharding.shard_batch(examples.batch(rows), mesh)
        out.append(score_fn(params, g["input_ids"], g["input_mask"]))
    return np.concatenate([sharding.to_host(x) for x in out])[: len(texts)]
