"""The chat-completions client against a real HTTP server on 127.0.0.1, and the JSONL journal.

`FakeEndpoint` (also used by test_judge.py and test_collect_gold.py) is an http.server in a thread
whose answers come from a test-supplied function of the request.
"""

from __future__ import annotations

import dataclasses
import http.server
import json
import os
import socket
import threading
import time
from typing import Any, Callable

import pytest

from apo_jax.evaluation import llm_client as lc

KEY = "sk-test-DO-NOT-LEAK-7f3a9c"


@dataclasses.dataclass
class Reply:
    """A scripted HTTP answer: status, body (dict -> JSON, str/bytes sent as is), headers, delay."""

    status: int = 200
    body: Any = None
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    delay_s: float = 0.0
    drop: bool = False  # close the connection without any answer


def chat_body(content: str | None, finish_reason: str = "stop") -> dict[str, Any]:
    return {
        "id": "x",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }


def ok(content: str | None, finish_reason: str = "stop") -> Reply:
    return Reply(200, chat_body(content, finish_reason))


class FakeEndpoint:
    """A threaded HTTP server; `respond(request_json, headers) -> Reply` decides every answer."""

    def __init__(self, respond: Callable[[dict[str, Any], dict[str, str]], Reply]) -> None:
        self.respond = respond
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.paths: list[str] = []
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        endpoint = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    req = json.loads(raw)
                except json.JSONDecodeError:
                    req = {"_raw": raw.decode("utf-8", "replace")}
                hdrs = {k.lower(): v for k, v in self.headers.items()}
                with endpoint.lock:
                    endpoint.requests.append(req)
                    endpoint.headers.append(hdrs)
                    endpoint.paths.append(self.path)
                    endpoint.in_flight += 1
                    endpoint.max_in_flight = max(endpoint.max_in_flight, endpoint.in_flight)
                try:
                    reply = endpoint.respond(req, hdrs)
                    if reply.delay_s:
                        time.sleep(reply.delay_s)
                    if reply.drop:
                        self.close_connection = True
                        return
                    body = reply.body
                    if isinstance(body, (dict, list)):
                        body = json.dumps(body)
                    data = body.encode() if isinstance(body, str) else (body or b"")
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in reply.headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)
                finally:
                    with endpoint.lock:
                        endpoint.in_flight -= 1

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> "FakeEndpoint":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()


class Script:
    """Answers requests with the next Reply of a fixed list (the last one repeats)."""

    def __init__(self, *replies: Reply) -> None:
        self.replies = list(replies)
        self.n = 0

    def __call__(self, req: dict[str, Any], headers: dict[str, str]) -> Reply:
        reply = self.replies[min(self.n, len(self.replies) - 1)]
        self.n += 1
        return reply


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    # A proxy configured on the machine must not intercept requests to the local test server.
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


def make_client(url: str, sleeps: list[float] | None = None, **overrides: Any) -> lc.ChatClient:
    fields = dict(base_url=url, model="judge-model", api_key_env="APO_TEST_KEY", max_retries=6,
                  backoff_base_s=0.01, backoff_max_s=1.0, timeout_s=5.0)
    fields.update(overrides)
    sleep = (lambda s: sleeps.append(s)) if sleeps is not None else (lambda s: None)
    return lc.ChatClient(lc.EndpointConfig(**fields), environ={"APO_TEST_KEY": KEY}, sleep=sleep, seed=0)


MSGS = [{"role": "user", "content": "hello"}]


def test_success_sends_model_messages_and_bearer_key():
    with FakeEndpoint(Script(ok("hi there"))) as ep:
        res = make_client(ep.url, temperature=0.0, max_tokens=7).chat(MSGS)
    assert res.content == "hi there" and res.finish_reason == "stop" and res.attempts == 1
    assert res.usage["total_tokens"] == 5
    assert ep.paths == ["/v1/chat/completions"]
    assert ep.requests == [{"model": "judge-model", "messages": MSGS, "temperature": 0.0, "max_tokens": 7}]
    assert ep.headers[0]["authorization"] == f"Bearer {KEY}"


