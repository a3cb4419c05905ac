"""A game on a user's conversational preference file, with a reward model whose tokenizer differs
from the policy's, and RM scoring across tokenizers against scoring each text by hand."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import ml_collections
import numpy as np
import pytest
import transformers
from tokenizers import Tokenizer, decoders, models as tok_models, pre_tokenizers, processors, trainers

from tests.hf_fixtures import random_causal_lm
from tests.tok_fixtures import CORPUS, llama_like_tokenizer

CHAT = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


def byte_level_tokenizer(vocab_size: int = 320) -> transformers.PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE (a different family's tokenizer than `llama_like_tokenizer`)."""
    tok = Tokenizer(tok_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>", pad_token="<unk>")


def save_model(path, tok, seed: int) -> str:
    tok.chat_template = CHAT
    random_causal_lm(seed, vocab_size=len(tok), max_position_embeddings=256).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_rm_with_its_own_tokenizer_scores_each_text_as_encoded_by_hand():
    """Policy tokens -> text (policy tokenizer) -> RM tokens (RM tokenizer) -> reward, against the
    RM run on each text's own RM encoding alone, unpadded."""
    import jax

    from apo_jax import models, sharding
    from apo_jax.data import tokenize
    from apo_jax.game import phases
    from apo_jax.training import train

    pol_tok, rm_tok = llama_like_tokenizer(), byte_level_tokenizer()
    prompts = ["\n\nHuman: What is the capital of France?\n\nAssistant:", "\n\nHuman: Tell me a joke.\n\nAssistant:",
               "\n\nHuman: reverse abc\n\nAssistant:"]
    answers = ["The capital is Paris.", "Why did the chicken cross the road?", "cba"]
    # What the sampler returns: policy-tokenizer ids, decoded as the game decodes samples.
    sampled = [pol_tok(a, add_special_tokens=False)["input_ids"] for a in answers]
    texts = [(p, tokenize.decode_response(pol_tok, ids)) for p, ids in zip(prompts, sampled)]
    assert [t for _, t in texts] == answers
    assert pol_tok(answers[0], add_special_tokens=False)["input_ids"] != rm_tok(answers[0], add_special_tokens=False)[
        "input_ids"]  # the two tokenizers really differ

    config = models.ModelConfig(vocab_size=len(rm_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                bos_token_id=1, eos_token_id=2, pad_token_id=0)
    params = train.rm_params_from(config, models.init_params(config, jax.random.PRNGKey(0)), jax.random.PRNGKey(1),
                                  0.5)
    mesh = sharding.make_mesh(sharding.MeshConfig(1, -1, 1))
    d = ml_collections.ConfigDict(dict(rm_max_len=128, buckets=(32, 64, 128), reward_position="last_token",
                                       prompt_format="hh"))
    ctx = phases.Context(SimpleNamespace(eval_batch_size=8), d, SimpleNamespace(mesh=mesh),
                         SimpleNamespace(tokenizer=pol_tok, rm_tokenizer=rm_tok))
    got = phases.score_texts(ctx, SimpleNamespace(config=config, params=params), texts)
    for (p, a), r in zip(texts, got):
        ids = np.asarray([rm_tok(p + " " + a)["input_ids"]], np.int32)  # [BOS] prompt answer, by hand
        want = models.rewards(config, params, ids, np.ones_like(ids))
        np.testing.assert_allclose(r, np.asarray(want)[0], atol=1e-5)


def conversational_rows(n: int) -> list[dict]:
    """n conversational pairs (some multi-turn, with a system turn), TRL's explicit-prompt form, with scores."""
    rows = []
    topics = ["France", "the sea", "bread", "a joke", "abc"]
    for i in range(n):
        prompt = [{"role": "user", "content": f"Tell me about {topics[i % 5]} number {i}."}]
        if i % 3 == 0:
            prompt = [{"role": "system", "content": "Be brief."}, *prompt,
                      {"role": "assistant", "content": "Which part?"}, {"role": "user", "content": "All of it."}]
        rows.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": f"Here is a fact {i}."}],
                     "rejected": [{"role": "assistant", "content": "No."}],
                     "score_chosen": 8.0, "score_rejected": 3.0 + i % 3})
    return rows


