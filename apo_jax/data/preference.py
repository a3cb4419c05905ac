"""Any preference data set in the ecosystem's standard formats (`data.kind = "preference"`).

Sources (`data.train`, `data.test`, `data.prompts`, `data.gold`) are a local file, a local directory
or a hub id, each with an optional `:split` (`HuggingFaceH4/ultrafeedback_binarized:train_prefs`,
`mine/:test`). `.jsonl` / `.jsonl.gz` files are read line by line here (so an error names the line);
`.json`, `.parquet`, `.arrow`, directories saved by `datasets.save_to_disk` and hub ids are read
with `datasets`. A plain directory stands for the files in it (any depth) whose name starts with the
split followed by "-", "." or a digit (`train.jsonl`, `test-00000-of-00001.parquet`; not
`train_gen.parquet` for the split `train`).

Row formats (TRL's names; `data.columns` maps other names onto them):

| kind | columns | text |
| --- | --- | --- |
| pairs, explicit prompt | `prompt`, `chosen`, `rejected` | strings, or lists of {role, content} messages |
| pairs, implicit prompt | `chosen`, `rejected` | two transcripts sharing the prompt (HH's, or message lists) |
| prompt-only | `prompt` | the policy's queries (`data.prompts`) |
| golden answers | `prompt` or `prompt_id`, `completion` (or `response`) | string or an assistant message list |

Optional per-pair `margin`, or `score_chosen` and `score_rejected` (margin = their difference).
A prompt column whose type differs from `chosen`'s (UltraFeedback: a string prompt beside message
lists that repeat it) is not the pair's prompt: the prompt is then the shared prefix, as TRL does.

Every prompt becomes the project's one prompt text, an HH transcript ending in "\\n\\nAssistant:"
(`records.py`): a message list is written turn by turn (system turns as "\\n\\nSystem:"), a plain
string not already in that form becomes one Human turn. `data.prompt_format = "chat_template"`
turns it back into the same messages for the tokenizer's template, so multi-turn history is kept.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any, Callable

from apo_jax.data import hh
from apo_jax.data.hh import CleaningReport, DataError, Part, _BadRecord
from apo_jax.data.records import prompt_id

ROLES = ("system", "user", "assistant")
JSONL = (".jsonl", ".jsonl.gz")
DATASETS_EXTENSIONS = {".json": "json", ".json.gz": "json", ".parquet": "parquet", ".arrow": "arrow",
                       ".csv": "csv"}


@dataclasses.dataclass(frozen=True)
class Columns:
    """The standard column names and what a data set calls them (`data.columns`)."""

    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"
    completion: str = "completion"
    prompt_id: str = "prompt_id"
    margin: str = "margin"
    score_chosen: str = "score_chosen"
    score_rejected: str = "score_rejected"

    @classmethod
    def from_config(cls, columns: Mapping[str, str] | None) -> Columns:
        return cls(**{k: v for k, v in dict(columns or {}).items() if v})


# ----------------------------------------------------------------------------------------------
# Prompt texts.


def messages_to_prompt(messages: Sequence[Mapping[str, str]]) -> str:
    """A message list as the project's prompt text: one "\\n\\nHuman:" / "\\n\\nAssistant:" /
    "\\n\\nSystem:" turn per message, ending in the "\\n\\nAssistant:" the answer follows."""
    names = {"user": "Human", "assistant": "Assistant", "system": "System"}
    return "".join(f"\n\n{names[m['role']]}: {m['content'].strip()}" for m in messages) + hh.ASSISTANT


def prompt_text(prompt: str) -> str:
    """A plain prompt string as prompt text: kept when it already is an HH transcript ending in
    "\\n\\nAssistant:", else one Human turn."""
    if prompt.startswith("\n\nHuman:") and prompt.rstrip().endswith(hh.ASSISTANT):
        return prompt.rstrip()
    return f"\n\nHuman: {prompt.strip()}{hh.ASSISTANT}"


def normalise(text: str) -> str:
    """Prompt text for matching golden answers: whitespace runs collapsed, ends stripped."""
    return " ".join(text.split())


def _is_messages(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, Mapping) for m in value)


def _messages(value: object, field: str) -> list[dict[str, str]]:
    """A checked message list; _BadRecord naming the field and message otherwise."""
    out = []
    for i, m in enumerate(value):
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise _BadRecord(f"field {field!r} message {i} has role {role!r}; expected one of {ROLES}")
        if not isinstance(content, str):
            raise _BadRecord(f"field {field!r} message {i} has content {type(content).__name__}; expected a string")
        if "\n\nHuman:" in content or hh.ASSISTANT in content or "\n\nSystem:" in content:
            raise _BadRecord(f"field {field!r} message {i} contains a turn marker ('\\n\\nHuman:', "
                             "'\\n\\nAssistant:' or '\\n\\nSystem:'); expected plain message content")
        out.append({"role": role, "content": content})
    return out


def _kind(value: object, field: str) -> str:
    """"text" or "messages"; _BadRecord for anything else."""
    if isinstance(value, str):
        return "text"
    if _is_messages(value):
        return "messages"
    if value is None:
        raise _BadRecord(f"field {field!r} is NoneType; expected a string or a list of {{role, content}} messages")
    raise _BadRecord(f"field {field!r} is {type(value).__name__}; expected a string or a list of "
                     "{role, content} messages")


def split_conversations(chosen: list[dict], rejected: list[dict]) -> tuple[str, str, str]:
    """(prompt text, chosen answer, rejected answer) of two conversations that end in different
    assistant turns after the same history (the history is the prompt)."""
    for field, conv in (("chosen", chosen), ("rejected", rejected)):
        if conv[-1]["role"] != "assistant":
            raise _BadRecord(f"field {field!r} ends with a {conv[-1]['role']!r} turn; expected the conversation to "
                             "end with the assistant's answer")
    if chosen[:-1] != rejected[:-1]:
        raise _BadRecord("'chosen' and 'rejected' differ before their last turn; expected the same history "
                         "(the prompt) followed by two different assistant answers")
    history = chosen[:-1]
    if not any(m["role"] == "user" for m in history):
        raise _BadRecord("the conversation has no user turn before the assistant's answer; expected a prompt")
    return messages_to_prompt(history), chosen[-1]["content"].strip(), rejected[-1]["content"].strip()


def parse_pair(row: Mapping[str, Any], cols: Columns) -> tuple[str, str, str]:
    """(prompt text, chosen, rejected) of one row in any of the pair formats; _BadRecord otherwise."""
    if not isinstance(row, Mapping):
        raise _BadRecord(f"expected a JSON object with fields {cols.chosen!r} and {cols.rejected!r}, "
                         f"got {type(row).__name__}")
    for field in (cols.chosen, cols.rejected):
        if field not in row:
            raise _BadRecord(f"missing field {field!r}; expected fields {cols.chosen!r} and {cols.rejected!r} "
                             f"(strings or message lists)")
    c, r = row[cols.chosen], row[cols.rejected]
    kc, kr = _kind(c, cols.chosen), _kind(r, cols.rejected)
    if kc != kr:
        raise _BadRecord(f"field {cols.chosen!r} is {kc} but {cols.rejected!r} is {kr}; expected both the same")
    p = row.get(cols.prompt)
    explicit = p is not None and (isinstance(p, str) if kc == "text" else _is_messages(p))
    if kc == "text":
        if explicit:
            return prompt_text(p), c.strip(), r.strip()
        try:
            return hh.split_transcripts(c, r)
        except DataError as e:
            raise _BadRecord(str(e)) from None
    c, r = _messages(c, cols.chosen), _messages(r, cols.rejected)
    if explicit:
        p = _messages(p, cols.prompt)
        return split_conversations(p + c, p + r)
    return split_conversations(c, r)


def _number(row: Mapping[str, Any], field: str) -> float | None:
    value = row.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _BadRecord(f"field {field!r} is {type(value).__name__}; expected a number")
    return float(value)


def pair_margin(row: Mapping[str, Any], cols: Columns) -> float | None:
    """The row's margin: `margin`, else `score_chosen - score_rejected`, else None."""
    margin = _number(row, cols.margin)
    if margin is not None:
        return margin
    sc, sr = _number(row, cols.score_chosen), _number(row, cols.score_rejected)
    if (sc is None) != (sr is None):
        raise _BadRecord(f"only one of {cols.score_chosen!r} and {cols.score_rejected!r}; expected both or neither")
    return None if sc is None else sc - sr