def test_retries_every_transient_failure_then_succeeds():
    script = Script(
        Reply(500, {"error": {"message": "boom"}}),
        Reply(429, {"error": {"message": "slow down"}}, headers={"Retry-After": "2"}),
        Reply(200, "{not json"),
        Reply(200, {"choices": []}),  # well-formed JSON without a completion
        Reply(drop=True),  # connection closed without an answer
        Reply(200, chat_body("late"), delay_s=0.6),  # the client times out first
        Reply(503, "Service Unavailable"),
        ok("finally"),
    )
    sleeps: list[float] = []
    with FakeEndpoint(script) as ep:
        client = make_client(ep.url, sleeps, max_retries=7, timeout_s=0.3)
        res = client.chat(MSGS)
    assert res.content == "finally" and res.attempts == 8
    assert len(ep.requests) == 8
    assert client.stats == {"requests": 8, "retries": 7, "refusals": 0, "failures": 0}
    assert len(sleeps) == 7
    for k, s in enumerate(sleeps):
        expo = min(1.0, 0.01 * 2**k)
        if k == 1:  # after the 429: Retry-After (2 s) wins over the 0.02 s backoff
            assert s == 2.0
        else:
            assert 0.5 * expo <= s < expo, (k, s)


def test_gives_up_after_max_retries_with_a_clear_error():
    sleeps: list[float] = []
    with FakeEndpoint(Script(Reply(502, "bad gateway"))) as ep:
        with pytest.raises(lc.RetriesExhausted) as exc:
            make_client(ep.url, sleeps, max_retries=3).chat(MSGS)
    assert len(ep.requests) == 4 and len(sleeps) == 3
    assert exc.value.attempts == 4
    assert "after 4 attempts" in str(exc.value) and "HTTP 502" in str(exc.value)


def test_connection_refused_is_retried_then_reported():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(lc.RetriesExhausted, match="connection error"):
        make_client(f"http://127.0.0.1:{port}/v1", max_retries=2).chat(MSGS)


@pytest.mark.parametrize(
    "reply, code",
    [
        (Reply(400, {"error": {"code": "content_filter", "message": "filtered",
                               "innererror": {"code": "ResponsibleAIPolicyViolation"}}}), "content_filter"),
        (Reply(400, {"error": {"code": "content_policy_violation", "type": "invalid_request_error"}}),
         "content_policy_violation"),
        (ok(None, finish_reason="content_filter"), "content_filter"),
    ],
)
def test_content_refusal_is_its_own_error_and_not_retried(reply, code):
    with FakeEndpoint(Script(reply)) as ep:
        client = make_client(ep.url)
        with pytest.raises(lc.ContentRefusal) as exc:
            client.chat(MSGS)
    assert exc.value.code == code
    assert len(ep.requests) == 1 and client.stats["refusals"] == 1


def test_refusal_retries_bound_the_refusal_attempts():
    with FakeEndpoint(Script(ok(None, "content_filter"))) as ep:
        with pytest.raises(lc.ContentRefusal):
            make_client(ep.url, refusal_retries=2).chat(MSGS)
    assert len(ep.requests) == 3


def test_other_4xx_is_rejected_at_once_and_key_echo_is_redacted():
    def echo_key(req: dict[str, Any], headers: dict[str, str]) -> Reply:
        return Reply(401, {"error": {"message": f"Incorrect API key provided: {headers['authorization']}"}})

    with FakeEndpoint(echo_key) as ep:
        client = make_client(ep.url)
        with pytest.raises(lc.RequestRejected) as exc:
            client.chat(MSGS)
    assert len(ep.requests) == 1 and exc.value.status == 401
    assert KEY not in str(exc.value) and "[redacted]" in str(exc.value)
    assert KEY not in repr(client) and KEY not in repr(client.cfg) and KEY not in str(vars(client.cfg))


def test_500_echoing_the_key_is_redacted_in_the_final_error():
    def echo_key(req: dict[str, Any], headers: dict[str, str]) -> Reply:
        return Reply(500, f"upstream failed for {headers['authorization']}")

    with FakeEndpoint(echo_key) as ep:
        with pytest.raises(lc.RetriesExhausted) as exc:
            make_client(ep.url, max_retries=1).chat(MSGS)
    assert KEY not in str(exc.value) and "[redacted]" in str(exc.value)


def test_missing_key_variable_is_named_without_a_value():
    cfg = lc.EndpointConfig(base_url="http://127.0.0.1:1/v1", model="m", api_key_env="APO_MISSING_KEY")
    with pytest.raises(lc.LLMClientError, match="APO_MISSING_KEY"):
        lc.ChatClient(cfg, environ={})


def test_close_stops_a_client_that_is_backing_off():
    with FakeEndpoint(Script(Reply(503, "down"))) as ep:
        client = make_client(ep.url, max_retries=50)
        client._sleep = lambda s: client.close()  # as if Ctrl-C arrived during the first backoff
        with pytest.raises(lc.LLMClientError, match="closed"):
            client.chat(MSGS)
    assert len(ep.requests) == 1


