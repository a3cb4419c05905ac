"""Tokenisation keeps the response end and masks exactly the response; batches are deterministic,
resumable, and split over processes into disjoint blocks that assemble into the global batch."""

from __future__ import annotations

import json

import ml_collections
import numpy as np
import pytest

from apo_jax.data import batching, pipeline, tokenize
from multiproc import run_processes
from tok_fixtures import llama_like_tokenizer

PROMPT = "\n\nHuman: What is the capital of France?\n\nAssistant:"
RESPONSES = ["The capital of France is Paris.", "Paris.", "Sure! Waves roll in, waves roll out."]


@pytest.fixture(scope="module")
def tok():
    return llama_like_tokenizer()


def _response_token_mask_from_offsets(tok, prompt: str, response: str) -> tuple[list[int], list[bool]]:
    """Independent reference: tokens of the full text whose characters start after the prompt."""
    enc = tok(f"{prompt} {response}", return_offsets_mapping=True)
    mask = [s >= len(prompt) and e > s for s, e in enc["offset_mapping"]]
    return enc["input_ids"], mask


@pytest.mark.parametrize("response", RESPONSES)
def test_loss_mask_covers_exactly_the_response_tokens(tok, response):
    enc = tokenize.encode_responses(tok, [(PROMPT, response)], max_len=256, append_eos=True)[0]
    ids, mask = _response_token_mask_from_offsets(tok, PROMPT, response)
    assert enc.ids.tolist() == ids + [tok.eos_token_id]
    assert enc.response_mask.tolist() == [int(m) for m in mask] + [1]
    assert enc.ids[0] == tok.bos_token_id and enc.response_mask[0] == 0
    # The masked tokens decode to the response itself.
    assert tok.decode(enc.ids[enc.response_mask == 1][:-1]).strip() == response


@pytest.mark.parametrize("max_len", [6, 9, 12])
def test_truncation_cuts_the_prompt_from_the_left_never_the_response_end(tok, max_len):
    response = RESPONSES[0]
    full = tokenize.encode_responses(tok, [(PROMPT, response)], max_len=10_000, append_eos=True)[0]
    cut = tokenize.encode_responses(tok, [(PROMPT, response)], max_len=max_len, append_eos=True)[0]
    assert len(cut) == max_len
    assert cut.ids[0] == tok.bos_token_id  # BOS kept
    np.testing.assert_array_equal(cut.ids[1:], full.ids[-(max_len - 1):])  # the end is intact
    np.testing.assert_array_equal(cut.response_mask[1:], full.response_mask[-(max_len - 1):])
    assert cut.ids[-1] == tok.eos_token_id


def test_prompts_are_left_truncated_with_bos_kept(tok):
    full = tokenize.encode_prompts(tok, [PROMPT], 10_000)[0]
    cut = tokenize.encode_prompts(tok, [PROMPT], 5)[0]
    assert cut.tolist() == [tok.bos_token_id] + full[-4:].tolist()
    ids, mask = tokenize.pad_left([cut, full[:2]], 8, 3, pad_id=0)
    assert mask.tolist() == [[0, 0, 0, 1, 1, 1, 1, 1], [0] * 6 + [1, 1], [0] * 8]
    assert ids[0, 3:].tolist() == cut.tolist()


def test_decode_response_cuts_at_the_first_stop_string(tok):
    ids = tok(" Paris is nice.\nHuman: more", add_special_tokens=False)["input_ids"]
    assert tokenize.decode_response(tok, ids + [tok.eos_token_id], ["\nHuman"]) == "Paris is nice."


def _data_cfg(**kw) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(rm_max_len=64, sft_max_len=64, prompt_max_len=32, buckets=(16, 32, 64),
                                          reward_position="eos", **kw))


def test_batches_are_padded_to_the_bucket_of_the_longest_global_row(tok):
    pairs = [{"prompt": PROMPT, "chosen": r, "rejected": "No.", "is_apo": i % 2} for i, r in enumerate(RESPONSES)]
    ts = pipeline.rm_set(tok, pairs, _data_cfg())
    b = ts.batch([1, 1, 0, 2], local=False)
    longest = max(len(tokenize.encode_responses(tok, [(PROMPT, r)], 64, append_eos=True)[0]) for r in RESPONSES)
    assert b["chosen_ids"].shape == (4, tokenize.bucket_length(longest, (16, 32, 64)))
    assert b["is_apo"].tolist() == [1, 1, 0, 0]
    assert b["chosen_mask"].sum(1).tolist() == [len(ts.fields["chosen"][i]) for i in (1, 1, 0, 2)]
    assert np.all(b["chosen_ids"][b["chosen_mask"] == 0] == tok.pad_token_id)


