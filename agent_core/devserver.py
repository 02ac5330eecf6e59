"""A local OpenAaaS server for integration tests and the demo (stdlib only).

It speaks the agent protocol of ``shared/protocol.md`` §1-4 with the reference
server's quirks (plain-text body errors, 400 on a lost accept, a rate limit
counted before auth, ...), keeps its state in memory behind one lock and stores
file bytes under ``data_dir``. Uploads and downloads are streamed in both
directions, so a 1 GiB file is never held in memory.

What the real server was seen doing (protocol.md, *observed*), and this one does too:

- (observed) A service that exists but never registered (no key stored yet) gets 401.
- (observed) The rate limit slides per request and counts only requests let through
  (refusals do not extend it); every 429 says ``Retry-After: 60``, whatever the window.
- (observed) Answers come before the request body is read: a file over the size limit
  (400) and a 429 are sent while the client is still sending, then the connection closes.
- (observed) ``request_timeout_secs`` (30) cuts off request bodies, i.e. uploads, that run
  past it: 408 with an empty body, then the connection closes. Downloads run on.
- (observed) Downloads are chunked, without Content-Length, and gzip-compressed whenever
  the request's Accept-Encoding allows gzip, whatever the file type.
- (observed) Each upload first empties its task's temporary folder, so an upload still
  running when another one to the same task starts loses its file and answers 500.
- (observed) A heartbeat refused with 400 still counts as a sign of life (and turns
  ``offline`` into ``online``); one without ``capacity`` stores its ``current_load`` unchecked.

    with DevServer(data_dir=tmp_path) as server:
        server.url, server.admin_key          # where and how to talk to it
        server.faults.fail_next(2, status=503) # inject faults
        server.calls_to("/heartbeat")          # what the agent sent
        server.restart(down_for=5)             # same port, state kept

Layers, bottom up: ``_Body`` / ``_MultipartReader`` (streaming request bodies),
``_Store`` (protocol semantics, one lock), ``Faults`` and ``_RateLimiter``
(knobs), ``_App`` (routing, auth, JSON shapes), ``_Handler`` / ``_HTTPServer``
(HTTP plumbing), ``DevServer`` (lifecycle, sweeper, what tests look at).
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import math
import mimetypes
import random
import re
import secrets
import socket
import socketserver
import sys
import tempfile
import threading
import time
import traceback
import uuid
import zlib
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple
from urllib.parse import parse_qs, quote, unquote

__all__ = ["Call", "DevServer", "Faults"]

_CHUNK = 1024 * 1024          # read/write granularity for file bodies
_MAX_SMALL_BODY = 1024 * 1024  # JSON bodies and multipart text fields
_MAX_PART_HEADERS = 16 * 1024
_TERMINAL = ("completed", "failed", "cancelled")
_HEARTBEAT_STATUSES = ("online", "busy", "offline")
_RETRY_AFTER = "60"  # the real server's constant, whatever its window
_GZIP_LEVEL = 1      # downloads: the point is the encoding, not the ratio; level 1 keeps big files cheap
_THROTTLE_STEP = 0.1  # a slowed body is read in pieces worth this many seconds


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --------------------------------------------------------------------------- responses


@dataclass
class _Response:
    status: int
    body: bytes = b""
    content_type: str | None = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    stream: Iterator[bytes] | None = None  # sent after the headers, chunk by chunk
    chunked: bool = True                    # how the stream is framed; False: "until the connection closes"
    drop: bool = False                      # close the connection without answering


def _json(status: int, obj: Any, headers: dict[str, str] | None = None) -> _Response:
    return _Response(status, json.dumps(obj).encode(), headers=headers or {})


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> _Response:
    return _json(status, {"error": code, "message": message}, headers)


def _text(status: int, text: str) -> _Response:
    # axum's extractor rejections are plain text; clients must not assume JSON errors
    return _Response(status, text.encode(), content_type="text/plain; charset=utf-8")


class _HttpError(Exception):
    """Raised anywhere below the router to answer with `response`."""

    def __init__(self, response: _Response):
        super().__init__(response.status)
        self.response = response


def _timed_out() -> _HttpError:
    return _HttpError(_Response(408, content_type=None))  # empty body, not JSON, like the real server


class _ClientGone(ConnectionError):
    """The client closed the connection in the middle of its request body."""


# --------------------------------------------------------------------------- request bodies


class _Body:
    """The request body as a stream: Content-Length or chunked, never buffered whole.

    Reads return what has arrived (never wait for a full chunk), so an answer can go
    out while the client is still sending; past `deadline` (monotonic) a read is a 408.
    """

    def __init__(self, rfile, headers, sock: socket.socket, deadline: float | None):
        self._rfile = rfile
        self._sock = sock
        self._deadline = deadline
        self._rate: float | None = None  # bytes per second, set by Faults.slow_upload_next
        self._done = False
        encoding = (headers.get("Transfer-Encoding") or "").strip().lower()
        self._chunked = encoding not in ("", "identity")
        if self._chunked:
            if encoding != "chunked":
                raise _HttpError(_text(501, f"unsupported Transfer-Encoding: {encoding}"))
            self._left = 0  # bytes left in the current chunk
            return
        try:
            self._left = int(headers.get("Content-Length") or 0)
            if self._left < 0:
                raise ValueError
        except ValueError:
            raise _HttpError(_text(400, "bad Content-Length")) from None
        self._done = self._left == 0

    @property
    def done(self) -> bool:
        """The whole body has been read: the connection can carry another request."""
        return self._done

    def throttle(self, bytes_per_sec: float) -> None:
        self._rate = bytes_per_sec

    def _io(self, read: Callable[[int], bytes], n: int) -> bytes:
        """One read from the socket, cut off by the deadline."""
        if self._rate:
            n = min(n, max(1, int(self._rate * _THROTTLE_STEP)))
            pause = n / self._rate
            if self._deadline is not None:
                pause = min(pause, max(0.0, self._deadline - time.monotonic()))
            time.sleep(pause)
        if self._deadline is None:
            return read(n)
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise _timed_out()
        self._sock.settimeout(left)
        try:
            return read(n)
        except TimeoutError:
            raise _timed_out() from None
        finally:
            self._sock.settimeout(None)  # keep-alive: the wait for the next request is not timed

    def read(self, n: int = _CHUNK) -> bytes:
        """Up to `n` bytes; b"" once the body is complete."""
        if self._done:
            return b""
        if self._chunked and self._left == 0:
            self._left = self._next_chunk_size()
            if self._left == 0:
                self._skip_trailers()
                self._done = True
                return b""
        data = self._io(self._rfile.read1, min(n, self._left))
        if not data:
            raise _ClientGone("request body cut short")
        self._left -= len(data)
        if self._left == 0:
            if self._chunked:
                self._expect_line(b"")
            else:
                self._done = True
        return data

    def read_all(self, limit: int) -> bytes:
        parts, size = [], 0
        while chunk := self.read():
            size += len(chunk)
            if size > limit:
                raise _HttpError(_text(413, "request body too large"))
            parts.append(chunk)
        return b"".join(parts)

    def _line(self) -> bytes:
        line = self._io(self._rfile.readline, 1024)
        if not line.endswith(b"\n"):
            raise _ClientGone("chunked body cut short")
        return line.rstrip(b"\r\n")

    def _expect_line(self, expected: bytes) -> None:
        if self._line() != expected:
            raise _HttpError(_text(400, "malformed chunked body"))

    def _next_chunk_size(self) -> int:
        try:
            return int(self._line().split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise _HttpError(_text(400, "malformed chunk size")) from None

    def _skip_trailers(self) -> None:
        while self._line():
            pass


_PARAM_RE = re.compile(r';\s*([^\s=;]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')


def _header_params(value: str) -> tuple[str, dict[str, str]]:
    """`form-data; name="a"; filename="b"` -> ("form-data", {"name": "a", "filename": "b"})."""
    main, sep, rest = value.partition(";")
    params: dict[str, str] = {}
    for match in _PARAM_RE.finditer(sep + rest):
        key, raw = match.group(1).lower(), match.group(2).strip()
        if raw.startswith('"') and raw.endswith('"') and len(raw) >= 2:
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
        params[key] = raw
    if "filename*" in params:  # RFC 5987: UTF-8''percent-encoded wins over the plain one
        _, _, encoded = params["filename*"].partition("''")
        params["filename"] = unquote(encoded, errors="replace")
    return main.strip().lower(), params


class _Part:
    """One multipart part; its data must be read (or skipped) before the next part."""

    def __init__(self, reader: _MultipartReader, headers: dict[str, str]):
        self._reader = reader
        _, params = _header_params(headers.get("content-disposition", ""))
        self.name = params.get("name")
        self.filename = params.get("filename")
        self.content_type = headers.get("content-type")

    def chunks(self) -> Iterator[bytes]:
        return self._reader._data()

    def text(self) -> str:
        data, size = [], 0
        for chunk in self.chunks():
            size += len(chunk)
            if size > _MAX_SMALL_BODY:
                raise _HttpError(_error(400, "BadRequest", f"form field {self.name!r} too large"))
            data.append(chunk)
        return b"".join(data).decode("utf-8", errors="replace")


class _MultipartReader:
    """A streaming multipart/form-data parser: at most ~one chunk of the body in memory.

    The data of a part ends at CRLF "--" boundary. A part's bytes are handed out
    as they arrive, holding back only what could be the start of a delimiter.
    """

    def __init__(self, read: Callable[[int], bytes], boundary: bytes):
        self._read = read
        self._delim = b"\r\n--" + boundary
        self._buf = bytearray(b"\r\n")  # lets the first boundary match the same pattern
        self._in_data = True            # the preamble is skipped like the rest of a part
        self._finished = False

    def __iter__(self) -> Iterator[_Part]:
        while (part := self._next_part()) is not None:
            yield part
        self._skip_epilogue()

    def _skip_epilogue(self) -> None:
        # what follows the closing delimiter (a CRLF from most clients) is read, within reason
        size = len(self._buf)
        while size <= _MAX_PART_HEADERS:
            data = self._read(_CHUNK)
            if not data:
                return
            size += len(data)
        raise _HttpError(_error(400, "BadRequest", "multipart epilogue too long"))

    def _fill(self) -> bool:
        data = self._read(_CHUNK)
        self._buf += data
        return bool(data)

    def _find(self, needle: bytes, limit: int) -> int:
        while (index := self._buf.find(needle)) < 0:
            if len(self._buf) > limit:
                raise _HttpError(_error(400, "BadRequest", "malformed multipart body"))
            if not self._fill():
                raise _HttpError(_error(400, "BadRequest", "multipart body ends early"))
        return index

    def _take_line(self) -> bytes:
        end = self._find(b"\r\n", _MAX_PART_HEADERS)
        line = bytes(self._buf[:end])
        del self._buf[:end + 2]
        return line

    def _next_part(self) -> _Part | None:
        if self._finished:
            return None
        if self._in_data:
            for _ in self._data():  # the unread rest of the previous part
                pass
        self._find(b"\r\n", _MAX_PART_HEADERS)  # makes sure the two bytes below are there
        if self._buf.startswith(b"--"):
            self._finished = True
            return None
        if self._take_line().strip(b" \t"):
            raise _HttpError(_error(400, "BadRequest", "malformed multipart boundary"))
        headers: dict[str, str] = {}
        while line := self._take_line():
            name, _, value = line.decode("utf-8", errors="replace").partition(":")
            headers[name.strip().lower()] = value.strip()
        self._in_data = True
        return _Part(self, headers)

    def _data(self) -> Iterator[bytes]:
        keep = len(self._delim) - 1
        while True:
            index = self._buf.find(self._delim)
            if index >= 0:
                chunk = bytes(self._buf[:index])
                del self._buf[:index + len(self._delim)]
                self._in_data = False
                if chunk:
                    yield chunk
                return
            if len(self._buf) > keep:
                chunk = bytes(self._buf[:-keep])
                del self._buf[:-keep]
                yield chunk
            if not self._fill():
                raise _HttpError(_error(400, "BadRequest", "multipart body ends inside a part"))


def _multipart(req: _Request) -> _MultipartReader:
    kind, params = _header_params(req.headers.get("Content-Type") or "")
    if kind != "multipart/form-data" or not params.get("boundary"):
        raise _HttpError(_error(400, "BadRequest", "expected multipart/form-data with a boundary"))
    return _MultipartReader(req.body.read, params["boundary"].encode("latin-1", errors="replace"))


@dataclass
class _Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: Any
    body: _Body
    closing: threading.Event  # set when the listener goes down: long waits must end
    data: bytes = b""         # the whole body, unless it is multipart (then streamed from `body`)
    record: Any = None        # what the call log shows as the body

    @property
    def is_multipart(self) -> bool:
        return (self.headers.get("Content-Type") or "").lower().startswith("multipart/")


# JSON body extraction, the way axum's Json extractor rejects: 415, then 400, then 422, all plain text.
_ANY = object


def _is_kind(value: Any, kinds: tuple[type, ...]) -> bool:
    if isinstance(value, bool) and bool not in kinds and _ANY not in kinds:
        return False
    return isinstance(value, kinds)


def _json_body(req: _Request, schema: dict[str, tuple[tuple[type, ...], bool]]) -> dict:
    ctype = (req.headers.get("Content-Type") or "").split(";")[0].strip().lower()
    if not (ctype == "application/json" or (ctype.startswith("application/") and ctype.endswith("+json"))):
        raise _HttpError(_text(415, "Expected request with `Content-Type: application/json`"))
    try:
        data = json.loads(req.data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _HttpError(_text(400, f"Failed to parse the request body as JSON: {exc}")) from None
    if not isinstance(data, dict):
        raise _HttpError(_text(422, "Failed to deserialize the JSON body into the target type: expected an object"))
    for key, (kinds, required) in schema.items():
        value = data.get(key)
        if value is None:
            if required:
                raise _HttpError(_text(422, f"Failed to deserialize the JSON body into the target type: "
                                           f"missing field `{key}`"))
        elif not _is_kind(value, kinds):
            raise _HttpError(_text(422, f"Failed to deserialize the JSON body into the target type: "
                                       f"invalid type for `{key}`"))
    return data


# --------------------------------------------------------------------------- state


@dataclass
class _Service:
    id: str
    name: str
    description: str
    usage: str
    is_public: bool
    token: str | None
    created_at: str = field(default_factory=_now_iso)
    key_hash: bytes | None = None   # set by register; None means "never registered" (-> 401)
    revoked: bool = False
    status: str = "pending"         # pending until register, then online/busy/offline
    capacity: int = 1
    current_load: int = 0
    last_heartbeat: float | None = None  # monotonic
    last_heartbeat_at: str | None = None

    def to_json(self) -> dict:
        registration = "revoked" if self.revoked else ("active" if self.key_hash else "pending")
        return {"id": self.id, "name": self.name, "description": self.description, "usage": self.usage,
                "is_public": self.is_public, "status": self.status, "registration_status": registration,
                "capacity": self.capacity, "current_load": self.current_load,
                "last_heartbeat_at": self.last_heartbeat_at, "created_at": self.created_at}


@dataclass
class _Task:
    id: str
    service_id: str
    seq: int                        # creation order: poll offers the oldest pending task
    task_prompt: str = ""
    output_prompt: str | None = None
    session_id: str | None = None
    raw: dict | None = None         # offered verbatim by poll (Faults.offer_raw_task)
    status: str = "pending"
    output: Any = None
    error_message: str | None = None
    retry_count: int = 0
    created_at: str = field(default_factory=_now_iso)
    assigned_at: str | None = None
    started_at: str | None = None
    completed_at: str | None = None

    def to_json(self) -> dict:
        task_input = self.raw if self.raw is not None else {
            "task_prompt": self.task_prompt, "output_prompt": self.output_prompt}
        return {"id": self.id, "service_id": self.service_id, "status": self.status, "input": task_input,
                "output": self.output, "error_message": self.error_message, "session_id": self.session_id,
                "retry_count": self.retry_count, "created_at": self.created_at,
                "assigned_at": self.assigned_at, "started_at": self.started_at,
                "completed_at": self.completed_at}


@dataclass
class _File:
    id: str
    task_id: str
    filename: str
    mime_type: str | None
    size_bytes: int
    created_by: str                 # "client" | "agent"
    path: Path
    created_at: str = field(default_factory=_now_iso)
    granted: set[str] = field(default_factory=set)  # extra services allowed to download it

    def to_json(self) -> dict:
        return {"id": self.id, "task_id": self.task_id, "filename": self.filename,
                "mime_type": self.mime_type, "size_bytes": self.size_bytes,
                "created_by": self.created_by, "created_at": self.created_at}

    def input_json(self) -> dict:
        return {"id": self.id, "filename": self.filename, "mime_type": self.mime_type,
                "size_bytes": self.size_bytes}


def _not_found(what: str) -> _HttpError:
    return _HttpError(_error(404, "NotFound", f"{what} not found"))


def _unauthorized(message: str) -> _HttpError:
    return _HttpError(_error(401, "Auth", message))


def _forbidden(what: str) -> _HttpError:
    return _HttpError(_error(403, "Forbidden", what))


def _bad_request(message: str) -> _HttpError:
    return _HttpError(_error(400, "BadRequest", message))


def _save_stream(root: Path, chunks: Iterable[bytes], limit: int) -> tuple[Path, int]:
    """Write chunks to a new file under root; 400 (and nothing left behind) past `limit` bytes."""
    path = root / uuid.uuid4().hex
    size = 0
    try:
        with open(path, "wb") as out:
            for chunk in chunks:
                size += len(chunk)
                if size > limit:
                    raise _bad_request(f"file larger than the {limit} byte limit")
                out.write(chunk)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path, size


def _heartbeat_problem(status: str, load: int, capacity: int | None) -> str | None:
    if status not in _HEARTBEAT_STATUSES:
        return f"unknown status {status!r}"
    if load < 0 or (capacity is not None and (capacity <= 0 or load > capacity)):
        return "need capacity > 0 and 0 <= current_load <= capacity"
    return None


class _Store:
    """Services, tasks, files and events behind one lock; the protocol's semantics live here."""

    def __init__(self, files_dir: Path, heartbeat_timeout: float, max_retries: int):
        self.lock = threading.RLock()
        self.files_dir = files_dir
        self.heartbeat_timeout = heartbeat_timeout
        self.max_retries = max_retries
        self.services: dict[str, _Service] = {}
        self.tokens: dict[str, str] = {}   # unused registration token -> service id
        self.tasks: dict[str, _Task] = {}
        self.files: dict[str, _File] = {}
        self.uploading: dict[str, object] = {}  # task id -> ticket of its latest upload still running
        self.events: list[dict] = []
        self._seq = 0
        self._secret = secrets.token_bytes(32)  # keys are kept as an HMAC, like the real server

    def _hash(self, key: str) -> bytes:
        return hmac.new(self._secret, key.encode("utf-8", errors="replace"), hashlib.sha256).digest()

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _event(self, kind: str, **details: Any) -> None:
        self.events.append({"type": kind, "time": time.monotonic(), **details})

    # ---- services

    def create_service(self, name: str, description: str = "", usage: str = "", id: str | None = None,
                       is_public: bool = False) -> dict:
        with self.lock:
            sid = id or str(uuid.uuid4())
            if sid in self.services:
                raise _HttpError(_error(409, "Conflict", "service id already exists"))
            token = "rt_" + secrets.token_hex(16)
            svc = _Service(sid, name, description, usage, is_public, token)
            self.services[sid] = svc
            self.tokens[token] = sid
            return {**svc.to_json(), "registration_token": token}

    def delete_service(self, sid: str, force: bool) -> None:
        with self.lock:
            svc = self.services.get(sid)
            if svc is None:
                raise _not_found("service")
            if not force and any(t.service_id == sid and t.status not in _TERMINAL for t in self.tasks.values()):
                raise _HttpError(_error(409, "Conflict", "service has active tasks; use force=true"))
            del self.services[sid]
            if svc.token:
                self.tokens.pop(svc.token, None)

    def revoke_service(self, sid: str) -> None:
        with self.lock:
            self.services[sid].revoked = True

    def register(self, token: str, capacity: int) -> dict:
        with self.lock:
            sid = self.tokens.get(token)
            if sid is None or sid not in self.services:
                raise _not_found("registration token")  # unknown and already used look the same
            svc = self.services[sid]
            if svc.revoked:
                raise _forbidden("service revoked")
            del self.tokens[token]
            svc.token = None
            api_key = "ak_agent_" + secrets.token_hex(16)
            svc.key_hash = self._hash(api_key)
            svc.capacity = capacity
            self._touch(svc, "online")
            return {"service_id": svc.id, "name": svc.name, "api_key": api_key, "status": "online",
                    "created_at": svc.created_at}

    def authenticate(self, header_sid: str | None, key: str | None) -> _Service:
        if not key:
            raise _unauthorized("missing or empty API key")
        with self.lock:
            svc = self.services.get(header_sid or "")
            if svc is None or svc.revoked:
                raise _unauthorized("unknown service")
            if svc.key_hash is None:  # observed: 401 (older servers answered 500)
                raise _unauthorized("service not registered")
            if not hmac.compare_digest(svc.key_hash, self._hash(key)):
                raise _unauthorized("invalid API key")
            return svc

    def _touch(self, svc: _Service, status: str) -> None:
        svc.status = status
        svc.last_heartbeat = time.monotonic()
        svc.last_heartbeat_at = _now_iso()

    def heartbeat(self, svc: _Service, status: str, load: int, capacity: int | None) -> dict:
        problem = _heartbeat_problem(status, load, capacity)
        with self.lock:
            if problem:  # observed: refused, yet still a sign of life
                self._touch(svc, "online" if svc.status == "offline" else svc.status)
                raise _bad_request(problem)
            svc.current_load = load  # observed: without a capacity, not checked against the stored one
            if capacity is not None:
                svc.capacity = capacity
            self._touch(svc, status)
        return {"acknowledged": True, "service_id": svc.id, "timestamp": _now_iso()}

    # ---- tasks, agent side

    def _service_tasks(self, sid: str, status: str) -> list[_Task]:
        return sorted((t for t in self.tasks.values() if t.service_id == sid and t.status == status),
                      key=lambda t: t.seq)

    def poll(self, svc: _Service) -> dict:
        with self.lock:
            cancelling = self._service_tasks(svc.id, "cancelling")
            if cancelling:  # a pending cancel blocks all new work until completed
                return {"has_task": False, "task": None, "should_cancel": True,
                        "cancel_task_id": cancelling[0].id}
            pending = self._service_tasks(svc.id, "pending")
            task = self._offer(pending[0]) if pending else None
            return {"has_task": task is not None, "task": task, "should_cancel": False, "cancel_task_id": None}

    def _offer(self, task: _Task) -> dict:
        if task.raw is not None:
            return copy.deepcopy(task.raw)
        inputs = [f.input_json() for f in self.files.values() if f.task_id == task.id and f.created_by == "client"]
        return {"id": task.id, "task_prompt": task.task_prompt, "output_prompt": task.output_prompt,
                "session_id": task.session_id, "input_files": inputs}

    def accept(self, svc: _Service, task_id: str) -> dict:
        with self.lock:
            task = self.tasks.get(task_id)
            if task is None or task.service_id != svc.id or task.status != "pending":
                raise _bad_request("task not available")  # 400, not 409: the server's quirk
            task.status = "running"
            task.assigned_at = task.started_at = _now_iso()
            return {"success": True, "task_id": task.id, "message": "task accepted"}

    def complete(self, svc: _Service, task_id: str, status: str, output: Any, error_message: str | None,
                 file_ids: list[str]) -> dict:
        with self.lock:
            task = self.tasks.get(task_id)
            if task is None or task.service_id != svc.id or task.status not in ("running", "cancelling"):
                raise _bad_request("Task not found or invalid status transition")
            if file_ids:
                if isinstance(output, dict):
                    output = {**output, "file_ids": list(file_ids)}
                elif output is None:
                    output = {"file_ids": list(file_ids)}
            task.status, task.output, task.error_message = status, output, error_message
            task.completed_at = _now_iso()
            return {"success": True, "task_id": task.id, "status": status}

    def task_for_upload(self, svc: _Service, task_id: str) -> _Task:
        with self.lock:
            task = self.tasks.get(task_id)
            if task is None:
                raise _not_found("task")
            if task.service_id != svc.id:
                raise _forbidden("task belongs to another service")
            return task  # status deliberately not checked (uploads after a requeue succeed)

    def begin_upload(self, task_id: str) -> object:
        """Empty the task's temporary upload folder (as each real upload does); returns a ticket.

        An upload of the same task still running then loses its file: `end_upload` says so.
        """
        with self.lock:
            ticket = object()
            self.uploading[task_id] = ticket
            return ticket

    def end_upload(self, task_id: str, ticket: object) -> bool:
        """False when a later upload to the task started meanwhile. Safe to call twice."""
        with self.lock:
            if self.uploading.get(task_id) is not ticket:
                return False
            del self.uploading[task_id]
            return True

    def file_for_agent(self, svc: _Service, file_id: str) -> _File:
        with self.lock:
            rec = self.files.get(file_id)
            if rec is None:
                raise _not_found("file")
            task = self.tasks.get(rec.task_id)
            if svc.id not in rec.granted and (task is None or task.service_id != svc.id):
                raise _forbidden("file belongs to another service")
            return rec

    # ---- tasks and files, client side

    def add_file(self, task_id: str, filename: str, mime_type: str | None, size: int, created_by: str,
                 path: Path, file_id: str | None = None) -> _File:
        with self.lock:
            rec = _File(file_id or str(uuid.uuid4()), task_id, filename, mime_type, size, created_by, path)
            self.files[rec.id] = rec
            return rec

    def submit_task(self, service_id: str, prompt: str, output_prompt: str | None, session_id: str | None,
                    uploads: list[tuple[str, str | None, int, Path]]) -> dict:
        with self.lock:
            if service_id not in self.services:
                raise _not_found("service")
            task = _Task(str(uuid.uuid4()), service_id, self._next_seq(), prompt, output_prompt, session_id)
            self.tasks[task.id] = task
            for filename, mime, size, path in uploads:
                self.add_file(task.id, filename, mime, size, "client", path)
            return task.to_json()

    def get_task(self, task_id: str) -> dict:
        with self.lock:
            task = self.tasks.get(task_id)
            if task is None:
                raise _not_found("task")
            return task.to_json()

    def cancel_task(self, task_id: str) -> dict:
        with self.lock:
            task = self.tasks.get(task_id)
            if task is None:
                raise _not_found("task")
            if task.status in _TERMINAL:
                raise _bad_request(f"task already {task.status}")
            if task.status == "pending":
                task.status, task.completed_at = "cancelled", _now_iso()
            elif task.status == "running":
                task.status = "cancelling"  # the agent learns it through poll
            return task.to_json()

    def list_files(self, task_id: str) -> list[dict]:
        with self.lock:
            if task_id not in self.tasks:
                raise _not_found("task")
            return [f.to_json() for f in self.files.values() if f.task_id == task_id]

    def get_file(self, file_id: str) -> _File:
        with self.lock:
            rec = self.files.get(file_id)
            if rec is None:
                raise _not_found("file")
            return rec

    # ---- test hooks

    def put_task(self, task: _Task) -> None:
        with self.lock:
            task.seq = self._next_seq()
            self.tasks[task.id] = task

    def set_cancelling(self, service_id: str, task_id: str) -> None:
        with self.lock:
            task = self.tasks.get(task_id)
            if task is None:
                task = _Task(task_id, service_id, self._next_seq())
                self.tasks[task_id] = task
            task.service_id, task.status = service_id, "cancelling"

    # ---- sweeper

    def sweep(self, now: float | None = None) -> None:
        """Mark silent services offline; requeue (or fail) their running tasks, cancel the cancelling."""
        now = time.monotonic() if now is None else now
        with self.lock:
            for svc in self.services.values():
                silent = svc.last_heartbeat is not None and now - svc.last_heartbeat > self.heartbeat_timeout
                if svc.status not in ("online", "busy") or not silent:
                    continue
                svc.status = "offline"
                self._event("offline", service_id=svc.id)
                for task in self.tasks.values():
                    if task.service_id == svc.id:
                        self._release(task)

    def _release(self, task: _Task) -> None:
        if task.status == "running" and task.retry_count < self.max_retries:
            task.status = "pending"
            task.retry_count += 1
            self._event("requeue", task_id=task.id, service_id=task.service_id, retry_count=task.retry_count)
        elif task.status == "running":
            task.status, task.completed_at = "failed", _now_iso()
            task.error_message = "agent went offline too many times"
            self._event("retries_exhausted", task_id=task.id, service_id=task.service_id)
        elif task.status == "cancelling":
            task.status, task.completed_at = "cancelled", _now_iso()
            self._event("cancelled", task_id=task.id, service_id=task.service_id)


