"""Request bodies: streamed reads (Content-Length or chunked), multipart parsing, JSON extraction."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator
from urllib.parse import unquote

from agent_core.devserver.responses import _ClientGone, _error, _HttpError, _text, _timed_out

_CHUNK = 1024 * 1024          # read/write granularity for file bodies
_MAX_SMALL_BODY = 1024 * 1024  # JSON bodies and multipart text fields
_MAX_PART_HEADERS = 16 * 1024
_THROTTLE_STEP = 0.1  # a slowed body is read in pieces worth this many seconds


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
