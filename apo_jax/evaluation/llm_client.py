"""A small client for OpenAI-compatible chat-completions endpoints, and a kill-safe JSONL journal.

Used by the judge (`evaluation.judge`, paper Appendix B) and golden-response collection
(`evaluation.collect_gold`, Appendix A). Standard library only: `urllib.request` for HTTP, threads
from `concurrent.futures` for concurrency.

- `EndpointConfig`: base URL, model, and the *name* of the environment variable that holds the API
  key. The key itself is read once by `ChatClient` and kept only there: it is never put in a
  config, a repr, a log line or an exception message (server text quoted in errors is scrubbed
  of it too, since some servers echo a bad key back).
- `ChatClient.chat`: one POST {base_url}/chat/completions with a concurrency limit, a timeout,
  and retries with exponential backoff and jitter (honouring Retry-After) on 429, 408, 5xx,
  timeouts, connection errors and malformed JSON. A content-policy refusal (HTTP 4xx with a
  content_filter / content_policy code, or finish_reason "content_filter") raises
  `ContentRefusal`; other 4xx raise `RequestRejected`; running out of retries raises
  `RetriesExhausted`.
- `JsonlJournal`: append-only JSONL where each record is written, flushed and fsynced as it
  arrives; reopening cuts off a torn last line, so a killed run loses only what it had not yet
  received.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import email.utils
import http.client
import json
import logging
import os
import random
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Callable, Iterable, Iterator, Mapping, NoReturn, Sequence, TypeVar

from apo_jax.io.fileio import write_text as write_atomic  # the one atomic writer

log = logging.getLogger(__name__)

Message = dict[str, str]
T = TypeVar("T")
R = TypeVar("R")

# Error codes that mean "the provider's content policy refused this request". OpenAI uses
# content_policy_violation, Azure OpenAI content_filter (innererror ResponsibleAIPolicyViolation).
_REFUSAL_CODE = re.compile(r"content[_ ]?(filter|policy)|responsibleaipolicyviolation", re.IGNORECASE)
_RETRY_STATUSES = frozenset({408, 409, 425, 429})  # plus every 5xx


class LLMClientError(RuntimeError):
    """Base class of the client's errors; messages never contain the API key."""


class ContentRefusal(LLMClientError):
    """The endpoint refused the content (content filter / content policy), not a transient fault."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


class RequestRejected(LLMClientError):
    """A non-retryable HTTP error (4xx other than 408/409/425/429 and content refusals)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status

    @property
    def item_specific(self) -> bool:
        """True when the fault lies in this request (400 bad / too long, 413, 422), so other
        requests may succeed; False for endpoint-wide faults (401 key, 403, 404 model or URL),
        which should stop a batch rather than be recorded against every item."""
        return self.status in (400, 413, 422)


class RetriesExhausted(LLMClientError):
    """Every attempt failed with a transient error; the message names the last one."""

    def __init__(self, message: str, attempts: int) -> None:
        super().__init__(message)
        self.attempts = attempts


