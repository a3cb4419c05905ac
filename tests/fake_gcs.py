"""An in-process fake of Google Cloud Storage, for tests that write to ``gs://`` paths offline.

Two real client paths are pointed at one directory tree, ``root/<bucket>/<object name>``:

* TensorStore's native ``gcs`` kvstore driver (what Orbax writes array data with) talks HTTP to
  :class:`FakeGcsServer`, a small GCS JSON-API server on 127.0.0.1, through the
  ``TENSORSTORE_GCS_HTTP_URL`` / ``GOOGLE_AUTH_TOKEN_FOR_TESTING`` environment variables.
* fsspec's ``gs`` / ``gcs`` protocols (what ``etils.epath.Path('gs://...')`` uses when TensorFlow
  is absent) resolve to :class:`FakeGcsFileSystem`, a ``LocalFileSystem`` that maps
  ``gs://bucket/key`` onto ``root/bucket/key`` and names paths the way gcsfs does
  (``bucket/key``, no protocol).

Both see the same bytes: a file written through epath can be read by TensorStore and vice versa.

Usage::

    from fake_gcs import fake_gcs, fake_gcs_fixture  # noqa: F401  (the fixture is named "fake_gcs")

    def test_x(fake_gcs):          # the pytest fixture, rooted in tmp_path
        p = epath.Path(fake_gcs.url("bucket", "a/b.txt"))
        p.write_text("hi")
        assert (fake_gcs.root / "bucket" / "a" / "b.txt").read_text() == "hi"

    with fake_gcs(some_dir) as gcs:  # the context manager, anywhere
        ...

Limitations (see also :func:`fake_gcs`):

* TensorStore's base URL may be read only once per process (and its drivers are cached), so the
  HTTP server is one per process and lives until the process ends; each :func:`fake_gcs` context
  points it at a new root. Contexts can't be nested.
* Orbax asks ``google.cloud.storage`` whether a ``gs://`` bucket has a hierarchical namespace.
  When that package is not installed, a minimal stand-in (``Client().get_bucket(name)``, which
  asks this server for the bucket) is put in ``sys.modules`` for the duration of the context. If
  the real package is installed it is used, pointed here by ``STORAGE_EMULATOR_HOST``.
* Only simple (``uploadType=media``) uploads, object get/metadata/delete/list and bucket get are
  served: no resumable/multipart uploads, compose, copy/rewrite, versions, ACLs or auth checks.
* An object ``a`` and an object ``a/b`` can't both exist (a file can't also be a directory).
* Generations are file modification times in nanoseconds, made strictly increasing for writes
  through the server or the fake filesystem; a file changed on disk some other way gets
  whatever mtime the OS gives it.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import http.server
import json
import os
import shutil
import stat as stat_lib
import sys
import threading
import time
import types
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import fsspec
from fsspec.implementations.local import LocalFileOpener, LocalFileSystem
from fsspec.registry import _registry as _fsspec_registry

__all__ = [
    "FakeGcs",
    "FakeGcsFileSystem",
    "FakeGcsServer",
    "Request",
    "fake_gcs",
    "fake_gcs_fixture",
]

_ENV_VARS = (
    "TENSORSTORE_GCS_HTTP_URL",
    "GOOGLE_AUTH_TOKEN_FOR_TESTING",
    "STORAGE_EMULATOR_HOST",
    "FAKE_GCS_ROOT",
    "NO_PROXY",
    "no_proxy",
)
_TMP_DIR = ".fake_gcs_tmp"  # under root; not a valid bucket name, so never listed as one
_PROTOCOLS = ("gs", "gcs")


# ------------------------------------------------------------------------------------------------
# Generations: an object's generation is its file's st_mtime_ns, bumped on every write made here.

_GEN_LOCK = threading.Lock()
_LAST_GEN = 0


def _next_generation() -> int:
    global _LAST_GEN
    with _GEN_LOCK:
        _LAST_GEN = max(time.time_ns(), _LAST_GEN + 1)
        return _LAST_GEN


def _stamp(local_path: str) -> int:
    """Gives the file at `local_path` a new, strictly larger generation and returns it."""
    gen = _next_generation()
    os.utime(local_path, ns=(gen, gen))
    return gen


def _rfc3339(ns: int) -> str:
    t = datetime.datetime.fromtimestamp(ns / 1e9, tz=datetime.timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def _valid_bucket(bucket: str) -> bool:
    return (
        3 <= len(bucket) <= 222
        and bucket[0].isalnum()
        and bucket[-1].isalnum()
        and all(c.islower() or c.isdigit() or c in "-_." for c in bucket)
    )


def _object_parts(name: str) -> list[str] | None:
    """The path components of an object name, or None if it can't be stored as a file."""
    if not name or len(name.encode()) > 1024 or "\0" in name or "\r" in name or "\n" in name:
        return None
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return None
    return parts