# --------------------------------------------------------------------------- knobs


class _Rule:
    def __init__(self, remaining: int, path_contains: str | None, response: Callable[[], _Response] | None,
                 delay: float = 0.0, rate: float = 0.0):
        self.remaining = remaining
        self.path_contains = path_contains
        self.response = response
        self.delay = delay
        self.rate = rate  # bytes per second a request body is read at

    def matches(self, path: str, is_agent: bool) -> bool:
        if self.remaining <= 0:
            return False
        return is_agent if self.path_contains is None else self.path_contains in path


class Faults:
    """Fault injection, all off by default and thread-safe.

    Counted rules (`fail_next`, `garbage_next`, `drop_next`, `delay_next`) apply to
    agent routes (register, /api/v1/agent/..., /api/v1/files/agent/...) or, with
    `path_contains`, to any request whose path contains that string; `slow_upload_next`
    to uploads by default. Rules fire in the order they were added. Faulted requests
    do not count towards the rate limit.
    """

    def __init__(self, store: _Store):
        self._store = store
        self._lock = threading.Lock()
        self._rules: list[_Rule] = []
        self._delays: list[_Rule] = []
        self._slow: list[_Rule] = []
        self._slow_downloads: list[_Rule] = []
        self._ratio = 0.0
        self._ratio_statuses: tuple[int, ...] = ()
        self._ratio_delay = 0.0
        self._random = random.Random()
        self._endless: set[str] = set()

    def fail_next(self, n: int, status: int = 503, retry_after: float | None = None,
                  path_contains: str | None = None) -> None:
        headers = {} if retry_after is None else {"Retry-After": _retry_after_value(retry_after)}
        self._add(self._rules, _Rule(n, path_contains, lambda: _error(status, "Injected", "injected fault",
                                                                        dict(headers))))

    def fail_ratio(self, p: float, statuses: tuple[int, ...] = (500, 429), delay_secs: float = 0.0,
                   seed: int | None = None) -> None:
        """Fail a random share `p` of agent requests (0 turns it off); 429s carry Retry-After: 1."""
        with self._lock:
            self._ratio, self._ratio_statuses, self._ratio_delay = p, tuple(statuses), delay_secs
            self._random = random.Random(seed)

    def delay_next(self, n: int, secs: float, path_contains: str | None = None) -> None:
        """Hold the next n requests for `secs` before handling them normally."""
        self._add(self._delays, _Rule(n, path_contains, None, delay=secs))

    def slow_upload_next(self, n: int, bytes_per_sec: float, path_contains: str | None = "/files/upload") -> None:
        """Read the bodies of the next n matching requests (default: agent uploads) at about
        `bytes_per_sec`, so they can run past the request timeout."""
        if bytes_per_sec <= 0:
            raise ValueError("bytes_per_sec must be positive")
        self._add(self._slow, _Rule(n, path_contains, None, rate=bytes_per_sec))

    def slow_download_next(self, n: int, bytes_per_sec: float) -> None:
        """Send the next n agent downloads at about `bytes_per_sec` (a slow link)."""
        if bytes_per_sec <= 0:
            raise ValueError("bytes_per_sec must be positive")
        self._add(self._slow_downloads, _Rule(n, "/download", None, rate=bytes_per_sec))

    def garbage_next(self, n: int, path_contains: str | None = None) -> None:
        """Answer 200 with a body that is not JSON (but claims to be)."""
        self._add(self._rules, _Rule(n, path_contains, lambda: _Response(200, b'{"has_task": tru<html>oops')))

    def drop_next(self, n: int, path_contains: str | None = None) -> None:
        """Read the request, then close the connection without an answer."""
        self._add(self._rules, _Rule(n, path_contains, lambda: _Response(0, drop=True)))

    def offer_raw_task(self, service_id: str, task: dict, files: dict[str, bytes] | None = None) -> str:
        """Make poll offer `task` verbatim (hostile ids, names, lying sizes). Returns the store key.

        Accept/complete then work on it like on any task. `files` maps input file ids
        to bytes to store under exactly those ids; input ids that name already stored
        files become downloadable by this service. Offering an id again resets it to pending.
        """
        raw_id = task.get("id")
        key = raw_id if isinstance(raw_id, str) else json.dumps(raw_id)
        names = {f.get("id"): f.get("filename") for f in task.get("input_files") or []
                 if isinstance(f, dict) and isinstance(f.get("id"), str)}
        for file_id, data in (files or {}).items():
            path, size = _save_stream(self._store.files_dir, [data], len(data))
            name = names.get(file_id)
            self._store.add_file(key, name if isinstance(name, str) else "raw", None, size, "client", path,
                                 file_id=file_id)
        with self._store.lock:
            for file_id in names:
                if file_id in self._store.files:
                    self._store.files[file_id].granted.add(service_id)
            self._store.put_task(_Task(key, service_id, 0, raw=copy.deepcopy(task),
                                       task_prompt=str(task.get("task_prompt", ""))))
        return key

    def endless_download(self, file_id: str) -> None:
        """Downloads of `file_id` (agent route) stream bytes until the client hangs up."""
        with self._lock:
            self._endless.add(file_id)

    def cancel_unknown(self, service_id: str, task_id: str) -> None:
        """Poll answers should_cancel for `task_id` (never offered) until complete is sent for it."""
        self._store.set_cancelling(service_id, task_id)

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()
            self._delays.clear()
            self._slow.clear()
            self._slow_downloads.clear()
            self._ratio = 0.0
            self._endless.clear()

    # ---- used by the app

    def _add(self, rules: list[_Rule], rule: _Rule) -> None:
        with self._lock:
            rules.append(rule)

    def _is_endless(self, file_id: str) -> bool:
        with self._lock:
            return file_id in self._endless

    def _body_rate(self, path: str, is_agent: bool, rules: list[_Rule] | None = None) -> float | None:
        """The bytes per second to read this request's body (or send a download) at, if slowed."""
        with self._lock:
            for rule in self._slow if rules is None else rules:
                if rule.matches(path, is_agent):
                    rule.remaining -= 1
                    return rule.rate
            return None

    def _pick(self, path: str, is_agent: bool) -> tuple[float, _Response | None]:
        """The delay to apply and the fault response to send instead of handling, if any."""
        with self._lock:
            delay = 0.0
            for rule in self._delays:
                if rule.matches(path, is_agent):
                    rule.remaining -= 1
                    delay = rule.delay
                    break
            for rule in self._rules:
                if rule.matches(path, is_agent):
                    rule.remaining -= 1
                    return delay, rule.response()
            if is_agent and self._ratio > 0 and self._random.random() < self._ratio:
                status = self._random.choice(self._ratio_statuses)
                headers = {"Retry-After": "1"} if status == 429 else {}
                return delay + self._ratio_delay, _error(status, "Injected", "injected random fault", headers)
            return delay, None


