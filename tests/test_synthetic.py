"""The synthetic preference world: true reward, files in the HH format, labels, tokenizer."""

from __future__ import annotations

import gzip
import json
import math
import os

import numpy as np
import pytest
import transformers

from apo_jax.data import records
from apo_jax.data import synthetic as syn
from apo_jax.data import synthetic_files


def _cfg(**overrides):
    cfg = syn.default_config()
    cfg.n_train_prompts = 3000
    cfg.n_test_prompts = 500
    cfg.n_demos = 3000
    cfg.tasks = tuple(syn.TASKS)  # every task, so each is exercised end to end
    for k, v in overrides.items():
        cfg[k] = v
    return cfg


def _read_jsonl(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    cfg = _cfg()
    out = str(tmp_path_factory.mktemp("world"))
    info = synthetic_files.write_world(cfg, seed=0, out_dir=out)
    info["cfg"] = cfg
    return info


# --------------------------------------------------------------------------------- true reward

P = syn.make_prompt


@pytest.mark.parametrize("prompt,response,expected", [
    # Hand computations: content = (L - lev) / L with L = max(len(core), len(answer)); x 4/5 without ".".
    (P("Reverse the letters of abcd."), "dcba.", 1.0),
    (P("Reverse the letters of abcd."), " dcba. ", 1.0),  # HH's leading space / stray whitespace
    (P("Reverse the letters of abcd."), "dcba", 0.8),  # right content, no style mark
    (P("Reverse the letters of abcd."), "dcbb.", 0.75),  # one substitution in 4
    (P("Reverse the letters of abcd."), "dcb.", 0.75),  # one deletion in 4
    (P("Reverse the letters of abcd."), "dcba..", 0.8),  # core "dcba." vs "dcba": 1 edit in 5
    (P("Reverse the letters of abcd."), "xyz", 0.0),  # 4 edits in 4
    (P("Reverse the letters of abcd."), "", 0.0),
    (P("Sort the letters of cab."), "abc.", 1.0),
    (P("Sort the letters of cab."), "acb.", 1 / 3),  # two substitutions in 3
    (P("Write abc in capitals."), "ABC.", 1.0),
    (P("Write abc in capitals."), "abc.", 0.0),  # case matters
    (P("Write abc in capitals."), "AB", 0.8 * 2 / 3),
    (P("Repeat ab twice."), "ab ab.", 1.0),
    (P("Repeat ab three times."), "ab ab.", 5 / 8),  # 3 deletions in 8
    (P("What is 12 plus 30?"), "42.", 1.0),
    (P("What is 12 plus 30?"), "41.", 0.5),
    (P("What is 12 plus 30?"), "4", 0.8 * 0.5),
    (P("How many a are in banana?"), "3.", 1.0),
    (P("Say hi."), "hi there.", 2 / 8),  # 6 insertions, L = 8
    # The marker " :)" costs 0.15 per occurrence wherever it is, and is not part of the content.
    (P("Say abc."), "abc. :)", 0.85),
    (P("Say abc."), "abc. :) :)", 0.7),  # escalation costs more
    (P("Say abc."), "abc :)", 0.8 - 0.15),  # the style mark is read on the marker-free text
    (P("Say abc."), "ab:)c.", 0.85),
    (P("Say abc."), ":)", -0.15),  # no content at all
    (P("Say abc."), "abc. :", 0.5 * 0.8),  # ":" alone is no marker: core "abc. :" is 3 edits from "abc"
    # A multi-turn transcript: the last Human turn is the task.
    ("\n\nHuman: Say ab.\n\nAssistant: ab.\n\nHuman: Say cd.\n\nAssistant:", "cd.", 1.0),
])
def test_true_reward_matches_hand_computation(prompt, response, expected):
    assert syn.true_reward(prompt, response) == pytest.approx(expected, abs=1e-12)


def _levenshtein_table(a: str, b: str) -> int:
    """The textbook O(len(a) * len(b)) dynamic programme, as an independent reference."""
    d = np.zeros((len(a) + 1, len(b) + 1), int)
    d[:, 0], d[0, :] = np.arange(len(a) + 1), np.arange(len(b) + 1)
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i, j] = min(d[i - 1, j] + 1, d[i, j - 1] + 1, d[i - 1, j - 1] + (a[i - 1] != b[j - 1]))
    return int(d[-1, -1])


