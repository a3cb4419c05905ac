"""Reward-model evaluation (paper Section 4.1): preference accuracy and calibration (ECE),
and `score_texts`, the stable entry point for scoring texts with a trained or exported RM.

The metrics are host-side NumPy: they run once per evaluation over a few thousand scores.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def preference_accuracy(r_good, r_bad) -> float:
    """Fraction of pairs with r(good) > r(bad); ties count as wrong."""
    r_good, r_bad = np.asarray(r_good, np.float64), np.asarray(r_bad, np.float64)
    if r_good.size == 0:
        return float("nan")
    return float(np.mean(r_good > r_bad))


def calibration_bins(r_good, r_bad, num_bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-bin (count, observed fraction o_b, mean predicted probability e_b).

    Q = sigmoid(r_good - r_bad) is the RM's probability that `good` is preferred. Each pair is
    counted in both orders, (Q, 1) and (1 - Q, 0), as Bai et al. (2022) and the official APO code
    do. Bin b holds Q in [b/B, (b+1)/B) (the last bin includes 1.0). Empty bins have o_b = e_b = 0.
    """
    diff = np.asarray(r_good, np.float64) - np.asarray(r_bad, np.float64)
    q = 1.0 / (1.0 + np.exp(-diff))
    probs = np.concatenate([q, 1.0 - q])
    labels = np.concatenate([np.ones_like(q), np.zeros_like(q)])
    idx = np.clip(np.floor(probs * num_bins).astype(int), 0, num_bins - 1)
    counts = np.bincount(idx, minlength=num_bins).astype(np.float64)
    safe = np.maximum(counts, 1.0)
    observed = np.bincount(idx, weights=labels, minlength=num_bins) / safe
    expected = np.bincount(idx, weights=probs, minlength=num_bins) / safe
    return counts, observed, expected


def expected_calibration_error(r_good, r_bad, num_bins: int = 10, weighted: bool = False) -> float:
    """ECE of the RM's preference probabilities.

    weighted=False: the paper's form, (1/B) * sum over non-empty bins of |o_b - e_b| (an empty
    bin adds nothing but still counts in B).
    weighted=True: the usual count-weighted form, sum_b (n_b / N) |o_b - e_b| (the official
    code's).
    """
    if np.asarray(r_good).size == 0:
        return float("nan")
    counts, observed, expected = calibration_bins(r_good, r_bad, num_bins)
    gaps = np.abs(observed - expected) * (counts > 0)
    if weighted:
        return float(np.sum(counts * gaps) / np.sum(counts))
    return float(np.sum(gaps) / num_bins)


def score_texts(rm_dir: str, prompts: Sequence[str], responses: Sequence[str], *,
                batch_size: int = 16, prompt_format: str | None = None, normalize: bool = False) -> np.ndarray:
    """float32 rewards [N] of (prompt, response) texts by the reward model in `rm_dir`.

    `rm_dir` is an apo_jax export (`run_dir/export/rm_*`) or any Hugging Face
    `LlamaForSequenceClassification(num_labels=1)` directory (local, gs:// or hub id) with its
    tokenizer. Texts are scored exactly as the game scores them: `prompt + " " + response`
    (the prompt alone for an empty response) through the directory's tokenizer (`data.pipeline.score_set`), the reward read at the last
    token (`models.rewards`), batches of `batch_size` (rounded up to a multiple of the devices)
    on a mesh over all local devices, one compiled program per length bucket. An export made
    with `data.reward_position="eos"` has a tokenizer that appends the EOS itself.
    `prompt_format` ("hh" or "chat_template", as `data.prompt_format`) defaults to what the
    export recorded in `apo_jax_scoring.json`, else "hh". `normalize=True` returns
    (r - mean) / std with the reward statistics the export recorded (`rm.reward_stats_set`);
    ValueError when it recorded none.
    """
    import json
    import os

    import jax
    import ml_collections

    from apo_jax import sharding
    from apo_jax.inference import scoring
    from apo_jax.io import hf
    from apo_jax.data import tokenize

    prompts, responses = list(prompts), list(responses)
    if len(prompts) != len(responses):
        raise ValueError(f"score_texts: {len(prompts)} prompts but {len(responses)} responses")
    if batch_size < 1:
        raise ValueError(f"score_texts: batch_size {batch_size} must be >= 1")
    mesh = sharding.make_mesh(sharding.MeshConfig(1, -1, 1), jax.local_devices())
    config, params = hf.load_pretrained(rm_dir, mesh=mesh)
    if "score" not in params:
        raise hf.CheckpointError(f"{rm_dir}: has no score.weight; expected a reward model "
                                 "(a *ForSequenceClassification checkpoint, num_labels=1)")
    tokenizer = tokenize.load_tokenizer(rm_dir)
    recorded_path = os.path.join(hf.resolve_checkpoint_dir(rm_dir), hf.SCORING_NAME)
    recorded = {}
    if os.path.exists(recorded_path):
        with open(recorded_path) as f:
            recorded = json.load(f)
    if prompt_format is None:
        prompt_format = recorded.get("prompt_format", "hh")
    if normalize and not {"reward_mean", "reward_std"} <= set(recorded):
        raise ValueError(f"score_texts: normalize=True but {recorded_path} records no reward_mean/reward_std; "
                         "export the RM from a run with rm.reward_stats_set (dev, test or rm)")
    max_len = int(config.max_position_embeddings)
    buckets = tuple(sorted({min(2 ** k, max_len) for k in range(4, max_len.bit_length() + 1)}))
    # The game's RM data settings; the tokenizer itself adds what an "eos" export needs.
    data_cfg = ml_collections.ConfigDict(dict(rm_max_len=max_len, buckets=buckets, reward_position="last_token",
                                              prompt_format=prompt_format))
    n = mesh.devices.size
    batch = -(-batch_size // n) * n
    rewards = scoring.score_texts_with(config, params, tokenizer, list(zip(prompts, responses)), data_cfg, mesh, batch)
    return scoring.normalize_rewards(rewards, recorded) if normalize else rewards