class _Transient(Exception):
    """An attempt failed in a way worth retrying (internal to `ChatClient`)."""

    def __init__(self, reason: str, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s


@dataclasses.dataclass(frozen=True)
class EndpointConfig:
    """Where and how to call an OpenAI-compatible chat-completions endpoint."""

    base_url: str
    """Endpoint root, e.g. "https://api.openai.com/v1"; requests go to {base_url}/chat/completions."""
    model: str
    """The "model" field of every request."""
    api_key_env: str = "OPENAI_API_KEY"
    """Name of the environment variable holding the key ("" = send no Authorization header)."""
    max_concurrency: int = 8
    """Most requests in flight at once."""
    timeout_s: float = 120.0
    """Socket timeout in seconds, per connect / per read (not a cap on the whole response)."""
    max_retries: int = 6
    """Retries after the first attempt; max_retries + 1 attempts in all."""
    backoff_base_s: float = 1.0
    """Backoff before retry k (k = 0, 1, ...) is base * 2**k seconds, capped, times U[0.5, 1)."""
    backoff_max_s: float = 60.0
    """Cap in seconds on the exponential part of the backoff."""
    retry_after_max_s: float = 300.0
    """Cap in seconds on how long a server's Retry-After is honoured."""
    refusal_retries: int = 0
    """How often a content refusal is retried before `ContentRefusal` is raised."""
    temperature: float | None = None
    """Sampling temperature; None leaves the field out (the endpoint's default)."""
    max_tokens: int | None = None
    """Cap on generated tokens; None leaves the field out."""

    def validate(self) -> None:
        """Raises ValueError listing every wrong field (`field: problem`), or returns None."""
        errors = []
        if urllib.parse.urlsplit(self.base_url).scheme not in ("http", "https"):
            errors.append(f"base_url: {self.base_url!r} is not an http(s) URL")
        if not self.model:
            errors.append("model: must be non-empty")
        if self.api_key_env and not re.fullmatch(r"[A-Z_][A-Z0-9_]*", self.api_key_env):
            # Not echoed: a value that is no variable name may be the key itself, pasted by mistake.
            errors.append("api_key_env: must be the NAME of an environment variable (A-Z, 0-9, _), not the key")
        for name in ("max_concurrency",):
            if getattr(self, name) < 1:
                errors.append(f"{name}: {getattr(self, name)}; must be >= 1")
        for name in ("max_retries", "refusal_retries"):
            if getattr(self, name) < 0:
                errors.append(f"{name}: {getattr(self, name)}; must be >= 0")
        for name in ("timeout_s", "backoff_max_s"):
            if not getattr(self, name) > 0:
                errors.append(f"{name}: {getattr(self, name)}; must be > 0")
        for name in ("backoff_base_s", "retry_after_max_s"):
            if getattr(self, name) < 0:
                errors.append(f"{name}: {getattr(self, name)}; must be >= 0")
        if self.max_tokens is not None and self.max_tokens < 1:
            errors.append(f"max_tokens: {self.max_tokens}; must be >= 1 or None")
        if errors:
            raise ValueError("invalid endpoint config:\n  " + "\n  ".join(errors))

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any]) -> "EndpointConfig":
        """From a dict or `ml_collections.ConfigDict` section with the same field names."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(m) - known)
        if unknown:
            raise ValueError(f"unknown endpoint config fields: {unknown}; known: {sorted(known)}")
        return cls(**dict(m))


@dataclasses.dataclass(frozen=True)
class ChatResult:
    """One successful completion."""

    content: str
    """The assistant message text ("" when the endpoint sent none)."""
    finish_reason: str | None
    attempts: int
    """HTTP attempts this call took (1 = no retry)."""
    usage: dict[str, Any]
    """The endpoint's token counts, as sent ({} when absent)."""


def backoff_delay(retry: int, base_s: float, max_s: float, u: float) -> float:
    """Seconds to wait before retry number `retry` (0-based): min(max, base * 2**retry) * (0.5 + u / 2).

    `u` in [0, 1) is the jitter draw; jitter keeps many clients that failed together from
    retrying in lockstep.
    """
    return min(max_s, base_s * (2.0**retry)) * (0.5 + 0.5 * u)