# ----------------------------------------------------------------------------------------------
# Sources.


def parse_source(spec: str, default_split: str) -> tuple[str, str]:
    """`path_or_id[:split]` -> (path or id, split); an existing path is never split."""
    if os.path.exists(spec):
        return spec, default_split
    head, sep, tail = spec.rpartition(":")
    if sep and head and tail and "/" not in tail:
        return head, tail
    return spec, default_split


def _jsonl_part(path: str) -> Part:
    return Part(os.path.basename(os.path.dirname(os.path.abspath(path))), lambda n, path=path: f"{path}:{n}",
                hh._read_lines(path))


def _extension(path: str) -> str | None:
    for ext in (*JSONL, *DATASETS_EXTENSIONS):
        if path.endswith(ext):
            return ext
    return None


def _dataset_part(ds: Any, where: str, subset: str) -> Part:
    return Part(subset, lambda n, where=where: f"{where} row {n}", ((n, row) for n, row in enumerate(ds, 1)))


def _load(loader: Callable[[], Any], where: str, hint: str = "") -> Any:
    try:
        return loader()
    except Exception as e:  # datasets raises many types (ArrowInvalid, FileNotFoundError, ConnectionError, ...)
        raise DataError(f"{where}: cannot read it with `datasets` ({type(e).__name__}: {str(e)[:300]}){hint}") from e


