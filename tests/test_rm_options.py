"""Reward-model options against NumPy: the data margin in the Bradley-Terry term, TRL's reward
centering, and the reward normalisation statistics of an export."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from apo_jax.config import base_config
from apo_jax.data import pipeline
from apo_jax.inference import scoring
from apo_jax.training import losses
from apo_jax.training.objectives.ranking import Ranking
from tests.tok_fixtures import llama_like_tokenizer

RNG = np.random.default_rng(0)
R_GOOD, R_BAD = RNG.normal(size=6).astype(np.float32), RNG.normal(size=6).astype(np.float32)
MARGIN = np.asarray([0.0, 1.0, 2.5, -0.5, 0.3, 0.0], np.float32)
IS_APO = np.asarray([0, 0, 1, 0, 1, 0], np.int32)
WEIGHT = np.asarray([1, 1, 1, 1, 1, 0], np.float32)  # the last row is batch filler


def np_log_sigmoid(x):
    return -np.log1p(np.exp(-x))


def test_margin_loss_matches_numpy():
    s = losses.rm_stats(jnp.asarray(R_GOOD), jnp.asarray(R_BAD), jnp.asarray(IS_APO), jnp.asarray(WEIGHT),
                        apo_weight=0.25, human_weight=1.0, margin=jnp.asarray(MARGIN))
    coef = WEIGHT * np.where(IS_APO > 0, 0.25, 1.0)
    want = np.sum(coef * -np_log_sigmoid(R_GOOD - R_BAD - MARGIN)) / WEIGHT.sum()
    m = losses.rm_metrics(s)
    np.testing.assert_allclose(m["loss"], want, rtol=1e-6)
    # Accuracy and the reported margin still read r_good - r_bad, not the shifted difference.
    valid = WEIGHT > 0
    np.testing.assert_allclose(m["accuracy"], np.mean((R_GOOD - R_BAD)[valid] > 0), rtol=1e-6)
    np.testing.assert_allclose(m["margin"], np.mean((R_GOOD - R_BAD)[valid]), rtol=1e-6)


def test_centering_matches_trls_form_with_unit_weights():
    ones, zeros = np.ones(5, np.float32), np.zeros(5, np.int32)
    loss, _ = losses.apo_rm_loss(jnp.asarray(R_GOOD[:5]), jnp.asarray(R_BAD[:5]), jnp.asarray(zeros),
                                 jnp.asarray(ones), apo_weight=1.0, human_weight=1.0, center_coef=0.01)
    # TRL RewardTrainer: -logsigmoid(r_c - r_r).mean() + coef * mean((r_c + r_r) ** 2)
    want = np.mean(-np_log_sigmoid(R_GOOD[:5] - R_BAD[:5])) + 0.01 * np.mean((R_GOOD[:5] + R_BAD[:5]) ** 2)
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    # Both options at once, with filler rows and mixed weights: the sum over row weights.
    s = losses.rm_stats(jnp.asarray(R_GOOD), jnp.asarray(R_BAD), jnp.asarray(IS_APO), jnp.asarray(WEIGHT),
                        apo_weight=0.5, human_weight=1.0, margin=jnp.asarray(MARGIN), center_coef=0.1)
    coef = WEIGHT * np.where(IS_APO > 0, 0.5, 1.0)
    num = np.sum(coef * -np_log_sigmoid(R_GOOD - R_BAD - MARGIN)) + 0.1 * np.sum(WEIGHT * (R_GOOD + R_BAD) ** 2)
    np.testing.assert_allclose(losses.rm_metrics(s)["loss"], num / WEIGHT.sum(), rtol=1e-6)


def test_options_are_off_by_default_and_read_from_the_config():
    plain = losses.rm_stats(jnp.asarray(R_GOOD), jnp.asarray(R_BAD), jnp.asarray(IS_APO), jnp.asarray(WEIGHT),
                            apo_weight=1.0, human_weight=1.0)
    want = np.sum(WEIGHT * -np_log_sigmoid(R_GOOD - R_BAD)) / WEIGHT.sum()
    np.testing.assert_allclose(losses.rm_metrics(plain)["loss"], want, rtol=1e-6)
    c = base_config()
    assert Ranking(**Ranking.settings_from(c)) == Ranking(apo_weight=0.1 / 4, human_weight=1.0)
    c.rm.margin_from_data, c.rm.center_rewards_coefficient = True, 0.01
    r = Ranking(**Ranking.settings_from(c))
    assert r.margin_from_data and r.center_coef == 0.01


def test_rm_batches_carry_the_data_margin_and_zero_for_pairs_without_one():
    d = ml_collections.ConfigDict(dict(rm_max_len=64, buckets=(64,), reward_position="last_token", prompt_format="hh"))
    pairs = [{"prompt": "\n\nHuman: a\n\nAssistant:", "chosen": "x", "rejected": "y", "margin": 1.5},
             {"prompt": "\n\nHuman: b\n\nAssistant:", "chosen": "x", "rejected": "y", "is_apo": 1}]
    batch = pipeline.rm_set(llama_like_tokenizer(), pairs, d).batch([0, 1], local=False)
    assert batch["margin"].tolist() == [1.5, 0.0] and batch["margin"].dtype == np.float32


def test_reward_statistics_and_normalisation_match_numpy():
    r = RNG.normal(3.0, 2.0, size=50)
    stats = scoring.reward_stats(r)
    assert stats == pytest.approx({"reward_mean": r.mean(), "reward_std": r.std(), "reward_count": 50})
    np.testing.assert_allclose(scoring.normalize_rewards(r[:5], stats), (r[:5] - r.mean()) / r.std(), rtol=1e-5)
    with pytest.raises(ValueError, match="reference set is empty"):
        scoring.reward_stats([])


def test_normalising_with_an_export_that_recorded_no_statistics_is_a_clear_error(tmp_path):
    import jax

    from apo_jax import models
    from apo_jax.evaluation import score_texts
    from apo_jax.io import hf
    from apo_jax.training import train

    tok = llama_like_tokenizer()
    config = models.ModelConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                bos_token_id=1, eos_token_id=2, pad_token_id=0)
    params = train.rm_params_from(config, models.init_params(config, jax.random.PRNGKey(0)), jax.random.PRNGKey(1),
                                  0.1)
    hf.save_pretrained(str(tmp_path / "rm"), config, params, tokenizer=tok)
    with pytest.raises(ValueError, match="records no reward_mean/reward_std; export the RM from a run with "
                                         "rm.reward_stats_set"):
        score_texts(str(tmp_path / "rm"), ["\n\nHuman: a\n\nAssistant:"], ["b"], normalize=True)