@pytest.mark.e2e
def test_a_game_plays_end_to_end_on_a_conversational_file_with_an_rm_of_another_tokenizer(tmp_path, monkeypatch):
    from apo_jax import config as config_lib
    from apo_jax.data import pipeline
    from apo_jax.evaluation import score_texts
    from apo_jax.game import loop

    # Which tokenizer every RM input (training pairs, APO pairs, scored texts) is encoded with.
    rm_inputs = []
    for name in ("rm_set", "score_set"):
        original = getattr(pipeline, name)

        def spy(tokenizer, records, d, _original=original, _name=name):
            apo = _name == "rm_set" and any(r.get("is_apo") for r in records)
            rm_inputs.append((_name, len(tokenizer), apo))
            return _original(tokenizer, records, d)

        monkeypatch.setattr(pipeline, name, spy)

    policy = save_model(tmp_path / "policy", llama_like_tokenizer(), 0)
    rm_init = save_model(tmp_path / "rm_init", byte_level_tokenizer(), 1)
    rows = conversational_rows(40)
    for name, part in (("train", rows[:32]), ("test", rows[32:])):
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)
    # Golden answers for two prompts, as prompt-completion rows keyed by the prompt's messages.
    with open(tmp_path / "gold.jsonl", "w") as f:
        for r in rows[:2]:
            f.write(json.dumps({"prompt": r["prompt"], "completion": [{"role": "assistant", "content": "Gold."}]}) + "\n")

    c = config_lib.base_config()
    c.run_dir = str(tmp_path / "run")
    c.data.kind = "preference"
    c.data.train, c.data.test, c.data.gold = str(tmp_path / "train.jsonl"), str(tmp_path / "test.jsonl"), str(
        tmp_path / "gold.jsonl")
    c.data.prompt_format = "chat_template"
    c.data.n_rm, c.data.n_dev, c.data.n_llm = 16, 4, 8
    c.data.rm_max_len = c.data.sft_max_len = c.data.prompt_max_len = 128
    c.data.buckets = (64, 128)
    c.policy.checkpoint = policy
    c.rm.init_checkpoint, c.rm.tokenizer = rm_init, rm_init
    c.rm.reward_head_std = 0.02
    c.rm.margin_from_data, c.rm.center_rewards_coefficient, c.rm.reward_stats_set = True, 0.01, "dev"
    for opt in (c.rm.base, c.rm.test, c.rm.apo, c.sft):
        opt.batch_size, opt.max_steps = 8, 2
    c.sft.lrs = (1e-4,)
    c.apo.rounds, c.apo.num_samples, c.apo.schedules = 1, 2, ("apo",)
    for s in (c.sampling.train, c.sampling.test):
        s.max_new_tokens = 4
    c.sampling.batch_size = c.eval.batch_size = 8
    c.checkpoint.async_save = False
    config_lib.validate(c, 8)
    loop.run(c)

    rm_vocab = len(byte_level_tokenizer())
    assert rm_vocab != len(llama_like_tokenizer())
    assert {v for _, v, _ in rm_inputs} == {rm_vocab}  # every RM input through the RM's own tokenizer
    assert any(apo for _, _, apo in rm_inputs) and any(n == "score_set" for n, _, _ in rm_inputs)

    run = tmp_path / "run"
    counts = json.loads((run / "data" / "splits.json").read_text())["counts"]
    assert counts["rm_pairs"] == 16 and counts["llm_prompts"] == 8 and counts["test_pairs"] == 8
    gold = [json.loads(l) for l in open(run / "data" / "gold.jsonl")]
    assert len(gold) == 16 and sum(g["source"] == "file" for g in gold) == len(
        {r["prompt_id"] for r in gold if r["response"] == "Gold."})
    assert any(g["prompt"].startswith("\n\nSystem: Be brief.") for g in gold + [
        json.loads(l) for l in open(run / "data" / "test_pairs.jsonl")])
    # The RM exports carry the RM's own tokenizer and the dev-set reward statistics.
    export = run / "export" / "rm_base"
    assert json.loads((export / "tokenizer_config.json").read_text())["bos_token"] == "<s>"
    assert len(transformers.AutoTokenizer.from_pretrained(export)) == len(byte_level_tokenizer())
    stats = json.loads((export / "apo_jax_scoring.json").read_text())
    assert stats["reward_count"] == 8 and stats["reward_std"] > 0
    dev = [json.loads(l) for l in open(run / "data" / "dev_pairs.jsonl")]
    prompts = [p["prompt"] for p in dev for _ in (0, 1)]
    answers = [p[s] for p in dev for s in ("chosen", "rejected")]
    raw = score_texts(str(export), prompts, answers)
    np.testing.assert_allclose([raw.mean(), raw.std()], [stats["reward_mean"], stats["reward_std"]], atol=1e-4)
    normed = score_texts(str(export), prompts, answers, normalize=True)
    np.testing.assert_allclose(normed, (raw - raw.mean()) / raw.std(), atol=1e-4)
    assert os.path.isdir(run / "export" / "policy_apo_r1")
