"""HH-RLHF loading, cleaning, splits and golden responses (`apo_jax.data.hh`).

Most tests build small HH-format files and compare with hand-written expectations. The tests on
the real test splits (../shared/data/hh-rlhf) skip when that folder is absent, and check the
loader against an independent, naive reading of the raw lines.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import random
import re
from pathlib import Path

import pytest

from apo_jax.data import hh
from apo_jax.data.records import prompt_id

A = "\n\nAssistant:"
REAL = Path(os.environ.get("APO_HH_DATA", Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf"))


def dialogue(*turns: str) -> str:
    """Alternating "\\n\\nHuman: t0\\n\\nAssistant: t1..." transcript (an empty last turn ends at "Assistant:")."""
    out = ""
    for i, turn in enumerate(turns):
        out += ("\n\nHuman:" if i % 2 == 0 else A) + (f" {turn}" if turn else "")
    return out


def write(path: Path, lines: list, gz: bool = False) -> Path:
    """Writes dicts as JSON lines and strings/bytes verbatim."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = b"".join((l if isinstance(l, bytes) else (l if isinstance(l, str) else json.dumps(l)).encode()) + b"\n"
                    for l in lines)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def pair(prompt_turns: tuple[str, ...], chosen: str, rejected: str) -> dict:
    return {"chosen": dialogue(*prompt_turns, chosen), "rejected": dialogue(*prompt_turns, rejected)}


# Three good lines with hand-written expected records (prompt, chosen, rejected).
GOOD = [
    (pair(("Hi",), "Hello!", "Go away."), ("\n\nHuman: Hi\n\nAssistant:", "Hello!", "Go away.")),
    (pair(("How tall is Everest?", "About 8.8 km.", "In feet?"), "About 29,000 feet.", "Tall."),
     ("\n\nHuman: How tall is Everest?\n\nAssistant: About 8.8 km.\n\nHuman: In feet?\n\nAssistant:",
      "About 29,000 feet.", "Tall.")),
    # The chosen response itself contains "\n\nAssistant:": the prompt still ends at the shared turn.
    ({"chosen": "\n\nHuman: Count\n\nAssistant: one\n\nAssistant: two",
      "rejected": "\n\nHuman: Count\n\nAssistant: no"},
     ("\n\nHuman: Count\n\nAssistant:", "one\n\nAssistant: two", "no")),
]


def expected_records(items, subset):
    return [{"prompt_id": prompt_id(p), "prompt": p, "chosen": c, "rejected": r, "subset": subset}
            for _, (p, c, r) in items]


# ---------------------------------------------------------------------------------------------
# split_transcripts


@pytest.mark.parametrize("chosen, rejected, expected", [
    ("\n\nHuman: Hi\n\nAssistant: Hello", "\n\nHuman: Hi\n\nAssistant: Bye",
     ("\n\nHuman: Hi\n\nAssistant:", "Hello", "Bye")),
    # Responses share a first word: the common prefix runs into them, the prompt must not.
    ("\n\nHuman: Hi\n\nAssistant: Sure, yes", "\n\nHuman: Hi\n\nAssistant: Sure, no",
     ("\n\nHuman: Hi\n\nAssistant:", "Sure, yes", "Sure, no")),
    # Nested "\n\nAssistant:" in the rejected response (the chosen one is covered by GOOD).
    ("\n\nHuman: Q\n\nAssistant: A1", "\n\nHuman: Q\n\nAssistant: B1\n\nAssistant: B2",
     ("\n\nHuman: Q\n\nAssistant:", "A1", "B1\n\nAssistant: B2")),
    # Non-alternating prompt: two Assistant turns in a row before the final one.
    ("\n\nHuman: Q\n\nAssistant: x\n\nAssistant: y\n\nHuman: Z\n\nAssistant: good",
     "\n\nHuman: Q\n\nAssistant: x\n\nAssistant: y\n\nHuman: Z\n\nAssistant: bad",
     ("\n\nHuman: Q\n\nAssistant: x\n\nAssistant: y\n\nHuman: Z\n\nAssistant:", "good", "bad")),
    # Whitespace around responses is stripped; one text a prefix of the other.
    ("\n\nHuman: Q\n\nAssistant:  a \n", "\n\nHuman: Q\n\nAssistant:  a b", ("\n\nHuman: Q\n\nAssistant:", "a", "a b")),
    ("\n\nHuman: Q\n\nAssistant: ", "\n\nHuman: Q\n\nAssistant: b", ("\n\nHuman: Q\n\nAssistant:", "", "b")),
])
def test_split_transcripts_cuts_at_last_assistant_in_common_prefix(chosen, rejected, expected):
    assert hh.split_transcripts(chosen, rejected) == expected


