"""HH-RLHF: loading and cleaning preference pairs, the paper's splits, and golden responses.

Paper Section 4.1 and Table 1; SPEC.md section 2. Sources are the hub id `Anthropic/hh-rlhf`
(through `datasets`, `data_dir` = subset) or local files in the same format: one `.jsonl` /
`.jsonl.gz` file, or a directory holding `<subset>/<split>.jsonl(.gz)` (the hub layout) or
`<split>.jsonl(.gz)`. Each line is `{"chosen": transcript, "rejected": transcript}`, two full
`"\\n\\nHuman: ...\\n\\nAssistant: ..."` dialogues that differ only in the final Assistant turn.

Records (see `records.py`):
- pair:   {"prompt_id", "prompt", "chosen", "rejected", "subset"}
- prompt: {"prompt_id", "prompt"} (test prompts also carry "chosen", an HH reference answer)
- gold:   {"prompt_id", "prompt", "response", "source"}: source "hh_chosen" for the fallback, else the
          file's own "source" field (collect_gold's Appendix A path) or "file"

Rows are read by the general preference reader (`preference.read_pairs`, HH's transcripts being its
implicit-prompt plain-text format), with HH's published cleaning; the splits and golden answers
here serve every data kind. Everything here is a pure function of its inputs (files, seed); no
global state.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import NamedTuple

HUB_ID = "Anthropic/hh-rlhf"
SUBSETS = ("helpful-base", "harmless-base")

ASSISTANT = "\n\nAssistant:"
_EXTENSIONS = (".jsonl", ".jsonl.gz")


class DataError(ValueError):
    """Input data that cannot be used; the message names the file, line (and field) and what was expected."""


class SplitSizeError(DataError):
    """A configured split size exceeds the data; the message starts with the config field (`data.n_rm: ...`)."""


class _BadRecord(ValueError):
    """One unusable line; the caller adds the file and line (and may skip it)."""


@dataclasses.dataclass
class CleaningReport:
    """What `load_hh_pairs` read, kept and dropped (`read == kept + sum(dropped.values())`)."""

    source: str
    """The source as given: the hub id or a local path."""
    split: str
    """The split that was read ("train", "test")."""
    read: int
    """Records read (non-blank lines or hub rows), bad ones included."""
    kept: int
    """Pairs returned."""
    dropped: dict[str, int]
    """Dropped pairs per reason: "empty_response", "identical_responses", and "bad_line" when skipping."""

    def summary(self) -> str:
        """One line for logs, e.g. `hh-rlhf test: read 4664, kept 4656, dropped 8 (empty_response 8, ...)`."""
        reasons = ", ".join(f"{k} {v}" for k, v in self.dropped.items())
        total = sum(self.dropped.values())
        return f"{self.source} {self.split}: read {self.read}, kept {self.kept}, dropped {total} ({reasons})"


@dataclasses.dataclass
class HHSplits:
    """The paper's HH-RLHF splits (Table 1). Lists are in a seeded random order except `all_train_pairs`."""

    rm_pairs: list[dict]
    """HH_RM: every pair of `n_rm` distinct train prompts (RM training data)."""
    llm_prompts: list[dict]
    """HH_LLM: the other distinct train prompts (policy training queries), capped at `n_llm` if > 0."""
    dev_pairs: list[dict]
    """HH_Dev: `n_dev` pairs sampled from the HH_LLM prompts' pairs (RM validation)."""
    test_pairs: list[dict]
    """HH_Test: the test pairs, capped at `n_test` if > 0."""
    test_prompts: list[dict]
    """The distinct prompts of `test_pairs`, each with the "chosen" response of its first pair."""
    all_train_pairs: list[dict]
    """Every train pair, in input order (the paper's RM_Test training set)."""


# ----------------------------------------------------------------------------------------------
# Parsing one pair.


def _common_prefix_len(a: str, b: str) -> int:
    """Length of the longest common prefix; a binary search over C-speed slice compares."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def split_transcripts(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Splits two HH transcripts into (prompt, chosen_response, rejected_response).

    The prompt is the text up to and including the last "\\n\\nAssistant:" inside the longest
    common prefix of the two transcripts, not each text's own last one: a final response may
    itself contain "\\n\\nAssistant:" (5 harmless-base test pairs do), which would give the two
    texts different prompts. Responses are the rest of each text, stripped. Raises DataError if
    the common prefix has no "\\n\\nAssistant:".
    """
    n = _common_prefix_len(chosen, rejected)
    k = chosen.rfind(ASSISTANT, 0, n)
    if k < 0:
        raise DataError(
            f"no {ASSISTANT!r} in the common prefix of 'chosen' and 'rejected'; expected two "
            f"'\\n\\nHuman: ...\\n\\nAssistant: ...' transcripts that differ only in the final Assistant turn")
    end = k + len(ASSISTANT)
    return chosen[:end], chosen[end:].strip(), rejected[end:].strip()