def parse_retry_after(headers: Mapping[str, str] | None, now: float | None = None) -> float | None:
    """Seconds a server asked us to wait (Retry-After seconds or HTTP date, or retry-after-ms)."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


def _refusal_code(payload: Any) -> str | None:
    """The content-policy code in an error payload {"error": {"code", "type", "innererror"}}, if any."""
    err = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(err, dict):
        return None
    inner = err.get("innererror")
    candidates = [err.get("code"), err.get("type"), inner.get("code") if isinstance(inner, dict) else None]
    for c in candidates:
        if isinstance(c, str) and _REFUSAL_CODE.search(c):
            return c
    return None


def _message_text(message: Any) -> str:
    """Text of a chat message whose content is a string, a list of text parts, or None."""
    content = message.get("content")
    if isinstance(content, list):  # some servers send [{"type": "text", "text": ...}, ...]
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if content is None:
        content = message.get("refusal")  # OpenAI's model-side refusal text
    if content is not None and not isinstance(content, str):
        raise _Transient("malformed response: message.content is not text")
    return content or ""


class ChatClient:
    """Thread-safe chat-completions client; `chat` may be called from many threads at once."""

    def __init__(
        self,
        cfg: EndpointConfig,
        *,
        environ: Mapping[str, str] | None = None,
        sleep: Callable[[float], Any] | None = None,
        seed: int | None = None,
    ) -> None:
        """`environ` defaults to os.environ; `sleep` and `seed` are for tests (backoff waits, jitter)."""
        cfg.validate()
        self.cfg = cfg
        env = os.environ if environ is None else environ
        key = ""
        if cfg.api_key_env:
            key = env.get(cfg.api_key_env, "")
            if not key:
                raise LLMClientError(
                    f"environment variable {cfg.api_key_env} is empty or unset; it must hold the API key "
                    f"for {cfg.base_url} (or pass an empty key-variable name for an endpoint without keys)"
                )
        self._key = key
        parts = urllib.parse.urlsplit(cfg.base_url)
        self._url = urllib.parse.urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/chat/completions"))
        self.url = self._redact(self._url)
        """The request URL for messages and logs (a key put in the URL by mistake is masked)."""
        self._slots = threading.BoundedSemaphore(cfg.max_concurrency)
        self._closed = threading.Event()
        # Backoff waits on the close event, so `close` (e.g. on Ctrl-C) ends them at once.
        self._sleep = sleep if sleep is not None else self._closed.wait
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.stats = {"requests": 0, "retries": 0, "refusals": 0, "failures": 0}
        """Counters over this client's life: HTTP requests sent, retries, content refusals, give-ups."""

    def __repr__(self) -> str:
        return f"ChatClient(url={self.url!r}, model={self.cfg.model!r}, api_key_env={self.cfg.api_key_env!r})"

    def close(self) -> None:
        """Stops retrying: calls still backing off raise LLMClientError; a request on the wire
        finishes (or times out) first."""
        self._closed.set()

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "[redacted]") if self._key else text

    def _count(self, name: str) -> None:
        with self._lock:
            self.stats[name] += 1

    def chat(self, messages: Sequence[Message], **params: Any) -> ChatResult:
        """One completion for `messages`; `params` are extra request fields (e.g. temperature).

        Raises ContentRefusal, RequestRejected or RetriesExhausted (all LLMClientError).
        """
        body: dict[str, Any] = {"model": self.cfg.model, "messages": [dict(m) for m in messages]}
        if self.cfg.temperature is not None:
            body["temperature"] = self.cfg.temperature
        if self.cfg.max_tokens is not None:
            body["max_tokens"] = self.cfg.max_tokens
        body.update(params)
        data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        refusals = 0
        last_error = ""
        attempts = self.cfg.max_retries + 1
        for attempt in range(attempts):
            if self._closed.is_set():
                raise LLMClientError(f"client for {self.url} was closed")
            retry_after = None
            try:
                with self._slots:  # held only while a request is on the wire, not while backing off
                    return self._post_once(data, attempt + 1)
            except ContentRefusal as e:
                self._count("refusals")
                refusals += 1
                if refusals > self.cfg.refusal_retries:
                    raise
                last_error = str(e)
            except _Transient as e:
                last_error = self._redact(e.reason)
                retry_after = e.retry_after_s
            if attempt + 1 == attempts:
                break
            with self._lock:
                u = self._rng.random()
            delay = backoff_delay(attempt, self.cfg.backoff_base_s, self.cfg.backoff_max_s, u)
            if retry_after is not None:
                delay = max(delay, min(retry_after, self.cfg.retry_after_max_s))
            self._count("retries")
            log.warning("%s: %s; retry %d/%d in %.2fs", self.url, last_error, attempt + 1, self.cfg.max_retries, delay)
            self._sleep(delay)
        self._count("failures")
        raise RetriesExhausted(
            f"gave up on POST {self.url} after {attempts} attempts "
            f"(max_retries={self.cfg.max_retries}); last error: {last_error}",
            attempts,
        )

    def _post_once(self, data: bytes, attempt: int) -> ChatResult:
        headers = {"Content-Type": "application/json", "Accept": "application/json", "User-Agent": "apo_jax"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        request = urllib.request.Request(self._url, data=data, headers=headers, method="POST")
        self._count("requests")
        try:
            with urllib.request.urlopen(request, timeout=self.cfg.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            try:
                text = e.read().decode("utf-8", "replace")
            except (OSError, http.client.HTTPException):
                text = ""
            finally:
                e.close()
            self._raise_http_error(e.code, text, e.headers)
        except TimeoutError:
            raise _Transient(f"timed out after {self.cfg.timeout_s}s") from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, TimeoutError):
                raise _Transient(f"timed out after {self.cfg.timeout_s}s") from None
            raise _Transient(f"connection error: {e.reason}") from None
        except (OSError, http.client.HTTPException) as e:  # reset, remote disconnected, incomplete read
            raise _Transient(f"connection error: {type(e).__name__}: {e}") from None
        try:
            payload = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise _Transient(f"malformed JSON in a 200 response ({len(raw)} bytes)") from None
        if isinstance(payload, dict) and "error" in payload and "choices" not in payload:
            # Some proxies answer errors with status 200.
            self._raise_http_error(200, json.dumps(payload), None)
        try:
            choice = payload["choices"][0]
            message = choice["message"]
            finish = choice.get("finish_reason")
        except (KeyError, IndexError, TypeError, AttributeError):
            raise _Transient("malformed response: no choices[0].message") from None
        if finish == "content_filter":
            raise ContentRefusal(f"{self.url}: finish_reason 'content_filter'", "content_filter")
        content = _message_text(message)
        usage = payload.get("usage") if isinstance(payload.get("usage"), dict) else {}
        return ChatResult(content=content, finish_reason=finish, attempts=attempt, usage=usage)

    def _raise_http_error(self, status: int, text: str, headers: Mapping[str, str] | None) -> NoReturn:
        snippet = self._redact(" ".join(text.split())[:300])
        try:
            payload = json.loads(text)
        except json.JSONDecodeError:
            payload = None
        code = _refusal_code(payload)
        if code is not None and (status == 200 or 400 <= status < 500):
            raise ContentRefusal(f"{self.url}: HTTP {status} content refusal ({code})", code)
        if status in _RETRY_STATUSES or status >= 500 or status == 200:
            raise _Transient(f"HTTP {status}: {snippet}", parse_retry_after(headers))
        raise RequestRejected(f"{self.url}: HTTP {status} (not retried): {snippet}", status)


def hh_to_messages(prompt: str) -> list[Message]:
    """Chat messages for an HH transcript "\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nAssistant:".

    The empty final "Assistant:" turn (the one to be answered) is dropped. Consecutive turns of
    one role (a few HH transcripts do not alternate) are joined with a blank line, since many
    chat templates reject non-alternating roles. Text without any "Human:" marker becomes one
    user message.
    """
    pieces = re.split(r"(?:^|\n\n)(Human|Assistant):", prompt)
    if len(pieces) < 3:
        return [{"role": "user", "content": prompt.strip()}]
    messages: list[Message] = []
    lead = pieces[0].strip()
    if lead:
        messages.append({"role": "user", "content": lead})
    for speaker, text in zip(pieces[1::2], pieces[2::2]):
        role = "user" if speaker == "Human" else "assistant"
        text = text.strip()
        if not text:
            continue
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += "\n\n" + text
        else:
            messages.append({"role": role, "content": text})
    return messages


def run_concurrently(
    fn: Callable[[T], R], items: Iterable[T], max_workers: int
) -> Iterator[tuple[T, R | None, BaseException | None]]:
    """Yields (item, result, None) or (item, None, error) in completion order, `max_workers` at a time.

    The caller consumes results on its own thread (e.g. writes them to a journal), so no file is
    shared between threads. Closing the generator early cancels work not yet started.
    """
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="llm")
    futures = {pool.submit(fn, item): item for item in items}
    try:
        for fut in concurrent.futures.as_completed(futures):
            err = fut.exception()
            yield futures[fut], (None if err is not None else fut.result()), err
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