def test_split_transcripts_without_assistant_in_common_prefix_is_a_data_error():
    with pytest.raises(hh.DataError, match="common prefix"):
        hh.split_transcripts("\n\nHuman: a\n\nAssistant: x", "\n\nHuman: b\n\nAssistant: x")


# ---------------------------------------------------------------------------------------------
# load_hh_pairs on small files


def test_valid_file_gives_hand_written_records(tmp_path):
    path = write(tmp_path / "mine" / "train.jsonl", [obj for obj, _ in GOOD] + [""])  # trailing blank line
    pairs, report = hh.load_hh_pairs(str(path), "train")
    assert pairs == expected_records(GOOD, "mine")
    assert (report.read, report.kept, report.dropped) == (3, 3, {"empty_response": 0, "identical_responses": 0})


def test_cleaning_drops_empty_and_identical_responses_and_counts_each_reason(tmp_path):
    lines = [
        GOOD[0][0],
        pair(("Q1",), "", "something"),              # empty chosen (ends at "Assistant:")
        pair(("Q2",), "something", "   "),           # rejected empty after stripping
        pair(("Q3",), "", ""),                       # both empty: counted once, as empty_response
        {"chosen": dialogue("Q4", "same"), "rejected": dialogue("Q4", "same  ") + "\n"},  # identical once stripped
        pair(("Q5",), "Same", "same"),               # differ in case: kept
        GOOD[1][0],
    ]
    pairs, report = hh.load_hh_pairs(str(write(tmp_path / "d" / "x.jsonl", lines)), "test")
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("Hello!", "Go away."), ("Same", "same"),
                                                              ("About 29,000 feet.", "Tall.")]
    assert report.dropped == {"empty_response": 3, "identical_responses": 1}
    assert (report.read, report.kept) == (7, 3)
    assert report.summary() == (f"{tmp_path / 'd' / 'x.jsonl'} test: read 7, kept 3, dropped 4 "
                                f"(empty_response 3, identical_responses 1)")


BAD_LINES = [
    ('{"chosen": "\\n\\nHuman: a\\n\\nAssistant: b", "rejected": ', "not valid JSON"),
    ({"chosen": dialogue("a", "b")}, "missing field 'rejected'"),
    ({"rejected": dialogue("a", "b")}, "missing field 'chosen'"),
    ({"chosen": dialogue("a", "b"), "rejected": 3}, "field 'rejected' is int; expected a string"),
    ({"chosen": None, "rejected": dialogue("a", "b")}, "field 'chosen' is NoneType"),
    ([dialogue("a", "b"), dialogue("a", "c")], "expected a JSON object"),
    ({"chosen": "\n\nHuman: a b", "rejected": "\n\nHuman: a c"}, "common prefix"),
    (b'{"chosen": "\xff", "rejected": "x"}', "not valid UTF-8"),
]


@pytest.mark.parametrize("bad, message", BAD_LINES)
def test_bad_line_raises_naming_file_line_and_problem(tmp_path, bad, message):
    path = write(tmp_path / "h" / "train.jsonl", [GOOD[0][0], "", bad, GOOD[1][0]])  # bad on line 3
    with pytest.raises(hh.DataError) as info:
        hh.load_hh_pairs(str(path), "train")
    assert str(info.value).startswith(f"{path}:3: ") and message in str(info.value)


def test_bad_lines_are_skipped_and_counted_when_configured(tmp_path):
    lines = [GOOD[0][0]] + [bad for bad, _ in BAD_LINES] + [pair(("Q",), "", "x"), GOOD[1][0]]
    pairs, report = hh.load_hh_pairs(str(write(tmp_path / "h" / "t.jsonl", lines)), "train", on_bad_line="skip")
    assert pairs == expected_records(GOOD[:2], "h")
    assert report.dropped == {"empty_response": 1, "identical_responses": 0, "bad_line": len(BAD_LINES)}
    assert report.read == 3 + len(BAD_LINES) and report.kept == 2
    with pytest.raises(ValueError, match="on_bad_line"):
        hh.load_hh_pairs(str(tmp_path / "h" / "t.jsonl"), "train", on_bad_line="ignore")


