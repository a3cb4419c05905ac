"""Golden-response collection (Appendix A) against a scripted endpoint on 127.0.0.1.

Each test prompt carries a marker "[item-NN]"; the server answers by the item's scripted
behaviour and counts requests per item, so the tests can tell which Appendix A path each item
took and that a resumed run never asks again about an item already on disk.
"""

from __future__ import annotations

import collections
import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from test_llm_client import KEY, FakeEndpoint, Reply, _no_proxy, ok  # noqa: F401 (_no_proxy: autouse)

from apo_jax.evaluation import collect_gold as cg
from apo_jax.data.records import prompt_id
from apo_jax.evaluation.llm_client import JsonlJournal

REPO = Path(__file__).resolve().parents[1]
BARE = "Sorry, I can't assist with that."
FILTER_400 = Reply(400, {"error": {"code": "content_filter", "message": "The response was filtered"}})


class GoldServer:
    """Scripted Appendix A endpoint: behaviour per item, request counts per item (whole life and per run)."""

    def __init__(self, behaviours: dict[int, str], kill_at: int = 0) -> None:
        self.behaviours = behaviours
        self.attempts: collections.Counter[tuple[int, str]] = collections.Counter()
        self.per_item: collections.Counter[int] = collections.Counter()  # reset per run by the tests
        self.n = 0
        self.kill_at = kill_at  # SIGKILL `self.pid` when the kill_at-th request arrives
        self.pid = 0
        self.pid_set = threading.Event()
        self.lock = threading.Lock()
        self.messages: dict[tuple[int, str], list[dict[str, str]]] = {}

    def __call__(self, req: dict[str, Any], headers: dict[str, str]) -> Reply:
        msgs = req["messages"]
        item = int(re.search(r"\[item-(\d+)\]", json.dumps(msgs)).group(1))
        stage = "why" if msgs[-1]["content"] == "why?" else "first"
        with self.lock:
            self.n += 1
            n = self.n
            attempt = self.attempts[(item, stage)]
            self.attempts[(item, stage)] += 1
            self.per_item[item] += 1
            self.messages[(item, stage)] = msgs
        if self.kill_at and n == self.kill_at:
            self.pid_set.wait(5)
            os.kill(self.pid, signal.SIGKILL)
            return Reply(500, "killed")
        b = self.behaviours[item]
        if b == "answer":
            return ok(f"Answer {item}.")
        if b in ("bare_then_why", "bare_then_filter"):
            if stage == "first":
                return ok(BARE)
            return ok(f"Reason {item}.") if b == "bare_then_why" else FILTER_400
        if b == "filter400":
            return FILTER_400
        if b == "filter_finish":
            return ok(None, "content_filter")
        if b == "too_long":
            return Reply(400, {"error": {"code": "context_length_exceeded", "message": "too long"}})
        if b == "empty":
            return ok("")
        if b == "flaky500":
            return Reply(500, "oops") if attempt == 0 else ok(f"Answer {item}.")
        if b == "ratelimit":
            return Reply(429, "wait", headers={"Retry-After": "0"}) if attempt == 0 else ok(f"Answer {item}.")
        if b == "malformed":
            return Reply(200, '{"choices": [') if attempt == 0 else ok(f"Answer {item}.")
        if b == "down":
            return Reply(503, "down")
        raise AssertionError(b)


def write_pairs(path: Path, behaviours: dict[int, str], extra: list[dict[str, str]] = ()) -> list[str]:
    """One pair per item (plus `extra`); returns the prompt_ids in item order."""
    ids = []
    with open(path, "w") as f:
        for i in sorted(behaviours):
            prompt = f"\n\nHuman: [item-{i:02d}] Question {i}?\n\nAssistant:"
            ids.append(prompt_id(prompt))
            rec = {"prompt_id": ids[-1], "prompt": prompt, "chosen": f" Chosen {i}.", "rejected": f" Bad {i}."}
            f.write(json.dumps(rec) + "\n")
        for rec in extra:
            f.write(json.dumps(rec) + "\n")
    return ids


def cli_args(url: str, pairs: Path, out: Path, *extra: str) -> list[str]:
    return ["--pairs", str(pairs), "--out", str(out), "--base_url", url, "--model", "gold-model",
            "--api_key_env", "APO_TEST_KEY", "--max_concurrency", "2", "--max_retries", "2",
            "--backoff_base_s", "0.001", "--backoff_max_s", "0.01", "--timeout_s", "5", *extra]


