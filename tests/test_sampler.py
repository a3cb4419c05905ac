"""The sampler: greedy equals transformers, the cache equals the full forward, filters hold,
sharding changes nothing, and best-of-S picks the argmax of independently computed rewards."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from apo_jax import hf, models, sampler, sharding
from hf_fixtures import padded_batch, random_causal_lm, random_reward_model


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    path = tmp_path_factory.mktemp("lm")
    model = random_causal_lm(seed=21, num_key_value_heads=2)
    model.save_pretrained(path)
    config, params = hf.load_pretrained(str(path))
    return model, config, params


def test_greedy_equals_transformers_generate(lm):
    model, config, params = lm
    ids, mask = padded_batch(4, 9, config.vocab_size, "left", seed=5, min_len=2)
    out = sampler.generate(config, params, ids, mask, jax.random.PRNGKey(0), num_samples=1, max_new_tokens=12,
                           temperature=0.0, eos_token_id=None)
    with torch.no_grad():
        ref = model.generate(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                             max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None,
                             min_new_tokens=12)[:, ids.shape[1]:].numpy()
    np.testing.assert_array_equal(np.asarray(out.tokens[:, 0]), ref)
    assert np.all(np.asarray(out.lengths) == 12)


def test_cached_decode_logits_equal_full_forward(lm):
    _, config, params = lm
    ids, mask = padded_batch(3, 8, config.vocab_size, "left", seed=6, min_len=3)
    n = 6
    out = sampler.generate(config, params, ids, mask, jax.random.PRNGKey(1), num_samples=1, max_new_tokens=n,
                           temperature=1.0, eos_token_id=None)
    full_ids = np.concatenate([ids, np.asarray(out.tokens[:, 0])], axis=1)
    full_mask = np.concatenate([mask, np.ones((3, n), np.int32)], axis=1)
    logits = np.asarray(models.lm_logits(config, params, full_ids, full_mask))
    # Under temperature 1 with no filters, the sampler's logprobs are log_softmax of the cached
    # logits at each step: compare them with the uncached forward's.
    ref = jax.nn.log_softmax(logits[:, ids.shape[1] - 1:-1], axis=-1)
    ref_tok = np.take_along_axis(np.asarray(ref), np.asarray(out.tokens[:, 0])[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(np.asarray(out.logprobs[:, 0]), ref_tok, atol=1e-4)


def test_decode_updates_the_kv_cache_in_place():
    """The decode loop's compiled program holds no full-cache temporary: the donated cache is
    updated in place, each layer writing its slot into the stacked [L, B, S, K, h] buffer. (With
    the cache as a scanned input/output of the layer stack, XLA sliced and restacked it: temporaries
    of 1.5x the cache here, and 1.9x slower decoding on CPU.)"""
    cfg = models.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                             eos_token_id=None, bos_token_id=1, pad_token_id=0)
    params = models.init_params(cfg, jax.random.PRNGKey(0))
    b, p, s, n = 2, 256, 2, 8
    ids, mask = jnp.ones((b, p), jnp.int32), jnp.ones((b, p), jnp.int32)
    cache, logits, kv_mask = sampler._prefill_fn(cfg, s, n, None)(params, ids, mask)
    decode = sampler._decode_fn(cfg, n, 1.0, 0, 1.0, (), (), 0, None)
    compiled = decode.lower(params, cache, logits, kv_mask, jnp.full((b * s,), p, jnp.int32),
                            jax.random.PRNGKey(0)).compile()
    memory = compiled.memory_analysis()
    cache_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(cache))
    assert memory.alias_size_in_bytes >= cache_bytes  # the donated cache is the output's buffer
    assert memory.temp_size_in_bytes < 0.5 * cache_bytes, (memory.temp_size_in_bytes, cache_bytes)


def test_fixed_rng_reproducible_and_samples_differ(lm):
    _, config, params = lm
    ids, mask = padded_batch(2, 6, config.vocab_size, "left", seed=7)
    kw = dict(num_samples=4, max_new_tokens=10, temperature=1.0, eos_token_id=None)
    a = sampler.generate(config, params, ids, mask, jax.random.PRNGKey(3), **kw)
    b = sampler.generate(config, params, ids, mask, jax.random.PRNGKey(3), **kw)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    toks = np.asarray(a.tokens)
    for i in range(2):
        assert len({tuple(t) for t in toks[i]}) == 4  # S samples of one prompt differ


def test_temperature_zero_is_greedy_for_every_sample(lm):
    _, config, params = lm
    ids, mask = padded_batch(2, 6, config.vocab_size, "left", seed=8)
    out = sampler.generate(config, params, ids, mask, jax.random.PRNGKey(4), num_samples=3, max_new_tokens=5,
                           temperature=0.0, top_k=3, top_p=0.5, eos_token_id=None)
    toks = np.asarray(out.tokens)
    assert np.all(toks == toks[:, :1])
    # And equals the argmax of the full forward, step by step.
    seq_ids, seq_mask = ids, mask
    for t in range(5):
        nxt = np.argmax(np.asarray(models.lm_logits(config, params, seq_ids, seq_mask))[:, -1], axis=-1)
        assert np.all(toks[:, 0, t] == nxt)
        seq_ids = np.concatenate([seq_ids, nxt[:, None].astype(np.int32)], 1)
        seq_mask = np.concatenate([seq_mask, np.ones((2, 1), np.int32)], 1)


def test_top_k_and_top_p_never_leave_the_allowed_set():
    logits = jnp.log(jnp.asarray([[0.4, 0.3, 0.15, 0.1, 0.05]]))
    keys = jax.random.split(jax.random.PRNGKey(0), 4000)
    top2 = np.asarray(jax.vmap(lambda k: sampler.sample_token(k, logits, 1.0, 2, 1.0)[0][0])(keys))
    assert set(top2.tolist()) == {0, 1}
    nucleus = np.asarray(jax.vmap(lambda k: sampler.sample_token(k, logits, 1.0, 0, 0.75)[0][0])(keys))
    assert set(nucleus.tolist()) == {0, 1, 2}  # 0.4 + 0.3 < 0.75 <= 0.4 + 0.3 + 0.15
    # top-p applies to the top-k renormalised distribution (0.57, 0.43), as transformers does.
    both = np.asarray(jax.vmap(lambda k: sampler.sample_token(k, logits, 1.0, 2, 0.5)[0][0])(keys))
    assert set(both.tolist()) == {0}
    both = np.asarray(jax.vmap(lambda k: sampler.sample_token(k, logits, 1.0, 3, 0.6)[0][0])(keys))
    assert set(both.tolist()) == {0, 1}
    # Frequencies follow the renormalised distribution (0.4 / 0.7 for token 0 under top-2).
    assert abs(np.mean(top2 == 0) - 0.4 / 0.7) < 0.03
    filtered = sampler.apply_top_p(logits, 0.75)
    assert np.isinf(np.asarray(filtered)[0, 3:]).all() and np.isfinite(np.asarray(filtered)[0, :3]).all()


def test_eos_and_stop_sequences_end_rows(lm):
    _, config, params = lm
    ids, mask = padded_batch(2, 6, config.vocab_size, "left", seed=9)
    greedy = sampler.generate(config, params, ids, mask, jax.random.PRNGKey(0), num_samples=1, max_new_tokens=8,
                              temperature=0.0, eos_token_id=None)
    seq = np.asarray(greedy.tokens[:, 0])
    eos = int(seq[0, 3])  # make the 4th greedy token of row 0 the EOS
    out = sampler.generate(config, params, ids, mask, jax.random.PRNGKey(0), num_samples=1, max_new_tokens=8,
                           temperature=0.0, eos_token_id=eos)
    first = int(np.argmax(seq[0] == eos))
    assert int(out.lengths[0, 0]) == first + 1  # EOS kept
    assert np.all(np.asarray(out.tokens[0, 0, first + 1:]) == 0)
    stop = (int(seq[1, 2]), int(seq[1, 3]))
    out = sampler.generate(config, params, ids, mask, jax.random.PRNGKey(0), num_samples=1, max_new_tokens=8,
                           temperature=0.0, eos_token_id=None, stop_sequences=[stop])
    hits = [t for t in range(1, 8) if (seq[1, t - 1], seq[1, t]) == stop]
    assert int(out.lengths[1, 0]) == hits[0] - 1  # the stop sequence is cut off
    np.testing.assert_array_equal(np.asarray(out.tokens[1, 0, : hits[0] - 1]), seq[1, : hits[0] - 1])


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake CPU) devices")
def test_sharded_sampling_equals_single_device(lm):
    _, config, params = lm
    ids, mask = padded_batch(4, 7, config.vocab_size, "left", seed=10)
    kw = dict(num_samples=2, max_new_tokens=6, temperature=0.9, top_k=20, top_p=0.9, eos_token_id=None)
    single = sampler.generate(config, params, ids, mask, jax.random.PRNGKey(5), **kw)
    mesh = sharding.make_mesh(sharding.MeshConfig(2, 2, 2))
    sharded = sampler.generate(config, sharding.shard_tree(params, mesh), ids, mask, jax.random.PRNGKey(5),
                               mesh=mesh, **kw)
    np.testing.assert_array_equal(np.asarray(sharded.tokens), np.asarray(single.tokens))
    np.testing.assert_allclose(np.asarray(sharded.logprobs), np.asarray(single.logprobs), atol=1e-4)


def test_compute_dtype_weights_sample_exactly_like_float32_master_weights(lm):
    _, config, params = lm
    config = config.replace(dtype="bfloat16")  # float32 params, bfloat16 compute
    mesh = sharding.make_mesh(sharding.MeshConfig(2, 2, 2))
    params = sharding.shard_tree(params, mesh)
    cast = models.params_for_generation(config, params)
    leaves = jax.tree_util.tree_leaves(cast)
    assert leaves and all(x.dtype == jnp.bfloat16 for x in leaves)
    flat, cast_flat = jax.tree_util.tree_leaves_with_path(params), dict(jax.tree_util.tree_leaves_with_path(cast))
    for path, x in flat:
        assert cast_flat[path].sharding == x.sharding, path  # no resharding, no gather
    ids, mask = padded_batch(4, 7, config.vocab_size, "left", seed=12)
    kw = dict(num_samples=2, max_new_tokens=6, temperature=1.0, top_p=0.9, eos_token_id=None, mesh=mesh)
    ref = sampler.generate(config, params, ids, mask, jax.random.PRNGKey(3), **kw)
    got = sampler.generate(config, cast, ids, mask, jax.random.PRNGKey(3), **kw)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(ref.tokens))
    np.testing.assert_array_equal(np.asarray(got.logprobs), np.asarray(ref.logprobs))
    # Same compute and weight dtype: the very same arrays.
    same = models.params_for_generation(config.replace(dtype="float32"), params)
    assert all(a is b for a, b in zip(jax.tree_util.tree_leaves(same), jax.tree_util.tree_leaves(params)))


def test_best_of_s_picks_argmax_of_independent_rewards(lm, tmp_path):
    _, config, params = lm
    rm_model = random_reward_model(seed=22)
    rm_model.save_pretrained(tmp_path)
    rm_config, rm_params = hf.load_pretrained(str(tmp_path))
    ids, mask = padded_batch(3, 6, config.vocab_size, "left", seed=11)
    eos = 2
    out = sampler.generate(config, params, ids, mask, jax.random.PRNGKey(6), num_samples=4, max_new_tokens=5,
                           temperature=1.0, eos_token_id=eos)
    best = sampler.best_of_s(rm_config, rm_params, ids, mask, out, eos_token_id=eos)
    toks, lens = np.asarray(out.tokens), np.asarray(out.lengths)
    ref = np.zeros((3, 4))
    for b in range(3):
        for s in range(4):
            row = list(ids[b][mask[b] == 1]) + list(toks[b, s, : lens[b, s]])
            if not row[-1] == eos:
                row.append(eos)
            with torch.no_grad():
                ref[b, s] = rm_model(torch.tensor([row])).logits[0, 0].item()
    np.testing.assert_allclose(np.asarray(best.scores), ref, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(best.best_index), ref.argmax(1))
    np.testing.assert_array_equal(np.asarray(best.best_tokens), toks[np.arange(3), ref.argmax(1)])


def test_sample_dataset_buckets_and_keeps_order(lm):
    _, config, params = lm
    rng = np.random.RandomState(12)
    prompts = [list(rng.randint(3, config.vocab_size, rng.randint(2, 15))) for _ in range(11)]
    before = dict(sampler.COMPILES)
    res = sampler.sample_dataset(config, params, prompts, jax.random.PRNGKey(7), batch_size=4, buckets=(8, 16),
                                 num_samples=2, max_new_tokens=4, temperature=0.0, progress=False)
    compiles = {k: sampler.COMPILES[k] - before[k] for k in before}
    assert compiles["prefill"] <= 2 and compiles["decode"] <= 2
    for p, (toks, _) in zip(prompts, res):
        nxt = np.argmax(np.asarray(models.lm_logits(config, params, np.asarray([p]), np.ones((1, len(p)))))[0, -1])
        assert toks[0, 0] == nxt and toks[1, 0] == nxt