class BatchAborted(LLMClientError):
    """A batch stopped early: the endpoint rejects every request, or too many items failed in a row."""


def drain(
    fn: Callable[[T], R],
    items: Sequence[T],
    max_workers: int,
    on_result: Callable[[T, R], None],
    describe: Callable[[T], str] = str,
    on_failure: Callable[[T, RetriesExhausted], R | None] | None = None,
    max_consecutive_failures: int = 25,
) -> int:
    """Runs `fn` over `items` concurrently and hands each result to `on_result` on this thread.

    An item whose calls ran out of retries is passed to `on_failure` (its return value, if not
    None, goes to `on_result`) or else left pending with a warning. Returns how many items ran out
    of retries. Raises BatchAborted after `max_consecutive_failures` such items in a row (0 = never;
    an endpoint that is down should not cost hours of backoff per item) or when `fn` lets an
    endpoint-wide RequestRejected through (a bad key must not be recorded against every item).
    """
    failed = consecutive = 0
    # closing(): stop queued work as soon as we stop, not when the traceback lets go of the generator.
    with contextlib.closing(run_concurrently(fn, items, max_workers)) as results:
        for item, result, err in results:
            if err is None:
                consecutive = 0
                on_result(item, result)
            elif isinstance(err, RetriesExhausted):
                failed += 1
                consecutive += 1
                fallback = on_failure(item, err) if on_failure is not None else None
                if fallback is not None:
                    on_result(item, fallback)
                else:
                    log.warning("%s: left pending: %s", describe(item), err)
                if max_consecutive_failures and consecutive >= max_consecutive_failures:
                    raise BatchAborted(f"{consecutive} items in a row ran out of retries; is the endpoint "
                                       f"down? Last error: {err}")
            elif isinstance(err, RequestRejected):
                raise BatchAborted(f"the endpoint rejects requests ({err}); check the base URL, the model "
                                   "and the key variable") from None
            else:
                raise err
    return failed