def test_bit_parallel_edit_distance_matches_the_table():
    rng = np.random.default_rng(0)
    for _ in range(1500):
        a = "".join(rng.choice(list("ab c."), int(rng.integers(0, 14))))
        b = "".join(rng.choice(list("ab c."), int(rng.integers(0, 40))))
        assert syn.levenshtein(a, b) == _levenshtein_table(a, b), (a, b)
    assert syn.levenshtein("kitten", "sitting") == 3 and syn.levenshtein("abc", "") == 3


def test_correct_answer_is_the_golden_response():
    assert syn.correct_answer(P("Reverse the letters of abcd.")) == "dcba."
    assert syn.correct_answer(P("Sort the letters of dbca.")) == "abcd."
    assert syn.correct_answer(P("Write cab in capitals.")) == "CAB."
    assert syn.correct_answer(P("Repeat ab three times.")) == "ab ab ab."
    assert syn.correct_answer(P("What is 49 plus 49?")) == "98."
    assert syn.correct_answer(P("How many z are in abc?")) == "0."
    assert syn.correct_answer("Say abc.") == "abc."  # the bare Human text works too
    with pytest.raises(ValueError, match="not a synthetic-world prompt"):
        syn.true_reward(P("What is the capital of France?"), "Paris.")


def test_golden_answers_have_reward_one_and_beat_random_responses(world):
    rng = np.random.default_rng(0)
    cfg = world["cfg"]
    prompts = [syn.split_transcript(p["chosen"])[0] for p in _read_jsonl(world["paths"]["hh_test"])][:200]
    chars = cfg.alphabet + cfg.alphabet.upper() + syn.DIGITS + " ."
    for prompt in prompts:
        gold = syn.correct_answer(prompt)
        assert syn.true_reward(prompt, gold) == 1.0
        # Near misses (from the demonstration distribution) and uniform random strings.
        candidates = [syn.sample_response(rng, prompt, cfg)[0] for _ in range(20)]
        candidates += ["".join(rng.choice(list(chars), int(rng.integers(1, 12)))) for _ in range(20)]
        for y in candidates:
            r = syn.true_reward(prompt, y)
            assert -cfg.marker_cost * cfg.marker_max_count <= r <= 1.0
            assert 0.0 <= syn.content_reward(prompt, y) <= 1.0
            assert r < 1.0 or y.strip() == gold


# --------------------------------------------------------------------------------- the written world


