"""The sampler: greedy equals transformers, the cache equals the full forward, filters hold,
sharding changes nothing, and stop strings end a row whatever their tokenisation."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from apo_jax import compiled, models, sharding
from apo_jax.inference import sampler
from apo_jax.io import hf
from apo_jax.data import tokenize
from hf_fixtures import padded_batch, random_causal_lm


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
    cfg = models.ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                             eos_token_id=None, bos_token_id=1, pad_token_id=0)
    params = models.init_params(cfg, jax.random.PRNGKey(0))
    b, p, s, n = 2, 256, 2, 8
    ids, mask = jnp.ones((b, p), jnp.int32), jnp.ones((b, p), jnp.int32)
    cache, logits, kv_mask = sampler._prefill_fn(cfg, s, n, None)(params, ids, mask)
    decode = sampler._decode_fn(cfg, n, 1.0, 0, 1.0, (), (), 0, None)
    executable = decode.lower(params, cache, logits, kv_mask, jnp.full((b * s,), p, jnp.int32),
                              jax.random.PRNGKey(0)).compile()
    memory = executable.memory_analysis()
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


def _split_layers_match(params, split, mesh=None):
    """`params_for_generation`'s tree: every non-layer leaf where it was, layer i of every stacked
    leaf under "layer_i" (sharded like the stack on its own axes when `mesh` is given)."""
    stacked = params["model"]["layers"]
    assert "layers" not in split["model"]
    n = jax.tree_util.tree_leaves(stacked)[0].shape[0]
    assert sorted(k for k in split["model"] if k.startswith(models.PER_LAYER_PREFIX)) == sorted(
        f"{models.PER_LAYER_PREFIX}{i}" for i in range(n))
    for path, x in jax.tree_util.tree_leaves_with_path(stacked):
        for i in range(n):
            got = split["model"][f"{models.PER_LAYER_PREFIX}{i}"]
            for key in path:
                got = got[key.key]
            np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(x[i].astype(got.dtype), np.float32))
            if mesh is not None:
                want = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*x.sharding.spec[1:]))
                assert got.sharding.is_equivalent_to(want, got.ndim), (path, i, got.sharding)  # no gather


def test_compute_dtype_weights_sample_exactly_like_float32_master_weights(lm):
    _, config, params = lm
    config = config.replace(dtype="bfloat16")  # float32 params, bfloat16 compute
    mesh = sharding.make_mesh(sharding.MeshConfig(2, 2, 2))
    params = sharding.shard_tree(params, mesh)
    cast = models.params_for_generation(config, params)
    leaves = jax.tree_util.tree_leaves(cast)
    assert leaves and all(x.dtype == jnp.bfloat16 for x in leaves)
    _split_layers_match(params, cast, mesh)
    # The rules table places the split layout where it lies (re-placing it would move nothing).
    for x, want in zip(leaves, jax.tree_util.tree_leaves(sharding.tree_shardings(cast, mesh))):
        assert x.sharding.is_equivalent_to(want, x.ndim)
    for name in ("embed", "final_norm"):
        for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(params["model"][name]),
                                jax.tree_util.tree_leaves(cast["model"][name])):
            assert y.sharding == x.sharding, (name, path)  # no resharding, no gather
    ids, mask = padded_batch(4, 7, config.vocab_size, "left", seed=12)
    kw = dict(num_samples=2, max_new_tokens=6, temperature=1.0, top_p=0.9, eos_token_id=None, mesh=mesh)
    ref = sampler.generate(config, params, ids, mask, jax.random.PRNGKey(3), **kw)
    got = sampler.generate(config, cast, ids, mask, jax.random.PRNGKey(3), **kw)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(ref.tokens))
    np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(ref.logprobs), atol=1e-6)
    # Same compute and weight dtype: the layers split, every other array the very same one.
    same = models.params_for_generation(config.replace(dtype="float32"), params)
    _split_layers_match(params, same)
    assert same["model"]["embed"]["embedding"] is params["model"]["embed"]["embedding"]
    assert models.params_for_generation(config.replace(dtype="float32"), same)["model"].keys() == same["model"].keys()


def test_per_layer_weights_compute_what_the_stack_computes(lm):
    """The decode layout runs the same model: logits of a padded batch (no cache) and a sampled
    continuation (prefill + cached decode) against the stacked weights, float32."""
    _, config, params = lm
    split = models.params_for_generation(config, params)
    ids, mask = padded_batch(3, 8, config.vocab_size, "left", seed=4)
    np.testing.assert_allclose(np.asarray(models.lm_logits(config, split, ids, mask)),
                               np.asarray(models.lm_logits(config, params, ids, mask)), atol=1e-5, rtol=1e-5)
    kw = dict(num_samples=2, max_new_tokens=7, temperature=1.0, eos_token_id=None)
    ref = sampler.generate(config, params, ids, mask, jax.random.PRNGKey(8), **kw)
    got = sampler.generate(config, split, ids, mask, jax.random.PRNGKey(8), **kw)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(ref.tokens))
    np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(ref.logprobs), atol=1e-5)


def test_two_stage_categorical_draws_each_entry_with_its_probability():
    """Blocks of 4 over 10 entries (the last block padded), -inf entries among them and a whole
    -inf block: 60,000 draws; every frequency within 4.5 standard errors of its probability
    (a draw skewed by 1% of the mass fails), and no -inf entry ever drawn."""
    p = np.array([0.22, 0.0, 0.18, 0.1, 0.0, 0.0, 0.0, 0.0, 0.3, 0.2])
    logits = jnp.log(jnp.asarray(p, jnp.float32))[None].repeat(2, axis=0)
    n = 30000
    draws = np.asarray(jax.vmap(lambda k: sampler.categorical(k, logits, block=4))(
        jax.random.split(jax.random.PRNGKey(7), n))).ravel()
    freq = np.bincount(draws, minlength=10) / draws.size
    assert freq.shape == (10,) and np.all(freq[p == 0] == 0)
    se = np.sqrt(p * (1 - p) / draws.size)
    assert np.all(np.abs(freq - p) <= 4.5 * se + 1e-12), (freq, p)
    # The two rows draw independently (not the same token from the same bits).
    pairs = draws.reshape(n, 2)
    assert np.mean(pairs[:, 0] == pairs[:, 1]) == pytest.approx(np.sum(p ** 2), abs=0.02)


def test_sample_dataset_buckets_and_keeps_order(lm):
    _, config, params = lm
    rng = np.random.RandomState(12)
    prompts = [list(rng.randint(3, config.vocab_size, rng.randint(2, 15))) for _ in range(11)]
    before = compiled.TRACES.copy()
    res = sampler.sample_dataset(config, params, prompts, jax.random.PRNGKey(7), batch_size=4, buckets=(8, 16),
                                 num_samples=2, max_new_tokens=4, temperature=0.0, progress=False)
    compiles = {k: compiled.TRACES[k] - before[k] for k in ("prefill", "decode")}
    assert compiles["prefill"] <= 2 and compiles["decode"] <= 2
    for p, (toks, _) in zip(prompts, res):
        nxt = np.argmax(np.asarray(models.lm_logits(config, params, np.asarray([p]), np.ones((1, len(p)))))[0, -1])
        assert toks[0, 0] == nxt and toks[1, 0] == nxt


def test_sample_batches_resumed_at_a_batch_equal_the_whole_run(lm):
    """Batch b samples with fold_in(rng, b): a run resumed at batch 2 yields what the whole run
    yields from there on (the sampling phase's restart guarantee), and input order is kept."""
    _, config, params = lm
    rng = np.random.RandomState(3)
    prompts = [list(rng.randint(3, config.vocab_size, rng.randint(2, 12))) for _ in range(7)]
    prompts[2] = prompts[0]  # the same prompt first in batches 0 and 1
    kw = dict(batch_size=2, buckets=(8, 16), num_samples=2, max_new_tokens=5, temperature=1.0)
    whole = list(sampler.sample_batches(config, params, prompts, jax.random.PRNGKey(5), **kw))
    resumed = list(sampler.sample_batches(config, params, prompts, jax.random.PRNGKey(5), start=2, **kw))
    assert [b for b, *_ in whole] == [0, 1, 2, 3] and [b for b, *_ in resumed] == [2, 3]
    assert [i for _, idx, *_ in whole for i in idx] == list(range(7))
    assert whole[-1][2].shape[0] == 1  # the filler rows of the last batch are dropped
    for (_, idx_w, tok_w, len_w), (_, idx_r, tok_r, len_r) in zip(whole[2:], resumed):
        assert idx_w == idx_r
        np.testing.assert_array_equal(tok_w, tok_r)
        np.testing.assert_array_equal(len_w, len_r)
    # The same prompt in two batches draws differently (the key is folded per batch, not reused).
    assert not np.array_equal(whole[0][2][0], whole[1][2][0])


def _tokenizer_with_two_spellings(vocab_size: int, first: int, second: int, avoid: set[int]):
    """A BPE tokenizer over the tiny model's ids in which id `first` is "\\n\\n" and id `second`
    is "Human": "\\nHuman" encodes as ["\\n", "Human"] but is also spelled [first, second]
    ("\\n\\n" + "Human"), as in SmolLM2's tokenizer (1116 + 14917 vs 198 + 14917)."""
    import transformers
    from tokenizers import Tokenizer, decoders, models as tok_models

    pieces = ["\n", "H", "u", "m", "a", "n", "Hu", "Hum", "Huma"]
    free = [i for i in range(3, vocab_size) if i not in avoid and i not in (first, second)]
    id_of = {"<unk>": 0, "<s>": 1, "</s>": 2, "\n\n": first, "Human": second}
    id_of.update(zip(pieces, free))
    used = set(id_of.values())
    id_of.update({f"<{i}>": i for i in range(vocab_size) if i not in used})  # fillers: never a stop
    merges = [("H", "u"), ("Hu", "m"), ("Hum", "a"), ("Huma", "n"), ("\n", "\n")]
    tok = Tokenizer(tok_models.BPE(vocab=id_of, merges=merges, unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>", pad_token="<unk>")


def _expected_keep(tok, row: np.ndarray, stop: str) -> int:
    """Tokens kept under the rule "keep every token that starts before the stop string", from
    character offsets of each token's own text (independent of the sampler's prefix decoding)."""
    texts = [tok.decode([int(t)], clean_up_tokenization_spaces=False) for t in row]
    pos = "".join(texts).find(stop)
    if pos < 0:
        return len(row)
    starts = np.cumsum([0] + [len(t) for t in texts[:-1]])
    return int(np.sum(starts < pos))


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake CPU) devices")
def test_stop_string_ends_the_row_whatever_its_tokenisation(lm):
    _, config, params = lm
    n = 12
    ids, mask = padded_batch(4, 6, config.vocab_size, "left", seed=9)
    # Sampled (a fixed key gives the same tokens in every run); the tiny model's greedy text repeats one token.
    kw = dict(num_samples=1, max_new_tokens=n, temperature=1.0, eos_token_id=None)
    seq = np.asarray(sampler.generate(config, params, ids, mask, jax.random.PRNGKey(0), **kw).tokens[:, 0])
    t = next(t for t in range(2, n - 2) if seq[0, t] != seq[0, t + 1] and seq[0, t] not in seq[0, :t])
    avoid = set(seq.ravel().tolist())
    tok = _tokenizer_with_two_spellings(config.vocab_size, int(seq[0, t]), int(seq[0, t + 1]), avoid)
    stop = "\nHuman"
    canonical = tok.encode(stop, add_special_tokens=False)
    assert len(canonical) == 2 and canonical[0] != seq[0, t] and canonical[1] == seq[0, t + 1]
    assert tok.decode(seq[0, t:t + 2].tolist()) == "\n\nHuman"

    # The token-id path alone (the only one before) misses the other spelling and runs to the end.
    by_ids = sampler.generate(config, params, ids, mask, jax.random.PRNGKey(0), stop_sequences=[canonical], **kw)
    assert int(by_ids.lengths[0, 0]) == n

    mesh = sharding.make_mesh(sharding.MeshConfig(2, 2, 2))
    for every, m, p in ((4, None, params), (n, None, params), (3, mesh, sharding.shard_tree(params, mesh))):
        out = sampler.generate(config, p, ids, mask, jax.random.PRNGKey(0), stop_strings=[stop], tokenizer=tok,
                               stop_check_every=every, mesh=m, **kw)
        toks, lens = np.asarray(out.tokens[:, 0]), np.asarray(out.lengths[:, 0])
        for r in range(4):
            keep = _expected_keep(tok, seq[r], stop)
            assert lens[r] == keep, (every, r)
            np.testing.assert_array_equal(toks[r, :keep], seq[r, :keep])
            assert np.all(toks[r, keep:] == 0) and np.all(np.asarray(out.logprobs[r, 0, keep:]) == 0)
        assert lens[0] == t + 1  # "\n\n" starts before the stop: kept; "Human" cut off
        text = tokenize.decode_response(tok, toks[0, : lens[0]], [stop])
        assert text == tok.decode(seq[0, :t].tolist()).strip()


def test_stop_cuts_reads_only_running_rows_and_offsets_by_the_window_start():
    vocab = {"<unk>": 0, "a": 1, "b": 2, "X": 3, "Y": 4, "XY": 5, "bX": 6}
    import transformers
    from tokenizers import Tokenizer, decoders, models as tok_models

    raw = Tokenizer(tok_models.BPE(vocab=vocab, merges=[("X", "Y")], unk_token="<unk>"))
    raw.decoder = decoders.Fuse()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>")
    window = np.asarray([[1, 2, 5, 1], [1, 6, 4, 1], [3, 4, 1, 1], [5, 1, 1, 1]])
    lengths = np.asarray([14, 14, 14, 11])
    check = np.asarray([True, True, False, True])
    cuts = sampler.stop_cuts(tok, window, 10, lengths, check, ["XY"])
    # row 0: "ab|XY|a" -> stop at a token boundary, 2 tokens kept; row 1: "a|bX|Y|a" -> the stop
    # starts inside "bX", which is kept; row 2 not running; row 3: only 1 token kept so far ("XY").
    np.testing.assert_array_equal(cuts, [12, 12, -1, 10])


_TWO_PROCESS_STOPS = """
import json
import numpy as np
from jax.experimental import multihost_utils
from apo_jax import sharding
from apo_jax.inference import sampler
from apo_jax.io import hf
from hf_fixtures import padded_batch
from test_sampler import _tokenizer_with_two_spellings

path, first, second, avoid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), set(json.loads(sys.argv[4]))
mesh = sharding.make_mesh(sharding.MeshConfig(2, 2, 2))
config, params = hf.load_pretrained(path, mesh=mesh)
tok = _tokenizer_with_two_spellings(config.vocab_size, first, second, avoid)
ids, mask = padded_batch(4, 6, config.vocab_size, "left", seed=9)
out = sampler.generate(config, params, ids, mask, jax.random.PRNGKey(0), num_samples=1, max_new_tokens=12,
                       temperature=1.0, eos_token_id=None, stop_strings=["\\nHuman"], tokenizer=tok,
                       stop_check_every=3, mesh=mesh)
gather = lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)).tolist()
print("RESULT" + json.dumps({"tokens": gather(out.tokens), "lengths": gather(out.lengths)}))
"""


@pytest.mark.e2e
def test_stop_strings_in_two_processes_equal_one_process(lm, tmp_path):
    """Every process checks the same replicated window of text and applies the same cuts."""
    from multiproc import run_processes

    model, config, params = lm
    model.save_pretrained(tmp_path)
    ids, mask = padded_batch(4, 6, config.vocab_size, "left", seed=9)
    kw = dict(num_samples=1, max_new_tokens=12, temperature=1.0, eos_token_id=None)
    seq = np.asarray(sampler.generate(config, params, ids, mask, jax.random.PRNGKey(0), **kw).tokens[:, 0])
    t = next(t for t in range(2, 10) if seq[0, t] != seq[0, t + 1] and seq[0, t] not in seq[0, :t])
    avoid = sorted(set(seq.ravel().tolist()))
    tok = _tokenizer_with_two_spellings(config.vocab_size, int(seq[0, t]), int(seq[0, t + 1]), set(avoid))
    ref = sampler.generate(config, params, ids, mask, jax.random.PRNGKey(0), stop_strings=["\nHuman"], tokenizer=tok,
                           stop_check_every=3, **kw)
    assert int(ref.lengths[0, 0]) == t + 1
    results = run_processes(_TWO_PROCESS_STOPS, num_processes=2, devices_per_process=4, timeout=400,
                            args=[str(tmp_path), str(int(seq[0, t])), str(int(seq[0, t + 1])), json.dumps(avoid)])
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]
        out = json.loads([ln for ln in r.stdout.splitlines() if ln.startswith("RESULT")][0][len("RESULT"):])
        np.testing.assert_array_equal(np.asarray(out["tokens"]), np.asarray(ref.tokens))
        np.testing.assert_array_equal(np.asarray(out["lengths"]), np.asarray(ref.lengths))
