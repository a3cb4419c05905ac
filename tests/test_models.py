"""The Flax LLaMA against `transformers` PyTorch: logits and rewards on padded batches."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.extend import core as jax_core

from apo_jax import models
from apo_jax.io import hf
from hf_fixtures import padded_batch, random_causal_lm, random_reward_model, torch_positions

ROPE_CASES = {
    "default": {},
    "linear": {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    # max_position_embeddings 16 < sequence 24, so dynamic NTK scaling really changes the base.
    "dynamic": {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}, "max_position_embeddings": 16},
    "llama3": {
        "rope_scaling": {
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8,
        },
        "rope_theta": 500000.0,
    },
}

MODEL_CASES = [
    pytest.param({"num_key_value_heads": 4}, id="mha-untied"),
    pytest.param({"num_key_value_heads": 2}, id="gqa-untied"),
    pytest.param({"num_key_value_heads": 1, "tie_word_embeddings": True}, id="mqa-tied"),
    pytest.param({"num_key_value_heads": 2, "head_dim": 16}, id="gqa-wide-heads"),
]


def _load(tmp_path, model, **runtime):
    model.save_pretrained(tmp_path)
    return hf.load_pretrained(str(tmp_path), **runtime)


def _torch_logits(model, ids, mask):
    with torch.no_grad():
        out = model(
            torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask),
            position_ids=torch_positions(mask),
        )
    return out.logits.float().numpy()


# Every architecture with plain RoPE, and every RoPE scaling on the GQA architecture.
LOGIT_CASES = [pytest.param(a.values[0], "default", id=a.id + "-default") for a in MODEL_CASES] + [
    pytest.param({"num_key_value_heads": 2}, r, id="gqa-" + r) for r in ROPE_CASES if r != "default"
]


@pytest.mark.parametrize("arch,rope", LOGIT_CASES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_logits_match_transformers(tmp_path, rope, arch, side):
    model = random_causal_lm(seed=3, **arch, **ROPE_CASES[rope])
    config, params = _load(tmp_path, model)
    ids, mask = padded_batch(3, 24, model.config.vocab_size, side, seed=1)
    ref = _torch_logits(model, ids, mask)
    out = np.asarray(models.lm_logits(config, params, jnp.asarray(ids), jnp.asarray(mask)))
    assert out.dtype == np.float32 and out.shape == ref.shape
    real = mask.astype(bool)
    np.testing.assert_allclose(out[real], ref[real], atol=1e-4, rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_rewards_match_sequence_classification(tmp_path, side):
    model = random_reward_model(seed=5)
    config, params = _load(tmp_path, model)
    assert "score" in params and "lm_head" not in params
    ids, mask = padded_batch(4, 20, model.config.vocab_size, side, seed=2)
    # HF pools the rightmost non-pad token, so give it the pad id; left padding needs positions.
    assert model.config.pad_token_id == 0
    with torch.no_grad():
        ref = model(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                    position_ids=torch_positions(mask)).logits[:, 0].numpy()
    out = np.asarray(models.rewards(config, params, jnp.asarray(ids), jnp.asarray(mask)))
    assert out.shape == (4,)
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


def test_reward_ignores_padding_content(tmp_path):
    """The reward is read at the last real token, never at a pad (TRL #937): changing pad ids or
    the amount of padding must not move it."""
    model = random_reward_model(seed=7)
    config, params = _load(tmp_path, model)
    ids, mask = padded_batch(2, 12, model.config.vocab_size, "right", seed=3)
    base = np.asarray(models.rewards(config, params, ids, mask))
    noisy = np.where(mask == 1, ids, 5)
    longer = np.concatenate([noisy, np.full((2, 7), 9, np.int32)], axis=1)
    longer_mask = np.concatenate([mask, np.zeros((2, 7), np.int32)], axis=1)
    np.testing.assert_allclose(np.asarray(models.rewards(config, params, longer, longer_mask)), base, atol=1e-5)


def test_bfloat16_compute_close_to_float32(tmp_path):
    model = random_causal_lm(seed=11)
    config, params = _load(tmp_path, model)
    bf_config, bf_params = _load(tmp_path / "again", model, param_dtype="bfloat16", dtype="bfloat16")
    assert bf_params["model"]["embed"]["embedding"].dtype == jnp.bfloat16
    ids, mask = padded_batch(2, 16, model.config.vocab_size, "right", seed=4)
    ref = np.asarray(models.lm_logits(config, params, ids, mask))
    out = np.asarray(models.lm_logits(bf_config, bf_params, ids, mask))
    assert out.dtype == np.float32
    real = mask.astype(bool)
    # bf16 has 8 mantissa bits: a loose bound, but far below the logit spread.
    assert np.abs(out[real] - ref[real]).max() < 0.05 * np.abs(ref[real]).max() + 0.05
    # The chunked LM head (`project` with float32 logits from bf16 operands) and its gradient.
    def summed_logp(cfg, p):
        return jnp.sum(models.token_logprobs(cfg, p, ids, mask, chunk_size=5)[0] * mask)

    # The head's dot itself yields float32 logits from bf16 operands (not bf16 logits cast later).
    jaxpr = str(jax.make_jaxpr(lambda p: summed_logp(bf_config, p))(bf_params))
    assert f"f32[2,5,{model.config.vocab_size}] = dot_general" in jaxpr
    ref_lp, ref_g = jax.value_and_grad(lambda p: summed_logp(config, p))(params)
    lp, g = jax.value_and_grad(lambda p: summed_logp(bf_config, p))(bf_params)
    assert lp.dtype == jnp.float32
    assert abs(float(lp) - float(ref_lp)) < 0.02 * abs(float(ref_lp))
    for path in (("model", "embed", "embedding"), ("model", "final_norm", "scale")):
        a, b = ref_g, g
        for key in path:
            a, b = a[key], b[key]
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.linalg.norm(b - a) < 0.05 * np.linalg.norm(a), path


@pytest.mark.parametrize("policy", ["minimal", "full", "dots", "dots_no_batch"])
def test_remat_and_unrolled_layers_give_same_logits_and_grads(tmp_path, policy):
    model = random_causal_lm(seed=13)
    config, params = _load(tmp_path, model)
    ids, mask = padded_batch(2, 10, model.config.vocab_size, "right", seed=5)

    def loss(cfg, p):
        return jnp.sum(models.lm_logits(cfg, p, ids, mask) ** 2) * 1e-3

    ref_val, ref_grad = jax.value_and_grad(lambda p: loss(config, p))(params)
    for variant in (config.replace(remat_policy=policy), config.replace(scan_layers=False)):
        val, grad = jax.value_and_grad(lambda p: loss(variant, p))(params)
        np.testing.assert_allclose(val, ref_val, rtol=1e-5)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), grad, ref_grad)


def test_projection_gradients_match_torch_autograd(tmp_path):
    """Every weight projection's gradient (written out in `models.project`'s custom VJP) equals
    PyTorch's autograd, on a GQA reward model with right and left padding."""
    model = random_reward_model(seed=23)
    config, params = _load(tmp_path, model)
    ids, mask = padded_batch(4, 12, model.config.vocab_size, "right", seed=9)
    ids[2:], mask[2:] = padded_batch(2, 12, model.config.vocab_size, "left", seed=10)
    weights_b = np.array([1.0, -2.0, 0.5, 3.0], np.float32)  # a loss whose rows all differ
    r = model(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
              position_ids=torch_positions(mask)).logits[:, 0]
    (r * torch.tensor(weights_b)).sum().backward()
    grad = jax.grad(lambda p: jnp.sum(models.rewards(config, p, jnp.asarray(ids), jnp.asarray(mask)) * weights_b))(
        params)
    layers = grad["model"]["layers"]
    for i, layer in enumerate(model.model.layers):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            ours = np.asarray(layers["attn"][name]["kernel"][i])
            ours = ours.reshape(-1, ours.shape[-1]) if name == "o_proj" else ours.reshape(ours.shape[0], -1)
            ref = getattr(layer.self_attn, name).weight.grad.numpy().T
            np.testing.assert_allclose(ours, ref, atol=2e-5, rtol=1e-4, err_msg=f"layer {i} {name}")
        for name in ("gate_proj", "up_proj", "down_proj"):
            ours = np.asarray(layers["mlp"][name]["kernel"][i])
            ref = getattr(layer.mlp, name).weight.grad.numpy().T
            np.testing.assert_allclose(ours, ref, atol=2e-5, rtol=1e-4, err_msg=f"layer {i} {name}")