def test_jsonl_gz_and_directory_layouts_give_the_same_records(tmp_path):
    helpful, harmless = [obj for obj, _ in GOOD[:2]], [GOOD[2][0]]
    want = expected_records(GOOD[:2], "helpful-base") + expected_records(GOOD[2:], "harmless-base")
    # Hub layout, one subset plain and one gzipped.
    write(tmp_path / "hub" / "helpful-base" / "train.jsonl", helpful)
    write(tmp_path / "hub" / "harmless-base" / "train.jsonl.gz", harmless, gz=True)
    assert hh.load_hh_pairs(str(tmp_path / "hub"), "train")[0] == want
    assert hh.load_hh_pairs(str(tmp_path / "hub"), "train", subsets=("harmless-base",))[0] == want[2:]
    # Single files, .jsonl and .jsonl.gz: the subset is the folder's name.
    gz = write(tmp_path / "helpful-base" / "train.jsonl.gz", helpful, gz=True)
    plain = write(tmp_path / "helpful-base" / "copy.jsonl", helpful)
    assert hh.load_hh_pairs(str(gz), "train")[0] == hh.load_hh_pairs(str(plain), "train")[0] == want[:2]
    # Flat directory of <split>.jsonl files.
    write(tmp_path / "flat" / "test.jsonl", helpful)
    assert hh.load_hh_pairs(str(tmp_path / "flat"), "test")[0] == expected_records(GOOD[:2], "flat")


def test_unusable_sources_raise_data_errors_naming_what_was_expected(tmp_path):
    write(tmp_path / "hub" / "helpful-base" / "train.jsonl", [GOOD[0][0]])
    with pytest.raises(hh.DataError, match="no harmless-base/train.jsonl"):  # a subset folder is missing
        hh.load_hh_pairs(str(tmp_path / "hub"), "train")
    with pytest.raises(hh.DataError, match=r"or a test.jsonl\(.gz\) file"):  # no test split in a flat folder
        hh.load_hh_pairs(str(tmp_path / "hub" / "helpful-base"), "test")
    with pytest.raises(hh.DataError, match="nor the hub id"):
        hh.load_hh_pairs(str(tmp_path / "nowhere.jsonl"), "train")
    (tmp_path / "broken.jsonl.gz").write_bytes(b"not gzip")
    with pytest.raises(hh.DataError, match="broken.jsonl.gz: not a readable gzip file"):
        hh.load_hh_pairs(str(tmp_path / "broken.jsonl.gz"), "train")


