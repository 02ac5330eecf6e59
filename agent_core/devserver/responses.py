"""What the dev server answers: response shapes and the errors that carry them."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterator


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


def _not_found(what: str) -> _HttpError:
    return _HttpError(_error(404, "NotFound", f"{what} not found"))


def _unauthorized(message: str) -> _HttpError:
    return _HttpError(_error(401, "Auth", message))


def _forbidden(what: str) -> _HttpError:
    return _HttpError(_error(403, "Forbidden", what))


def _bad_request(message: str) -> _HttpError:
    return _HttpError(_error(400, "BadRequest", message))