# ------------------------------------------------------------------------------------------------
# The JSON-API server.


@dataclass(frozen=True)
class Request:
    """One request the fake server answered."""

    method: str
    path: str  # the URL path, still percent-encoded
    query: dict[str, str]
    status: int
    range: str | None = None  # the Range header, if any
    user_agent: str = ""

    @property
    def kind(self) -> str:
        """A short label: 'media', 'metadata', 'upload', 'delete', 'list', 'bucket' or 'other'."""
        p = self.path
        if p.startswith("/upload/"):
            return "upload"
        if "/o/" in p:
            if self.method == "DELETE":
                return "delete"
            return "media" if self.query.get("alt") == "media" else "metadata"
        if p.rstrip("/").endswith("/o"):
            return "list"
        if "/b/" in p:
            return "bucket"
        return "other"


class _HttpError(Exception):
    def __init__(self, status: int, message: str = "", reason: str = "", headers=None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason
        self.headers = headers or {}


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and 100-continue for curl's uploads
    server: "_HttpServer"

    def log_message(self, format, *args):  # noqa: A002 - quiet
        pass

    # -- plumbing -------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        split = urllib.parse.urlsplit(self.path)
        query = {k: v[0] for k, v in urllib.parse.parse_qs(split.query, keep_blank_values=True).items()}
        fake: FakeGcsServer = self.server.fake
        status = 500
        try:
            body = self._read_body()
            root = fake.root
            if root is None:
                raise _HttpError(503, "fake GCS server has no root (no fake_gcs context active)")
            status, payload, headers = fake._handle(self.command, split.path, query, dict(self.headers), body, root)
        except _HttpError as e:
            status, headers = e.status, dict(e.headers)
            payload = b""
            if status not in (204, 304):
                payload = json.dumps(
                    {"error": {"code": status, "message": e.message,
                               "errors": [{"message": e.message, "domain": "global", "reason": e.reason}]}}
                ).encode()
                headers.setdefault("Content-Type", "application/json; charset=UTF-8")
        except Exception as e:  # a bug in the fake: say so, don't hang the client
            status, headers = 500, {"Content-Type": "text/plain"}
            payload = f"fake GCS internal error: {type(e).__name__}: {e}".encode()
        fake._log(Request(self.command, split.path, query, status, self.headers.get("Range"),
                          self.headers.get("User-Agent", "")))
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        if status in (204, 304):
            self.send_header("Content-Length", "0")
            payload = b""
        else:
            self.send_header("Content-Length", str(len(payload)))
        self.send_header("Date", self.date_time_string())
        self.end_headers()
        if self.command != "HEAD" and payload:
            self.wfile.write(payload)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = do_HEAD = _dispatch


class _HttpServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    fake: "FakeGcsServer"


class FakeGcsServer:
    """A GCS JSON-API server over a directory: object ``name`` of ``bucket`` is the file
    ``root/bucket/name``. ``root`` can be changed (or set to None) while it runs."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root: str | None = None if root is None else os.path.abspath(root)
        self.requests: list[Request] = []
        self._lock = threading.RLock()
        self._httpd: _HttpServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> "FakeGcsServer":
        if self._httpd is None:
            httpd = _HttpServer(("127.0.0.1", 0), _Handler)
            httpd.fake = self
            self._httpd = httpd
            self._thread = threading.Thread(target=httpd.serve_forever, name="fake-gcs", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
            self._thread = None

    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def _log(self, r: Request) -> None:
        with self._lock:
            self.requests.append(r)

    # -- request handling ---------------------------------------------------------------------------

    def _handle(self, method, path, query, headers, body, root):
        parts = path.split("/")  # percent-encoded components: an object name's "/" is "%2F"
        upload = False
        if parts[:5] == ["", "upload", "storage", "v1", "b"]:
            upload, rest = True, parts[5:]
        elif parts[:5] == ["", "download", "storage", "v1", "b"]:  # mediaLink form
            rest = parts[5:]
            query = {**query, "alt": "media"}
        elif parts[:4] == ["", "storage", "v1", "b"]:
            rest = parts[4:]
        else:
            raise _HttpError(404, f"Not Found: {path}", "notFound")
        if not rest or not rest[0]:
            raise _HttpError(400, "bucket name required", "invalid")
        bucket = urllib.parse.unquote(rest[0])
        if not _valid_bucket(bucket):
            raise _HttpError(400, f"Invalid bucket name: '{bucket}'", "invalid")
        bucket_dir = os.path.join(root, bucket)
        rest = rest[1:]
        if not rest:
            if method in ("GET", "HEAD"):
                return self._bucket_resource(bucket)
            raise _HttpError(405, f"{method} on a bucket is not supported by the fake", "notImplemented")
        if rest[0] != "o":
            raise _HttpError(404, f"Not Found: {path}", "notFound")
        if len(rest) == 1 or (len(rest) == 2 and rest[1] == ""):  # the object collection
            if method == "POST":
                if not upload:
                    raise _HttpError(400, "Uploads must be sent to the upload URL.", "wrongUrlForUpload")
                return self._insert(bucket, bucket_dir, query, body)
            if method == "GET" and not upload:
                return self._list(bucket, bucket_dir, query)
            raise _HttpError(405, f"{method} {path} is not supported by the fake", "notImplemented")
        name = urllib.parse.unquote("/".join(rest[1:]))
        if upload:
            raise _HttpError(405, f"{method} {path} is not supported by the fake", "notImplemented")
        if method in ("GET", "HEAD"):
            return self._get(bucket, bucket_dir, name, query, headers)
        if method == "DELETE":
            return self._delete(bucket_dir, name, query)
        raise _HttpError(405, f"{method} on an object is not supported by the fake", "notImplemented")

    @staticmethod
    def _conditions(query) -> tuple[int | None, int | None]:
        out = []
        for k in ("ifGenerationMatch", "ifGenerationNotMatch"):
            v = query.get(k)
            if v is None:
                out.append(None)
                continue
            try:
                out.append(int(v))
            except ValueError:
                raise _HttpError(400, f"Invalid long value: '{v}'.", "invalid") from None
        return out[0], out[1]

    @staticmethod
    def _object_path(bucket_dir: str, name: str) -> str:
        parts = _object_parts(name)
        if parts is None:
            raise _HttpError(400, f"The fake can't store an object named {name!r}", "invalid")
        return os.path.join(bucket_dir, *parts)

    @staticmethod
    def _stat_file(local: str) -> os.stat_result | None:
        try:
            st = os.stat(local)
        except (FileNotFoundError, NotADirectoryError):
            return None
        return st if stat_lib.S_ISREG(st.st_mode) else None

    def _bucket_resource(self, bucket):
        now = _rfc3339(time.time_ns())
        meta = {
            "kind": "storage#bucket", "id": bucket, "name": bucket, "projectNumber": "0",
            "metageneration": "1", "location": "US", "storageClass": "STANDARD",
            "timeCreated": now, "updated": now, "etag": "CAE=",
            "hierarchicalNamespace": {"enabled": False},
        }
        return 200, json.dumps(meta).encode(), {"Content-Type": "application/json; charset=UTF-8"}

    def _metadata(self, bucket: str, name: str, st: os.stat_result) -> dict[str, Any]:
        gen = st.st_mtime_ns
        enc = urllib.parse.quote(name, safe="")
        base = self.url if self._httpd is not None else "http://fake-gcs"
        return {
            "kind": "storage#object",
            "id": f"{bucket}/{name}/{gen}",
            "selfLink": f"{base}/storage/v1/b/{bucket}/o/{enc}",
            "mediaLink": f"{base}/download/storage/v1/b/{bucket}/o/{enc}?generation={gen}&alt=media",
            "name": name,
            "bucket": bucket,
            "generation": str(gen),
            "metageneration": "1",
            "contentType": "application/octet-stream",
            "storageClass": "STANDARD",
            "size": str(st.st_size),
            "timeCreated": _rfc3339(gen),
            "updated": _rfc3339(gen),
            "timeStorageClassUpdated": _rfc3339(gen),
            "etag": base64.b64encode(str(gen).encode()).decode(),
        }

    def _get(self, bucket, bucket_dir, name, query, headers):
        local = self._object_path(bucket_dir, name)
        if_match, if_not_match = self._conditions(query)
        with self._lock:
            try:
                f = open(local, "rb")
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                f = None
        with contextlib.ExitStack() as stack:
            st = None
            if f is not None:
                stack.enter_context(f)
                st = os.fstat(f.fileno())  # the generation of the bytes we read, even if replaced since
            if if_match is not None:
                if if_match == 0:
                    if st is not None:
                        raise _HttpError(412, "At least one of the pre-conditions you specified did not hold.",
                                         "conditionNotMet")
                    return 204, b"", {}
                if st is None or st.st_mtime_ns != if_match:
                    raise _HttpError(412, "At least one of the pre-conditions you specified did not hold.",
                                     "conditionNotMet")
            if st is None:
                raise _HttpError(404, f"No such object: {bucket}/{name}", "notFound")
            if if_not_match is not None and st.st_mtime_ns == if_not_match:
                return 304, b"", {}
            if query.get("alt") != "media":
                meta = json.dumps(self._metadata(bucket, name, st)).encode()
                return 200, meta, {"Content-Type": "application/json; charset=UTF-8"}
            data = f.read()
            gen = st.st_mtime_ns
        out_headers = {
            "Content-Type": "application/octet-stream",
            "x-goog-generation": str(gen),
            "x-goog-metageneration": "1",
            "x-goog-stored-content-length": str(len(data)),
            "x-goog-stored-content-encoding": "identity",
            "x-goog-storage-class": "STANDARD",
            "Accept-Ranges": "bytes",
            "ETag": f'"{gen}"',
        }
        rng = headers.get("Range") or headers.get("range")
        if rng:
            start, end = self._parse_range(rng, len(data))
            out_headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            return 206, data[start:end + 1], out_headers
        return 200, data, out_headers

    @staticmethod
    def _parse_range(rng: str, size: int) -> tuple[int, int]:
        """(first, last) byte of a single `bytes=` range; 416 if it can't be satisfied."""
        unsatisfiable = _HttpError(416, "The requested range cannot be satisfied.", "requestedRangeNotSatisfiable",
                                   {"Content-Range": f"bytes */{size}"})
        unit, _, spec = rng.strip().partition("=")
        if unit.strip().lower() != "bytes" or "," in spec:
            raise _HttpError(400, f"unsupported Range header {rng!r}", "invalid")
        first, _, last = spec.strip().partition("-")
        try:
            if first == "":
                n = int(last)
                if n <= 0 or size == 0:
                    raise unsatisfiable
                return max(0, size - n), size - 1
            start = int(first)
            end = size - 1 if last == "" else min(int(last), size - 1)
        except ValueError:
            raise _HttpError(400, f"bad Range header {rng!r}", "invalid") from None
        if start >= size or end < start:
            raise unsatisfiable
        return start, end

    def _insert(self, bucket, bucket_dir, query, body):
        if query.get("uploadType", "media") != "media":
            raise _HttpError(400, f"uploadType={query.get('uploadType')} is not supported by the fake "
                                  "(only uploadType=media)", "notImplemented")
        name = query.get("name")
        if not name:
            raise _HttpError(400, "Required parameter: name", "required")
        local = self._object_path(bucket_dir, name)
        if_match, if_not_match = self._conditions(query)
        root = os.path.dirname(bucket_dir)
        tmp_dir = os.path.join(root, _TMP_DIR)
        os.makedirs(tmp_dir, exist_ok=True)
        tmp = os.path.join(tmp_dir, f"{threading.get_ident()}-{time.monotonic_ns()}")
        with open(tmp, "wb") as f:
            f.write(body)
        try:
            with self._lock:
                st = self._stat_file(local)
                failed = (
                    (if_match == 0 and st is not None)
                    or (if_match not in (None, 0) and (st is None or st.st_mtime_ns != if_match))
                    or (if_not_match is not None and st is not None and st.st_mtime_ns == if_not_match)
                )
                if failed:
                    raise _HttpError(412, "At least one of the pre-conditions you specified did not hold.",
                                     "conditionNotMet")
                try:
                    os.makedirs(os.path.dirname(local), exist_ok=True)
                    if os.path.isdir(local):
                        raise NotADirectoryError
                    _stamp(tmp)  # before it becomes visible: never seen with another generation
                    os.replace(tmp, local)
                except (NotADirectoryError, FileExistsError, IsADirectoryError):
                    raise _HttpError(409, f"The fake can't store both a 'file' and a 'directory' at "
                                          f"{bucket}/{name} (an object and a prefix of another)",
                                     "conflict") from None
                st = os.stat(local)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        meta = json.dumps(self._metadata(bucket, name, st)).encode()
        return 200, meta, {"Content-Type": "application/json; charset=UTF-8"}

    def _delete(self, bucket_dir, name, query):
        local = self._object_path(bucket_dir, name)
        if_match, _ = self._conditions(query)
        with self._lock:
            st = self._stat_file(local)
            if st is None:
                raise _HttpError(404, f"No such object: {os.path.basename(bucket_dir)}/{name}", "notFound")
            if if_match is not None and st.st_mtime_ns != if_match:
                raise _HttpError(412, "At least one of the pre-conditions you specified did not hold.",
                                 "conditionNotMet")
            os.remove(local)
            # GCS has no directories: a prefix with no objects left is gone.
            d = os.path.dirname(local)
            while d != bucket_dir and d.startswith(bucket_dir + os.sep):
                try:
                    os.rmdir(d)
                except OSError:
                    break
                d = os.path.dirname(d)
        return 204, b"", {}

    def _list(self, bucket, bucket_dir, query):
        prefix = query.get("prefix", "")
        delimiter = query.get("delimiter", "")
        start = query.get("startOffset", "")
        end = query.get("endOffset", "")
        try:
            max_results = min(1000, max(1, int(query.get("maxResults", "1000"))))
        except ValueError:
            raise _HttpError(400, f"Invalid long value: '{query['maxResults']}'.", "invalid") from None
        after = None
        if query.get("pageToken"):
            tok = query["pageToken"]
            try:
                after = base64.urlsafe_b64decode(tok + "=" * (-len(tok) % 4)).decode()
            except Exception:
                raise _HttpError(400, f"Invalid pageToken {tok!r}", "invalid") from None
        entries: dict[str, tuple[str, Any]] = {}  # sort key -> ("item", stat) | ("prefix", None)
        with self._lock:
            for name, st in self._walk_files(bucket_dir):
                if not name.startswith(prefix) or name < start or (end and name >= end):
                    continue
                if delimiter:
                    i = name.find(delimiter, len(prefix))
                    if i >= 0:
                        p = name[: i + len(delimiter)]
                        entries.setdefault(p, ("prefix", None))
                        continue
                entries[name] = ("item", st)
        keys = sorted(k for k in entries if after is None or k > after)
        page, more = keys[:max_results], len(keys) > max_results
        result: dict[str, Any] = {"kind": "storage#objects"}
        items = [self._metadata(bucket, k, entries[k][1]) for k in page if entries[k][0] == "item"]
        prefixes = [k for k in page if entries[k][0] == "prefix"]
        if items:
            result["items"] = items
        if prefixes:
            result["prefixes"] = prefixes
        if more:
            result["nextPageToken"] = base64.urlsafe_b64encode(page[-1].encode()).decode().rstrip("=")
        return 200, json.dumps(result).encode(), {"Content-Type": "application/json; charset=UTF-8"}

    @staticmethod
    def _walk_files(bucket_dir: str) -> Iterator[tuple[str, os.stat_result]]:
        for dirpath, _dirnames, filenames in os.walk(bucket_dir):
            rel = os.path.relpath(dirpath, bucket_dir)
            for fn in filenames:
                local = os.path.join(dirpath, fn)
                try:
                    st = os.stat(local)
                except FileNotFoundError:
                    continue
                if stat_lib.S_ISREG(st.st_mode):
                    yield (fn if rel == "." else f"{rel.replace(os.sep, '/')}/{fn}"), st


# ------------------------------------------------------------------------------------------------
# The fsspec filesystem.

_FS_ROOT: str | None = None  # the root of the active fake_gcs context


class _ObjectFile(LocalFileOpener):
    """A file of the fake bucket. Writes ('w', 'a', 'x') go to a temporary file that replaces
    the object, with a new generation, when closed: like a GCS upload, readers never see a
    half-written object."""

    def __init__(self, path, mode, *, tmp_dir, **kwargs):
        self._tmp_dir = tmp_dir
        self._tmp = None
        super().__init__(path, mode, **kwargs)

    def _open(self):
        if "r" in self.mode or "+" in self.mode:
            super()._open()
            return
        if self.f is not None:
            return
        if "x" in self.mode and os.path.exists(self.path):
            raise FileExistsError(self.path)
        os.makedirs(self._tmp_dir, exist_ok=True)
        self._tmp = os.path.join(self._tmp_dir, f"fs-{threading.get_ident()}-{time.monotonic_ns()}")
        if "a" in self.mode and os.path.isfile(self.path):
            shutil.copyfile(self.path, self._tmp)
        self.f = open(self._tmp, mode=self.mode.replace("x", "w"))

    def close(self):
        if self.f is None or self.f.closed:
            return
        self.f.close()
        if self._tmp is not None:
            _stamp(self._tmp)
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            os.replace(self._tmp, self.path)
            self._tmp = None
        elif any(c in self.mode for c in "wax+"):
            _stamp(self.path)

    def __exit__(self, exc_type, exc_value, traceback):
        self._incontext = False
        self.close()

    def commit(self):
        self.close()

    def discard(self):
        if self._tmp is not None:
            self.f.close()
            os.remove(self._tmp)
            self._tmp = None


class FakeGcsFileSystem(LocalFileSystem):
    """``gs://bucket/key`` as the local file ``<root>/bucket/key``, with gcsfs-style names.

    Paths handed out (``ls``, ``info``, ``find``, ``glob``, ``walk``) are ``bucket/key``, as
    gcsfs gives them; ``unstrip_protocol`` adds ``gs://``. Writing a file creates its parent
    directories (GCS has none to create). Keyword arguments gcsfs takes, such as
    ``finalize_on_close``, are accepted and ignored.
    """

    protocol = _PROTOCOLS
    root_marker = ""
    local_file = False  # paths are not OS paths

    def __init__(self, *args, finalize_on_close: bool = False, **kwargs):
        kwargs.pop("auto_mkdir", None)
        for k in ("project", "token", "access", "consistency", "cache_timeout", "requester_pays",
                  "session_kwargs", "endpoint_url", "default_location", "version_aware"):
            kwargs.pop(k, None)
        super().__init__(auto_mkdir=True, **kwargs)
        self.finalize_on_close = finalize_on_close

    @property
    def fsid(self):
        return "fake_gcs"

    # -- names ------------------------------------------------------------------------------------

    @classmethod
    def _strip_protocol(cls, path):
        if isinstance(path, (list, tuple)):
            return [cls._strip_protocol(p) for p in path]
        path = fsspec.utils.stringify_path(path)
        for proto in _PROTOCOLS:
            for sep in ("://", "::"):
                if path.startswith(proto + sep):
                    path = path[len(proto) + len(sep):]
                    break
        return path.strip("/")

    @classmethod
    def _parent(cls, path):
        path = cls._strip_protocol(path)
        return path.rsplit("/", 1)[0] if "/" in path else cls.root_marker

    def unstrip_protocol(self, name):
        return "gs://" + self._strip_protocol(name)

    @staticmethod
    def _root() -> str:
        if _FS_ROOT is None:
            raise RuntimeError("the fake gs:// filesystem is used outside a fake_gcs() context")
        return _FS_ROOT

    def _local(self, path) -> str:
        name = self._strip_protocol(path)
        root = self._root()
        if not name:
            return root
        parts = name.split("/")
        if any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"fake GCS: unsupported path {path!r}")
        if not _valid_bucket(parts[0]):
            raise ValueError(f"fake GCS: invalid bucket name in {path!r}")
        return os.path.join(root, *parts)

    # -- queries ------------------------------------------------------------------------------------

    def info(self, path, **kwargs):
        name = self._strip_protocol(path)
        try:
            out = os.stat(self._local(path))
        except NotADirectoryError:
            raise FileNotFoundError(path) from None
        if stat_lib.S_ISDIR(out.st_mode):
            t = "directory"
        elif stat_lib.S_ISREG(out.st_mode):
            t = "file"
        else:
            t = "other"
        return {
            "name": name,
            "size": out.st_size if t == "file" else 0,
            "type": t,
            "created": out.st_ctime,
            "islink": False,
            "mode": out.st_mode,
            "uid": out.st_uid,
            "gid": out.st_gid,
            "mtime": out.st_mtime,
            "ino": out.st_ino,
            "nlink": out.st_nlink,
            "generation": str(out.st_mtime_ns) if t == "file" else None,
        }

    def ls(self, path, detail=False, **kwargs):
        name = self._strip_protocol(path)
        info = self.info(path)
        if info["type"] != "directory":
            return [info] if detail else [name]
        out = []
        for child in sorted(os.listdir(self._local(path))):
            if not name and child == _TMP_DIR:
                continue
            child_name = f"{name}/{child}" if name else child
            try:
                out.append(self.info(child_name) if detail else child_name)
            except FileNotFoundError:
                pass
        return out

    def exists(self, path, **kwargs):
        try:
            return os.path.exists(self._local(path))
        except ValueError:
            return False

    def lexists(self, path, **kwargs):
        return self.exists(path)

    def isfile(self, path):
        return os.path.isfile(self._local(path))

    def isdir(self, path):
        return os.path.isdir(self._local(path))

    def islink(self, path) -> bool:
        return False

    # -- changes ------------------------------------------------------------------------------------

    def mkdir(self, path, create_parents=True, **kwargs):
        local = self._local(path)
        if os.path.exists(local):
            raise FileExistsError(path)
        if create_parents:
            os.makedirs(local, exist_ok=True)
        else:
            os.mkdir(local)

    def makedirs(self, path, exist_ok=False):
        os.makedirs(self._local(path), exist_ok=exist_ok)

    def rmdir(self, path):
        os.rmdir(self._local(path))

    def rm_file(self, path):
        os.remove(self._local(path))

    def rm(self, path, recursive=False, maxdepth=None):
        for p in path if isinstance(path, list) else [path]:
            local = self._local(p)
            if os.path.isdir(local):
                if not recursive:
                    raise ValueError("Cannot delete directory, set recursive=True")
                shutil.rmtree(local)
            else:
                os.remove(local)

    def cp_file(self, path1, path2, **kwargs):
        src, dst = self._local(path1), self._local(path2)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copyfile(src, dst)
            _stamp(dst)
        elif os.path.isdir(src):
            os.makedirs(dst, exist_ok=True)
        else:
            raise FileNotFoundError(path1)

    def mv(self, path1, path2, recursive: bool = True, maxdepth=None, **kwargs):
        src, dst = self._local(path1), self._local(path2)
        if not os.path.exists(src):
            raise FileNotFoundError(path1)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.move(src, dst)
        # A moved object is a new object on GCS (copy + delete): new generations.
        if os.path.isdir(dst):
            for dirpath, _dirs, files in os.walk(dst):
                for fn in files:
                    _stamp(os.path.join(dirpath, fn))
        else:
            _stamp(dst)

    def put_file(self, lpath, rpath, callback=None, **kwargs):
        dst = self._local(rpath)
        if os.path.isdir(lpath):
            os.makedirs(dst, exist_ok=True)
            return
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copyfile(lpath, dst)
        _stamp(dst)

    def get_file(self, rpath, lpath, callback=None, **kwargs):
        src = self._local(rpath)
        if fsspec.utils.isfilelike(lpath):
            with open(src, "rb") as f:
                shutil.copyfileobj(f, lpath)
        elif os.path.isdir(src):
            os.makedirs(lpath, exist_ok=True)
        else:
            shutil.copyfile(src, lpath)

    def link(self, src, dst, **kwargs):
        raise NotImplementedError("GCS has no links")

    symlink = link

    def chmod(self, path, mode):
        raise NotImplementedError("GCS has no file modes")

    def touch(self, path, truncate=True, **kwargs):
        local = self._local(path)
        os.makedirs(os.path.dirname(local), exist_ok=True)
        if truncate or not os.path.exists(local):
            open(local, "wb").close()
        _stamp(local)

    def _open(self, path, mode="rb", block_size=None, **kwargs):
        local = self._local(path)
        if any(c in mode for c in "wax"):
            os.makedirs(os.path.dirname(local), exist_ok=True)
        elif os.path.isdir(local):
            raise IsADirectoryError(path)
        kwargs.pop("autocommit", None)
        tmp_dir = os.path.join(self._root(), _TMP_DIR)
        return _ObjectFile(local, mode, fs=self, tmp_dir=tmp_dir, **kwargs)