def _retry_after_value(secs: float) -> str:
    return str(max(1, math.ceil(secs)))


class _RateLimiter:
    """Sliding window per key: at most `limit` requests let through in any `window` seconds.

    Only requests let through are counted (observed): refusals do not extend the window.
    """

    def __init__(self, limit: int, window: float):
        self.limit, self.window = limit, window
        self._lock = threading.Lock()
        self._hits: dict[str, deque[float]] = {}

    def allow(self, key: str) -> bool:
        if self.limit <= 0:
            return True
        now = time.monotonic()
        with self._lock:
            hits = self._hits.setdefault(key, deque())
            while hits and hits[0] <= now - self.window:
                hits.popleft()
            if len(hits) >= self.limit:
                return False
            hits.append(now)
            return True


class Call(NamedTuple):
    method: str
    path: str
    status: int | None   # None: the connection was dropped without an answer
    time: float          # time.monotonic() when the request arrived
    body: Any            # parsed JSON body, a multipart summary, or None


# --------------------------------------------------------------------------- routing

_SEG = r"(?P<{}>[^/]+)"
_AGENT, _REGISTER, _ADMIN, _PUBLIC = "agent", "register", "admin", "public"
_AGENT_PREFIXES = ("/api/v1/agent/", "/api/v1/files/agent/")