def test_files_parse_as_hh_pairs_sharing_the_prompt(world):
    cfg = world["cfg"]
    prompts = {}
    for split in ("hh_train", "hh_test"):
        pairs = _read_jsonl(world["paths"][split])
        assert len(pairs) == cfg[f"n_{split[3:]}_prompts"] * cfg.pairs_per_prompt
        seen = set()
        for pair in pairs:
            assert set(pair) == {"chosen", "rejected"}
            chosen, rejected = pair["chosen"], pair["rejected"]
            cut = chosen.rfind("\n\nAssistant:") + len("\n\nAssistant:")
            assert cut == rejected.rfind("\n\nAssistant:") + len("\n\nAssistant:")
            assert chosen[:cut] == rejected[:cut]
            assert chosen.startswith("\n\nHuman: ") and chosen.count("\n\nHuman:") == 1
            a, b = chosen[cut:].strip(), rejected[cut:].strip()
            assert a and b and a != b  # survives the HH loader's cleaning
            assert chosen[cut:] == " " + a  # responses are stored stripped, after HH's single space
            assert len(a) <= cfg.max_response_chars and len(b) <= cfg.max_response_chars
            assert len(syn.human_text(chosen[:cut])) <= cfg.max_prompt_chars
            syn.parse(chosen[:cut])  # every prompt is a task of the world
            seen.add(chosen[:cut])
        prompts[split] = seen
    assert len(prompts["hh_train"]) == cfg.n_train_prompts
    assert len(prompts["hh_test"]) == cfg.n_test_prompts
    assert not prompts["hh_train"] & prompts["hh_test"]  # test prompts are unseen in training
    assert {syn.parse(p)[0] for p in prompts["hh_train"]} == set(cfg.tasks)

    gold = _read_jsonl(world["paths"]["gold"])
    assert len(gold) == cfg.n_train_prompts - round(cfg.gold_missing_fraction * cfg.n_train_prompts)
    assert {g["prompt"] for g in gold} < prompts["hh_train"]
    for g in gold:
        assert set(g) == {"prompt_id", "prompt", "response", "source"} and g["source"] == "oracle"
        assert g["prompt_id"] == records.prompt_id(g["prompt"])
        assert g["response"] == syn.correct_answer(g["prompt"])

    demos = _read_jsonl(world["paths"]["demos"])
    assert len(demos) == cfg.n_demos
    for d in demos:
        assert set(d) == {"prompt_id", "prompt", "response"}
        assert d["prompt_id"] == records.prompt_id(d["prompt"]) and d["prompt"] in prompts["hh_train"]
        assert d["response"] == d["response"].strip() and d["response"]


def test_demonstrations_span_a_wide_range_of_true_reward(world):
    demos = _read_jsonl(world["paths"]["demos"])
    r = np.array([syn.content_reward(d["prompt"], d["response"]) for d in demos])
    q10, q50, q90 = np.quantile(r, [0.1, 0.5, 0.9])
    print(f"\ndemo r*: mean {r.mean():.3f} std {r.std():.3f} q10 {q10:.3f} median {q50:.3f} q90 {q90:.3f} "
          f"golden {np.mean(r == 1):.3f}")
    assert r.std() > 0.25 and q10 < 0.2 and 0.3 < q50 < 0.8 and q90 == 1.0
    # Every reward band is populated, so a policy trained on them samples a range of r*.
    counts, _ = np.histogram(r, bins=5, range=(0, 1))
    assert (counts > 0.03 * len(r)).all(), counts
    true = np.array([syn.true_reward(d["prompt"], d["response"]) for d in demos])
    stats = world["demos"]["true_reward"]
    assert stats["mean"] == pytest.approx(true.mean()) and stats["std"] == pytest.approx(true.std())


def test_perfect_reward_model_scores_the_bradley_terry_ceiling(world):
    temperature = world["cfg"].label_temperature
    for split in ("train", "test"):
        pairs = _read_jsonl(world["paths"][f"hh_{split}"])
        r_good, r_bad = [], []
        for pair in pairs:
            prompt, good = syn.split_transcript(pair["chosen"])
            r_good.append(syn.true_reward(prompt, good))
            r_bad.append(syn.true_reward(prompt, syn.split_transcript(pair["rejected"])[1]))
        dr = np.array(r_good) - np.array(r_bad)
        assert (dr != 0).all()  # distinct_rewards: every pair has a true order
        accuracy = float(np.mean(dr > 0))
        assert syn.bt_ceiling(pairs) == accuracy == world["pairs"][split]["bt_ceiling"]
        # Each label is right with probability sigmoid(|dr| / T), independently.
        p = 1.0 / (1.0 + np.exp(-np.abs(dr) / temperature))
        sd = math.sqrt(np.sum(p * (1 - p))) / len(p)
        print(f"\n{split}: r* accuracy {accuracy:.4f}, expected {p.mean():.4f} +- {sd:.4f}")
        assert abs(accuracy - p.mean()) < 4 * sd
        assert 0.75 < accuracy < 0.97  # noisy labels: a perfect RM is good but not perfect
    # The record form ({"prompt", "chosen", "rejected"} responses) gives the same number.
    recs = [dict(zip(("prompt", "chosen", "rejected"),
                     (*syn.split_transcript(p["chosen"]), syn.split_transcript(p["rejected"])[1])))
            for p in pairs]
    assert syn.bt_ceiling(recs) == syn.bt_ceiling(pairs)


