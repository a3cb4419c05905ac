"""Every model family against its own `transformers` class: logits on left- and right-padded rows,
rewards, greedy decoding past the sliding window, and the HF export round trip."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from apo_jax import models, sharding
from apo_jax.inference import sampler
from apo_jax.io import hf
from family_fixtures import FAMILIES, WINDOW, random_model
from hf_fixtures import padded_batch, torch_logits, torch_rewards

ATOL = 1e-4


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_lm(request, tmp_path_factory):
    family = request.param
    model = random_model(family, seed=3)
    path = tmp_path_factory.mktemp(family) / "lm"
    model.save_pretrained(path)
    config, params = hf.load_pretrained(str(path))
    return family, model, config, params, path


def test_config_maps_the_family_switches(family_lm):
    family, model, config, _, _ = family_lm
    assert config.model_type == family and config.num_hidden_layers == 4
    hf_cfg = model.config
    sliding = [t == "sliding_attention" for t in getattr(hf_cfg, "layer_types", None) or
               ["sliding_attention" if getattr(hf_cfg, "sliding_window", None) else "full_attention"] * 4]
    assert list(config.sliding_layers) == sliding
    assert (sum(sliding) == 0) == (family == "llama")
    assert config.head_dim == (getattr(hf_cfg, "head_dim", None) or hf_cfg.hidden_size // hf_cfg.num_attention_heads)
    assert config.qk_norm == (family in ("qwen3", "gemma3_text"))
    assert config.sandwich_norms == config.norm_unit_offset == config.scale_embeddings == family.startswith("gemma")


@pytest.mark.parametrize("side", ["left", "right"])
def test_logits_match_transformers(family_lm, side):
    _, model, config, params, _ = family_lm
    ids, mask = padded_batch(3, 24, config.vocab_size, side, seed=1, min_len=WINDOW + 3)
    ref = torch_logits(model, ids, mask)
    out = np.asarray(models.lm_logits(config, params, jnp.asarray(ids), jnp.asarray(mask)))
    real = mask.astype(bool)
    np.testing.assert_allclose(out[real], ref[real], atol=ATOL, rtol=0)


def test_long_sequences_take_the_blocked_kernel_and_match_transformers(family_lm):
    """300 tokens: the 128-row query blocks, with no window (llama), a static one (every layer
    slides: mistral) or a traced one (a stack of both kinds)."""
    _, model, config, params, _ = family_lm
    ids, mask = padded_batch(2, 300, config.vocab_size, "right", seed=4, min_len=200)
    ref = torch_logits(model, ids, mask)
    out = np.asarray(models.lm_logits(config, params, jnp.asarray(ids), jnp.asarray(mask)))
    real = mask.astype(bool)
    np.testing.assert_allclose(out[real], ref[real], atol=ATOL, rtol=0)


@pytest.mark.parametrize("layout", ["stacked", "per_layer"])
def test_greedy_decoding_equals_transformers_generate_past_the_window(family_lm, layout):
    _, model, config, params, _ = family_lm
    ids, mask = padded_batch(3, 9, config.vocab_size, "left", seed=5, min_len=2)
    n = 3 * WINDOW  # decoding runs well past the window
    weights = params if layout == "stacked" else models.params_for_generation(config, params)
    out = sampler.generate(config, weights, ids, mask, jax.random.PRNGKey(0), num_samples=1, max_new_tokens=n,
                           temperature=0.0, eos_token_id=None)
    with torch.no_grad():
        ref = model.generate(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask), max_new_tokens=n,
                             do_sample=False, pad_token_id=0, eos_token_id=None, min_new_tokens=n)
    np.testing.assert_array_equal(np.asarray(out.tokens[:, 0]), ref[:, ids.shape[1]:].numpy())


def test_sft_and_dpo_log_probs_and_their_gradients_match_full_logits(family_lm):
    """The chunked heads (soft-capped for Gemma 2) against log_softmax of `lm_logits`, values and
    gradients, so the SFT and DPO objectives train every family."""
    _, _, config, params, _ = family_lm
    ids, mask = padded_batch(2, 12, config.vocab_size, "right", seed=6)
    coeff = np.random.RandomState(0).rand(*ids.shape).astype(np.float32) * mask

    def reference(p):
        logp = jax.nn.log_softmax(models.lm_logits(config, p, ids, mask)[:, :-1], axis=-1)
        tok = jnp.take_along_axis(logp, jnp.asarray(ids)[:, 1:, None], axis=-1)[..., 0]
        return jnp.sum(tok * coeff[:, 1:])

    fused = lambda p: models.weighted_logprob_sum(config, p, ids, mask, jnp.asarray(coeff), chunk_size=5)[0]  # noqa: E731
    chunked = lambda p: jnp.sum(models.token_logprobs(config, p, ids, mask, chunk_size=5)[0] * coeff)  # noqa: E731
    want, want_grad = jax.value_and_grad(reference)(params)
    for fn in (fused, chunked):
        got, got_grad = jax.value_and_grad(fn)(params)
        np.testing.assert_allclose(got, want, rtol=1e-5)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4), got_grad, want_grad)


def test_policy_export_loads_as_the_family_class_with_equal_logits(family_lm, tmp_path):
    family, model, config, params, _ = family_lm
    hf.save_pretrained(str(tmp_path / "out"), config, params)
    back, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert type(back).__name__ == FAMILIES[family][1] and back.config.model_type == family
    ids, mask = padded_batch(2, 16, config.vocab_size, "left", seed=7, min_len=WINDOW + 2)
    real = mask.astype(bool)
    np.testing.assert_allclose(torch_logits(back.eval(), ids, mask)[real], torch_logits(model, ids, mask)[real],
                               atol=1e-5, rtol=0)
    _, again = hf.load_pretrained(str(tmp_path / "out"))
    jax.tree_util.tree_map(np.testing.assert_array_equal, again, params)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_rewards_match_sequence_classification_and_export_round_trips(family, tmp_path):
    model = random_model(family, reward=True, seed=8)
    model.save_pretrained(tmp_path / "rm")
    config, params = hf.load_pretrained(str(tmp_path / "rm"))
    assert "score" in params and "lm_head" not in params
    for side in ("left", "right"):
        ids, mask = padded_batch(4, 20, config.vocab_size, side, seed=2, min_len=WINDOW + 2)
        np.testing.assert_allclose(np.asarray(models.rewards(config, params, ids, mask)),
                                   torch_rewards(model, ids, mask), atol=ATOL, rtol=0)
    hf.save_pretrained(str(tmp_path / "rm_out"), config, params)
    back = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm_out").eval()
    assert type(back).__name__ == FAMILIES[family][2] and back.config.num_labels == 1
    ids, mask = padded_batch(3, 14, config.vocab_size, "right", seed=3)
    with torch.no_grad():  # the standard usage: no position ids, HF pools the last non-pad token
        got = back(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits[:, 0].numpy()
    np.testing.assert_allclose(got, np.asarray(models.rewards(config, params, ids, mask)), atol=ATOL, rtol=0)


def test_every_parameter_of_every_family_has_a_partition_rule(family_lm):
    _, _, config, params, _ = family_lm
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2), jax.devices()[:8])
    with_head = {**params, "score": {"kernel": models.new_reward_head(config, jax.random.PRNGKey(0))}}
    for tree in (with_head, models.params_for_generation(config, params)):
        shardings = sharding.tree_shardings(tree, mesh)
        assert len(jax.tree_util.tree_leaves(shardings)) == len(jax.tree_util.tree_leaves(tree))
    # Placed by those rules, the model computes what it computes on one device.
    ids, mask = padded_batch(4, 16, config.vocab_size, "right", seed=9)

    def logits(p):
        with sharding.activation_sharding(mesh):
            return models.lm_logits(config, p, ids, mask)

    np.testing.assert_allclose(np.asarray(jax.jit(logits)(sharding.shard_tree(params, mesh))),
                               np.asarray(models.lm_logits(config, params, ids, mask)), atol=1e-5)
    with pytest.raises(sharding.ShardingRuleError, match="matches no rule"):
        sharding.tree_shardings({"model": {"layers": {"attn": {"r_proj": {"kernel": np.ones((4, 2))}}}}}, mesh)


def test_cudnn_requests_fall_back_to_xla_where_attention_is_soft_capped(family_lm):
    family, _, config, _, _ = family_lm
    impls = models.layer_impls(config.replace(attention_impl="cudnn"))
    assert impls == (("xla",) if family == "gemma2" else ("cudnn",)) * config.num_hidden_layers


def test_dot_product_attention_window_equals_the_xla_kernels_window():
    """The cuDNN path's `local_window_size` (run here by jax's own XLA implementation) sees the same
    keys as the sliding mask of the XLA kernels, static and traced."""
    rng = np.random.RandomState(0)
    q, k, v = (jnp.asarray(rng.randn(2, 20, n, 8).astype(np.float32)) for n in (4, 2, 2))
    mask = np.ones((2, 20), np.int32)
    mask[1, 14:] = 0
    ref = np.asarray(models.attention._xla_attention(q, k, v, jnp.asarray(mask), 0, WINDOW))
    out = np.asarray(models.causal_length_attention(q, k, v, jnp.asarray(mask), None, window=WINDOW))
    traced = jax.jit(lambda w: models.causal_length_attention(q, k, v, jnp.asarray(mask), None, window=w,
                                                              width=WINDOW))(jnp.int32(WINDOW))
    real = mask.astype(bool)
    np.testing.assert_allclose(out[real], ref[real], atol=1e-5)
    np.testing.assert_allclose(np.asarray(traced)[real], ref[real], atol=1e-5)
    # And a full layer of a mixed stack (FULL_WINDOW) is plain causal attention.
    full = jax.jit(lambda w: models.causal_length_attention(q, k, v, jnp.asarray(mask), None, window=w,
                                                            width=WINDOW))(jnp.int32(models.attention.FULL_WINDOW))
    np.testing.assert_allclose(np.asarray(full)[real], np.asarray(models.attention._xla_attention(q, k, v, jnp.asarray(mask), 0))[real],
                               atol=1e-5)


UNSUPPORTED = [
    pytest.param({"model_type": "mixtral"}, r"model_type: 'mixtral' is not supported; apo_jax reads llama, qwen2", id="moe-family"),
    pytest.param({"model_type": "qwen2", "num_experts": 8}, r"num_experts: mixture-of-experts", id="moe-field"),
    pytest.param({"model_type": "gemma3", "vision_config": {"model_type": "siglip"}}, r"model_type: 'gemma3' is not",
                 id="gemma3-multimodal"),
    pytest.param({"model_type": "gemma3_text", "use_bidirectional_attention": True},
                 r"use_bidirectional_attention: true is not supported", id="bidirectional"),
    pytest.param({"model_type": "qwen2", "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}},
                 r"qwen2 config: rope_scaling type 'yarn' is not supported", id="yarn"),
    pytest.param({"model_type": "llama", "hidden_act": "gelu"}, r"hidden_act: 'gelu' is not supported for llama",
                 id="activation"),
]


@pytest.mark.parametrize("edit,message", UNSUPPORTED)
def test_unsupported_families_and_features_are_one_line_naming_file_and_field(tmp_path, edit, message):
    model = random_model("qwen2")
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(edit)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(hf.CheckpointError) as err:
        hf.load_pretrained(str(tmp_path))
    text = str(err.value)
    assert "\n" not in text and text.startswith(str(tmp_path / "config.json") + ": "), text
    assert __import__("re").search(message, text), text


def test_export_refuses_a_switch_the_family_class_does_not_compute(tmp_path):
    config = models.ModelConfig(vocab_size=16, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=2, qk_norm=True)
    params = models.init_params(config, jax.random.PRNGKey(0))
    with pytest.raises(hf.CheckpointError, match="qk_norm set, which LlamaForCausalLM does not compute"):
        hf.save_pretrained(str(tmp_path / "out"), config, params)
    assert not (tmp_path / "out").exists()


def _mesh8():
    return sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2), jax.devices()[:8])


def _torch_token_logp(model, ids, mask):
    """log p(ids[t] | ids[:t]) [B, T] (0 at t = 0) from the transformers model."""
    logits = torch.tensor(torch_logits(model, ids, mask))
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, torch.tensor(ids[:, 1:], dtype=torch.long)[..., None])
    return np.concatenate([np.zeros((ids.shape[0], 1), np.float32), logp[..., 0].numpy()], axis=1)


def test_train_steps_of_every_objective_start_from_the_transformers_loss_and_learn(family_lm):
    """RM ranking, SFT and DPO steps on a data x fsdp x tensor mesh: the first step's loss equals
    the loss computed from the transformers model's own outputs, and a few steps lower it."""
    from apo_jax.training import train
    from apo_jax.training.objectives import DPO, SFT, Ranking

    family, model, config, params, path = family_lm
    mesh = _mesh8()
    opt = train.OptimizerConfig(lr=3e-3, warmup_steps=1, total_steps=8, schedule="constant")
    chosen, cmask = padded_batch(8, 16, config.vocab_size, "right", seed=10, min_len=WINDOW + 2)
    rejected, rmask = padded_batch(8, 16, config.vocab_size, "right", seed=11, min_len=WINDOW + 2)
    response = cmask * (np.arange(16)[None] >= 4)
    rresponse = rmask * (np.arange(16)[None] >= 4)

    # RM: transformers' RM of the same trunk with our fresh head -> -log sigmoid(r_w - r_l).
    rm = random_model(family, reward=True, seed=3)
    rm.model.load_state_dict(model.model.state_dict())
    head = np.asarray(models.new_reward_head(config, jax.random.PRNGKey(1), 0.5))
    with torch.no_grad():
        rm.score.weight.copy_(torch.tensor(head.T))
    margin = torch_rewards(rm, chosen, cmask) - torch_rewards(rm, rejected, rmask)
    rm_params = {**{k: v for k, v in params.items() if k != "lm_head"}, "score": {"kernel": jnp.asarray(head)}}
    rm_batch = dict(chosen_ids=chosen, chosen_mask=cmask, rejected_ids=rejected, rejected_mask=rmask,
                    weight=np.ones(8, np.float32), is_apo=np.zeros(8, np.int32))
    # SFT: the mean response-token NLL.
    sft_batch = dict(input_ids=chosen, attention_mask=cmask, loss_mask=response, weight=np.ones(8, np.float32))
    logp_w, logp_l = _torch_token_logp(model, chosen, cmask), _torch_token_logp(model, rejected, rmask)
    # DPO against a reference that is not the policy: log sigmoid(beta * (ratio_w - ratio_l)).
    ref_w, ref_l = np.full(8, -40.0, np.float32), np.full(8, -30.0, np.float32)
    dpo_batch = dict(chosen_ids=chosen, chosen_mask=cmask, chosen_response_mask=response, rejected_ids=rejected,
                     rejected_mask=rmask, rejected_response_mask=rresponse, weight=np.ones(8, np.float32),
                     ref_chosen=ref_w, ref_rejected=ref_l)
    pi_w, pi_l = (logp_w * response).sum(1), (logp_l * rresponse).sum(1)
    cases = [
        (Ranking(1.0, 1.0), rm_params, rm_batch, np.mean(np.logaddexp(0.0, -margin))),
        (SFT(), params, sft_batch, -(logp_w * response).sum() / response.sum()),
        (DPO(beta=0.1), params, dpo_batch, np.mean(np.logaddexp(0.0, -0.1 * ((pi_w - ref_w) - (pi_l - ref_l))))),
    ]
    for objective, start, batch, want in cases:
        state = train.init_state(config, start, opt, mesh)
        step = train.make_train_step(config, objective, opt, mesh)
        first = None
        for _ in range(6):
            state, metrics = step(state, sharding.shard_batch(batch, mesh))
            first = float(metrics["loss"]) if first is None else first
        np.testing.assert_allclose(first, want, rtol=2e-5, atol=2e-5, err_msg=objective.name)
        assert float(metrics["loss"]) < first, (objective.name, first, float(metrics["loss"]))