def _drop_reason(chosen: str, rejected: str) -> str | None:
    """Why a cleaned pair is dropped (Cheng et al. 2023), or None to keep it.

    Emptiness is checked first, so a pair with two empty responses counts as "empty_response".
    """
    if not chosen or not rejected:
        return "empty_response"
    if chosen == rejected:
        return "identical_responses"
    return None


# ----------------------------------------------------------------------------------------------
# Reading files.


def _decode_json(raw: bytes) -> object:
    """One JSONL line to a Python value; _BadRecord if it is not UTF-8 JSON."""
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise _BadRecord(f"not valid UTF-8 ({e.reason} at byte {e.start + 1}); expected UTF-8 JSON") from None
    except json.JSONDecodeError as e:
        raise _BadRecord(f"not valid JSON ({e.msg} at column {e.colno}); expected one JSON object per line") from None


def _read_lines(path: str) -> Iterator[tuple[int, bytes]]:
    """Yields (1-based line number, raw bytes) for each non-blank line of a .jsonl or .jsonl.gz file.

    Bytes, not text, so a line with bad UTF-8 is one bad line rather than a failed file; blank
    lines (e.g. a trailing newline) are not records and are skipped.
    """
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                if raw.strip():
                    yield lineno, raw
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataError(f"{path}: not a readable gzip file ({e}); expected gzip-compressed JSONL") from e
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from e


def _local_files(source: str, split: str, subsets: Sequence[str]) -> list[tuple[str, str]]:
    """The (subset label, file path) list a local source stands for.

    A file's subset label is the name of the directory it sits in (e.g. "helpful-base").
    """
    def label(path: str) -> str:
        return os.path.basename(os.path.dirname(os.path.abspath(path)))

    def one_of(stem: str) -> str | None:
        found = [stem + ext for ext in _EXTENSIONS if os.path.isfile(stem + ext)]
        if len(found) > 1:
            raise DataError(f"both {found[0]} and {found[1]} exist; keep one")
        return found[0] if found else None

    if os.path.isfile(source):
        if not source.endswith(_EXTENSIONS):
            raise DataError(f"{source}: expected a .jsonl or .jsonl.gz file (or a directory of them)")
        return [(label(source), source)]
    if os.path.isdir(source):
        if any(os.path.isdir(os.path.join(source, s)) for s in subsets):
            # Hub layout: every requested subset must be there, so that a missing folder is not
            # silently a run on half the data.
            files = []
            for s in subsets:
                path = one_of(os.path.join(source, s, split))
                if path is None:
                    raise DataError(
                        f"{source}: no {s}/{split}.jsonl or {s}/{split}.jsonl.gz (subsets {tuple(subsets)})")
                files.append((s, path))
            return files
        path = one_of(os.path.join(source, split))
        if path is None:
            raise DataError(
                f"{source}: expected {'/, '.join(subsets)}/ folders holding {split}.jsonl(.gz) (the hub layout) "
                f"or a {split}.jsonl(.gz) file")
        return [(label(path), path)]
    raise DataError(
        f"{source!r} is neither an existing .jsonl/.jsonl.gz file or directory nor the hub id {HUB_ID!r}")


class Part(NamedTuple):
    """One file's (or hub split's) rows: (1-based row number, raw line bytes or an already decoded row)."""

    subset: str
    locate: Callable[[int], str]
    """Row number -> where it is, for messages ("path:12" or "hub id ... row 12")."""
    rows: Iterable[tuple[int, bytes | dict]]


def _local_parts(source: str, split: str, subsets: Sequence[str]) -> list[Part]:
    return [Part(s, lambda n, path=path: f"{path}:{n}", _read_lines(path))
            for s, path in _local_files(source, split, subsets)]