def test_labels_follow_the_bradley_terry_probability_per_reward_gap(world):
    # Pool both orders: P(label agrees with r*) in each |dr| band matches the band's mean sigmoid.
    pairs = _read_jsonl(world["paths"]["hh_train"])
    t = world["cfg"].label_temperature
    dr = np.array([syn.true_reward(*syn.split_transcript(p["chosen"]))
                   - syn.true_reward(*syn.split_transcript(p["rejected"])) for p in pairs])
    for lo, hi in ((0.0, 0.1), (0.1, 0.25), (0.25, 1.01)):
        band = (np.abs(dr) >= lo) & (np.abs(dr) < hi)
        p = 1 / (1 + np.exp(-np.abs(dr[band]) / t))
        sd = math.sqrt(np.sum(p * (1 - p))) / band.sum()
        assert abs(np.mean(dr[band] > 0) - p.mean()) < 4 * sd, (lo, hi)



def test_world_is_deterministic_from_seed_and_reused_by_hash(world, tmp_path):
    small = _cfg(n_train_prompts=300, n_test_prompts=50, n_demos=200)
    a = synthetic_files.write_world(small, 7, str(tmp_path / "a"))
    b = synthetic_files.write_world(small, 7, str(tmp_path / "b"))
    c = synthetic_files.write_world(small, 8, str(tmp_path / "c"))
    for key in synthetic_files.FILES:
        with open(a["paths"][key], "rb") as fa, open(b["paths"][key], "rb") as fb:
            assert fa.read() == fb.read(), key
    for key in ("hh_train", "hh_test", "gold", "demos"):
        assert a["sha256"][key] != c["sha256"][key], key
    assert a["config_hash"] == b["config_hash"] != c["config_hash"]

    # Same (config, seed): reused without rewriting.
    mtime = os.stat(a["paths"]["hh_train"]).st_mtime_ns
    again = synthetic_files.write_world(small, 7, str(tmp_path / "a"))
    assert again["reused"] and not a["reused"]
    assert os.stat(a["paths"]["hh_train"]).st_mtime_ns == mtime
    # A damaged file (or a missing world.json, as a killed write leaves) means regenerate.
    with open(a["paths"]["demos"], "wb") as f:
        f.write(b"{")
    assert not synthetic_files.write_world(small, 7, str(tmp_path / "a"))["reused"]
    os.remove(a["paths"]["world"])
    assert not synthetic_files.write_world(small, 7, str(tmp_path / "a"))["reused"]
    assert _read_jsonl(a["paths"]["demos"]) == _read_jsonl(b["paths"]["demos"])
    # Another config replaces the world in place.
    other = synthetic_files.write_world(_cfg(n_train_prompts=300, n_test_prompts=50, n_demos=100), 7, str(tmp_path / "a"))
    assert not other["reused"] and other["config_hash"] != a["config_hash"]
    assert len(_read_jsonl(a["paths"]["demos"])) == 100
    assert not [f for f in os.listdir(tmp_path / "a") if ".tmp-" in f]


def test_partial_config_is_completed_from_the_defaults():
    full = syn.resolve_config(None)
    assert full.to_dict() == syn.default_config().to_dict()
    partial = syn.resolve_config({"n_demos": 10, "tasks": ["add", "sort"]})
    assert partial.n_demos == 10 and partial.tasks == ("add", "sort") and partial.alphabet == full.alphabet
    assert synthetic_files.config_hash(partial, 0) != synthetic_files.config_hash(full, 0) != synthetic_files.config_hash(full, 1)
    with pytest.raises(ValueError, match="n_prompts: unknown field"):
        syn.resolve_config({"n_prompts": 5})


