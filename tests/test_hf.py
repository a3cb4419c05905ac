"""HF interchange: round trips through `transformers`, sharded checkpoints, and bad input."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from apo_jax import models
from apo_jax.io import hf
from hf_fixtures import padded_batch, random_causal_lm, random_reward_model, torch_positions


def _hf_logits(model, ids, mask):
    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                     position_ids=torch_positions(mask)).logits.float().numpy()


def _load_strict(cls, path, **kw):
    model, info = cls.from_pretrained(path, output_loading_info=True, **kw)
    assert not info["missing_keys"], info["missing_keys"]
    assert not info["unexpected_keys"], info["unexpected_keys"]
    return model.eval()


@pytest.mark.parametrize("tied", [False, True])
def test_policy_round_trip_through_transformers(tmp_path, tied):
    src = random_causal_lm(seed=1, tie_word_embeddings=tied,
                           rope_scaling={"rope_type": "linear", "factor": 2.0})
    src.save_pretrained(tmp_path / "src")
    config, params = hf.load_pretrained(str(tmp_path / "src"))
    hf.save_pretrained(str(tmp_path / "out"), config, params)
    back = _load_strict(transformers.LlamaForCausalLM, tmp_path / "out")
    assert back.config.tie_word_embeddings == tied
    ids, mask = padded_batch(2, 16, src.config.vocab_size, "right", seed=0)
    np.testing.assert_allclose(_hf_logits(back, ids, mask), _hf_logits(src, ids, mask), atol=1e-5)
    # And our own reading of what we wrote gives back identical tensors.
    _, again = hf.load_pretrained(str(tmp_path / "out"))
    jax.tree_util.tree_map(np.testing.assert_array_equal, again, params)


def test_reward_model_round_trip_and_lm_to_rm_export(tmp_path):
    src = random_reward_model(seed=2)
    src.save_pretrained(tmp_path / "rm")
    config, params = hf.load_pretrained(str(tmp_path / "rm"))
    hf.save_pretrained(str(tmp_path / "rm_out"), config, params)
    back = _load_strict(transformers.LlamaForSequenceClassification, tmp_path / "rm_out")
    assert back.config.num_labels == 1 and back.config.pad_token_id == 0
    ids, mask = padded_batch(3, 12, src.config.vocab_size, "right", seed=1)
    with torch.no_grad():
        ref = src(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits
        out = back(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits
    np.testing.assert_allclose(out.numpy(), ref.numpy(), atol=1e-5)
    # A reward head added to an LM checkpoint is saved (OpenRLHF #873: a head silently dropped).
    lm = random_causal_lm(seed=3)
    lm.save_pretrained(tmp_path / "lm")
    config, params = hf.load_pretrained(str(tmp_path / "lm"))
    params["score"] = {"kernel": jnp.full((config.hidden_size, 1), 0.25, jnp.float32)}
    hf.save_pretrained(str(tmp_path / "lm_rm"), config.replace(pad_token_id=0), params)
    rm = _load_strict(transformers.LlamaForSequenceClassification, tmp_path / "lm_rm")
    np.testing.assert_allclose(rm.score.weight.detach().numpy(), 0.25)
    ours = models.rewards(config, params, ids, mask)
    with torch.no_grad():
        theirs = rm(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits[:, 0]
    np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), atol=1e-4)


def test_bfloat16_params_round_trip(tmp_path):
    src = random_causal_lm(seed=4)
    src.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    config, params = hf.load_pretrained(str(tmp_path / "bf16"), param_dtype="bfloat16")
    assert params["model"]["layers"]["mlp"]["up_proj"]["kernel"].dtype == jnp.bfloat16
    hf.save_pretrained(str(tmp_path / "out"), config, params)
    back = _load_strict(transformers.LlamaForCausalLM, tmp_path / "out", dtype=torch.bfloat16)
    for (name, a), (_, b) in zip(sorted(src.state_dict().items()), sorted(back.state_dict().items())):
        assert a.dtype == b.dtype == torch.bfloat16, name
        assert torch.equal(a, b), name


def test_sharded_checkpoint_in_and_out(tmp_path):
    src = random_causal_lm(seed=5)
    src.save_pretrained(tmp_path / "src", max_shard_size="20KB")
    assert (tmp_path / "src" / hf.INDEX_NAME).exists()
    config, params = hf.load_pretrained(str(tmp_path / "src"))
    hf.save_pretrained(str(tmp_path / "out"), config, params, max_shard_bytes=30_000)
    index = json.loads((tmp_path / "out" / hf.INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) > 1
    back = _load_strict(transformers.LlamaForCausalLM, tmp_path / "out")
    ids, mask = padded_batch(2, 8, src.config.vocab_size, "left", seed=0)
    np.testing.assert_allclose(_hf_logits(back, ids, mask), _hf_logits(src, ids, mask), atol=1e-5)


def _corrupt(tmp_path, edit):
    src = random_causal_lm(seed=6)
    src.save_pretrained(tmp_path)
    path = tmp_path / hf.WEIGHTS_NAME
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return str(tmp_path)


def test_missing_tensor_names_key_and_shape(tmp_path):
    path = _corrupt(tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(hf.CheckpointError, match=r"missing tensor model\.layers\.1\.mlp\.up_proj\.weight \(expected shape \[56, 32\]\)"):
        hf.load_pretrained(path)


def test_wrong_shape_names_key_and_both_shapes(tmp_path):
    def edit(t):
        t["model.layers.0.self_attn.k_proj.weight"] = np.zeros((8, 32), np.float32)

    path = _corrupt(tmp_path, edit)
    with pytest.raises(hf.CheckpointError, match=r"k_proj\.weight has shape \[8, 32\], expected \[16, 32\]"):
        hf.load_pretrained(path)


def test_unsupported_model_type_is_refused_naming_the_supported_families(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10}))
    with pytest.raises(hf.CheckpointError, match=r"config\.json: model_type: 'gpt2' is not supported; apo_jax reads "
                                                 r"llama, qwen2, qwen3, mistral, gemma2, gemma3_text$"):
        hf.load_pretrained(str(tmp_path))


def test_pickled_weights_are_refused_not_unpickled(tmp_path):
    src = random_causal_lm(seed=7)
    src.config.save_pretrained(tmp_path)
    torch.save(src.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(hf.CheckpointError, match="never unpickles"):
        hf.load_pretrained(str(tmp_path))


def test_hub_id_offline_fails_with_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(hf.CheckpointError, match="HF_HUB_OFFLINE.*local directory"):
        hf.load_pretrained("meta-llama/Llama-2-7b-hf")


def test_save_over_existing_checkpoint_is_atomic(tmp_path):
    src = random_causal_lm(seed=8)
    src.save_pretrained(tmp_path / "src")
    config, params = hf.load_pretrained(str(tmp_path / "src"))
    out = str(tmp_path / "out")
    hf.save_pretrained(out, config, params)
    bad = dict(params)
    bad["model"] = {k: v for k, v in params["model"].items() if k != "final_norm"}
    with pytest.raises(hf.CheckpointError, match="final_norm"):
        hf.save_pretrained(out, config, bad)
    # The earlier export is intact and nothing temporary is left behind.
    _load_strict(transformers.LlamaForCausalLM, out)
    assert sorted(os.listdir(tmp_path)) == ["out", "src"]


# ------------------------------------------------------------------------------------------
# An exported RM scores in plain transformers what apo_jax scores (issue #16, TRL #937).

PROMPTS = ["\n\nHuman: What is the capital of France?\n\nAssistant:", "\n\nHuman: Tell me a joke.\n\nAssistant:",
           "\n\nHuman: How do I bake bread?\n\nAssistant:"]
RESPONSES = ["The capital of France is Paris.", "Why did the chicken cross the road?", "Mix flour and water."]


def _game_scores(tok_dir, config, params, reward_position):
    """What the game computes: its tokenizer loader, `score_set`, `models.rewards`."""
    import ml_collections

    from apo_jax.data import pipeline, tokenize

    tok = tokenize.load_tokenizer(tok_dir)
    d = ml_collections.ConfigDict(dict(rm_max_len=64, buckets=(32, 64), reward_position=reward_position))
    batch = pipeline.score_set(tok, list(zip(PROMPTS, RESPONSES)), d).batch(np.arange(len(PROMPTS)), local=False)
    return np.asarray(models.rewards(config, params, batch["input_ids"], batch["input_mask"]))


@pytest.mark.parametrize("pad_is_eos,reward_position", [(False, "last_token"), (True, "last_token"), (False, "eos")])
def test_exported_rm_scores_the_same_in_transformers(tmp_path, pad_is_eos, reward_position):
    from tok_fixtures import llama_like_tokenizer

    tok = llama_like_tokenizer()
    if pad_is_eos:
        tok.pad_token = tok.eos_token  # SmolLM2-style: pad id == EOS id
    assert (tok.pad_token_id == tok.eos_token_id) == pad_is_eos
    tok.save_pretrained(tmp_path / "tok")
    src = random_reward_model(seed=7, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    src.save_pretrained(tmp_path / "src")
    config, params = hf.load_pretrained(str(tmp_path / "src"))
    ours = _game_scores(str(tmp_path / "tok"), config, params, reward_position)
    out = str(tmp_path / "export")
    old_umask = os.umask(0o022)
    try:
        hf.save_pretrained(out, config, params, tokenizer=tok, reward_position=reward_position)
    finally:
        os.umask(old_umask)
    # Readable by other users; a tokenizer class transformers 4 knows too.
    assert oct(os.stat(out).st_mode & 0o777) == oct(0o755)
    assert {oct(os.stat(os.path.join(out, n)).st_mode & 0o777) for n in os.listdir(out)} == {oct(0o644)}
    with open(os.path.join(out, "tokenizer_config.json")) as f:
        tok_config = json.load(f)  # transformers 4.46 loads it too (no 5-only class, no token_type_ids)
    assert tok_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tok_config["model_input_names"] == ["input_ids", "attention_mask"]
    with open(os.path.join(out, hf.SCORING_NAME)) as f:
        assert json.load(f) == {"reward_position": reward_position, "prompt_format": "hh"}

    # The standard transformers usage, one text at a time and as a padded batch.
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    texts = [f"{p} {r}" for p, r in zip(PROMPTS, RESPONSES)]
    with torch.no_grad():
        single = np.asarray([model(**hf_tok(t, return_tensors="pt")).logits[0, 0].item() for t in texts])
        batched = model(**hf_tok(texts, return_tensors="pt", padding=True)).logits[:, 0].numpy()
    np.testing.assert_allclose(single, ours, atol=1e-4)
    np.testing.assert_allclose(batched, ours, atol=1e-4)
    # The reward is read where the config says: an appended EOS, or the last response token.
    last_ids = [hf_tok(t)["input_ids"][-1] for t in texts]
    assert all((i == tok.eos_token_id) == (reward_position == "eos") for i in last_ids), last_ids
    assert len(set(np.round(ours, 4))) == len(ours)  # distinct scores: a wrong position would show
    # The stable API on the export follows it too (an "eos" export's tokenizer appends the EOS).
    from apo_jax import evaluation

    np.testing.assert_allclose(evaluation.score_texts(out, PROMPTS, RESPONSES, batch_size=8), ours, atol=1e-5)


def test_score_texts_api_matches_the_game_on_an_hf_rm_dir(tmp_path):
    from apo_jax import evaluation
    from tok_fixtures import llama_like_tokenizer

    tok = llama_like_tokenizer()
    src = random_reward_model(seed=8, vocab_size=len(tok))
    src.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")  # a plain HF RM dir, not an apo_jax export
    config, params = hf.load_pretrained(str(tmp_path / "rm"))
    ours = _game_scores(str(tmp_path / "rm"), config, params, "last_token")
    got = evaluation.score_texts(str(tmp_path / "rm"), PROMPTS, RESPONSES, batch_size=2)
    assert got.shape == (3,) and got.dtype == np.float32
    np.testing.assert_allclose(got, ours, atol=1e-5)
    with pytest.raises(ValueError, match="3 prompts but 2 responses"):
        evaluation.score_texts(str(tmp_path / "rm"), PROMPTS, RESPONSES[:2])


def test_corrupt_safetensors_header_is_named(tmp_path):
    src = random_causal_lm(seed=9)
    src.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(b"\xff" * 8 + data[8:])  # a header length far beyond the file
    with pytest.raises(hf.CheckpointError, match=r"model\.safetensors: not a safetensors file"):
        hf.load_pretrained(str(tmp_path))
    weights.write_bytes(data[: len(data) // 2])  # a truncated copy
    with pytest.raises(hf.CheckpointError, match=r"model\.safetensors: truncated"):
        hf.load_pretrained(str(tmp_path))