def _file_part(path: str) -> Part:
    ext = _extension(path)
    if ext in JSONL:
        return _jsonl_part(path)
    import datasets

    builder = DATASETS_EXTENSIONS[ext]
    ds = _load(lambda: datasets.load_dataset(builder, data_files=path, split="train"), path)
    return _dataset_part(ds, path, os.path.basename(os.path.dirname(os.path.abspath(path))))


def source_parts(spec: str, default_split: str) -> list[Part]:
    """The parts a source stands for (see the module docstring); DataError naming what was expected."""
    source, split = parse_source(spec, default_split)
    if os.path.isfile(source):
        if _extension(source) is None:
            raise DataError(f"{source}: expected a .jsonl(.gz), .json, .parquet, .arrow or .csv file")
        return [_file_part(source)]
    if os.path.isdir(source):
        if any(os.path.exists(os.path.join(source, n)) for n in ("dataset_dict.json", "state.json")):
            import datasets

            ds = _load(lambda: datasets.load_from_disk(source), source)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"{source}: no split {split!r} (it has {sorted(ds)}); give it as {source}:SPLIT")
                ds = ds[split]
            return [_dataset_part(ds, f"{source}:{split}", split)]
        of_split = re.compile(re.escape(split) + r"([-.0-9].*)?")  # train.jsonl, train-00000-of-00001.parquet
        files = sorted(os.path.join(d, f) for d, _, names in os.walk(source) for f in names
                       if of_split.fullmatch(f) and _extension(f) is not None)
        if not files:
            raise DataError(f"{source}: no file named {split}*.jsonl(.gz) / .json / .parquet / .arrow / .csv in it; "
                            f"expected the {split!r} split's files (or give another split as {source}:SPLIT)")
        return [_file_part(f) for f in files]
    if "://" in source or source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise DataError(f"{spec!r} is neither an existing file or directory nor a hub id (owner/name[:split])")
    import datasets

    where = f"{source}:{split}"
    ds = _load(lambda: datasets.load_dataset(source, split=split), f"hub dataset {where}",
               f"; offline or without network, pass a local copy instead: a .jsonl/.parquet file, or a directory "
               f"holding the data set's files, as /path/to/copy:{split}")
    return [_dataset_part(ds, where, split)]


def _decode(row: bytes | dict) -> Any:
    return hh._decode_json(row) if isinstance(row, bytes) else row


# ----------------------------------------------------------------------------------------------
# Loading.


def read_pairs(parts: Sequence[Part], source: str, split: str, *, cols: Columns = Columns(),
               on_bad_line: str = "raise", identical: str = "bad") -> tuple[list[dict], CleaningReport]:
    """Pair records of the rows of `parts`, and the cleaning report.

    A pair with an empty response is dropped and counted ("empty_response"). A pair whose
    responses are equal is a bad row with identical="bad" (the default) or dropped and counted
    ("identical_responses", HH's published cleaning) with identical="drop". A bad row raises
    DataError naming its file and row, or is counted as "bad_line" with on_bad_line="skip".
    Records: {prompt_id, prompt, chosen, rejected, subset}, plus "margin" and "source_id" (the
    data's own prompt id) when the row has them.
    """
    if on_bad_line not in ("raise", "skip"):
        raise ValueError(f"on_bad_line={on_bad_line!r}; expected 'raise' or 'skip'")
    pairs: list[dict] = []
    dropped = {"empty_response": 0, "identical_responses": 0} if identical == "drop" else {"empty_response": 0}
    if on_bad_line == "skip":
        dropped["bad_line"] = 0
    read = 0
    for part in parts:
        for n, raw in part.rows:
            read += 1
            try:
                row = _decode(raw)
                prompt, c, r = parse_pair(row, cols)
                if c and r and c == r and identical == "bad":
                    raise _BadRecord("'chosen' equals 'rejected'; expected two different answers")
                margin = pair_margin(row, cols)
            except _BadRecord as e:
                if on_bad_line == "raise":
                    raise DataError(f"{part.locate(n)}: {e}") from None
                dropped["bad_line"] += 1
                continue
            reason = hh._drop_reason(c, r)
            if reason is not None:
                dropped[reason] += 1
                continue
            rec = {"prompt_id": prompt_id(prompt), "prompt": prompt, "chosen": c, "rejected": r, "subset": part.subset}
            if margin is not None:
                rec["margin"] = margin
            own = row.get(cols.prompt_id)
            if isinstance(own, (str, int)) and not isinstance(own, bool):
                rec["source_id"] = str(own)
            pairs.append(rec)
    return pairs, CleaningReport(source=source, split=split, read=read, kept=len(pairs), dropped=dropped)