# ------------------------------------------------------------------------------------------------
# A stand-in for google.cloud.storage, only what Orbax asks of it for gs:// paths.


def _make_storage_stub(server: FakeGcsServer) -> types.ModuleType:
    mod = types.ModuleType("google.cloud.storage")
    mod.__doc__ = "fake_gcs stand-in: Client().get_bucket(name) asks the fake GCS server."

    class Bucket:
        def __init__(self, meta: dict[str, Any]):
            self.name = meta["name"]
            self._properties = meta
            self.hierarchical_namespace_enabled = bool(meta.get("hierarchicalNamespace", {}).get("enabled"))

        def list_blobs(self, *args, **kwargs):
            raise NotImplementedError("fake_gcs: list_blobs is only used for HNS buckets")

    class Client:
        def __init__(self, *args, **kwargs):
            pass

        def get_bucket(self, bucket_or_name):
            name = getattr(bucket_or_name, "name", bucket_or_name)
            url = f"{server.url}/storage/v1/b/{urllib.parse.quote(name, safe='')}"
            with urllib.request.urlopen(url, timeout=10) as r:
                return Bucket(json.load(r))

        bucket = get_bucket

    mod.Client, mod.Bucket = Client, Bucket
    return mod


@contextlib.contextmanager
def _storage_stub(server: FakeGcsServer):
    try:
        import google.cloud.storage  # noqa: F401
    except ImportError:
        pass
    else:  # the real client: STORAGE_EMULATOR_HOST points it here
        yield
        return
    saved = {k: sys.modules.get(k) for k in ("google.cloud", "google.cloud.storage")}
    cloud = saved["google.cloud"] or types.ModuleType("google.cloud")
    if saved["google.cloud"] is None:
        cloud.__path__ = []  # a package, so `from google.cloud import storage` resolves
    stub = _make_storage_stub(server)
    had_attr, old_attr = hasattr(cloud, "storage"), getattr(cloud, "storage", None)
    sys.modules["google.cloud"] = cloud
    sys.modules["google.cloud.storage"] = stub
    cloud.storage = stub
    try:
        yield
    finally:
        if had_attr:
            cloud.storage = old_attr
        else:
            del cloud.storage
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