def test_iterator_is_deterministic_covers_each_epoch_and_resumes_exactly():
    a = batching.BatchIterator(10, 4, seed=3)
    stream = [a.next_indices() for _ in range(5)]  # 20 rows = 2 epochs
    flat = np.concatenate(stream)
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert not np.array_equal(flat[:10], flat[10:])  # a new permutation per epoch
    b = batching.BatchIterator(10, 4, seed=3)
    b.next_indices()
    b.next_indices()
    saved = json.loads(json.dumps(b.state()))
    c = batching.BatchIterator(10, 4, seed=3)
    c.restore(saved)
    np.testing.assert_array_equal(np.concatenate([c.next_indices() for _ in range(3)]), np.concatenate(stream[2:]))
    other = batching.BatchIterator(10, 4, seed=4)
    assert not np.array_equal(other.next_indices(), stream[0])
    with pytest.raises(ValueError, match="batch_size=4 but this run has 5"):
        batching.BatchIterator(10, 5, seed=3).restore(saved)


def test_process_rows_are_disjoint_contiguous_blocks():
    rows = np.arange(8) * 10
    blocks = [batching.process_rows(rows, i, 4).tolist() for i in range(4)]
    assert blocks == [[0, 10], [20, 30], [40, 50], [60, 70]]
    with pytest.raises(ValueError, match="does not split over 3 processes"):
        batching.process_rows(rows, 0, 3)


_TWO_PROCESS = r"""
import json, sys
import numpy as np
import ml_collections
from jax.experimental import multihost_utils
from apo_jax.data import batching, pipeline
from tok_fixtures import llama_like_tokenizer
tok = llama_like_tokenizer()
cfg = ml_collections.ConfigDict(dict(rm_max_len=64, sft_max_len=64, prompt_max_len=32, buckets=(16, 32, 64),
                                     reward_position="eos"))
responses = ["Paris.", "The capital of France is Paris.", "Sure! Waves roll in.", "No.", "Mix flour and water.",
             "Why did the chicken cross the road?", "cba", "Let it rise, bake."]
pairs = [{"prompt": "\n\nHuman: q%d\n\nAssistant:" % i, "chosen": responses[i], "rejected": responses[-1 - i]}
         for i in range(8)]
ts = pipeline.rm_set(tok, pairs, cfg)
mesh = sharding.make_mesh(sharding.MeshConfig(1, -1, 1))
it = batching.BatchIterator(len(ts), 4, seed=7)
out = {"local": [], "global": []}
for _ in range(3):
    rows = it.next_indices()
    local = ts.batch(rows)
    out["local"].append({k: v.tolist() for k, v in local.items()})
    g = sharding.shard_batch(local, mesh)
    out["global"].append({k: np.asarray(multihost_utils.process_allgather(v, tiled=True)).tolist()
                          for k, v in g.items()})
print("RESULT" + json.dumps(out))
"""


def test_two_processes_get_disjoint_halves_that_assemble_the_global_batch(tok):
    results = run_processes(_TWO_PROCESS, num_processes=2, devices_per_process=2, timeout=240)
    outs = []
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]
        line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT")][0]
        outs.append(json.loads(line[len("RESULT"):]))
    # The single-process reference: the same iterator, the whole global batch built at once.
    responses = ["Paris.", "The capital of France is Paris.", "Sure! Waves roll in.", "No.", "Mix flour and water.",
                 "Why did the chicken cross the road?", "cba", "Let it rise, bake."]
    pairs = [{"prompt": "\n\nHuman: q%d\n\nAssistant:" % i, "chosen": responses[i], "rejected": responses[-1 - i]}
             for i in range(8)]
    ts = pipeline.rm_set(tok, pairs, _data_cfg())
    it = batching.BatchIterator(len(ts), 4, seed=7)
    for step in range(3):
        ref = ts.batch(it.next_indices(), local=False)
        for k, v in ref.items():
            np.testing.assert_array_equal(np.asarray(outs[0]["local"][step][k]), v[:2])  # process 0: rows 0-1
            np.testing.assert_array_equal(np.asarray(outs[1]["local"][step][k]), v[2:])  # process 1: rows 2-3
            for o in outs:
                np.testing.assert_array_equal(np.asarray(o["global"][step][k]), v)


def test_reward_is_read_at_the_eos_even_when_pad_equals_eos():
    """TRL #937: with pad == EOS, a reward read at "the first pad" lands on the EOS of the shortest
    row and ignores padding elsewhere. Ours is read at the last attended position: each padded
    row's reward equals the reward of the same row run alone, unpadded."""
    import jax

    from apo_jax import models

    tok = llama_like_tokenizer()
    tok.pad_token = tok.eos_token
    assert tok.pad_token_id == tok.eos_token_id
    cfg = models.ModelConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    params = models.init_params(cfg, jax.random.PRNGKey(0), lm_head=False, reward_head=True)
    params["score"]["kernel"] = jax.random.normal(jax.random.PRNGKey(1), params["score"]["kernel"].shape)
    pairs = [{"prompt": PROMPT, "chosen": r, "rejected": "No."} for r in RESPONSES]
    batch = pipeline.rm_set(tok, pairs, _data_cfg()).batch([0, 1, 2], local=False)
    padded = np.asarray(models.rewards(cfg, params, batch["chosen_ids"], batch["chosen_mask"]))
    for i in range(3):
        n = int(batch["chosen_mask"][i].sum())
        assert batch["chosen_ids"][i, n - 1] == tok.eos_token_id  # the row really ends in EOS
        alone = models.rewards(cfg, params, batch["chosen_ids"][i:i + 1, :n], batch["chosen_mask"][i:i + 1, :n])
        np.testing.assert_allclose(padded[i], np.asarray(alone)[0], atol=1e-5)
    assert len(set(np.round(padded, 5))) == 3  # three different rows, three different rewards