def load_pairs(spec: str, default_split: str, *, cols: Columns = Columns(),
               on_bad_line: str = "raise") -> tuple[list[dict], CleaningReport]:
    """Pair records of a source (`path_or_id[:split]`); see `read_pairs`."""
    source, split = parse_source(spec, default_split)
    return read_pairs(source_parts(spec, default_split), source, split, cols=cols, on_bad_line=on_bad_line)


def load_prompts(spec: str, *, cols: Columns = Columns(), on_bad_line: str = "raise") -> tuple[list[dict], dict]:
    """Prompt-only rows (`prompt`: a string or a message list ending in a user turn) as distinct
    prompt records {prompt_id, prompt} in first-appearance order, and a report."""
    prompts: dict[str, dict] = {}
    read = bad = 0
    for part in source_parts(spec, "train"):
        for n, raw in part.rows:
            read += 1
            try:
                row = _decode(raw)
                if not isinstance(row, Mapping) or cols.prompt not in row:
                    raise _BadRecord(f"missing field {cols.prompt!r}; expected a prompt (a string or messages)")
                p = row[cols.prompt]
                if _kind(p, cols.prompt) == "text":
                    if not p.strip():
                        raise _BadRecord(f"field {cols.prompt!r} is empty; expected a prompt")
                    text = prompt_text(p)
                else:
                    msgs = _messages(p, cols.prompt)
                    if msgs[-1]["role"] != "user":
                        raise _BadRecord(f"field {cols.prompt!r} ends with a {msgs[-1]['role']!r} turn; expected a "
                                         "user turn for the policy to answer")
                    text = messages_to_prompt(msgs)
            except _BadRecord as e:
                if on_bad_line == "raise":
                    raise DataError(f"{part.locate(n)}: {e}") from None
                bad += 1
                continue
            prompts.setdefault(prompt_id(text), {"prompt_id": prompt_id(text), "prompt": text})
    return list(prompts.values()), {"source": spec, "read": read, "kept": len(prompts), "bad_line": bad}


# ----------------------------------------------------------------------------------------------
# Golden answers.


def _gold_row(row: object, cols: Columns) -> tuple[str | None, str | None, str]:
    """(prompt_id or None, prompt text or None, answer) of one gold row; _BadRecord otherwise."""
    if not isinstance(row, Mapping):
        raise _BadRecord(f"expected a JSON object with 'prompt_id' (or 'prompt') and 'response' (or "
                         f"{cols.completion!r}), got {type(row).__name__}")
    pid, p = row.get(cols.prompt_id), row.get(cols.prompt)
    if pid is None and p is None:
        raise _BadRecord(f"missing field {cols.prompt_id!r} (or {cols.prompt!r}); expected one of them to name the query")
    if pid is not None and not isinstance(pid, (str, int)):
        raise _BadRecord(f"field {cols.prompt_id!r} is {type(pid).__name__}; expected a string")
    text = None
    if p is not None:
        if _kind(p, cols.prompt) == "text":
            text = prompt_text(p)
        else:
            msgs = _messages(p, cols.prompt)
            text = messages_to_prompt(msgs[:-1] if msgs[-1]["role"] == "assistant" else msgs)
    field = cols.completion if cols.completion in row else "response"
    answer = row.get(field)
    if _is_messages(answer):
        msgs = _messages(answer, field)
        answer = msgs[-1]["content"] if msgs[-1]["role"] == "assistant" else None
        if answer is None:
            raise _BadRecord(f"field {field!r} has no final assistant turn; expected the golden answer")
    if not isinstance(answer, str) or not answer.strip():
        got = "missing" if field not in row else f"{type(answer).__name__} {answer!r}"[:60]
        raise _BadRecord(f"field {field!r} is {got}; expected a non-empty string (or an assistant message)")
    return (None if pid is None else str(pid)), text, answer.strip()