def test_hub_id_offline_fails_with_a_clear_message(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    assert os.environ.get("HF_DATASETS_OFFLINE") == "1"  # set by conftest.py
    # Empty caches, so a copy cached on this machine cannot make the load succeed.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(hh.DataError) as info:
        hh.load_hh_pairs(hh.HUB_ID, "train")
    msg = str(info.value)
    assert "Anthropic/hh-rlhf" in msg and "HF_DATASETS_OFFLINE=1" in msg and "offline mode" in msg
    assert "pass a local path" in msg and "helpful-base" in msg


# ---------------------------------------------------------------------------------------------
# The real test splits


@pytest.fixture(scope="module")
def real():
    if not all((REAL / s / "test.jsonl.gz").exists() for s in hh.SUBSETS):
        pytest.skip(f"real HH-RLHF test files not found under {REAL} (optional; see ../shared/data/README.md)")
    raw = {s: [json.loads(line) for line in gzip.open(REAL / s / "test.jsonl.gz", "rt", encoding="utf-8")]
           for s in hh.SUBSETS}
    return raw, {s: hh.load_hh_pairs(str(REAL), "test", subsets=(s,)) for s in hh.SUBSETS}


def naive_prompt(text: str) -> str:
    """The text up to its own last "\\n\\nAssistant:" (what a loader that ignores the partner would do)."""
    return text[: text.rindex(A) + len(A)]


def test_real_test_files_parse_with_per_reason_counts(real):
    raw, loaded = real
    # Hand counts from the raw files: harmless has 4 empty chosen responses (README), helpful 4
    # empty rejected ones; no pair has identical responses.
    for subset, empty_chosen, empty_rejected in (("harmless-base", 4, 0), ("helpful-base", 0, 4)):
        rows = raw[subset]
        assert sum(r["chosen"].rstrip().endswith(A) for r in rows) == empty_chosen
        assert sum(r["rejected"].rstrip().endswith(A) for r in rows) == empty_rejected
        pairs, report = loaded[subset]
        assert report.read == len(rows) == {"harmless-base": 2312, "helpful-base": 2352}[subset]
        assert report.dropped == {"empty_response": 4, "identical_responses": 0}
        assert report.kept == len(pairs) == len(rows) - 4
        for p in pairs:
            assert p["prompt"].endswith(A) and p["prompt_id"] == prompt_id(p["prompt"]) and p["subset"] == subset
            assert p["chosen"] and p["rejected"] and p["chosen"] != p["rejected"]
    both, report = hh.load_hh_pairs(str(REAL), "test")
    assert both == loaded["helpful-base"][0] + loaded["harmless-base"][0]
    assert report.summary().endswith("read 4664, kept 4656, dropped 8 (empty_response 8, identical_responses 0)")


def test_real_nested_assistant_pairs_get_one_common_prompt(real):
    raw, loaded = real
    kept = {(p["prompt"], p["chosen"], p["rejected"]) for p in loaded["harmless-base"][0]}
    nested = [r for r in raw["harmless-base"] if naive_prompt(r["chosen"]) != naive_prompt(r["rejected"])]
    assert len(nested) == 5  # README
    for r in nested:
        # The shared prompt is the shorter naive one; the longer one cut into a response.
        prompt = min(naive_prompt(r["chosen"]), naive_prompt(r["rejected"]), key=len)
        want = (prompt, r["chosen"][len(prompt):].strip(), r["rejected"][len(prompt):].strip())
        assert A in want[1] + want[2] and want in kept


def test_real_non_alternating_transcripts_parse(real):
    raw, loaded = real
    kept = {(p["prompt"], p["chosen"], p["rejected"]) for s in hh.SUBSETS for p in loaded[s][0]}

    def alternates(text: str) -> bool:
        turns = re.findall(r"\n\n(Human|Assistant):", text)
        return all(t == ("Human", "Assistant")[i % 2] for i, t in enumerate(turns))

    def shared_prompt(r: dict) -> str:  # see test_real_nested_assistant_pairs_get_one_common_prompt
        return min(naive_prompt(r["chosen"]), naive_prompt(r["rejected"]), key=len)

    odd = [r for s in hh.SUBSETS for r in raw[s] if not alternates(shared_prompt(r))]
    # 11 pairs (4 harmless, 7 helpful) share a prompt whose turns do not alternate; the README's
    # "8 transcripts" counts them differently.
    assert len(odd) == 11
    for r in odd:
        prompt = shared_prompt(r)
        assert (prompt, r["chosen"][len(prompt):].strip(), r["rejected"][len(prompt):].strip()) in kept


# ---------------------------------------------------------------------------------------------
# Splits


def synthetic_pairs(n_prompts: int, tag: str) -> list[dict]:
    """Prompt i has i % 3 + 1 pairs (40 prompts give 79 pairs, 10 give 19)."""
    out = []
    for i in range(n_prompts):
        prompt = f"\n\nHuman: {tag} question {i}?{A}"
        for j in range(i % 3 + 1):
            out.append({"prompt_id": prompt_id(prompt), "prompt": prompt, "chosen": f"good {j}",
                        "rejected": f"bad {j}", "subset": "helpful-base"})
    return out


TRAIN, TEST = synthetic_pairs(40, "train"), synthetic_pairs(10, "test")


def ids(records) -> set[str]:
    return {r["prompt_id"] for r in records}


def test_splits_are_disjoint_by_prompt_and_of_the_configured_sizes():
    s = hh.make_splits(TRAIN, TEST, n_rm=12, n_dev=7, seed=0)
    assert len(ids(s.rm_pairs)) == 12 and len(s.llm_prompts) == len(ids(s.llm_prompts)) == 28
    assert ids(s.rm_pairs).isdisjoint(ids(s.llm_prompts)) and ids(s.rm_pairs) | ids(s.llm_prompts) == ids(TRAIN)
    # HH_RM holds every pair of its prompts.
    assert sorted(map(id, s.rm_pairs)) == sorted(id(p) for p in TRAIN if p["prompt_id"] in ids(s.rm_pairs))
    # HH_Dev: distinct pairs of HH_LLM prompts.
    assert len(s.dev_pairs) == len(set(map(id, s.dev_pairs))) == 7 and ids(s.dev_pairs) <= ids(s.llm_prompts)
    assert sorted(map(id, s.test_pairs)) == sorted(map(id, TEST)) and len(s.test_prompts) == 10
    assert s.all_train_pairs == TRAIN
    for p in s.test_prompts:
        first = next(t for t in s.test_pairs if t["prompt_id"] == p["prompt_id"])
        assert p == {"prompt_id": first["prompt_id"], "prompt": first["prompt"], "chosen": first["chosen"]}

    capped = hh.make_splits(TRAIN, TEST, n_rm=12, n_dev=5, n_llm=6, n_test=7, seed=0)
    assert len(capped.llm_prompts) == 6 and ids(capped.dev_pairs) <= ids(capped.llm_prompts)
    assert len(capped.test_pairs) == 7 and ids(capped.test_prompts) == ids(capped.test_pairs)


def test_splits_are_identical_for_a_seed_and_differ_for_another():
    a = hh.make_splits(TRAIN, TEST, n_rm=12, n_dev=7, n_test=5, seed=0)
    # Input order does not matter either (only all_train_pairs keeps it).
    shuffled = random.Random(1).sample(TRAIN, len(TRAIN))
    from_shuffled = hh.make_splits(shuffled, TEST, n_rm=12, n_dev=7, n_test=5, seed=0)
    assert dataclasses.replace(from_shuffled, all_train_pairs=[]) == dataclasses.replace(a, all_train_pairs=[])
    assert hh.make_splits(TRAIN, TEST, n_rm=12, n_dev=7, n_test=5, seed=0) == a
    b = hh.make_splits(TRAIN, TEST, n_rm=12, n_dev=7, n_test=5, seed=1)
    assert ids(b.rm_pairs) != ids(a.rm_pairs) and b.dev_pairs != a.dev_pairs and ids(b.test_pairs) != ids(a.test_pairs)


@pytest.mark.parametrize("sizes, message", [
    (dict(n_rm=41, n_dev=0), "data.n_rm: 41 queries requested but the train data has only 40 distinct prompts"),
    (dict(n_rm=40, n_dev=0), "data.n_rm: 40 queries requested and the train data has only 40 distinct prompts"),
    (dict(n_rm=30, n_dev=0, n_llm=11), "data.n_llm: 11 queries requested but only 10 distinct train prompts remain"),
    (dict(n_rm=1, n_dev=80), "data.n_dev: 80 pairs requested but the 39 HH_LLM prompts have only"),
    (dict(n_rm=0, n_dev=0), "data.n_rm: 0 RM queries from 40 distinct train prompts leaves no RM pairs"),
    (dict(n_rm=1, n_dev=0, n_test=20), "data.n_test: 20 pairs requested but the test data has only 19 pairs"),
    (dict(n_rm=-1, n_dev=0), "data.n_rm: -1 must be >= 0"),
])
def test_oversize_splits_raise_naming_the_config_field(sizes, message):
    with pytest.raises(hh.SplitSizeError) as info:
        hh.make_splits(TRAIN, TEST, seed=0, **sizes)
    assert str(info.value).startswith(message) and isinstance(info.value, hh.DataError)


# ---------------------------------------------------------------------------------------------
# Golden responses


def test_gold_uses_the_file_and_falls_back_to_chosen(tmp_path):
    rm = hh.make_splits(TRAIN, TEST, n_rm=6, n_dev=0, seed=3).rm_pairs
    order = list(dict.fromkeys(p["prompt_id"] for p in rm))
    prompts = {p["prompt_id"]: p["prompt"] for p in rm}
    first_chosen = {pid: next(p["chosen"] for p in rm if p["prompt_id"] == pid) for pid in order}

    records, report = hh.load_gold(None, rm)
    assert report == {"total": 6, "from_file": 0, "fallback_chosen": 6, "unused_in_file": 0}
    assert records == [{"prompt_id": pid, "prompt": prompts[pid], "response": first_chosen[pid], "source": "hh_chosen"}
                       for pid in order]

    gold = write(tmp_path / "gold.jsonl", [
        {"prompt_id": order[0], "response": " gold zero "},
        {"prompt": prompts[order[3]], "response": "gold three"},            # keyed by prompt text
        {"prompt_id": order[3], "prompt": prompts[order[3]], "response": "gold three"},  # same again: fine
        {"prompt_id": "0123456789abcdef", "response": "not an RM prompt"},
    ])
    records, report = hh.load_gold(str(gold), rm)
    assert report == {"total": 6, "from_file": 2, "fallback_chosen": 4, "unused_in_file": 1}
    got = {r["prompt_id"]: (r["response"], r["source"]) for r in records}
    assert [r["prompt_id"] for r in records] == order
    assert got[order[0]] == ("gold zero", "file") and got[order[3]] == ("gold three", "file")
    assert got[order[1]] == (first_chosen[order[1]], "hh_chosen")


def test_gold_keeps_the_source_collect_gold_wrote(tmp_path):
    rm = hh.make_splits(TRAIN, TEST, n_rm=4, n_dev=0, seed=3).rm_pairs
    order = list(dict.fromkeys(p["prompt_id"] for p in rm))
    gold = write(tmp_path / "gold.jsonl", [
        {"prompt_id": order[0], "response": "a", "source": "endpoint"},
        {"prompt_id": order[1], "response": "b", "source": "why_followup"},
        {"prompt_id": order[2], "response": "c", "source": "hh_chosen"},  # collect_gold's own fallback
    ])
    records, report = hh.load_gold(str(gold), rm)
    assert [r["source"] for r in records[:3]] == ["endpoint", "why_followup", "hh_chosen"]
    assert records[3]["source"] == "hh_chosen" and records[2]["response"] == "c"
    assert report == {"total": len(order), "from_file": 3, "fallback_chosen": len(order) - 3, "unused_in_file": 0}


@pytest.mark.parametrize("bad, message", [
    ("{not json", "not valid JSON"),
    ({"response": "x"}, "missing field 'prompt_id' (or 'prompt')"),
    ({"prompt_id": "abc"}, "field 'response' is missing"),
    ({"prompt_id": "abc", "response": "  "}, "expected a non-empty string"),
    ({"prompt_id": "abc", "prompt": "\n\nHuman: q\n\nAssistant:", "response": "x"}, "does not match"),
    ({"prompt_id": "first", "response": "different"}, "already has a different response on line 1"),
])
def test_bad_gold_line_raises_naming_file_and_line(tmp_path, bad, message):
    path = write(tmp_path / "gold.jsonl", [{"prompt_id": "first", "response": "r"}, bad])
    with pytest.raises(hh.DataError) as info:
        hh.load_gold(str(path), TRAIN)
    assert str(info.value).startswith(f"{path}:2: ") and message in str(info.value)


def test_carving_one_split_gives_disjoint_prompt_sets_of_the_asked_fraction():
    pairs = TRAIN + TEST
    train, test = hh.carve_by_prompt(pairs, 0.25, seed=0)
    assert ids(train).isdisjoint(ids(test)) and ids(train) | ids(test) == ids(pairs)
    assert len(ids(test)) == round(0.25 * len(ids(pairs))) and len(train) + len(test) == len(pairs)
    assert [p for p in pairs if p["prompt_id"] in ids(test)] == test  # every pair of a prompt, input order
    assert hh.carve_by_prompt(pairs, 0.25, seed=0) == (train, test)
    assert ids(hh.carve_by_prompt(pairs, 0.25, seed=1)[1]) != ids(test)
    with pytest.raises(hh.SplitSizeError, match=r"data.carve_test_fraction: 1.0 must be in \(0, 1\)"):
        hh.carve_by_prompt(pairs, 1.0, seed=0)