# ------------------------------------------------------------------------------------------
# Prompt formats.

CHAT = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
DIALOGUE = "\n\nHuman: How do I bake bread?\n\nAssistant: Do you have flour?\n\nHuman: Yes.\n\nAssistant:"


@pytest.fixture(scope="module")
def chat_tok():
    tok = llama_like_tokenizer()
    tok.chat_template = CHAT
    return tok


def test_hh_transcripts_become_alternating_chat_messages():
    assert tokenize.hh_to_messages(DIALOGUE) == [
        {"role": "user", "content": "How do I bake bread?"},
        {"role": "assistant", "content": "Do you have flour?"},
        {"role": "user", "content": "Yes."},
    ]
    assert tokenize.hh_to_messages("Context.\n\nHuman: Hi\n\nAssistant:") == [
        {"role": "user", "content": "Context.\n\nHi"}]


def test_chat_template_format_renders_prompts_and_answers_like_the_template(chat_tok):
    head = ("<s>user\nHow do I bake bread?</s>\n<s>assistant\nDo you have flour?</s>\n<s>user\nYes.</s>\n"
            "<s>assistant\n")  # the template rendered by hand
    [prompt] = tokenize.encode_prompts(chat_tok, [DIALOGUE], 512, prompt_format="chat_template")
    assert prompt.tolist() == chat_tok(head, add_special_tokens=False)["input_ids"]  # no second BOS
    sft, rm = (tokenize.encode_responses(chat_tok, [(DIALOGUE, "Mix it.")], 512, append_eos=eos,
                                         prompt_format="chat_template")[0] for eos in (True, False))
    # SFT learns the answer and its end-of-turn (here EOS itself: not appended twice).
    assert sft.ids.tolist() == chat_tok(head + "Mix it.</s>", add_special_tokens=False)["input_ids"]
    assert chat_tok.decode(sft.ids[sft.response_mask == 1]).strip() == "Mix it.</s>"
    # The RM reads the answer's last token: the end-of-turn (= pad in many chat models) left out.
    assert rm.ids.tolist() == chat_tok(head + "Mix it.", add_special_tokens=False)["input_ids"]
    assert rm.ids[:len(prompt)].tolist() == prompt.tolist()
    # Left truncation keeps the template's BOS and the answer's end.
    short = tokenize.encode_responses(chat_tok, [(DIALOGUE, "Mix it.")], 12, append_eos=True,
                                      prompt_format="chat_template")[0]
    assert len(short.ids) == 12 and short.ids[0] == chat_tok.bos_token_id
    assert short.ids[1:].tolist() == sft.ids[-11:].tolist()


def test_every_phase_formats_prompts_the_same_way(chat_tok):
    d = ml_collections.ConfigDict(dict(rm_max_len=256, sft_max_len=256, prompt_max_len=256, buckets=(256,),
                                       reward_position="last_token", prompt_format="chat_template"))
    pair = {"prompt": DIALOGUE, "chosen": "Mix it.", "rejected": "No."}
    rm = pipeline.rm_set(chat_tok, [pair], d).fields["chosen"][0]
    score = pipeline.score_set(chat_tok, [(DIALOGUE, "Mix it.")], d).fields["input"][0]
    sft = pipeline.sft_set(chat_tok, [{"prompt": DIALOGUE, "response": "Mix it."}], d).fields["input"][0]
    [prompt] = pipeline.prompt_ids(chat_tok, [{"prompt": DIALOGUE}], d)
    assert rm.ids.tolist() == score.ids.tolist()
    assert rm.ids[:len(prompt)].tolist() == sft.ids[:len(prompt)].tolist() == prompt.tolist()
    hh = pipeline.prompt_ids(chat_tok, [{"prompt": DIALOGUE}], ml_collections.ConfigDict(dict(prompt_max_len=256)))
    assert hh[0].tolist() == chat_tok(DIALOGUE)["input_ids"]  # "hh" (BOS + the transcript) stays the default


def test_chat_template_format_without_a_template_is_a_clear_error(tok):
    with pytest.raises(ValueError, match=r"data.prompt_format: 'chat_template' but the tokenizer .* no chat template"):
        tokenize.encode_prompts(tok, [DIALOGUE], 64, prompt_format="chat_template")
    with pytest.raises(ValueError, match=r"data.prompt_format: 'chatml'; expected one of"):
        tokenize.check_prompt_format(tok, "chatml")