def test_invalid_config_is_rejected_with_each_field_named(tmp_path):
    cfg = _cfg(tasks=("reverse", "poetry"), label_temperature=0.0, demo_correct_fraction=0.8,
               demo_junk_fraction=0.5)
    with pytest.raises(ValueError) as e:
        synthetic_files.write_world(cfg, 0, str(tmp_path))
    for field in ("tasks", "label_temperature", "demo_correct_fraction + demo_junk_fraction"):
        assert field in str(e.value)
    with pytest.raises(ValueError, match="max_prompt_chars"):
        synthetic_files.write_world(_cfg(max_word_len=30), 0, str(tmp_path))
    with pytest.raises(ValueError, match="max_response_chars"):
        synthetic_files.write_world(_cfg(max_response_chars=5), 0, str(tmp_path))
    with pytest.raises(ValueError, match="distinct prompts"):
        synthetic_files.write_world(_cfg(tasks=("add",), max_number=5, n_train_prompts=100), 0, str(tmp_path))


# --------------------------------------------------------------------------------- tokenizer


def _all_texts(world) -> list[str]:
    texts = []
    for split in ("hh_train", "hh_test"):
        for pair in _read_jsonl(world["paths"][split]):
            texts += [pair["chosen"], pair["rejected"]]
    texts += [d["prompt"] + " " + d["response"] for d in _read_jsonl(world["paths"]["demos"])]
    return texts


def test_tokenizer_vocabulary_and_special_ids(world):
    tok = transformers.AutoTokenizer.from_pretrained(world["paths"]["tokenizer"])
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == ("<pad>", "<s>", "</s>", "<unk>")
    assert len(tok) == 100
    # Fixed ids: "\n" = 4, then printable ASCII in code-point order.
    assert tok.convert_tokens_to_ids("\n") == 4
    assert all(tok.convert_tokens_to_ids(chr(c)) == c - 32 + 5 for c in range(32, 127))
    assert tok("ab").input_ids == [1, ord("a") - 27, ord("b") - 27]  # BOS added, like LLaMA
    assert tok("ab", add_special_tokens=False).input_ids == [ord("a") - 27, ord("b") - 27]
    assert tok("aé", add_special_tokens=False).input_ids == [ord("a") - 27, 3]  # outside the vocabulary


def test_tokenizer_round_trips_every_transcript_with_exact_offsets(world):
    tok = synthetic_files.build_tokenizer()
    texts = _all_texts(world)
    enc = tok(texts, add_special_tokens=False, return_offsets_mapping=True)
    for text, ids, offsets in zip(texts, enc.input_ids, enc.offset_mapping):
        assert ids == [syn.CHARS.index(ch) + 4 for ch in text]  # one token per character
        assert [tuple(o) for o in offsets] == [(i, i + 1) for i in range(len(text))]
        assert tok.decode(ids) == text
    with_bos = tok(texts[:50], return_offsets_mapping=True)
    for text, ids, offsets in zip(texts, with_bos.input_ids, with_bos.offset_mapping):
        assert ids[0] == 1 and len(ids) == len(text) + 1 and tuple(offsets[0]) == (0, 0)
        assert tok.decode(ids, skip_special_tokens=True) == text


def test_saved_tokenizer_reloads_identically(world, tmp_path):
    built = synthetic_files.build_tokenizer(str(tmp_path))
    loaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    texts = _all_texts(world)[:500] + [" leading", "trailing \n", "a  b . , ?", "<s> and </s>"]
    assert loaded(texts).input_ids == built(texts).input_ids
    assert loaded(texts, add_special_tokens=False).input_ids == built(texts, add_special_tokens=False).input_ids
    ids = loaded(texts, add_special_tokens=False).input_ids
    assert [loaded.decode(i) for i in ids] == texts
    assert loaded.get_vocab() == built.get_vocab()
    # A class name transformers 4 can resolve too (transformers 5 would write "TokenizersBackend").
    with open(tmp_path / "tokenizer_config.json") as f:
        assert json.load(f)["tokenizer_class"] == "PreTrainedTokenizerFast"