def _hub_parts(split: str, subsets: Sequence[str]) -> list[Part]:
    """One part per subset from the hub through `datasets`; DataError when it cannot be reached."""
    import datasets  # Deferred: a second to import, and local sources never need it.

    parts = []
    for s in subsets:
        where = f"{HUB_ID} data_dir={s!r} split={split!r}"
        try:
            ds = datasets.load_dataset(HUB_ID, data_dir=s, split=split)
        except Exception as e:  # datasets raises many types (ConnectionError, FileNotFoundError, ...)
            raise DataError(_hub_failure(s, split, e)) from e
        missing = {"chosen", "rejected"} - set(ds.column_names)
        if missing:
            raise DataError(f"{where}: no column(s) {sorted(missing)}; expected 'chosen' and 'rejected'")
        rows = ((n, {"chosen": c, "rejected": r}) for n, (c, r) in enumerate(zip(ds["chosen"], ds["rejected"]), 1))
        parts.append(Part(s, lambda n, where=where: f"{where} row {n}", rows))
    return parts


def _hub_failure(subset: str, split: str, err: Exception) -> str:
    """The message for a failed hub load: why (offline mode or no network) and how to use local files."""
    import datasets

    what = f"cannot load {HUB_ID!r} (data_dir={subset!r}, split={split!r}) from the Hugging Face hub"
    cause = f"{type(err).__name__}: {err}"
    local = (f"pass a local path as the source instead: a directory holding <subset>/{split}.jsonl.gz for "
             f"{', '.join(SUBSETS)} (the hub layout), a directory holding {split}.jsonl(.gz), or one "
             f".jsonl/.jsonl.gz file")
    names = [v for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
             if os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")]
    if names or datasets.config.HF_HUB_OFFLINE:
        names = names or ["HF_HUB_OFFLINE"]
        setting = " and ".join(f"{v}={os.environ.get(v, '1')}" for v in names)
        return (f"{what}: offline mode is on ({setting}) and the dataset is not in the local cache ({cause}). "
                f"Either {local}, or unset {' and '.join(names)} on a machine with network access")
    return f"{what} ({cause}). Check the network connection, or {local}"


# ----------------------------------------------------------------------------------------------
# Loading.


def load_hh_pairs(source: str, split: str, *, subsets: Sequence[str] = SUBSETS,
                  on_bad_line: str = "raise") -> tuple[list[dict], CleaningReport]:
    """Loads, splits and cleans HH-RLHF pairs from the hub id or local files.

    Args:
      source: `HUB_ID`, a .jsonl / .jsonl.gz file, or a directory (see the module docstring). An
        existing local path wins over the hub id.
      split: "train" or "test" (for a single file it only names the report).
      subsets: the hub / directory subsets to merge, in this order (unused for a single file).
      on_bad_line: "raise" (DataError naming file and line) or "skip" (counted as "bad_line").
        A bad line is invalid JSON, not an object, lacks string "chosen"/"rejected", or has no
        "\\n\\nAssistant:" in the two transcripts' common prefix.

    Returns:
      Pair records in source order, and the cleaning report.
    """
    if on_bad_line not in ("raise", "skip"):
        raise ValueError(f"on_bad_line={on_bad_line!r}; expected 'raise' or 'skip'")
    if not subsets:
        raise ValueError("subsets is empty; expected e.g. ('helpful-base', 'harmless-base')")

    # An existing local path wins, so a folder that happens to be called Anthropic/hh-rlhf is read as files.
    if os.path.exists(source) or source != HUB_ID:
        parts = _local_parts(source, split, subsets)
    else:
        parts = _hub_parts(split, subsets)

    # The general preference reader, on HH's implicit-prompt transcripts, with HH's published
    # cleaning (identical responses dropped and counted, not an error).
    from apo_jax.data import preference

    return preference.read_pairs(parts, source, split, on_bad_line=on_bad_line, identical="drop")


# ----------------------------------------------------------------------------------------------
# Splits (Table 1).


def _rank(seed: int, tag: str, key: str) -> bytes:
    """A seeded pseudo-random sort key: a hash, so the order depends only on (seed, tag, key), not
    on the input order or on a library's random-number stream changing between versions."""
    return hashlib.blake2b(f"{seed}\x1f{tag}\x1f{key}".encode("utf-8"), digest_size=16).digest()


def _shuffled_pairs(pairs: Sequence[dict], seed: int, tag: str) -> list[dict]:
    """`pairs` in a seeded order that does not depend on their input order.

    Exact duplicate pairs get an occurrence number so that they rank independently.
    """
    seen: dict[tuple[str, str, str], int] = {}
    keyed = []
    for p in pairs:
        ident = (p["prompt_id"], p["chosen"], p["rejected"])
        seen[ident] = seen.get(ident, -1) + 1
        keyed.append((_rank(seed, tag, "\x1e".join((*ident, str(seen[ident])))), p))
    keyed.sort(key=lambda kp: kp[0])
    return [p for _, p in keyed]


def _distinct_prompts(pairs: Iterable[dict], with_chosen: bool = False) -> list[dict]:
    """One prompt record per distinct prompt, in first-appearance order."""
    out: dict[str, dict] = {}
    for p in pairs:
        if p["prompt_id"] not in out:
            rec = {"prompt_id": p["prompt_id"], "prompt": p["prompt"]}
            if with_chosen:
                rec["chosen"] = p["chosen"]
            out[p["prompt_id"]] = rec
    return list(out.values())


def carve_by_prompt(pairs: Sequence[dict], test_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Splits one set of pairs into disjoint (train, test) parts by prompt, for sources that ship
    only one split (e.g. the HH test files alone): a seeded `test_fraction` of the distinct
    prompts, with all their pairs, is the test part; no prompt is in both. Input order is kept."""
    if not 0.0 < test_fraction < 1.0:
        raise SplitSizeError(f"data.carve_test_fraction: {test_fraction} must be in (0, 1)")
    ids = sorted({p["prompt_id"] for p in pairs}, key=lambda pid: (_rank(seed, "carve", pid), pid))
    n_test = int(round(test_fraction * len(ids)))
    if n_test == 0 or n_test == len(ids):
        raise SplitSizeError(f"data.carve_test_fraction: {test_fraction} of {len(ids)} prompts leaves an empty "
                             "train or test part")
    test_ids = set(ids[:n_test])
    return [p for p in pairs if p["prompt_id"] not in test_ids], [p for p in pairs if p["prompt_id"] in test_ids]


def make_splits(train_pairs: Sequence[dict], test_pairs: Sequence[dict], *, n_rm: int, n_dev: int,
                n_llm: int = 0, n_test: int = 0, seed: int, prompts: Sequence[dict] | None = None) -> HHSplits:
    """The paper's splits, deterministic from `seed` and independent of the input order.

    Train pairs (all subsets merged) are grouped by prompt, and the distinct prompts put in a seeded
    order: the first `n_rm` are HH_RM (with all their pairs), the rest HH_LLM (the first `n_llm`
    of them if `n_llm > 0`); HH_Dev is `n_dev` pairs sampled from the HH_LLM prompts' pairs, so
    RM validation uses prompts the RM never trains on. HH_Test is the test pairs (a seeded sample
    of `n_test` if `n_test > 0`). Records are shared with the inputs, not copied.

    `prompts` (prompt-only records, `data.prompts`): the policy queries are these (less any RM
    prompt, in a seeded order, the first `n_llm` if > 0) instead of the train prompts after HH_RM;
    HH_Dev still comes from the train pairs outside HH_RM.

    Raises SplitSizeError, naming the config field, when a size exceeds the data, a split would
    be empty (no test pairs, no RM pairs, no policy queries), or `n_rm` leaves no prompts for HH_LLM.
    """
    for field, value in (("n_rm", n_rm), ("n_dev", n_dev), ("n_llm", n_llm), ("n_test", n_test)):
        if value < 0:
            raise SplitSizeError(f"data.{field}: {value} must be >= 0")

    groups: dict[str, list[dict]] = {}
    for p in train_pairs:
        groups.setdefault(p["prompt_id"], []).append(p)
    order = sorted(groups, key=lambda pid: (_rank(seed, "prompt", pid), pid))
    if n_rm > len(order):
        raise SplitSizeError(
            f"data.n_rm: {n_rm} queries requested but the train data has only {len(order)} distinct prompts")
    if not test_pairs:
        raise SplitSizeError("data.test: the test data has no pairs after cleaning; expected at least one")
    if n_rm == 0 or not order:
        raise SplitSizeError(f"data.n_rm: {n_rm} RM queries from {len(order)} distinct train prompts leaves no RM "
                             "pairs; expected n_rm >= 1")
    rm_ids, rest = order[:n_rm], order[n_rm:]
    if prompts is not None:
        return _splits_with_prompts(train_pairs, test_pairs, groups, rm_ids, rest, prompts, n_dev=n_dev, n_llm=n_llm,
                                    n_test=n_test, seed=seed)
    if not rest:
        raise SplitSizeError(
            f"data.n_rm: {n_rm} queries requested and the train data has only {len(order)} distinct prompts, "
            f"which leaves none for HH_LLM")
    if n_llm > len(rest):
        raise SplitSizeError(
            f"data.n_llm: {n_llm} queries requested but only {len(rest)} distinct train prompts remain "
            f"after data.n_rm={n_rm}")
    llm_ids = rest[:n_llm] if n_llm else rest

    llm_pool = [p for pid in llm_ids for p in groups[pid]]
    if n_dev > len(llm_pool):
        raise SplitSizeError(
            f"data.n_dev: {n_dev} pairs requested but the {len(llm_ids)} HH_LLM prompts have only "
            f"{len(llm_pool)} pairs")
    return _assemble(train_pairs, test_pairs, groups, rm_ids,
                     [{"prompt_id": pid, "prompt": groups[pid][0]["prompt"]} for pid in llm_ids], llm_pool,
                     n_dev=n_dev, n_test=n_test, seed=seed)


def _assemble(train_pairs: Sequence[dict], test_pairs: Sequence[dict], groups: dict[str, list[dict]],
              rm_ids: list[str], llm_prompts: list[dict], dev_pool: list[dict], *, n_dev: int, n_test: int,
              seed: int) -> HHSplits:
    """The splits from the chosen RM prompts, policy queries and dev pool (test carved here)."""
    if n_test > len(test_pairs):
        raise SplitSizeError(
            f"data.n_test: {n_test} pairs requested but the test data has only {len(test_pairs)} pairs")
    test = _shuffled_pairs(test_pairs, seed, "test")
    test = test[:n_test] if n_test else test
    return HHSplits(
        rm_pairs=_shuffled_pairs([p for pid in rm_ids for p in groups[pid]], seed, "rm"),
        llm_prompts=llm_prompts,
        dev_pairs=_shuffled_pairs(dev_pool, seed, "dev")[:n_dev],
        test_pairs=test,
        test_prompts=_distinct_prompts(test, with_chosen=True),
        all_train_pairs=list(train_pairs),
    )


def _splits_with_prompts(train_pairs: Sequence[dict], test_pairs: Sequence[dict], groups: dict[str, list[dict]],
                         rm_ids: list[str], rest: list[str], prompts: Sequence[dict], *, n_dev: int, n_llm: int,
                         n_test: int, seed: int) -> HHSplits:
    """`make_splits` when the policy queries come from a prompt-only source."""
    rm_set = set(rm_ids)
    queries = sorted({p["prompt_id"]: p for p in prompts if p["prompt_id"] not in rm_set}.values(),
                     key=lambda p: (_rank(seed, "prompt", p["prompt_id"]), p["prompt_id"]))
    if not queries:
        raise SplitSizeError(f"data.prompts: none of its {len(prompts)} prompts is left for the policy after the "
                             "RM prompts; expected prompts the RM does not train on")
    if n_llm > len(queries):
        raise SplitSizeError(f"data.n_llm: {n_llm} queries requested but data.prompts has only {len(queries)} "
                             "prompts outside the RM prompts")
    dev_pool = [p for pid in rest for p in groups[pid]]
    if n_dev > len(dev_pool):
        raise SplitSizeError(f"data.n_dev: {n_dev} pairs requested but the train prompts outside HH_RM have only "
                             f"{len(dev_pool)} pairs")
    return _assemble(train_pairs, test_pairs, groups, rm_ids,
                     [{"prompt_id": p["prompt_id"], "prompt": p["prompt"]}
                      for p in (queries[:n_llm] if n_llm else queries)],
                     dev_pool, n_dev=n_dev, n_test=n_test, seed=seed)


# ----------------------------------------------------------------------------------------------
# Golden responses.


def load_gold(path: str | None, rm_pairs: Sequence[dict], known: Sequence[dict] | None = None,
              on_bad_line: str = "raise") -> tuple[list[dict], dict]:
    """Golden responses for the distinct RM prompts, from a file, with the chosen answer as
    fallback: `preference.load_gold` (each line `{"prompt_id" or "prompt": ..., "response": ...}`,
    or the prompt-completion format)."""
    from apo_jax.data import preference

    return preference.load_gold(path, rm_pairs, known=known, on_bad_line=on_bad_line)