@dataclass(frozen=True)
class _Route:
    method: str
    pattern: re.Pattern
    kind: str
    handler: str  # name of an `_App` method


def _route(method: str, template: str, kind: str, handler: str) -> _Route:
    regex = re.sub(r"\{(\w+)\}", lambda m: _SEG.format(m.group(1)), template)
    return _Route(method, re.compile(regex + r"\Z"), kind, handler)


_ROUTES = [
    _route("GET", "/health", _PUBLIC, "health"),
    _route("POST", "/api/v1/agent/register", _REGISTER, "register"),
    _route("POST", "/api/v1/agent/{sid}/poll", _AGENT, "poll"),
    _route("POST", "/api/v1/agent/{sid}/accept", _AGENT, "accept"),
    _route("POST", "/api/v1/agent/{sid}/complete", _AGENT, "complete"),
    _route("POST", "/api/v1/agent/{sid}/heartbeat", _AGENT, "heartbeat"),
    _route("GET", "/api/v1/files/agent/{sid}/files/{file_id}/download", _AGENT, "agent_download"),
    _route("POST", "/api/v1/files/agent/{sid}/files/upload", _AGENT, "agent_upload"),
    _route("POST", "/api/v1/services", _ADMIN, "create_service"),
    _route("DELETE", "/api/v1/services/{id}", _ADMIN, "delete_service"),
    _route("POST", "/api/v1/client/tasks", _ADMIN, "submit_task"),
    _route("GET", "/api/v1/client/tasks/{id}", _ADMIN, "get_task"),
    _route("POST", "/api/v1/client/tasks/{id}/cancel", _ADMIN, "cancel_task"),
    _route("GET", "/api/v1/client/files/list/{task_id}", _ADMIN, "list_files"),
    _route("GET", "/api/v1/client/files/{id}/download", _ADMIN, "client_download"),
]