def test_a_key_pasted_as_the_variable_name_is_not_echoed():
    with pytest.raises(ValueError) as exc:
        lc.EndpointConfig(base_url="http://h/v1", model="m", api_key_env=KEY).validate()
    assert "api_key_env" in str(exc.value) and KEY not in str(exc.value)


def test_concurrency_limit_caps_requests_in_flight():
    # Each request is held until a second one is in flight (or all six have arrived), so the cap is
    # reached however slowly the threads run, and a client that let more through would pile them up.
    def respond(req, h):
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            with ep.lock:
                if ep.in_flight >= 2 or len(ep.requests) == 6:
                    break
            time.sleep(0.005)
        return Reply(200, chat_body("x"), delay_s=0.05)

    ep = FakeEndpoint(respond)  # `respond` reads `ep` when a request arrives
    with ep:
        client = make_client(ep.url, max_concurrency=2)
        results = list(lc.run_concurrently(lambda i: client.chat(MSGS).content, range(6), max_workers=6))
    assert [r for _, r, e in results] == ["x"] * 6 and all(e is None for _, _, e in results)
    assert ep.max_in_flight == 2


def test_config_validation_lists_every_bad_field():
    cfg = lc.EndpointConfig(base_url="ftp://x", model="", api_key_env="sk-abc", max_concurrency=0,
                            max_retries=-1, timeout_s=0)
    with pytest.raises(ValueError) as exc:
        cfg.validate()
    for field in ("base_url", "model", "api_key_env", "max_concurrency", "max_retries", "timeout_s"):
        assert f"{field}:" in str(exc.value)
    with pytest.raises(ValueError, match="unknown"):
        lc.EndpointConfig.from_mapping({"base_url": "http://x", "model": "m", "api_key": "no"})


def test_url_keeps_query_string():
    client = lc.ChatClient(lc.EndpointConfig(base_url="https://h/openai/v1/?api-version=1", model="m", api_key_env=""))
    assert client.url == "https://h/openai/v1/chat/completions?api-version=1"


def test_backoff_delay_and_retry_after_parsing():
    assert lc.backoff_delay(0, 1.0, 60.0, 0.0) == 0.5
    assert lc.backoff_delay(3, 1.0, 60.0, 0.5) == 8.0 * 0.75
    assert lc.backoff_delay(10, 1.0, 60.0, 0.0) == 30.0  # capped at 60, then jitter factor 0.5
    assert lc.parse_retry_after({"Retry-After": "7"}) == 7.0
    assert lc.parse_retry_after({"retry-after-ms": "250", "Retry-After": "7"}) == 0.25
    assert lc.parse_retry_after({"Retry-After": "Wed, 21 Oct 2015 07:28:10 GMT"}, now=1445412480.0) == 10.0
    assert lc.parse_retry_after({"Retry-After": "soon"}) is None and lc.parse_retry_after({}) is None


def test_hh_to_messages():
    prompt = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: One\n\nHuman: Two\n\nAssistant:"
    assert lc.hh_to_messages(prompt) == [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "One\n\nTwo"},
    ]
    assert lc.hh_to_messages("plain question") == [{"role": "user", "content": "plain question"}]


def test_journal_cuts_a_torn_last_line_and_appends_cleanly(tmp_path):
    path = str(tmp_path / "j.jsonl")
    j = lc.JsonlJournal(path)
    j.append({"a": 1})
    j.append({"a": 2})
    j.close()
    with open(path, "ab") as f:
        f.write(b'{"a": 3, "tr')  # a kill in the middle of a write
    j = lc.JsonlJournal(path)
    assert j.load() == [{"a": 1}, {"a": 2}]
    j.append({"a": 4})
    j.close()
    assert open(path).read() == '{"a": 1}\n{"a": 2}\n{"a": 4}\n'
    with open(path, "ab") as f:
        f.write(b'{"a": 5}')  # complete, only the newline missing
    assert lc.JsonlJournal(path).load() == [{"a": 1}, {"a": 2}, {"a": 4}, {"a": 5}]
    assert open(path).read().endswith('{"a": 5}\n')


def test_journal_refuses_a_corrupt_middle_line(tmp_path):
    path = tmp_path / "j.jsonl"
    path.write_text('{"a": 1}\ngarbage\n{"a": 2}\n')
    with pytest.raises(lc.JournalError, match="line 2"):
        lc.JsonlJournal(str(path)).load()
    assert os.path.getsize(path) == len('{"a": 1}\ngarbage\n{"a": 2}\n')  # left untouched