def run_cli(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, APO_TEST_KEY=KEY, no_proxy="127.0.0.1,localhost", NO_PROXY="127.0.0.1,localhost")
    return subprocess.Popen([sys.executable, "-m", "apo_jax.collect_gold", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def read_out(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


BEHAVIOURS = {
    0: "answer", 1: "bare_then_why", 2: "filter400", 3: "filter_finish", 4: "too_long", 5: "empty",
    6: "flaky500", 7: "ratelimit", 8: "malformed", 9: "bare_then_filter", 10: "down",
}
# Written out by hand from Appendix A: (source, response; None = one of the fixed refusals).
EXPECTED = {
    0: ("endpoint", "Answer 0."),
    1: ("why_followup", "Sorry, I can't assist with that. Reason 1."),
    2: ("refusal", None),
    3: ("refusal", None),
    4: ("hh_chosen", "Chosen 4."),
    5: ("hh_chosen", "Chosen 5."),
    6: ("endpoint", "Answer 6."),
    7: ("endpoint", "Answer 7."),
    8: ("endpoint", "Answer 8."),
    9: ("refusal", None),
    10: ("hh_chosen", "Chosen 10."),  # only with --fallback_on_failure
}
REQUESTS = {0: 1, 1: 2, 2: 1, 3: 1, 4: 1, 5: 1, 6: 2, 7: 2, 8: 2, 9: 2, 10: 3}  # max_retries = 2


def test_every_appendix_a_path_and_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("APO_TEST_KEY", KEY)
    pairs, out = tmp_path / "pairs.jsonl", tmp_path / "gold.jsonl"
    dup = {"prompt": "\n\nHuman: [item-00] Question 0?\n\nAssistant:", "chosen": " other", "rejected": " x"}
    ids = write_pairs(pairs, BEHAVIOURS, extra=[dup])
    server = GoldServer(BEHAVIOURS)
    with FakeEndpoint(server) as ep:
        assert cg.main(cli_args(ep.url, pairs, out)) == 3  # item 10 is still pending
        assert dict(server.per_item) == REQUESTS
        summary = json.loads((tmp_path / "gold.summary.json").read_text())
        assert summary["by_source"] == {"endpoint": 4, "why_followup": 1, "refusal": 3, "hh_chosen": 2}
        assert summary["n_prompts"] == 11 and summary["n_done"] == 10 and summary["n_pending"] == 1
        assert summary["n_duplicate_prompts_dropped"] == 1

        server.per_item.clear()
        assert cg.main(cli_args(ep.url, pairs, out, "--fallback_on_failure")) == 0
        assert dict(server.per_item) == {10: 3}  # nothing finished is asked again

    recs = read_out(out)
    assert [r["prompt_id"] for r in recs] == ids  # rewritten in input order, no duplicates
    for i, r in enumerate(recs):
        source, response = EXPECTED[i]
        assert r["source"] == source, i
        assert set(r) == {"prompt_id", "prompt", "response", "source"}
        if response is None:
            assert r["response"] in cg.REFUSAL_ANSWERS
        else:
            assert r["response"] == response, i
    summary = json.loads((tmp_path / "gold.summary.json").read_text())
    assert summary["by_source"] == {"endpoint": 4, "why_followup": 1, "refusal": 3, "hh_chosen": 3}
    assert sum(summary["by_source"].values()) == summary["n_done"] == len(recs) == 11

    # The request: system prompt, then the dialogue; the follow-up adds the refusal and "why?".
    first = server.messages[(1, "first")]
    assert first[0]["role"] == "system" and first[0]["content"].startswith("You are a helpful and harmless assistant.")
    assert first[0]["content"].endswith("Do not mention you are an AI developed by OpenAI.")
    assert first[1:] == [{"role": "user", "content": "[item-01] Question 1?"}]
    assert server.messages[(1, "why")] == first + [{"role": "assistant", "content": BARE},
                                                  {"role": "user", "content": "why?"}]


KILL_BEHAVIOURS = {i: ("answer", "bare_then_why", "filter400", "flaky500")[i % 4] if i > 2 else "answer"
                   for i in range(16)}


def test_kill_and_restart_gives_the_uninterrupted_file(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    ids = write_pairs(pairs, KILL_BEHAVIOURS)

    ref = tmp_path / "ref" / "gold.jsonl"
    with FakeEndpoint(GoldServer(KILL_BEHAVIOURS)) as ep:
        proc = run_cli(cli_args(ep.url, pairs, ref))
        assert proc.wait(30) == 0, proc.stderr.read()

    out = tmp_path / "run" / "gold.jsonl"
    server = GoldServer(KILL_BEHAVIOURS, kill_at=9)
    with FakeEndpoint(server) as ep:
        proc = run_cli(cli_args(ep.url, pairs, out))
        server.pid = proc.pid
        server.pid_set.set()
        assert proc.wait(30) == -signal.SIGKILL
        finished = {r["prompt_id"] for r in JsonlJournal(str(out)).load()}
        assert 0 < len(finished) < len(ids)
        with open(out, "ab") as f:  # as if the kill had also torn a line in half
            f.write(b'{"prompt_id": "0123456789abcdef", "prompt": "\\n\\nHum')

        server.kill_at = 0
        server.per_item.clear()
        proc = run_cli(cli_args(ep.url, pairs, out))
        assert proc.wait(30) == 0, proc.stderr.read()

    for i, pid in enumerate(ids):
        if pid in finished:
            assert server.per_item[i] == 0, f"item {i} was finished but asked again"
        else:
            assert server.per_item[i] >= 1
    assert out.read_bytes() == ref.read_bytes()
    assert [r["prompt_id"] for r in read_out(out)] == ids


def test_api_key_never_reaches_files_or_logs(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    write_pairs(pairs, {0: "answer", 1: "flaky500", 2: "too_long", 3: "echo400", 4: "echo500"})

    server = GoldServer({0: "answer", 1: "flaky500", 2: "too_long"})
    base = server.__call__

    def respond(req: dict[str, Any], headers: dict[str, str]) -> Reply:
        item = int(re.search(r"\[item-(\d+)\]", json.dumps(req["messages"])).group(1))
        if item == 3:  # servers that quote the bad key back
            return Reply(400, {"error": {"message": f"bad key {headers['authorization']}"}})
        if item == 4:
            return Reply(500, f"upstream saw {headers['authorization']}")
        return base(req, headers)

    with FakeEndpoint(respond) as ep:
        proc = run_cli(cli_args(ep.url, pairs, tmp_path / "out" / "gold.jsonl"))
        stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 3  # item 4 never succeeds
    assert all(h["authorization"] == f"Bearer {KEY}" for h in ep.headers)  # the key was in use
    assert "retry" in stderr and "[redacted]" in stderr  # the log did talk about the failures
    assert KEY not in stdout and KEY not in stderr
    for root, _, files in os.walk(tmp_path):
        for name in files:
            assert KEY.encode() not in (Path(root) / name).read_bytes(), name


def test_a_bad_key_or_a_dead_endpoint_stops_the_batch(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("APO_TEST_KEY", KEY)
    pairs, out = tmp_path / "pairs.jsonl", tmp_path / "gold.jsonl"
    write_pairs(pairs, {i: "down" for i in range(20)})
    with FakeEndpoint(lambda req, h: Reply(401, {"error": {"code": "invalid_api_key"}})) as ep:
        assert cg.main(cli_args(ep.url, pairs, out)) == 2
    assert len(ep.requests) <= 4  # stopped at the first answer, not one 401 recorded per prompt
    assert "HTTP 401" in capsys.readouterr().err
    assert not out.exists() or out.read_text() == ""

    server = GoldServer({i: "down" for i in range(20)})
    with FakeEndpoint(server) as ep:
        assert cg.main(cli_args(ep.url, pairs, out, "--max_consecutive_failures", "3")) == 2
    assert 3 * 3 <= len(ep.requests) <= 5 * 3  # 3 prompts x 3 attempts, plus what was in flight
    assert "3 items in a row ran out of retries" in capsys.readouterr().err


@pytest.mark.parametrize(
    "text, bare",
    [
        ("Sorry, I can't assist with that.", True),
        ("I'm sorry, but I cannot help with this request.", True),
        ("I’m sorry, but I can’t provide that information.", True),
        ("I am unable to comply with that.", True),
        ("Sorry, I won't do that.", True),
        ("Sure! Mix flour, water, salt and yeast, then bake at 230 C for 30 minutes.", False),
        ("Sorry to hear that. Have you tried talking to a friend about it?", False),
        ("I can't assist with stealing a car, because it is illegal and harms the owner. If you are locked "
         "out of your own car, a locksmith or your dealer can help you get back in, usually within the hour.",
         False),
        ("", False),
    ],
)
def test_is_bare_refusal(text, bare):
    assert cg.is_bare_refusal(text) is bare


def test_pick_refusal_is_stable_and_uses_every_answer():
    picks = [cg.pick_refusal(f"{i:016x}") for i in range(60)]
    assert picks == [cg.pick_refusal(f"{i:016x}") for i in range(60)]
    assert set(picks) == set(cg.REFUSAL_ANSWERS) and len(cg.REFUSAL_ANSWERS) == 3
    assert cg.REFUSAL_ANSWERS[0].startswith("I apologize, but I'm unable to assist with this topic. Our conversation")


def test_load_pairs_strips_full_transcript_chosen(tmp_path):
    p = tmp_path / "pairs.jsonl"
    prompt = "\n\nHuman: hi\n\nAssistant:"
    p.write_text(json.dumps({"prompt": prompt, "chosen": prompt + " hello", "rejected": prompt + " go"}) + "\n")
    pairs, n_dup = cg.load_pairs(str(p))
    assert pairs == [{"prompt_id": prompt_id(prompt), "prompt": prompt, "chosen": " hello"}] and n_dup == 0