_STR, _INT, _BOOL = (str,), (int,), (bool,)
_OPT_STR = (str, type(None))
_REGISTER_SCHEMA = {"registration_token": (_STR, True), "capacity": (_INT, False)}
_ACCEPT_SCHEMA = {"task_id": (_STR, True)}
_COMPLETE_SCHEMA = {"task_id": (_STR, True), "status": (_STR, True), "output": ((_ANY,), False),
                    "error_message": (_STR, False), "file_ids": ((list,), False)}
_HEARTBEAT_SCHEMA = {"status": (_STR, True), "current_load": (_INT, True), "capacity": (_INT, False),
                     "available_capacity": (_INT, False)}
_SERVICE_SCHEMA = {"name": (_STR, True), "description": (_STR, False), "usage": (_STR, False),
                   "id": (_STR, False), "is_public": (_BOOL, False)}
_TASK_SCHEMA = {"service_id": (_STR, True), "task_prompt": (_STR, True), "output_prompt": (_STR, False),
                "session_id": (_STR, False)}


def _bearer(headers) -> str | None:
    value = headers.get("Authorization") or ""
    return value[7:].strip() if value[:7].lower() == "bearer " else None


def _agent_key(headers) -> str | None:
    # X-API-Key wins even when empty (then it is a 401); the Bearer token is only a fallback
    key = headers.get("X-API-Key")
    return key if key is not None else _bearer(headers)