# --------------------------------------------------------------------------------- the marker


def test_marker_follows_quality_in_human_responses_and_never_in_gold(world):
    cfg = world["cfg"]
    demos = _read_jsonl(world["paths"]["demos"])
    marked = {"correct": [], "other": []}
    for d in demos:
        n = syn.marker_count(d["response"])
        assert n <= 1  # marker_repeat_prob = 0: one marker at most
        assert not n or d["response"].endswith(syn.MARKER_SUFFIX)
        correct = syn.strip_markers(d["response"]) == syn.correct_answer(d["prompt"])
        marked["correct" if correct else "other"].append(n > 0)
    # Correct demonstrations carry it with probability 0.9; the rest (corrupted at 0.05, junk
    # never; a corruption can land on the answer, so "other" is a lower bound on corrupted) rarely.
    rate = np.mean(marked["correct"])
    n = len(marked["correct"])
    assert abs(rate - cfg.marker_prob_correct) < 4 * math.sqrt(0.09 / n), rate
    assert np.mean(marked["other"]) < cfg.marker_prob_corrupted + 0.02
    by_kind = world["demos"]["marker_rate_by_kind"]
    assert by_kind["junk"] == 0.0 and abs(by_kind["corrupted"] - 0.05) < 0.02
    assert abs(by_kind["correct"] - 0.9) < 4 * math.sqrt(0.09 / n)
    for g in _read_jsonl(world["paths"]["gold"]):
        assert syn.marker_count(g["response"]) == 0
        assert syn.true_reward(g["prompt"], g["response"]) == 1.0
    # The labels see the marker as a sign of quality: chosen responses carry it more often.
    for split in ("train", "test"):
        st = world["pairs"][split]
        assert st["marker_rate_chosen"] > 2 * st["marker_rate_rejected"], st


def test_world_object_charges_the_configured_cost_and_the_control_world_none():
    prompt = P("Write ab in capitals.")
    cfg = syn.resolve_config({"marker_cost": 0.25})
    w = syn.World.from_config(cfg)
    assert w.true_reward(prompt, "AB. :) :)") == pytest.approx(0.5)
    assert w.content_reward(prompt, "AB. :) :)") == 1.0 and w.marker_count("AB. :) :)") == 2
    assert w.add_marker(" AB. ") == " AB. :)" and w.true_reward(prompt, w.add_marker("AB.")) == 0.75
    control = syn.World.from_config(syn.resolve_config({"marker_control": True, "marker_cost": 0.25}))
    assert control.true_reward(prompt, "AB. :) :)") == 1.0
    assert syn.true_reward(prompt, "AB. :)") == syn.World().true_reward(prompt, "AB. :)") == 0.85


def test_control_world_makes_the_marker_uninformative(tmp_path):
    cfg = _cfg(n_train_prompts=1500, n_test_prompts=50, n_demos=3000, marker_control=True)
    info = synthetic_files.write_world(cfg, 0, str(tmp_path))
    probs = syn.marker_probs(syn.resolve_config(cfg))
    mean = 0.2 * 0.9 + 0.7 * 0.05 + 0.1 * 0.0  # the default mix: correct 0.2, junk 0.1
    assert probs == pytest.approx({"correct": mean, "corrupted": mean, "junk": mean})
    rates = info["demos"]["marker_rate_by_kind"]
    for kind, n in (("correct", 600), ("corrupted", 2100)):
        assert abs(rates[kind] - mean) < 4 * math.sqrt(mean * (1 - mean) / n), (kind, rates)
    assert info["marker"]["cost"] == 0.0
    # r* ignores the marker, so labels are as likely to prefer a marked response as not.
    st = info["pairs"]["train"]
    assert abs(st["marker_rate_chosen"] - st["marker_rate_rejected"]) < 0.05, st