# ------------------------------------------------------------------------------------------------
# The context manager and the fixture.

_SERVER: FakeGcsServer | None = None
_ACTIVE = threading.Lock()


def server() -> FakeGcsServer:
    """The process's fake GCS server (started on first use, never stopped: see `fake_gcs`)."""
    global _SERVER
    if _SERVER is None:
        _SERVER = FakeGcsServer().start()
    return _SERVER


@dataclass
class FakeGcs:
    """What `fake_gcs` yields."""

    root: Path
    server: FakeGcsServer
    _first_request: int = field(default=0, repr=False)

    @property
    def endpoint(self) -> str:
        return self.server.url

    def url(self, bucket: str, key: str = "") -> str:
        """``gs://bucket/key``."""
        key = key.lstrip("/")
        return f"gs://{bucket}/{key}" if key else f"gs://{bucket}"

    def local_path(self, bucket: str, key: str = "") -> Path:
        """The file behind ``gs://bucket/key``."""
        return self.root.joinpath(bucket, *[p for p in key.split("/") if p])

    @property
    def requests(self) -> list[Request]:
        """Requests the HTTP server answered in this context (TensorStore's, and the storage
        stand-in's); fsspec/epath access doesn't go through HTTP."""
        with self.server._lock:
            return list(self.server.requests[self._first_request:])