@pytest.mark.parametrize("policy,recomputed", [("none", 0), ("minimal", 0), ("dots_no_batch", 0), ("full", 6)])
def test_remat_policies_recompute_no_weight_matmul_unless_full(policy, recomputed):
    """The policies that keep weight matmuls still see them through `project`'s custom VJP (its
    output is named "proj"): only "full" reruns a layer's projections in the backward, the six
    whose outputs it needs (down_proj's output only feeds the residual sum)."""
    config = models.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, remat_policy=policy)
    params = models.init_params(config, jax.random.PRNGKey(0), reward_head=True, reward_head_std=0.02)
    ids, mask = jnp.ones((2, 8), jnp.int32), jnp.ones((2, 8), jnp.int32)
    grad_fn = jax.grad(lambda p: jnp.sum(models.rewards(config, p, ids, mask)))

    def weight_dots(jaxpr) -> int:
        """dot_generals without batch dimensions (the weight matmuls: attention's einsums have
        batch dims), counted through sub-jaxprs (the layer scan's body once)."""
        n = 0
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
                n += not lb  # projections have no batch dims; attention's einsums do
            for sub in jax_core.jaxprs_in_params(eqn.params):
                n += weight_dots(sub)
        return n

    plain = config.replace(remat_policy="none")
    baseline = weight_dots(jax.make_jaxpr(jax.grad(lambda p: jnp.sum(models.rewards(plain, p, ids, mask))))(
        params).jaxpr)
    assert weight_dots(jax.make_jaxpr(grad_fn)(params).jaxpr) == baseline + recomputed