class JournalError(RuntimeError):
    """A journal file is corrupt somewhere other than its last line."""


class JsonlJournal:
    """Append-only JSONL file of dict records that a killed process leaves readable.

    Each `append` is one write of one line, then flush and fsync, so a record on disk is complete
    or is the torn last line; `load` cuts such a line off before anything new is appended.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._file: Any = None

    def load(self) -> list[dict[str, Any]]:
        """All complete records; truncates a torn last line. Raises JournalError on a bad middle line."""
        if not os.path.exists(self.path):
            return []
        with open(self.path, "rb") as f:
            data = f.read()
        records: list[dict[str, Any]] = []
        good_end = 0
        lines = data.split(b"\n")
        for i, line in enumerate(lines):
            end = good_end + len(line) + (1 if i < len(lines) - 1 else 0)
            if line.strip():
                try:
                    rec = json.loads(line.decode("utf-8"))
                    if not isinstance(rec, dict):
                        raise ValueError("not a JSON object")
                except ValueError as e:
                    if any(rest.strip() for rest in lines[i + 1 :]):
                        raise JournalError(f"{self.path}: line {i + 1} is not a JSON object ({e})") from None
                    log.warning("%s: cutting off a torn last line (%d bytes)", self.path, len(line))
                    break
                records.append(rec)
            good_end = end
        if good_end < len(data) or (data and not data.endswith(b"\n")):
            with open(self.path, "r+b") as f:
                f.truncate(good_end)
                if good_end and not data[:good_end].endswith(b"\n"):
                    f.seek(good_end)
                    f.write(b"\n")  # a complete last record that only lacked its newline
                os.fsync(f.fileno())
        return records

    def append(self, record: Mapping[str, Any]) -> None:
        """Writes one record durably (flush + fsync) before returning."""
        if self._file is None:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            self._file = open(self.path, "ab")
        self._file.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        self._file.flush()
        os.fsync(self._file.fileno())

    def rewrite(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Atomically replaces the file with `records` (e.g. sorted into input order)."""
        self.close()
        write_atomic(self.path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def add_endpoint_args(parser: argparse.ArgumentParser) -> None:
    """The `EndpointConfig` fields as command-line flags (--base_url, --model, --api_key_env, ...)."""
    d = EndpointConfig(base_url="http://x", model="x")
    g = parser.add_argument_group("endpoint")
    g.add_argument("--base_url", required=True, help="OpenAI-compatible root, e.g. https://api.openai.com/v1")
    g.add_argument("--model", required=True, help="model name sent with every request")
    g.add_argument("--api_key_env", default=d.api_key_env,
                   help="NAME of the environment variable holding the key ('' = send none); never the key itself")
    g.add_argument("--max_concurrency", type=int, default=d.max_concurrency)
    g.add_argument("--timeout_s", type=float, default=d.timeout_s)
    g.add_argument("--max_retries", type=int, default=d.max_retries)
    g.add_argument("--backoff_base_s", type=float, default=d.backoff_base_s)
    g.add_argument("--backoff_max_s", type=float, default=d.backoff_max_s)
    g.add_argument("--retry_after_max_s", type=float, default=d.retry_after_max_s)
    g.add_argument("--refusal_retries", type=int, default=d.refusal_retries)
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--max_tokens", type=int, default=None)
    g.add_argument("--max_consecutive_failures", type=int, default=25,
                   help="stop the batch after this many items in a row ran out of retries (endpoint down)")


def endpoint_config_from_args(args: argparse.Namespace) -> EndpointConfig:
    """The `EndpointConfig` named by the flags of `add_endpoint_args`."""
    names = [f.name for f in dataclasses.fields(EndpointConfig)]
    return EndpointConfig(**{n: getattr(args, n) for n in names})