def _clear_caches() -> None:
    try:
        from etils.epath import backend as epath_backend

        epath_backend._FileSystemSpecBackend._get_filesystem.cache_clear()
    except (ImportError, AttributeError):
        pass
    for proto in _PROTOCOLS:
        try:
            fsspec.get_filesystem_class(proto).clear_instance_cache()
        except (ImportError, ValueError):
            pass
    FakeGcsFileSystem.clear_instance_cache()
    gcs_utils = sys.modules.get("orbax.checkpoint._src.path.gcs_utils")
    get_bucket = getattr(gcs_utils, "get_bucket", None)
    if hasattr(get_bucket, "cache_clear"):
        get_bucket.cache_clear()


@contextlib.contextmanager
def fake_gcs(root: str | os.PathLike) -> Iterator[FakeGcs]:
    """Serves ``gs://`` from the directory `root` (``root/<bucket>/<object>``) for the duration.

    Sets ``TENSORSTORE_GCS_HTTP_URL``, ``GOOGLE_AUTH_TOKEN_FOR_TESTING`` and
    ``STORAGE_EMULATOR_HOST`` to this process's fake server (and adds 127.0.0.1 to
    ``NO_PROXY``), registers :class:`FakeGcsFileSystem` for fsspec's ``gs``/``gcs``, and clears
    etils' and fsspec's filesystem caches; all undone on exit.

    The server is one per process, kept after the context ends (answering 503 until the next
    context), because TensorStore may read ``TENSORSTORE_GCS_HTTP_URL`` only once per process and
    caches open drivers, so every context must present the same URL. Not re-entrant.
    """
    if not _ACTIVE.acquire(blocking=False):
        raise RuntimeError("fake_gcs() contexts can't be nested or run concurrently")
    global _FS_ROOT
    root_path = Path(root).absolute()
    root_path.mkdir(parents=True, exist_ok=True)
    srv = server()
    saved_env = {k: os.environ.get(k) for k in _ENV_VARS}
    saved_impls = {p: _fsspec_registry.get(p) for p in _PROTOCOLS}
    try:
        srv.root = str(root_path)
        host = srv.url.removeprefix("http://")
        os.environ["TENSORSTORE_GCS_HTTP_URL"] = srv.url
        os.environ["GOOGLE_AUTH_TOKEN_FOR_TESTING"] = "fake-gcs-token"
        os.environ["STORAGE_EMULATOR_HOST"] = srv.url
        os.environ["FAKE_GCS_ROOT"] = str(root_path)  # for child processes: see `install_in_child`
        for k in ("NO_PROXY", "no_proxy"):
            existing = [x for x in (saved_env[k] or "").split(",") if x]
            os.environ[k] = ",".join(existing + ["127.0.0.1", "localhost", host])
        _FS_ROOT = str(root_path)
        for proto in _PROTOCOLS:
            fsspec.register_implementation(proto, FakeGcsFileSystem, clobber=True)
        _clear_caches()
        with srv._lock:
            first = len(srv.requests)
        with _storage_stub(srv):
            yield FakeGcs(root_path, srv, first)
    finally:
        _clear_caches()
        for proto, impl in saved_impls.items():
            if impl is None:
                _fsspec_registry.pop(proto, None)
            else:
                fsspec.register_implementation(proto, impl, clobber=True)
        _clear_caches()
        _FS_ROOT = None
        srv.root = None
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _ACTIVE.release()