def gold_parts(path: str) -> list[Part]:
    """A gold source: a .jsonl(.gz) file read line by line, anything else through `source_parts`."""
    if os.path.isfile(path) and _extension(path) in JSONL:
        return [_jsonl_part(path)]
    if not os.path.exists(path) and _extension(path) is not None:
        raise DataError(f"{path}: no such gold-response file (use no path to fall back to the chosen answers)")
    return source_parts(path, "train")


def load_gold(path: str | None, rm_pairs: Sequence[dict], *, known: Sequence[dict] | None = None,
              cols: Columns = Columns(), on_bad_line: str = "raise") -> tuple[list[dict], dict]:
    """Golden answers for the distinct RM prompts, from a file, with each pair's chosen answer as
    the fallback for a prompt the file does not answer (the paper does this for 1.7K queries).

    A row names its query by `prompt_id` (the project's id, or the data's own id column) or by
    `prompt` (matched on the normalised prompt text); a row with both must agree. Its answer is
    `completion` (text or an assistant message list) or `response`. `known`: every record of the
    data (pairs and prompts); a row matching none of them is a bad row (DataError naming file and
    row, or counted with on_bad_line="skip"); rows matching a known prompt outside the RM prompts
    are counted as "unused_in_file". Without `known` every row outside the RM prompts is unused.

    Returns one record {prompt_id, prompt, response, source} per distinct RM prompt in
    first-appearance order, and a report {total, from_file, fallback_chosen, unused_in_file,
    [bad_line]}. Two different answers for one prompt are a DataError.
    """
    rm_prompts = hh._distinct_prompts(rm_pairs, with_chosen=True)
    universe = list(rm_pairs) + list(known or [])
    by_id: dict[str, str] = {}
    by_text: dict[str, str] = {}
    for rec in universe:
        by_id.setdefault(rec["prompt_id"], rec["prompt_id"])
        if rec.get("source_id"):
            by_id.setdefault(str(rec["source_id"]), rec["prompt_id"])
        by_text.setdefault(normalise(rec["prompt"]), rec["prompt_id"])
    gold: dict[str, tuple[str, str, str]] = {}
    bad = 0
    if path:
        for part in gold_parts(path):
            for n, raw in part.rows:
                try:
                    row = _decode(raw)
                    pid, text, answer = _gold_row(row, cols)
                    target = by_text.get(normalise(text)) if text is not None else None
                    if text is not None and pid is not None:
                        own = by_id.get(pid)
                        if pid != prompt_id(text) and (target is None or own != target):
                            raise _BadRecord(f"field {cols.prompt_id!r} {pid!r} does not match the id of field "
                                             f"{cols.prompt!r} ({prompt_id(text)!r})")
                    if target is None:
                        target = by_id.get(pid) if pid is not None else None
                    if target is None:
                        if known is None:  # outside the RM prompts: unused
                            target = pid if pid is not None else prompt_id(text)
                        else:
                            raise _BadRecord("matches no prompt of the data (by prompt_id, the data's own prompt id "
                                             "or the normalised prompt text); expected an answer to one of its prompts")
                except _BadRecord as e:
                    if on_bad_line == "raise":
                        raise DataError(f"{part.locate(n)}: {e}") from None
                    bad += 1
                    continue
                if target in gold and gold[target][0] != answer:
                    unit = "line" if part.locate(n).endswith(f":{n}") else "row"
                    raise DataError(f"{part.locate(n)}: prompt {target} already has a different response on {unit} "
                                    f"{gold[target][1]}; expected one response per prompt")
                # collect_gold's files say which Appendix A path answered; other files are "file".
                source = row.get("source") if isinstance(row.get("source"), str) and row.get("source") else "file"
                gold.setdefault(target, (answer, n, source))

    records = []
    for p in rm_prompts:
        pid = p["prompt_id"]
        if pid in gold:
            records.append({"prompt_id": pid, "prompt": p["prompt"], "response": gold[pid][0], "source": gold[pid][2]})
        else:
            records.append({"prompt_id": pid, "prompt": p["prompt"], "response": p["chosen"], "source": "hh_chosen"})
    from_file = sum(r["prompt_id"] in gold for r in records)
    report = {"total": len(records), "from_file": from_file, "fallback_chosen": len(records) - from_file,
              "unused_in_file": len(gold) - from_file}
    if on_bad_line == "skip":
        report["bad_line"] = bad
    return records, report