def _content_disposition(filename: str) -> str:
    plain = "".join(c if 32 <= ord(c) < 127 and c not in '"\\' else "_" for c in filename)
    encoded = quote(filename.encode("utf-8", errors="replace"), safe="")
    return f"attachment; filename=\"{plain}\"; filename*=UTF-8''{encoded}"


def _accepts_gzip(headers) -> bool:
    for item in (headers.get("Accept-Encoding") or "").split(","):
        coding, _, params = item.partition(";")
        if coding.strip().lower() == "gzip":
            return not re.fullmatch(r"\s*q\s*=\s*0(\.0*)?\s*", params, re.IGNORECASE)
    return False


def _gzip(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Compress a stream as it goes: memory stays constant whatever the size."""
    packer = zlib.compressobj(_GZIP_LEVEL, zlib.DEFLATED, 16 + zlib.MAX_WBITS)  # 16+: gzip framing
    try:
        for chunk in chunks:
            if packed := packer.compress(chunk):
                yield packed
        yield packer.flush()
    finally:
        chunks.close()


def _file_response(rec: _File, request_headers, rate: float | None = None) -> _Response:
    """A download as the real server sends it (observed): chunked, no Content-Length, gzip if accepted.
    `rate` (bytes per second) slows it down, as Faults.slow_download_next asks."""
    piece = max(1, min(_CHUNK, int(rate / 10))) if rate else _CHUNK

    def stream() -> Iterator[bytes]:
        with open(rec.path, "rb") as src:
            while chunk := src.read(piece):
                if rate:
                    time.sleep(len(chunk) / rate)
                yield chunk
    headers = {"Content-Disposition": _content_disposition(rec.filename), "Vary": "accept-encoding"}
    body = stream()
    if _accepts_gzip(request_headers):
        headers["Content-Encoding"] = "gzip"
        body = _gzip(body)
    return _Response(200, content_type=rec.mime_type or "application/octet-stream", headers=headers, stream=body)


def _endless_stream(closing: threading.Event) -> Iterator[bytes]:
    chunk = b"\0" * 65536
    while not closing.is_set():
        yield chunk


def _client_filename_ok(name: str | None) -> bool:
    return bool(name) and not any(bad in name for bad in ("..", "/", "\\", "\0"))


class _App:
    """Maps requests to store operations: faults, rate limit, auth, body shapes, call log."""

    def __init__(self, store: _Store, faults: Faults, limiter: _RateLimiter, admin_key: str, max_file_bytes: int,
                 request_timeout: float):
        self.store = store
        self.faults = faults
        self.limiter = limiter
        self.admin_key = admin_key
        self.max_file_bytes = max_file_bytes
        self.request_timeout = request_timeout  # seconds a request body may take; 0 = no limit
        self.log_lock = threading.Lock()
        self.calls: list[Call] = []
        self.stats: Counter[str] = Counter()
        self.errors: list[str] = []

    def record_call(self, call: Call) -> None:
        with self.log_lock:
            self.calls.append(call)
            if call.status == 429:
                self.stats["429"] += 1

    def record_error(self, text: str) -> None:
        with self.log_lock:
            self.errors.append(text)

    def count(self, stat: str) -> None:
        with self.log_lock:
            self.stats[stat] += 1

    def handle(self, req: _Request) -> _Response:
        is_agent = req.path.startswith(_AGENT_PREFIXES)
        delay, fault = self.faults._pick(req.path, is_agent)
        if delay:
            self.count("delayed")
            if req.closing.wait(delay):  # went down meanwhile: a real server would not answer
                return _Response(0, drop=True)
        if fault is not None:
            self.count("faults")
            return fault
        if rate := self.faults._body_rate(req.path, is_agent):
            req.body.throttle(rate)
        route, params = self._match(req)
        if route.kind == _AGENT:
            key = _agent_key(req.headers)
            if not self.limiter.allow(key or ""):  # before auth: bad keys fill a window too
                self.count("rate_limited")
                return _error(429, "RateLimited", "too many requests", {"Retry-After": _RETRY_AFTER})
            svc = self.store.authenticate(req.headers.get("X-Service-ID"), key)
            if params.pop("sid") != svc.id:
                raise _forbidden("service id in path does not match X-Service-ID")
            return getattr(self, route.handler)(req, svc, **params)
        if route.kind == _ADMIN:
            key = _bearer(req.headers)
            if not key or not hmac.compare_digest(key.encode(), self.admin_key.encode()):
                raise _unauthorized("admin key required")
        return getattr(self, route.handler)(req, **params)

    def _match(self, req: _Request) -> tuple[_Route, dict[str, str]]:
        allowed = False
        for route in _ROUTES:
            match = route.pattern.match(req.path)
            if match:
                if route.method == req.method:
                    return route, {k: unquote(v) for k, v in match.groupdict().items()}
                allowed = True
        if allowed:
            raise _HttpError(_error(405, "MethodNotAllowed", "method not allowed"))
        raise _not_found("route")

    # ---- public and agent routes

    def health(self, req: _Request) -> _Response:
        return _json(200, {"status": "healthy"})

    def register(self, req: _Request) -> _Response:
        try:
            body = _json_body(req, _REGISTER_SCHEMA)
        except _HttpError as exc:  # any malformed register body is a 400
            raise _HttpError(_text(400, exc.response.body.decode())) from None
        return _json(200, self.store.register(body["registration_token"], body.get("capacity") or 1))

    def poll(self, req: _Request, svc: _Service) -> _Response:
        return _json(200, self.store.poll(svc))  # the body is ignored, as on the real server

    def accept(self, req: _Request, svc: _Service) -> _Response:
        body = _json_body(req, _ACCEPT_SCHEMA)
        return _json(200, self.store.accept(svc, body["task_id"]))

    def complete(self, req: _Request, svc: _Service) -> _Response:
        body = _json_body(req, _COMPLETE_SCHEMA)
        file_ids = body.get("file_ids") or []
        if body["status"] not in _TERMINAL or not all(isinstance(f, str) for f in file_ids):
            raise _HttpError(_text(422, "Failed to deserialize the JSON body into the target type: "
                                       "bad status or file_ids"))
        return _json(200, self.store.complete(svc, body["task_id"], body["status"], body.get("output"),
                                              body.get("error_message"), file_ids))

    def heartbeat(self, req: _Request, svc: _Service) -> _Response:
        body = _json_body(req, _HEARTBEAT_SCHEMA)
        return _json(200, self.store.heartbeat(svc, body["status"], body["current_load"], body.get("capacity")))

    def agent_download(self, req: _Request, svc: _Service, file_id: str) -> _Response:
        if self.faults._is_endless(file_id):
            return _Response(200, content_type="application/octet-stream", stream=_endless_stream(req.closing),
                             headers={"Content-Disposition": _content_disposition("endless.bin")}, chunked=False)
        rate = self.faults._body_rate(req.path, True, self.faults._slow_downloads)
        return _file_response(self.store.file_for_agent(svc, file_id), req.headers, rate)

    def agent_upload(self, req: _Request, svc: _Service) -> _Response:
        task: _Task | None = None
        ticket: object = None
        saved: tuple[str, str | None, int, Path] | None = None
        summary: dict[str, Any] = {"fields": {}, "files": []}
        req.record = summary
        try:
            for part in _multipart(req):
                if part.name == "task_id":
                    summary["fields"]["task_id"] = task_id = part.text()
                    task = self.store.task_for_upload(svc, task_id)
                    ticket = self.store.begin_upload(task.id)
                    self.count("uploads")
                elif part.name == "file":
                    if task is None:
                        raise _bad_request("the task_id part must precede the file part")
                    if saved is not None:
                        raise _bad_request("one file per request")
                    saved = self._save_part(part, summary)
                else:
                    part.text()  # unknown fields are skipped
            if task is None or saved is None:
                raise _bad_request("need a task_id part and a file part")
            if not self.store.end_upload(task.id, ticket):
                raise _HttpError(_error(500, "Internal", "temporary upload file vanished (overlapping upload)"))
        except BaseException:
            if task is not None:
                self.store.end_upload(task.id, ticket)
            if saved is not None:
                saved[3].unlink(missing_ok=True)
            raise
        filename, mime, size, path = saved
        rec = self.store.add_file(task.id, filename, mime, size, "agent", path)
        return _json(200, {"file_id": rec.id, "filename": rec.filename, "mime_type": rec.mime_type,
                           "size_bytes": rec.size_bytes, "created_at": rec.created_at})

    def _save_part(self, part: _Part, summary: dict) -> tuple[str, str | None, int, Path]:
        filename = part.filename
        if not filename or "\0" in filename:
            raise _bad_request("the file part needs a filename")
        mime = part.content_type if part.content_type and part.content_type != "application/octet-stream" \
            else mimetypes.guess_type(filename)[0]
        path, size = _save_stream(self.store.files_dir, part.chunks(), self.max_file_bytes)
        summary["files"].append({"name": part.name, "filename": filename, "size_bytes": size})
        return filename, mime, size, path

    # ---- admin and client routes

    def create_service(self, req: _Request) -> _Response:
        body = _json_body(req, _SERVICE_SCHEMA)
        return _json(201, self.store.create_service(body["name"], body.get("description") or "",
                                                    body.get("usage") or "", body.get("id"),
                                                    bool(body.get("is_public"))))

    def delete_service(self, req: _Request, id: str) -> _Response:
        self.store.delete_service(id, force=req.query.get("force", ["false"])[0].lower() == "true")
        return _json(200, {"success": True, "id": id})

    def submit_task(self, req: _Request) -> _Response:
        if not req.is_multipart:
            body = _json_body(req, _TASK_SCHEMA)
            return _json(201, self.store.submit_task(body["service_id"], body["task_prompt"],
                                                     body.get("output_prompt"), body.get("session_id"), []))
        fields: dict[str, str] = {}
        uploads: list[tuple[str, str | None, int, Path]] = []
        summary = {"fields": fields, "files": []}
        req.record = summary
        try:
            for part in _multipart(req):
                if part.name == "files":
                    if not _client_filename_ok(part.filename):
                        raise _bad_request("invalid filename")
                    uploads.append(self._save_part(part, summary))
                else:
                    fields[part.name or ""] = part.text()
            if not fields.get("service_id") or "task_prompt" not in fields:
                raise _bad_request("service_id and task_prompt are required")
            return _json(201, self.store.submit_task(fields["service_id"], fields["task_prompt"],
                                                     fields.get("output_prompt"), fields.get("session_id"),
                                                     uploads))
        except BaseException:
            for upload in uploads:
                upload[3].unlink(missing_ok=True)
            raise

    def get_task(self, req: _Request, id: str) -> _Response:
        return _json(200, self.store.get_task(id))

    def cancel_task(self, req: _Request, id: str) -> _Response:
        return _json(200, self.store.cancel_task(id))

    def list_files(self, req: _Request, task_id: str) -> _Response:
        return _json(200, {"files": self.store.list_files(task_id)})

    def client_download(self, req: _Request, id: str) -> _Response:
        return _file_response(self.store.get_file(id), req.headers)


# --------------------------------------------------------------------------- HTTP plumbing


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the agent's pooled httpx client expects
    server_version = "openaaas-devserver"
    sys_version = ""
    disable_nagle_algorithm = True  # headers and body go out in separate writes: avoid 40 ms stalls
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        pass  # no stderr access log: tests and the demo stay quiet

    def do_GET(self) -> None:
        self._serve()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_GET

    def _serve(self) -> None:
        app = self.server.app
        started = time.monotonic()
        path, _, query = self.path.partition("?")
        deadline = started + app.request_timeout if app.request_timeout > 0 else None
        req: _Request | None = None
        try:
            body = _Body(self.rfile, self.headers, self.connection, deadline)
            req = _Request(self.command, path, parse_qs(query), self.headers, body, self.server.closing)
            if not req.is_multipart:
                req.data = req.body.read_all(_MAX_SMALL_BODY)
                req.record = _maybe_json(req.data)
            resp = app.handle(req)
        except _HttpError as exc:
            resp = exc.response
        except ConnectionError:  # the client went away mid-request: nobody to answer
            resp = _Response(0, drop=True)
        except Exception:
            app.record_error(traceback.format_exc())
            resp = _error(500, "Internal", "dev server bug (see DevServer.errors)")
        if not resp.drop and (req is None or not req.body.done):
            # answered before the body was read (observed): close rather than drain the rest
            resp.headers["Connection"] = "close"

        def record(status: int | None) -> None:
            app.record_call(Call(self.command, path, status, started, req.record if req else None))

        if resp.drop:
            self.close_connection = True
            record(None)
            return
        self._send(resp, record)

    def _send(self, resp: _Response, record: Callable[[int | None], None]) -> None:
        recorded = False
        try:
            self.send_response(resp.status)
            for name, value in resp.headers.items():
                self.send_header(name, value)
            if resp.content_type:
                self.send_header("Content-Type", resp.content_type)
            if resp.stream is None:
                self.send_header("Content-Length", str(len(resp.body)))
            elif resp.chunked:
                self.send_header("Transfer-Encoding", "chunked")
            else:
                self.send_header("Connection", "close")
            self.end_headers()
            record(resp.status)  # before the body: an endless stream is visible while it runs
            recorded = True
            if resp.stream is None:
                self.wfile.write(resp.body)
            else:
                self._write_stream(resp)
        except OSError:
            self.close_connection = True
        finally:
            if not recorded:
                record(resp.status)
            if resp.stream is not None:
                resp.stream.close()

    def _write_stream(self, resp: _Response) -> None:
        for chunk in resp.stream:
            if not resp.chunked:
                self.wfile.write(chunk)
            elif chunk:  # an empty chunk would end the body
                self.wfile.write(b"%x\r\n" % len(chunk))
                self.wfile.write(chunk)
                self.wfile.write(b"\r\n")
        if resp.chunked:
            self.wfile.write(b"0\r\n\r\n")


def _maybe_json(data: bytes) -> Any:
    if not data:
        return None
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None


class _HTTPServer(ThreadingHTTPServer):
    """One listening generation; tracks its connections so going down can sever them."""

    daemon_threads = False  # joined in server_close(): stop() leaves no thread behind
    block_on_close = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], app: _App):
        self.app = app
        self.closing = threading.Event()
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # skip HTTPServer's getfqdn(), which can stall on a DNS lookup
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def process_request(self, request, client_address) -> None:
        with self._conns_lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request) -> None:
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def sever_connections(self) -> None:
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], OSError):  # resets and broken pipes are the client's business
            self.app.record_error(traceback.format_exc())


# --------------------------------------------------------------------------- the server


class DevServer:
    """The local OpenAaaS server. `start()` it (or use `with`), point clients at `.url`.

    `rate_limit_per_minute` is the number of agent requests allowed per key in any
    `rate_window_secs` window (60 by default, hence the name); 0 turns the limit off.
    `request_timeout_secs` bounds how long a request body (an upload) may take; 0 = no bound.
    While the server is down (`go_down`) the sweeper pauses, and after `come_up` the
    first sweep comes a full `sweep_interval_secs` later, as with a restarted process.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, data_dir: Path | str | None = None,
                 admin_key: str | None = None, rate_limit_per_minute: int = 150, rate_window_secs: float = 60,
                 heartbeat_timeout_secs: float = 60, sweep_interval_secs: float = 10,
                 max_file_bytes: int = 50 * 1024 ** 2, max_retries: int = 3, request_timeout_secs: float = 30):
        self.host = host
        self._port = port
        self._tmp: tempfile.TemporaryDirectory | None = None
        if data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="devserver-")
            data_dir = self._tmp.name
        self.data_dir = Path(data_dir)
        files_dir = self.data_dir / "files"
        files_dir.mkdir(parents=True, exist_ok=True)
        self.admin_key = admin_key or "admin_" + secrets.token_hex(16)
        self.sweep_interval_secs = sweep_interval_secs
        self._store = _Store(files_dir, heartbeat_timeout_secs, max_retries)
        self.faults = Faults(self._store)
        self._app = _App(self._store, self.faults, _RateLimiter(rate_limit_per_minute, rate_window_secs),
                         self.admin_key, max_file_bytes, request_timeout_secs)
        self._life = threading.Lock()
        self._httpd: _HTTPServer | None = None
        self._serve_thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._sweeper: threading.Thread | None = None
        self._next_sweep = 0.0

    # ---- lifecycle

    def start(self) -> DevServer:
        """Listen and serve in background threads; returns once the socket is listening."""
        self.come_up()
        with self._life:
            if self._sweeper is None:
                self._stop.clear()
                self._next_sweep = time.monotonic() + self.sweep_interval_secs
                self._sweeper = threading.Thread(target=self._sweep_loop, name="devserver-sweeper", daemon=True)
                self._sweeper.start()
        return self

    def stop(self) -> None:
        """Stop serving and sweeping; joins every thread. Safe to call twice."""
        self.go_down()
        self._stop.set()
        with self._life:
            sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None:
            sweeper.join()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def go_down(self) -> None:
        """Close the listening socket and sever open connections; state is kept."""
        with self._life:
            httpd, thread = self._httpd, self._serve_thread
            self._httpd = self._serve_thread = None
        if httpd is None:
            return
        httpd.closing.set()  # ends injected delays and endless downloads
        httpd.shutdown()
        thread.join()
        httpd.sever_connections()
        httpd.server_close()  # joins the handler threads

    def come_up(self) -> None:
        """Listen again, on the same port as before."""
        with self._life:
            if self._httpd is not None:
                return
            httpd = _HTTPServer((self.host, self._port), self._app)
            self._port = httpd.server_address[1]
            thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                      name=f"devserver-{self._port}", daemon=True)
            thread.start()
            self._httpd, self._serve_thread = httpd, thread
            # a restarted server sweeps a full interval after it comes back, like a fresh process
            self._next_sweep = time.monotonic() + self.sweep_interval_secs

    def restart(self, down_for: float = 0) -> None:
        """Go down, stay down `down_for` seconds (blocking the caller), come up on the same port."""
        self.go_down()
        time.sleep(down_for)
        self.come_up()

    @property
    def is_up(self) -> bool:
        return self._httpd is not None

    def __enter__(self) -> DevServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self._port}"

    def _sweep_loop(self) -> None:
        tick = max(0.01, min(self.sweep_interval_secs, 0.1))
        while not self._stop.wait(tick):
            if self.is_up and time.monotonic() >= self._next_sweep:
                self._next_sweep = time.monotonic() + self.sweep_interval_secs
                self._store.sweep()

    # ---- what tests look at

    @property
    def calls(self) -> list[Call]:
        """Every request so far, in the order they were answered; `Call.time` is when each arrived."""
        with self._app.log_lock:
            return list(self._app.calls)

    def calls_to(self, suffix: str) -> list[Call]:
        return [c for c in self.calls if c.path.endswith(suffix)]

    @property
    def events(self) -> list[dict]:
        """Sweeper events: offline, requeue, retries_exhausted, cancelled."""
        with self._store.lock:
            return [dict(e) for e in self._store.events]

    @property
    def stats(self) -> Counter[str]:
        """Counters: "429" (all 429s sent), "rate_limited", "faults", "delayed",
        "uploads" (agent uploads that got past their task_id part)."""
        with self._app.log_lock:
            return Counter(self._app.stats)

    @property
    def errors(self) -> list[str]:
        """Tracebacks of bugs in the server itself; tests can assert it stays empty."""
        with self._app.log_lock:
            return list(self._app.errors)

    def sweep(self) -> None:
        """Run one sweep now (the sweeper thread also runs one every sweep_interval_secs)."""
        self._store.sweep()

    def get_task(self, task_id: str) -> dict:
        """The task record as the client API shows it; KeyError if unknown."""
        with self._store.lock:
            return self._store.tasks[task_id].to_json()

    def get_service(self, service_id: str) -> dict:
        """status (pending/online/busy/offline), registration_status, capacity, last_heartbeat_at, ...;
        KeyError if unknown."""
        with self._store.lock:
            return self._store.services[service_id].to_json()

    def revoke_service(self, service_id: str) -> None:
        """Revoke a service: its unused token then gives 403 on register, its key 401."""
        self._store.revoke_service(service_id)

    def add_file(self, task_id: str, filename: str, data: bytes, mime_type: str | None = None,
                 created_by: str = "client") -> str:
        """Store a file for a task directly (no HTTP); returns its id."""
        path, size = _save_stream(self._store.files_dir, [data], len(data))
        return self._store.add_file(task_id, filename, mime_type, size, created_by, path).id
