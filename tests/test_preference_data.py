"""Preference data in the standard formats (`apo_jax.data.preference`): records and formatted texts
written by hand for small files in each format, bad input, golden answers, splits, the HH files
read through the same path, and the example files of docs/data_formats.md."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import ml_collections
import pytest

from apo_jax.data import hh, pipeline, preference, tokenize
from apo_jax.data.records import prompt_id
from tests.tok_fixtures import llama_like_tokenizer

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "docs" / "examples"
REAL = Path(os.environ.get("APO_HH_DATA", REPO.parent / "shared" / "data" / "hh-rlhf"))
A = "\n\nAssistant:"


def write(path: Path, rows: list) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


def rec(prompt, chosen, rejected, subset, **extra):
    return {"prompt_id": prompt_id(prompt), "prompt": prompt, "chosen": chosen, "rejected": rejected,
            "subset": subset, **extra}


# ---------------------------------------------------------------------------------------------
# Each format, by hand.

MULTI = [{"role": "system", "content": "Be brief."}, user("Hi"), bot("Hello!"), user("Capital of France?")]
MULTI_TEXT = "\n\nSystem: Be brief.\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Capital of France?" + A

FORMATS = {
    "plain_explicit": (
        [{"prompt": "What is 2+2?", "chosen": " 4 ", "rejected": "5"},
         {"prompt": "\n\nHuman: Hi\n\nAssistant:", "chosen": "Hello", "rejected": "Bye"}],  # already a transcript
        [("\n\nHuman: What is 2+2?" + A, "4", "5"), ("\n\nHuman: Hi" + A, "Hello", "Bye")]),
    "plain_implicit": (
        [{"chosen": "\n\nHuman: Q\n\nAssistant: x\n\nHuman: R\n\nAssistant: good",
          "rejected": "\n\nHuman: Q\n\nAssistant: x\n\nHuman: R\n\nAssistant: bad"}],
        [("\n\nHuman: Q\n\nAssistant: x\n\nHuman: R" + A, "good", "bad")]),
    "conversational_explicit": (
        [{"prompt": MULTI, "chosen": [bot("Paris.")], "rejected": [bot("Rome.")]},
         {"prompt": [user("2+2?")], "chosen": [bot("4")], "rejected": [bot("5")]}],
        [(MULTI_TEXT, "Paris.", "Rome."), ("\n\nHuman: 2+2?" + A, "4", "5")]),
    "conversational_implicit": (
        # UltraFeedback's layout: a string prompt beside conversations that repeat it.
        [{"prompt": "Capital of France?", "chosen": MULTI + [bot("Paris.")], "rejected": MULTI + [bot("Rome.")]}],
        [(MULTI_TEXT, "Paris.", "Rome.")]),
}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_each_format_gives_hand_written_records(tmp_path, fmt):
    rows, want = FORMATS[fmt]
    pairs, report = preference.load_pairs(write(tmp_path / "mine" / "train.jsonl", rows), "train")
    assert pairs == [rec(p, c, r, "mine") for p, c, r in want]
    assert (report.read, report.kept) == (len(rows), len(rows))


def test_multi_turn_history_and_system_turn_reach_the_chat_template():
    tok = llama_like_tokenizer()
    tok.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                         "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
    head, tail = tokenize.format_example(tok, MULTI_TEXT, "Paris.", "chat_template")
    assert head == ("<s>system\nBe brief.</s>\n<s>user\nHi</s>\n<s>assistant\nHello!</s>\n"
                    "<s>user\nCapital of France?</s>\n<s>assistant\n")  # rendered by hand
    assert tail == "Paris.</s>"
    assert tokenize.format_prompt(tok, "\n\nHuman: What is 2+2?" + A, "hh") == "\n\nHuman: What is 2+2?" + A


def test_margins_from_a_column_or_score_difference_and_a_column_mapping(tmp_path):
    rows = [{"question": "a?", "good": "x", "bad": "y", "s_good": 7, "s_bad": 4.5},
            {"question": "b?", "good": "x", "bad": "y", "delta": 2.0, "s_good": 1, "s_bad": 0}]  # margin wins
    cols = preference.Columns(prompt="question", chosen="good", rejected="bad", margin="delta",
                              score_chosen="s_good", score_rejected="s_bad")
    pairs, _ = preference.load_pairs(write(tmp_path / "d" / "t.jsonl", rows), "train", cols=cols)
    assert [p["margin"] for p in pairs] == [2.5, 2.0]
    assert preference.Columns.from_config({"prompt": "question", "chosen": ""}) == preference.Columns(prompt="question")


def test_parquet_and_save_to_disk_give_the_same_records_as_jsonl(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows, want = FORMATS["conversational_explicit"]
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "pq" / "train-00000.parquet"))
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "disk"))
    from_jsonl = preference.load_pairs(write(tmp_path / "pq" / "train.jsonl", rows), "train")[0]
    from_parquet = preference.load_pairs(str(tmp_path / "pq" / "train-00000.parquet"), "train")[0]
    from_disk = preference.load_pairs(f"{tmp_path / 'disk'}:test", "train")[0]
    strip = lambda ps: [{k: v for k, v in p.items() if k != "subset"} for p in ps]  # noqa: E731
    assert strip(from_parquet) == strip(from_disk) == strip(from_jsonl) == strip(
        [rec(p, c, r, "") for p, c, r in want])
    # A directory stands for its files of the split: both train files are read, not train_gen's.
    write(tmp_path / "pq" / "train_gen.jsonl", rows)
    assert len(preference.load_pairs(str(tmp_path / "pq"), "train")[0]) == 2 * len(rows)


def test_source_specs_split_on_the_last_colon_only_when_not_a_path(tmp_path):
    f = write(tmp_path / "a.jsonl", [])
    assert preference.parse_source(f, "train") == (f, "train")
    assert preference.parse_source("org/name:train_prefs", "test") == ("org/name", "train_prefs")
    assert preference.parse_source("gs://bucket/x.jsonl", "test") == ("gs://bucket/x.jsonl", "test")


# ---------------------------------------------------------------------------------------------
# Bad input.

BAD = [
    ({"prompt": "q", "chosen": "a"}, "missing field 'rejected'"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "'chosen' equals 'rejected'"),
    ({"chosen": [user("q"), bot("a")], "rejected": [user("q"), user("b")]},
     "field 'rejected' ends with a 'user' turn; expected the conversation to end with the assistant's answer"),
    ({"prompt": [user("q")], "chosen": [user("a")], "rejected": [bot("b")]}, "ends with a 'user' turn"),
    ({"chosen": [user("q"), bot("a")], "rejected": [user("other"), bot("b")]}, "differ before their last turn"),
    ({"chosen": [bot("a")], "rejected": [bot("b")]}, "no user turn before the assistant's answer"),
    ({"chosen": "x", "rejected": [bot("b")]}, "field 'chosen' is text but 'rejected' is messages"),
    ({"chosen": [{"role": "robot", "content": "a"}], "rejected": [bot("b")]}, "role 'robot'"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "score_chosen": 1}, "only one of 'score_chosen'"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"}, "field 'margin' is str; expected a number"),
    ("[1, 2]", "expected a JSON object"),
]


@pytest.mark.parametrize("bad, message", BAD)
def test_bad_row_raises_naming_file_row_and_what_was_expected(tmp_path, bad, message):
    path = write(tmp_path / "t.jsonl", [{"prompt": "ok", "chosen": "a", "rejected": "b"}, bad])
    with pytest.raises(hh.DataError) as info:
        preference.load_pairs(path, "train")
    assert str(info.value).startswith(f"{path}:2: ") and message in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_rows_are_skipped_and_counted(tmp_path):
    rows = [{"prompt": "ok", "chosen": "a", "rejected": "b"}] + [b for b, _ in BAD] + [
        {"prompt": "q", "chosen": "", "rejected": "b"}]
    pairs, report = preference.load_pairs(write(tmp_path / "t.jsonl", rows), "train", on_bad_line="skip")
    assert len(pairs) == 1 and report.dropped == {"empty_response": 1, "bad_line": len(BAD)}
    assert report.summary().endswith(f"read {len(rows)}, kept 1, dropped {len(BAD) + 1} "
                                     f"(empty_response 1, bad_line {len(BAD)})")


def test_unusable_sources_name_what_was_expected(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(hh.DataError, match=r"no file named test\*\.jsonl"):
        preference.load_pairs(str(tmp_path / "d"), "test")
    with pytest.raises(hh.DataError, match="neither an existing file or directory nor a hub id"):
        preference.load_pairs(str(tmp_path / "missing.jsonl"), "train")
    write(tmp_path / "x.txt", ["hi"])
    with pytest.raises(hh.DataError, match=r"expected a \.jsonl\(\.gz\), \.json, \.parquet"):
        preference.load_pairs(str(tmp_path / "x.txt"), "train")


def test_prompt_only_rows(tmp_path):
    path = write(tmp_path / "p.jsonl", [{"prompt": "Hi"}, {"prompt": MULTI}, {"prompt": "Hi"},
                                        {"prompt": [user("q"), bot("a")]}])
    with pytest.raises(hh.DataError, match=r"p.jsonl:4: field 'prompt' ends with a 'assistant' turn; expected a user"):
        preference.load_prompts(path)
    prompts, report = preference.load_prompts(path, on_bad_line="skip")
    assert prompts == [{"prompt_id": prompt_id(t), "prompt": t} for t in ("\n\nHuman: Hi" + A, MULTI_TEXT)]
    assert report == {"source": path, "read": 4, "kept": 2, "bad_line": 1}


# ---------------------------------------------------------------------------------------------
# Golden answers.

PAIRS = [rec(f"\n\nHuman: question {i}?" + A, f"chosen {i}", "no", "x", source_id=f"id{i}") for i in range(4)]


def test_gold_matches_by_normalised_text_own_id_or_project_id_and_falls_back_to_chosen(tmp_path):
    path = write(tmp_path / "gold.jsonl", [
        {"prompt": "  question   0? ", "completion": "gold 0"},                    # plain text, spacing differs
        {"prompt": [user("question 1?")], "completion": [bot("gold 1")]},          # messages
        {"prompt_id": "id2", "completion": "gold 2"},                              # the data's own id
        {"prompt_id": PAIRS[3]["prompt_id"], "response": "gold 3", "source": "endpoint"},  # project id, old schema
    ])
    records, report = preference.load_gold(path, PAIRS[:3], known=PAIRS)
    assert [(r["response"], r["source"]) for r in records] == [("gold 0", "file"), ("gold 1", "file"),
                                                                ("gold 2", "file")]
    assert report == {"total": 3, "from_file": 3, "fallback_chosen": 0, "unused_in_file": 1}
    records, report = preference.load_gold(None, PAIRS[:2], known=PAIRS)
    assert [(r["response"], r["source"]) for r in records] == [("chosen 0", "hh_chosen"), ("chosen 1", "hh_chosen")]


def test_gold_matching_no_prompt_is_a_bad_row(tmp_path):
    path = write(tmp_path / "gold.jsonl", [{"prompt": "question 0?", "completion": "g"},
                                           {"prompt": "an unknown question", "completion": "g"}])
    with pytest.raises(hh.DataError, match=r"gold.jsonl:2: matches no prompt of the data"):
        preference.load_gold(path, PAIRS, known=PAIRS)
    records, report = preference.load_gold(path, PAIRS, known=PAIRS, on_bad_line="skip")
    assert report["bad_line"] == 1 and report["from_file"] == 1


# ---------------------------------------------------------------------------------------------
# The pipeline: splits, prompt-only queries, empty splits.


def data_cfg(tmp_path, **fields):
    d = ml_collections.ConfigDict(dict(kind="preference", train="", test="", prompts="", gold="", tokenizer="",
                                       n_rm=2, n_dev=1, n_llm=0, n_test=0, on_bad_line="raise", prompt_format="hh",
                                       carve_test_fraction=0.0, columns=dict(preference.Columns().__dict__)))
    d.update(fields)
    tok_dir = tmp_path / "tok"
    llama_like_tokenizer().save_pretrained(tok_dir)
    d.tokenizer = str(tok_dir)
    return ml_collections.ConfigDict(dict(seed=0, data=d, policy=dict(checkpoint=""),
                                          rm=dict(margin_from_data=False, tokenizer="")))


def test_prepare_carves_the_papers_splits_by_prompt(tmp_path):
    rows = [{"prompt": f"q{i}", "chosen": f"a{i}{j}", "rejected": "b"} for i in range(5) for j in range(2)]
    test = [{"prompt": "t", "chosen": "a", "rejected": "b"}]
    prompts = [{"prompt": "q0"}, {"prompt": "new 1"}, {"prompt": "new 2"}]
    cfg = data_cfg(tmp_path, train=write(tmp_path / "train.jsonl", rows), test=write(tmp_path / "test.jsonl", test))
    data = pipeline.prepare(cfg, str(tmp_path / "run"))
    rm_ids = {p["prompt_id"] for p in data.rm_pairs}
    llm_ids = {p["prompt_id"] for p in data.llm_prompts}
    # The documented rule, computed here: prompts ordered by blake2b(seed, "prompt", prompt id).
    order = sorted({prompt_id(f"\n\nHuman: q{i}" + A) for i in range(5)},
                   key=lambda pid: hashlib.blake2b(f"0\x1fprompt\x1f{pid}".encode(), digest_size=16).digest())
    assert rm_ids == set(order[:2]) and [p["prompt_id"] for p in data.llm_prompts] == order[2:]
    # 5 prompts x 2 pairs: 2 RM prompts with all 4 of their pairs; the other 3 are the policy's queries.
    assert len(rm_ids) == 2 and len(data.rm_pairs) == 4 and len(llm_ids) == 3 and not rm_ids & llm_ids
    assert {p["prompt_id"] for p in data.dev_pairs} <= llm_ids and len(data.dev_pairs) == 1
    assert [g["prompt_id"] for g in data.gold] == list(dict.fromkeys(p["prompt_id"] for p in data.rm_pairs))
    assert all(g["source"] == "hh_chosen" for g in data.gold)  # no gold file: the chosen answers
    counts = json.loads((tmp_path / "run" / "data" / "splits.json").read_text())["counts"]
    assert counts == {"rm_pairs": 4, "gold": 2, "llm_prompts": 3, "dev_pairs": 1, "test_pairs": 1,
                      "test_prompts": 1, "all_train_pairs": 10}
    # Prompt-only queries replace the train prompts after HH_RM (less any RM prompt).
    cfg.data.prompts = write(tmp_path / "prompts.jsonl", prompts)
    data = pipeline.prepare(cfg, str(tmp_path / "run2"))
    want = {prompt_id("\n\nHuman: " + p["prompt"] + A) for p in prompts} - {p["prompt_id"] for p in data.rm_pairs}
    assert {p["prompt_id"] for p in data.llm_prompts} == want


def test_only_a_test_split_is_carved_and_empty_splits_are_named(tmp_path):
    rows = [{"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(8)]
    cfg = data_cfg(tmp_path, test=write(tmp_path / "test.jsonl", rows), carve_test_fraction=0.25)
    data = pipeline.prepare(cfg, str(tmp_path / "run"))
    assert len(data.test_pairs) == 2 and len(data.all_train_pairs) == 6  # 25% of 8 prompts
    assert not {p["prompt_id"] for p in data.test_pairs} & {p["prompt_id"] for p in data.all_train_pairs}
    bad = write(tmp_path / "bad.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "a"}])
    cfg = data_cfg(tmp_path, train=write(tmp_path / "train.jsonl", rows), test=bad, on_bad_line="skip")
    with pytest.raises(hh.DataError, match="data.test: the test data has no pairs after cleaning"):
        pipeline.prepare(cfg, str(tmp_path / "run_bad"))
    assert not (tmp_path / "run_bad").exists()  # nothing written before the data is whole


# ---------------------------------------------------------------------------------------------
# HH as one instance of the path, and the documented examples.


def test_hh_files_read_as_preference_data_give_the_hh_records():
    if not all((REAL / s / "test.jsonl.gz").exists() for s in hh.SUBSETS):
        pytest.skip(f"real HH-RLHF test files not found under {REAL} (optional; see ../shared/data/README.md)")
    for subset, kept in (("helpful-base", 2348), ("harmless-base", 2308)):
        via_hh, _ = hh.load_hh_pairs(str(REAL), "test", subsets=(subset,))
        via_pref, report = preference.load_pairs(str(REAL / subset / "test.jsonl.gz"), "test")
        assert via_pref == via_hh and len(via_pref) == kept
        assert report.dropped == {"empty_response": 4}


def test_documented_example_files_load():
    gold_prompts = []
    for name in ("plain_explicit", "plain_implicit", "conversational_explicit", "conversational_implicit"):
        pairs, report = preference.load_pairs(str(EXAMPLES / f"{name}.jsonl"), "train")
        assert len(pairs) == report.read == 10
        assert all(p["prompt"].endswith(A) and p["chosen"] != p["rejected"] for p in pairs)
        gold_prompts.append(pairs)
    # The same ten questions: the single-turn prompts are the same text in every format.
    texts = [{p["prompt"] for p in pairs if p["prompt"].startswith("\n\nHuman:")} for pairs in gold_prompts]
    assert texts[0] == texts[1] == texts[3] and len(texts[0]) == 10
    implicit = gold_prompts[3]
    assert [p["margin"] for p in implicit[:3]] == [7.0, 5.0, 5.0] and implicit[0]["source_id"] == "115049a29853"
    records, report = preference.load_gold(str(EXAMPLES / "gold.jsonl"), implicit, known=implicit)
    assert report == {"total": 10, "from_file": 6, "fallback_chosen": 4, "unused_in_file": 0}
    assert all(r["response"].endswith("(gold)") for r in records[:6])
    prompts, _ = preference.load_prompts(str(EXAMPLES / "prompts.jsonl"))
    assert len(prompts) == 11 and prompts[-1]["prompt"].startswith("\n\nSystem: Answer in one sentence.")


# ---------------------------------------------------------------------------------------------
# configs/ultrafeedback.py on a local copy in the data set's own layout and schema.


def ultrafeedback_rows(n: int, tag: str) -> list[dict]:
    rows = []
    for i in range(n):
        q = f"{tag} question {i}?"
        u = {"role": "user", "content": q}
        good, bad = [u, bot(f"A careful answer {i}.")], [u, bot("Whatever.")]
        rows.append({"prompt": q, "prompt_id": f"{tag}{i:04d}", "chosen": good, "rejected": bad, "messages": good,
                     "score_chosen": 9.0, "score_rejected": float(i % 5)})
    return rows


def test_ultrafeedback_config_reads_a_local_copy_of_the_data_set(tmp_path):
    datasets = pytest.importorskip("datasets")
    import runpy

    from apo_jax import config as config_lib

    c = runpy.run_path(str(REPO / "configs" / "ultrafeedback.py"))["get_config"]()
    config_lib.validate(c, 8)
    assert (c.data.kind, c.data.train, c.data.test) == (
        "preference", "HuggingFaceH4/ultrafeedback_binarized:train_prefs", "HuggingFaceH4/ultrafeedback_binarized:test_prefs")
    snap = tmp_path / "ultrafeedback_binarized" / "data"  # the hub repo's layout
    snap.mkdir(parents=True)
    for split, n in (("train_prefs", 12), ("test_prefs", 4), ("train_gen", 3)):
        datasets.Dataset.from_list(ultrafeedback_rows(n, split)).to_parquet(str(snap / f"{split}-00000-of-00001.parquet"))
    c.data.train, c.data.test = f"{snap.parent}:train_prefs", f"{snap.parent}:test_prefs"
    c.data.n_rm, c.data.n_dev, c.data.n_llm, c.data.n_test = 4, 2, 0, 0
    tok_dir = tmp_path / "tok"
    tok = llama_like_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    tok.save_pretrained(tok_dir)
    c.data.tokenizer = str(tok_dir)
    data = pipeline.prepare(c, str(tmp_path / "run"))
    assert len(data.all_train_pairs) == 12 and len(data.test_pairs) == 4  # train_gen is not read
    assert len(data.rm_pairs) == 4 and len(data.llm_prompts) == 8 and len(data.dev_pairs) == 2
    first = next(p for p in data.all_train_pairs if p["source_id"] == "train_prefs0003")
    assert first == {"prompt_id": prompt_id("\n\nHuman: train_prefs question 3?" + A),
                     "prompt": "\n\nHuman: train_prefs question 3?" + A, "chosen": "A careful answer 3.",
                     "rejected": "Whatever.", "subset": "data", "margin": 6.0, "source_id": "train_prefs0003"}
    assert [g["response"] for g in data.gold] == [p["chosen"] for p in data.rm_pairs]  # no gold: chosen
    c.data.train = "HuggingFaceH4/ultrafeedback_binarized:train_prefs"
    with pytest.raises(hh.DataError, match=r"hub dataset HuggingFaceH4/ultrafeedback_binarized:train_prefs: cannot read"
                                           r".* pass a local copy instead"):
        pipeline.prepare(c, str(tmp_path / "run2"))


def test_config_checks_for_the_preference_fields(tmp_path):
    from apo_jax import config as config_lib

    c = config_lib.base_config()
    c.data.kind, c.policy.checkpoint = "preference", "org/model"
    c.data.train = str(tmp_path / "missing.jsonl")
    c.rm.tokenizer, c.rm.reward_stats_set, c.rm.center_rewards_coefficient = "org/rm", "train", -1.0
    with pytest.raises(config_lib.ConfigError) as info:
        config_lib.validate(c, 8)
    msg = str(info.value)
    for line in (f"data.train: {str(tmp_path / 'missing.jsonl')!r} does not exist",
                 "data.test: empty; give a file, directory or hub id",
                 "rm.tokenizer: a tokenizer of its own needs rm.init_checkpoint",
                 "rm.reward_stats_set: 'train'; expected '', 'dev', 'test' or 'rm'",
                 "rm.center_rewards_coefficient: -1.0 must be >= 0"):
        assert line in msg
    c.data.train, c.data.test = "org/data:train_prefs", write(tmp_path / "t.jsonl", [])
    c.rm.tokenizer, c.rm.reward_stats_set, c.rm.center_rewards_coefficient = "", "dev", 0.0
    config_lib.validate(c, 8)
