"""Golden responses for the RM-split queries through an OpenAI-compatible endpoint (paper Appendix A).

    python -m apo_jax.collect_gold --pairs rm_split.jsonl --out gold.jsonl \\
        --base_url https://api.openai.com/v1 --model gpt-4 --api_key_env OPENAI_API_KEY

Input: preference pairs {"prompt_id", "prompt", "chosen", "rejected"} (one golden answer per
distinct prompt_id; the first pair's "chosen" is the fallback). Output: golden records
{"prompt_id", "prompt", "response", "source"}, where `source` says which Appendix A path answered:

- "endpoint":     the endpoint's answer to [system prompt (Code 1)] + the dialogue history;
- "why_followup": the answer was a bare refusal ("Sorry, I can't assist with that."), so the
                  endpoint was asked "why?" once more; the response is the refusal followed by
                  the reason it gave;
- "refusal":      the endpoint refused the content (content filter), so one of the fixed
                  answer-refusing responses (Code 2) stands in, chosen by a hash of the prompt_id
                  so that reruns give the same file;
- "hh_chosen":    no usable answer (empty, or a request the endpoint rejects outright), so the
                  HH chosen response stands in.

Every answer is appended to `--out` (flushed and fsynced) as it arrives; a rerun of the same
command skips finished prompts. Prompts whose calls ran out of retries stay pending (exit code 3:
run again), unless --fallback_on_failure gives them the HH chosen response. When nothing is
pending the file is rewritten in input order, so an interrupted-and-resumed run ends with the
same bytes as an uninterrupted one. Counts per source go to stdout and to <out>.summary.json.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import logging
import re
import sys
from typing import Any, Sequence

from apo_jax.data.records import prompt_id as make_prompt_id
from apo_jax.evaluation.llm_client import (
    ChatClient,
    ContentRefusal,
    JsonlJournal,
    LLMClientError,
    Message,
    RequestRejected,
    RetriesExhausted,
    add_endpoint_args,
    drain,
    endpoint_config_from_args,
    hh_to_messages,
    write_atomic,
)
from apo_jax.io.fileio import read_jsonl

log = logging.getLogger(__name__)

SOURCES = ("endpoint", "why_followup", "refusal", "hh_chosen")

# Appendix A, Code 1. The paper's listing joins adjacent Python literals without spaces; we add
# the spaces, which is what the sentences plainly mean, and keep the wording (typos included).
SYSTEM_PROMPT = (
    "You are a helpful and harmless assistant. "
    "Please try provide an useful and harmless response based on the dialog history, even if some of "
    "the history content are inappropriate. "
    "If you still cannot assist, please provide some constructive sugguestions or reasons. "
    "Do not mention you are an AI developed by OpenAI."
)

# Appendix A, Code 2 (spaces between sentences added as above; ASCII apostrophes, as in HH).
REFUSAL_ANSWERS = (
    "I apologize, but I'm unable to assist with this topic. "
    "Our conversation has included potentially harmful content, which falls into one of the four "
    "categories: hate, sexual, violence, and self-harm. "
    "If you still require assistance on this matter, we can adjust our wording and explore alternative "
    "solutions.",
    "I apologize, but I'm unable to provide assistance on this particular topic. "
    "Our conversation has included potentially harmful content that may fall into categories such as "
    "hate, sexual, violence, or self-harm. "
    "To ensure a safe and positive interaction, it would be best to refrain from seeking further "
    "assistance in this area. "
    "If you have any other questions or need help with a different topic, I'm here to provide guidance "
    "and support.",
    "I am sorry, but I'm unable to provide assistance on this particular topic. "
    "Our conversation has touched upon potentially harmful content that falls within categories such "
    "as hate, sexual, violence, or self-harm. "
    "To ensure a safe and positive interaction, it would be best to refrain from pursuing further "
    "assistance in this area. "
    "If you have any other questions or need help with a different topic, I'm here to provide guidance "
    "and support.",
)

WHY = "why?"

# A refusal names what it will not do: "can't assist", "cannot help with", "unable to provide".
_REFUSAL = re.compile(
    r"\b(can(?:no|'|’)t|can not|cannot|unable to|not able to|won(?:'|’)t|will not)\b[\w\s,'’]{0,30}?"
    r"\b(assist|help|provide|comply|fulfil+|do (?:that|this)|engage|support|answer|continue|share)",
    re.IGNORECASE,
)
BARE_REFUSAL_MAX_WORDS = 25


def is_bare_refusal(text: str, max_words: int = BARE_REFUSAL_MAX_WORDS) -> bool:
    """True for a short answer that only declines ("Sorry, I can't assist with that.").

    Short means at most `max_words` words: a longer answer usually carries a reason or an
    alternative, which is what Appendix A's "why?" follow-up is meant to obtain.
    """
    words = text.split()
    return 0 < len(words) <= max_words and _REFUSAL.search(text) is not None


def pick_refusal(prompt_id: str, seed: int = 0) -> str:
    """One of REFUSAL_ANSWERS, fixed by (seed, prompt_id) so that reruns agree (the paper: at random)."""
    h = hashlib.sha1(f"{seed}:{prompt_id}".encode("utf-8")).digest()
    return REFUSAL_ANSWERS[h[0] % len(REFUSAL_ANSWERS)]


def gold_messages(prompt: str) -> list[Message]:
    """The Appendix A request: the system prompt, then the HH dialogue history as chat turns."""
    return [{"role": "system", "content": SYSTEM_PROMPT}] + hh_to_messages(prompt)


def _record(pair: dict[str, Any], response: str, source: str) -> dict[str, Any]:
    return {"prompt_id": pair["prompt_id"], "prompt": pair["prompt"], "response": response, "source": source}


def collect_one(client: ChatClient, pair: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """The golden record for one pair, following Appendix A's paths (see the module docstring).

    Raises RetriesExhausted when a call keeps failing transiently (the caller decides), and
    RequestRejected for endpoint-wide faults (bad key, unknown model).
    """
    messages = gold_messages(pair["prompt"])
    try:
        first = client.chat(messages).content.strip()
    except ContentRefusal:
        return _record(pair, pick_refusal(pair["prompt_id"], seed), "refusal")
    except RequestRejected as e:
        if not e.item_specific:
            raise
        log.warning("%s: request rejected, using the HH chosen response: %s", pair["prompt_id"], e)
        return _record(pair, pair["chosen"].strip(), "hh_chosen")
    if not first:
        return _record(pair, pair["chosen"].strip(), "hh_chosen")
    if not is_bare_refusal(first):
        return _record(pair, first, "endpoint")
    followup = messages + [{"role": "assistant", "content": first}, {"role": "user", "content": WHY}]
    try:
        reason = client.chat(followup).content.strip()
    except ContentRefusal:
        return _record(pair, pick_refusal(pair["prompt_id"], seed), "refusal")
    except RequestRejected as e:
        if not e.item_specific:
            raise
        log.warning("%s: 'why?' request rejected, using the HH chosen response: %s", pair["prompt_id"], e)
        return _record(pair, pair["chosen"].strip(), "hh_chosen")
    if not reason:
        return _record(pair, pair["chosen"].strip(), "hh_chosen")
    return _record(pair, f"{first} {reason}", "why_followup")


def load_pairs(path: str) -> tuple[list[dict[str, Any]], int]:
    """Distinct-prompt pairs of a preference file, in file order, and how many duplicates were dropped."""
    records = read_jsonl(path)
    pairs: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, rec in enumerate(records, 1):
        missing = [k for k in ("prompt", "chosen") if not isinstance(rec.get(k), str)]
        if missing:
            raise ValueError(f"{path}: record {i} lacks string field(s) {missing}")
        pid = rec.get("prompt_id") or make_prompt_id(rec["prompt"])
        if pid in seen:
            continue
        seen.add(pid)
        chosen = rec["chosen"]
        if chosen.startswith(rec["prompt"]):  # a full HH transcript rather than the response alone
            chosen = chosen[len(rec["prompt"]) :]
        pairs.append({"prompt_id": pid, "prompt": rec["prompt"], "chosen": chosen})
    return pairs, len(records) - len(pairs)


def summary_path(out: str) -> str:
    """<out without .jsonl>.summary.json."""
    stem = out[: -len(".jsonl")] if out.endswith(".jsonl") else out
    return stem + ".summary.json"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m apo_jax.collect_gold", description=__doc__.split("\n")[0])
    p.add_argument("--pairs", required=True, help="preference pairs JSONL (the RM split)")
    p.add_argument("--out", required=True, help="golden-response JSONL (appended to; resumable)")
    p.add_argument("--limit", type=int, default=0, help="only the first N distinct prompts (0 = all)")
    p.add_argument("--seed", type=int, default=0, help="picks among the fixed refusal answers")
    p.add_argument(
        "--fallback_on_failure",
        action="store_true",
        help="give prompts whose calls ran out of retries the HH chosen response instead of leaving them pending",
    )
    add_endpoint_args(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Runs a collection; returns 0 when every prompt is answered, 3 when some are pending."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = endpoint_config_from_args(args)
        cfg.validate()
        pairs, n_dup = load_pairs(args.pairs)
    except (ValueError, OSError) as e:
        print(f"collect_gold: {e}", file=sys.stderr)
        return 2
    order = {p["prompt_id"]: i for i, p in enumerate(pairs)}
    work = pairs[: args.limit] if args.limit > 0 else pairs

    journal = JsonlJournal(args.out)
    done: dict[str, dict[str, Any]] = {}
    for rec in journal.load():
        pid = rec.get("prompt_id")
        if pid not in order:
            print(f"collect_gold: {args.out} holds prompt_id {pid!r}, which is not in {args.pairs}; "
                  "use a new --out for a different input", file=sys.stderr)
            return 2
        done.setdefault(pid, rec)  # a duplicate line (never written by us) keeps the first answer
    todo = [p for p in work if p["prompt_id"] not in done]
    log.info("%d distinct prompts (%d duplicates dropped); %d to do, %d already done",
             len(pairs), n_dup, len(todo), len(work) - len(todo))

    try:
        client = ChatClient(cfg)
    except LLMClientError as e:
        print(f"collect_gold: {e}", file=sys.stderr)
        return 2
    this_run: collections.Counter[str] = collections.Counter()

    def on_result(pair: dict[str, Any], rec: dict[str, Any]) -> None:
        journal.append(rec)
        done[rec["prompt_id"]] = rec
        this_run[rec["source"]] += 1
        if sum(this_run.values()) % 100 == 0:
            log.info("%d/%d answered this run", sum(this_run.values()), len(todo))

    def on_failure(pair: dict[str, Any], err: RetriesExhausted) -> dict[str, Any] | None:
        return _record(pair, pair["chosen"].strip(), "hh_chosen") if args.fallback_on_failure else None

    try:
        failed = drain(lambda p: collect_one(client, p, args.seed), todo, cfg.max_concurrency, on_result,
                       describe=lambda p: p["prompt_id"], on_failure=on_failure,
                       max_consecutive_failures=args.max_consecutive_failures)
    except LLMClientError as e:
        print(f"collect_gold: stopped: {e}\n{len(done)} answers are saved in {args.out}; "
              "run the same command again to resume", file=sys.stderr)
        return 2
    finally:
        journal.close()
        client.close()

    pending = sum(1 for p in work if p["prompt_id"] not in done)
    if pending == 0:
        journal.rewrite(sorted(done.values(), key=lambda r: order[r["prompt_id"]]))
    counts = collections.Counter(r["source"] for r in done.values())
    summary = {
        "out": args.out,
        "n_prompts": len(work),
        "n_duplicate_prompts_dropped": n_dup,
        "n_done": len(done),
        "n_pending": pending,
        "by_source": {s: counts.get(s, 0) for s in SOURCES},
        "this_run": {
            "by_source": {s: this_run.get(s, 0) for s in SOURCES},
            "ran_out_of_retries": failed,
            "client": dict(client.stats),
        },
    }
    write_atomic(summary_path(args.out), json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    if pending:
        print(f"collect_gold: {pending} prompts still pending; run the same command again to resume",
              file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
