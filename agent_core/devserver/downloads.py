"""File downloads as the real server sends them: chunked, gzip when accepted, optionally slowed."""

from __future__ import annotations

import re
import threading
import time
import zlib
from typing import Iterator
from urllib.parse import quote

from agent_core.devserver.bodies import _CHUNK
from agent_core.devserver.responses import _Response
from agent_core.devserver.state import _File

_GZIP_LEVEL = 1      # downloads: the point is the encoding, not the ratio; level 1 keeps big files cheap


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