def install_in_child() -> None:
    """In a process started inside a `fake_gcs` context (it inherits the environment): points
    this process's epath/fsspec `gs://` at the same directory and Orbax's storage client at the
    parent's server. TensorStore finds the server through the inherited environment itself."""
    global _FS_ROOT
    root, url = os.environ["FAKE_GCS_ROOT"], os.environ["TENSORSTORE_GCS_HTTP_URL"]
    _FS_ROOT = root
    for proto in _PROTOCOLS:
        fsspec.register_implementation(proto, FakeGcsFileSystem, clobber=True)
    _clear_caches()
    try:
        import google.cloud.storage  # noqa: F401  (the real client: STORAGE_EMULATOR_HOST points it here)
    except ImportError:
        cloud = sys.modules.get("google.cloud") or types.ModuleType("google.cloud")
        if not hasattr(cloud, "__path__"):
            cloud.__path__ = []
        stub = _make_storage_stub(types.SimpleNamespace(url=url))
        sys.modules["google.cloud"], sys.modules["google.cloud.storage"] = cloud, stub
        cloud.storage = stub


try:
    import pytest
except ImportError:  # pragma: no cover - the module also works without pytest
    pytest = None

if pytest is not None:

    @pytest.fixture(name="fake_gcs")
    def fake_gcs_fixture(tmp_path) -> Iterator[FakeGcs]:
        """A `fake_gcs` context rooted at ``tmp_path / "gcs"``. Import it into a test module
        (``from fake_gcs import fake_gcs_fixture``) and ask for ``fake_gcs``."""
        with fake_gcs(tmp_path / "gcs") as g:
            yield g