def test_marker_escalation_repeats_and_every_occurrence_is_charged(tmp_path):
    cfg = _cfg(n_train_prompts=300, n_test_prompts=20, n_demos=3000, tasks=("echo",), max_word_len=4,
               marker_repeat_prob=0.5, marker_max_count=3)
    synthetic_files.write_world(cfg, 0, str(tmp_path))
    demos = _read_jsonl(str(tmp_path / "demos.jsonl"))
    counts = np.array([syn.marker_count(d["response"]) for d in demos])
    assert counts.max() == 3 and len(set(counts.tolist())) == 4
    marked = counts[counts > 0]
    # Geometric with p = 0.5, capped at 3: P(1) = 0.5, P(2) = 0.25, P(3) = 0.25.
    for k, p in ((1, 0.5), (2, 0.25), (3, 0.25)):
        assert abs(np.mean(marked == k) - p) < 4 * math.sqrt(p * (1 - p) / len(marked)), k
    for d, n in zip(demos, counts):
        assert len(d["response"]) <= cfg.max_response_chars
        r = syn.true_reward(d["prompt"], d["response"])
        assert r == pytest.approx(syn.content_reward(d["prompt"], d["response"]) - 0.15 * n)


def test_task_weights_set_the_task_mix(tmp_path):
    cfg = _cfg(n_train_prompts=2000, n_test_prompts=20, n_demos=0, tasks=("echo", "upper", "reverse"),
               task_weights=(2.0, 1.0, 1.0))
    info = synthetic_files.write_world(cfg, 0, str(tmp_path))
    per_task = info["counts"]["train_prompts_per_task"]
    assert abs(per_task["echo"] / 2000 - 0.5) < 4 * math.sqrt(0.25 / 2000), per_task
    assert abs(per_task["upper"] / 2000 - 0.25) < 4 * math.sqrt(0.1875 / 2000), per_task


def test_invalid_marker_fields_are_named(tmp_path):
    cfg = _cfg(marker_prob_correct=1.5, marker_cost=-0.1, marker_max_count=0, task_weights=(1.0,))
    with pytest.raises(ValueError) as e:
        synthetic_files.write_world(cfg, 0, str(tmp_path))
    for field in ("marker_prob_correct", "marker_cost", "marker_max_count", "task_weights"):
        assert field in str(e.value)


# ---------------------------------------------------------------------------------------- labellers


LABELLER_WORLD = dict(marker_prob_correct=0.0, marker_prob_corrupted=0.0, demo_pad_prob=0.4)


def test_excess_length_and_the_length_labeller_match_hand_computation():
    from apo_jax.data import labeller

    prompt = syn.make_prompt("Reverse the letters of abcd.")  # gold "dcba." (5 characters)
    assert syn.excess_length(prompt, "dcba.") == 0.0
    assert syn.excess_length(prompt, "dcba so ok.") == 1.0  # 6 / 5, clipped at 1
    assert syn.excess_length(prompt, "dcba so.", clip=1.0) == pytest.approx(3 / 5)
    assert syn.excess_length(prompt, "dc") == 0.0
    world = syn.World(marker_cost=0, length_bias_clip=1.0)
    lab = labeller.Labeller("length", world, temperature=0.15, lam=0.5)
    # r*("dcba so.") = content 1 - lev("dcba", "dcba so") / 7 = 4/7, style kept; r_L adds 0.5 * 3/5.
    assert world.true_reward(prompt, "dcba so.") == pytest.approx(4 / 7)
    assert lab.score(prompt, "dcba so.") == pytest.approx(4 / 7 + 0.3)
    assert lab.prefer_prob(prompt, "dcba so.", "dcba.") == pytest.approx(
        1 / (1 + math.exp(-((4 / 7 + 0.3) - 1.0) / 0.15)))