def test_config_rejects_bad_fields():
    with pytest.raises(ValueError, match="num_key_value_heads"):
        models.ModelConfig(num_attention_heads=6, num_key_value_heads=4, hidden_size=48)
    with pytest.raises(ValueError, match="remat_policy"):
        models.ModelConfig(remat_policy="sometimes")
    with pytest.raises(ValueError, match="model_type: 'gpt2' is not supported; apo_jax reads llama, qwen2, qwen3, mistral, gemma2, gemma3_text"):
        models.ModelConfig.from_hf({"model_type": "gpt2", "vocab_size": 8})
    with pytest.raises(ValueError, match="yarn"):
        models.ModelConfig.from_hf({"model_type": "llama", "vocab_size": 8, "hidden_size": 8,
                                    "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
                                    "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})


def _torch_token_logprobs(model, ids, mask):
    """HF reference: log p(ids[t] | ids[:t]) [B, T-1] and whether ids[t] is the argmax."""
    logits = model(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                   position_ids=torch_positions(mask)).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    target = torch.tensor(ids[:, 1:], dtype=torch.long)
    token = torch.gather(logp, -1, target[..., None])[..., 0]
    return token, logp.argmax(-1) == target


@pytest.mark.parametrize("side,chunk_size", [("left", None), ("right", 5), ("left", 1), ("right", 64)],
                         ids=["left-auto", "right-uneven", "left-one", "right-whole"])
def test_token_and_sequence_logprobs_match_transformers(tmp_path, side, chunk_size):
    model = random_causal_lm(seed=17, num_key_value_heads=1, tie_word_embeddings=True)
    config, params = _load(tmp_path, model)
    ids, mask = padded_batch(3, 23, model.config.vocab_size, side, seed=6)
    with torch.no_grad():
        ref_token, ref_hit = _torch_token_logprobs(model, ids, mask)
    logp, hit = jax.jit(lambda p: models.token_logprobs(config, p, ids, mask, chunk_size=chunk_size))(params)
    assert logp.shape == ids.shape and logp.dtype == jnp.float32 and hit.dtype == jnp.bool_
    np.testing.assert_array_equal(np.asarray(logp[:, 0]), 0.0)
    assert not np.asarray(hit[:, 0]).any()
    real = mask[:, 1:].astype(bool)  # a real target predicted from a real position
    real &= mask[:, :-1].astype(bool)
    np.testing.assert_allclose(np.asarray(logp[:, 1:])[real], ref_token.numpy()[real], atol=1e-4, rtol=0)
    np.testing.assert_array_equal(np.asarray(hit[:, 1:])[real], ref_hit.numpy()[real])

    # A response mask over the last 6 real tokens of each row.
    response = np.zeros_like(mask)
    for i in range(len(mask)):
        last = np.nonzero(mask[i])[0][-6:]
        response[i, last] = 1
    ref_seq = np.sum(np.where(response[:, 1:] == 1, ref_token.numpy(), 0.0), axis=1)
    seq = jax.jit(models.sequence_logprobs, static_argnums=0)(config, params, ids, mask, response)
    assert seq.shape == (3,) and seq.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(seq), ref_seq, atol=2e-4, rtol=0)


def test_default_chunk_needs_the_fewest_chunks_and_pads_less_than_one_position_each():
    """By hand: 8 rows x 49,152 logits allow 42 positions per 64 MiB chunk; 255 positions need 7
    chunks, and 7 of 37 pad 4 positions where 7 of 42 padded 39."""
    assert models.heads._default_chunk(8, 255, 49152) == 37
    for batch, length, vocab in [(8, 255, 49152), (1, 4095, 128256), (16, 1023, 32000), (4, 7, 512), (2, 1, 10)]:
        most = max((1 << 24) // (batch * vocab), 8)
        chunk = models.heads._default_chunk(batch, length, vocab)
        chunks = -(-length // chunk)
        assert chunk <= max(most, 1) and chunks == -(-length // most)
        assert 0 <= chunks * chunk - length < chunks


def test_chunked_logprob_gradients_match_torch_autograd(tmp_path):
    """The rematerialised chunk scan's backward equals PyTorch's gradient of the summed response
    log-probabilities (LM head, embedding and a layer weight)."""
    model = random_causal_lm(seed=19)
    config, params = _load(tmp_path, model)
    ids, mask = padded_batch(2, 14, model.config.vocab_size, "right", seed=8)
    response = mask.copy()
    response[:, :4] = 0
    token, _ = _torch_token_logprobs(model, ids, mask)
    (token * torch.tensor(response[:, 1:], dtype=torch.float32)).sum().backward()

    # Chunks of 3 over 13 predicted positions: an uneven last chunk, padded and dropped.
    grad = jax.jit(jax.grad(lambda p: jnp.sum(
        models.token_logprobs(config, p, ids, mask, chunk_size=3)[0] * response)))(params)
    np.testing.assert_allclose(np.asarray(grad["lm_head"]["kernel"]),
                               model.lm_head.weight.grad.numpy().T, atol=1e-5)
    np.testing.assert_allclose(np.asarray(grad["model"]["embed"]["embedding"]),
                               model.model.embed_tokens.weight.grad.numpy(), atol=1e-5)
    down = np.asarray(grad["model"]["layers"]["mlp"]["down_proj"]["kernel"][1])
    np.testing.assert_allclose(down, model.model.layers[1].mlp.down_proj.weight.grad.numpy().T, atol=1e-5)


def test_token_logprobs_rejects_bad_chunk_size():
    config = models.ModelConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=1)
    ids = jnp.ones((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="chunk_size=0"):  # checked before any parameter is read
        models.token_logprobs(config, {}, ids, ids, chunk_size=0)


def test_auto_remat_keeps_small_forwards_plain_and_remats_large_ones():
    """"auto" resolves by the residual bytes a layer stack would keep: the CI models and batches
    run without remat, the SmolLM2-135M shape at 8 pairs x 256 tokens (~7 GiB) with "minimal"."""
    tiny = models.ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=56, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2)
    smol = models.ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                              num_attention_heads=9, num_key_value_heads=3, dtype="float32")
    assert tiny.remat_policy == "auto" and models.remat_for(tiny, 8, 256) == "none"
    # (8 * 576 + 6 * 1536) * 4 bytes * 30 layers = 1.66 MB per token: 4096 tokens is 6.8 GB.
    assert models.remat_for(smol, 16, 256) == "minimal"
    assert models.remat_for(smol, 1, 256) == "none"  # 0.42 GB
    assert models.remat_for(smol.replace(remat_policy="none"), 16, 256) == "none"
    assert models.remat_for(smol.replace(remat_policy="full"), 1, 8) == "full"


@pytest.mark.parametrize("normalize", ["token", "sequence"])
def test_sft_objective_on_token_logprobs_equals_the_logits_path(tmp_path, normalize):
    """The SFT objective's stats (chunked `token_logprobs`) equal `losses.sft_stats` on full
    logits (checked against PyTorch in test_losses), weights and padding included."""
    from apo_jax.training import losses, objectives

    model = random_causal_lm(seed=23)
    config, params = _load(tmp_path, model)
    ids, mask = padded_batch(3, 16, model.config.vocab_size, "right", seed=9)
    loss_mask = mask.copy()
    loss_mask[:, :5] = 0
    batch = dict(input_ids=ids, attention_mask=mask, loss_mask=loss_mask, weight=np.array([1.0, 0.5, 0.0], np.float32))
    got = jax.jit(lambda p: objectives.get("sft", normalize=normalize).stats(config, p, batch))(params)
    logits = models.lm_logits(config, params, ids, mask)
    ref = losses.sft_stats(logits, ids, loss_mask, batch["weight"], normalize)
    assert set(got) == set(ref)
    for k in ref:
        np.testing.assert_allclose(np.asarray(got[k]), np.asarray(ref[k]), rtol=1e-5, atol=1e-5, err_msg=k)


def _qkv(b=4, t=12, n=4, k=2, h=8, seed=0):
    rng = np.random.RandomState(seed)
    return [jnp.asarray(rng.randn(b, t, heads, h).astype(np.float32)) for heads in (n, k, k)]


def test_length_attention_equals_masked_attention_on_right_padded_rows():
    """cuDNN's causal + sequence-length form (here through XLA's implementation of the same API)
    computes what the masked einsum path computes, an all-padding row included."""
    q, k, v = _qkv()
    mask = np.zeros((4, 12), np.int32)
    for i, n in enumerate([12, 7, 1, 0]):
        mask[i, :n] = 1
    ref = np.asarray(models.attention._xla_attention(q, k, v, jnp.asarray(mask), 0))
    out = np.asarray(models.causal_length_attention(q, k, v, jnp.asarray(mask), None))
    real = mask.astype(bool)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[real], ref[real], atol=1e-5, rtol=1e-5)


def _torch_masked_attention(q, k, v, mask_bt):
    """Dense float64 causal GQA attention in PyTorch: [B, T, N, h] from [B, T, N|K, h] and [B, T]."""
    q, k, v = (torch.tensor(np.asarray(x), dtype=torch.float64, requires_grad=True) for x in (q, k, v))
    t, n, kh = q.shape[1], q.shape[2], k.shape[2]
    kr, vr = (x.repeat_interleave(n // kh, dim=2) for x in (k, v))
    logits = torch.einsum("btnh,bsnh->bnts", q, kr) / np.sqrt(q.shape[-1])
    see = torch.tril(torch.ones(t, t, dtype=torch.bool))[None] & torch.tensor(mask_bt, dtype=torch.bool)[:, None]
    logits = logits.masked_fill(~see[:, None], float("-inf"))
    probs = torch.nan_to_num(torch.softmax(logits, dim=-1))  # a query that sees nothing: 0
    return (q, k, v), torch.einsum("bnts,bsnh->btnh", probs, vr)


@pytest.mark.parametrize("t", [300, 2100])  # 128-row blocks with a short last one; 256-row blocks (> 16 x 128)
def test_blocked_causal_attention_matches_dense_torch_attention_and_its_gradients(t):
    """The no-cache attention (query blocks, keys cut at each block's end) against dense masked
    attention in float64 PyTorch, outputs and q/k/v gradients, on right- and left-padded rows and a
    row with a hole; a query that sees no slot (left padding) is left out (its output is unused)."""
    assert models.attention_block(300) == 128 and models.attention_block(2100) == 256
    q, k, v = _qkv(b=3, t=t, n=4, k=2, h=8, seed=1)
    mask = np.ones((3, t), np.int32)
    mask[0, t - 37:] = 0      # right-padded
    mask[1, :140] = 0         # left-padded past the first block
    mask[2, 5:9] = 0          # a hole
    seen = np.cumsum(mask, axis=1) > 0
    w = jnp.asarray(np.random.RandomState(2).randn(3, t, 4, 8).astype(np.float32) * seen[:, :, None, None])

    out, grads = jax.value_and_grad(
        lambda *x: jnp.sum(models.attention._blocked_causal_attention(*x, jnp.asarray(mask)) * w), argnums=(0, 1, 2))(q, k, v)
    out_btnh = np.asarray(models.attention._blocked_causal_attention(q, k, v, jnp.asarray(mask)))
    leaves, ref = _torch_masked_attention(q, k, v, mask)
    total = (ref * torch.tensor(np.asarray(w), dtype=torch.float64)).sum()
    total.backward()
    np.testing.assert_allclose(out_btnh[seen], ref.detach().numpy()[seen], atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(float(out), total.item(), rtol=1e-4)
    for g, leaf in zip(grads, leaves):
        np.testing.assert_allclose(np.asarray(g), leaf.grad.numpy(), atol=2e-5, rtol=1e-4)


def test_length_attention_turns_rows_that_are_not_right_padded_into_nan():
    q, k, v = _qkv()
    mask = np.ones((4, 12), np.int32)
    mask[1, :3] = 0          # left-padded
    mask[2, 5] = 0           # a hole
    out = np.asarray(models.causal_length_attention(q, k, v, jnp.asarray(mask), None))
    assert np.isfinite(out[[0, 3]]).all()
    assert np.isnan(out[[1, 2]]).all()


@pytest.fixture
def cudnn_api_on_cpu(monkeypatch):
    """`attention_impl="cudnn"` runs its real code path on CPU: the one call into
    `jax.nn.dot_product_attention` gets the portable implementation instead of cuDNN."""
    original = jax.nn.dot_product_attention
    calls = []

    def portable(*args, implementation=None, **kwargs):
        calls.append({"implementation": implementation, "mask": kwargs.get("mask") is not None,
                      "is_causal": kwargs.get("is_causal", False)})
        return original(*args, implementation=None, **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", portable)
    return calls


def test_cudnn_path_gives_the_xla_paths_rewards_gradients_and_cached_prefill(tmp_path, cudnn_api_on_cpu):
    model = random_reward_model(seed=21, num_key_value_heads=2)
    config, params = _load(tmp_path, model)
    cudnn = config.replace(attention_impl="cudnn")
    ids, mask = padded_batch(4, 14, model.config.vocab_size, "right", seed=8)
    mask[3] = 0  # an all-padding row, as batches are filled up to their fixed size

    def loss(cfg, p):
        r = models.rewards(cfg, p, ids, mask)
        return jnp.sum(jnp.where(mask[:, 0] == 1, r, 0.0) ** 2), r

    (ref_val, ref_r), ref_grad = jax.value_and_grad(lambda p: loss(config, p), has_aux=True)(params)
    (val, r), grad = jax.value_and_grad(lambda p: loss(cudnn, p), has_aux=True)(params)
    assert cudnn_api_on_cpu and all(c == {"implementation": "cudnn", "mask": False, "is_causal": True}
                                    for c in cudnn_api_on_cpu)
    np.testing.assert_allclose(np.asarray(r)[:3], np.asarray(ref_r)[:3], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(val, ref_val, rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), grad, ref_grad)

    # With a cache (left-padded prefill), the visible slots are not a prefix: the XLA path runs.
    cudnn_api_on_cpu.clear()
    prompt, kv = padded_batch(3, 9, model.config.vocab_size, "left", seed=9)
    kv_mask = np.concatenate([kv, np.zeros((3, 7), np.int32)], axis=1)
    positions = models.positions_from_mask(jnp.asarray(kv))
    outs = []
    for cfg in (config, cudnn):
        cache = models.init_cache(cfg, 3, 16)
        hidden, _ = models.cached_forward(cfg, params, jnp.asarray(prompt), positions, jnp.asarray(kv_mask), cache, 0)
        outs.append(np.asarray(hidden))
    assert cudnn_api_on_cpu == []
    real = kv.astype(bool)
    np.testing.assert_allclose(outs[1][real], outs[0][real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_weighted_logprob_sum_and_its_gradient_match_torch_autograd(tmp_path, tied):
    """SFT's fused head (`weighted_logprob_sum`: the head's gradient formed in the forward pass,
    the backward only scales it) against PyTorch autograd of sum_t c_t log p(ids[t] | ids[:t]):
    the total, the log-probabilities, and the gradients of the embedding, the untied head, the
    final norm and every layer's down projection; chunks of 5 over 22 positions (uneven tail)."""
    model = random_causal_lm(seed=29, tie_word_embeddings=tied)
    config, params = _load(tmp_path, model)
    ids, mask = padded_batch(3, 23, model.config.vocab_size, "right", seed=11)
    coeff = (np.random.RandomState(3).rand(3, 23) * 2 - 0.5).astype(np.float32) * mask
    token, _ = _torch_token_logprobs(model, ids, mask)
    ref_total = (token * torch.tensor(coeff[:, 1:])).sum()
    (-2.5 * ref_total).backward()  # a cotangent other than 1 (the SFT loss is -total / den)

    def total(p):
        return models.weighted_logprob_sum(config, p, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(coeff),
                                           chunk_size=5)[0]

    value, grad = jax.value_and_grad(total)(params)
    grad = jax.grad(lambda p: -2.5 * total(p))(params)
    _, logp, hit = models.weighted_logprob_sum(config, params, ids, mask, coeff, chunk_size=5)
    assert float(value) == pytest.approx(ref_total.item(), rel=1e-5, abs=1e-4)
    real = (mask[:, 1:] & mask[:, :-1]).astype(bool)
    np.testing.assert_allclose(np.asarray(logp[:, 1:])[real], token.detach().numpy()[real], atol=1e-4, rtol=0)
    assert logp.shape == ids.shape and hit.shape == ids.shape and not np.asarray(hit[:, 0]).any()
    close = dict(atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(grad["model"]["embed"]["embedding"]),
                               model.model.embed_tokens.weight.grad.numpy(), **close)
    if not tied:
        np.testing.assert_allclose(np.asarray(grad["lm_head"]["kernel"]), model.lm_head.weight.grad.numpy().T, **close)
    np.testing.assert_allclose(np.asarray(grad["model"]["final_norm"]["scale"]), model.model.norm.weight.grad.numpy(),
                               **close)
    for i, layer in enumerate(model.model.layers):
        np.testing.assert_allclose(np.asarray(grad["model"]["layers"]["mlp"]["down_proj"]["kernel"][i]),
                                   layer.mlp.down_proj.weight.grad.numpy().T, err_msg=f"layer {i}", **close)
    with pytest.raises(ValueError, match="chunk_size=0"):
        models.weighted_logprob_sum(config, params, ids, mask, coeff, chunk_size=0)