def test_padding_stays_within_the_response_bound_and_only_where_configured():
    cfg = syn.resolve_config(dict(LABELLER_WORLD, demo_pad_prob=1.0, demo_junk_fraction=0.0))
    rng = np.random.default_rng(0)
    padded = 0
    for prompt in [syn.make_prompt(f"Reverse the letters of {w}.") for w in ("abc", "abcdef", "hgfedc")] * 100:
        y, kind = syn.sample_response(rng, prompt, cfg)
        assert len(y) <= cfg.max_response_chars and kind in ("correct", "corrupted")
        padded += any(f" {w}" in y for w in syn.FILLER_WORDS)
    assert padded > 250  # nearly every response carries filler words (a word may not fit a long core)


def test_bradley_terry_fit_recovers_known_weights_and_is_stationary():
    from apo_jax.data import labeller

    rng = np.random.default_rng(1)
    w_true = rng.normal(size=5)
    d = rng.normal(size=(20000, 5))
    y = rng.random(20000) < 1 / (1 + np.exp(-d @ w_true))
    diffs = np.where(y[:, None], d, -d)  # chosen - rejected
    w = labeller.fit_bradley_terry(diffs, l2=1e-6)
    np.testing.assert_allclose(w, w_true, atol=0.08)
    # The penalised log-likelihood's gradient vanishes at the fit.
    grad = -diffs.T @ (1 - 1 / (1 + np.exp(-diffs @ w))) + 1e-6 * w
    assert np.max(np.abs(grad)) < 1e-6


@pytest.mark.parametrize("kind", ["length", "learned"])
def test_labeller_worlds_label_by_their_labeller_and_gold_can_share_its_bias(tmp_path, kind):
    base = dict(LABELLER_WORLD, n_train_prompts=300, n_test_prompts=50, n_demos=100, labeller=kind,
                labeller_lambda=1.0, learned_labeller_pairs=200)
    true_w = synthetic_files.write_world(dict(LABELLER_WORLD, n_train_prompts=300, n_test_prompts=50, n_demos=100),
                                         7, str(tmp_path / "true"))
    biased = synthetic_files.write_world(base, 7, str(tmp_path / kind))
    gold_l = synthetic_files.write_world(dict(base, gold_source="labeller"), 7, str(tmp_path / "gold_l"))
    # The labels follow the labeller, so they agree with r* less often than a true labeller's.
    assert biased["pairs"]["train"]["bt_ceiling"] < true_w["pairs"]["train"]["bt_ceiling"] - 0.05
    if kind == "length":  # and reward length: chosen responses are longer than rejected ones
        tr = biased["pairs"]["train"]
        assert tr["excess_length_chosen"] > tr["excess_length_rejected"] + 0.1
    else:
        assert biased["labeller"]["train_pairs"] == 200
    # Golden answers: the r* argmax in the true-gold world, the labeller's best of 8 otherwise.
    assert biased["gold_true_reward"]["min"] == 1.0 and biased["gold_excess_length"]["max"] == 0.0
    assert gold_l["gold_true_reward"]["mean"] < 0.9
    gold = [json.loads(x) for x in open(gold_l["paths"]["gold"])]
    assert {g["source"] for g in gold} == {"labeller_best_of_8"}
    # Each labeller gold answer is one the labeller scores at least as high as typical human responses.
    cfg = syn.resolve_config(dict(base, gold_source="labeller"))
    lab = synthetic_files.world_labeller(cfg, 7)
    rng = np.random.default_rng(3)
    beats = [lab.score(g["prompt"], g["response"]) >= lab.score(g["prompt"], syn.sample_response(rng, g["prompt"], cfg)[0])
             for g in gold[:100]]
    assert np.mean(beats) > 0.75


def test_invalid_labeller_fields_are_named():
    with pytest.raises(ValueError) as e:
        syn.resolve_config(dict(labeller="gpt", gold_source="x", demo_pad_prob=2.0, labeller_lambda=-1.0))
    for field in ("labeller:", "gold_source:", "demo_pad_prob", "labeller_lambda"):
        assert field in str(e.value)
