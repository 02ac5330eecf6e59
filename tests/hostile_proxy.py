"""A reverse proxy on 127.0.0.1 that turns a good server into a broken or hostile one, for tests.

    proxy = HostileProxy(dev_server.url).start()    (or the `hostile_proxy` fixture)
    proxy.url                   point the agent's server.base_url here
    proxy.paths                 every request path received, raw (still percent-encoded), in order
    proxy.replace_next(n, "/poll", huge_json(300 * MB))
                                the next n requests whose path holds the fragment get that reply
                                instead of the upstream's (the request itself never goes upstream)
    proxy.served                (path, body bytes sent) of each replaced reply, once it ended

Everything else is forwarded as it comes: method, path, headers and the body, streamed both
ways, so uploads and downloads of any size pass through.
"""

from __future__ import annotations

import http.client
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterator, NamedTuple
from urllib.parse import urlsplit

import pytest

CHUNK = 1024 * 1024
# per connection, not end to end: each side frames its own body
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade",
              "content-length"}


@dataclass(frozen=True)
class Reply:
    """A canned answer. `chunks` makes the body anew each time the reply is used."""

    status: int
    chunks: Callable[[], Iterator[bytes]]
    length: int | None = None  # Content-Length to declare; None: chunked
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": "application/json"})


def body_reply(body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> Reply:
    return Reply(status, lambda: iter([body]), len(body),
                 {"Content-Type": "application/json"} if headers is None else headers)


def json_reply(data: Any, status: int = 200) -> Reply:
    return body_reply(json.dumps(data).encode(), status)


def poll_offer(task: Any) -> Reply:
    """A poll reply offering `task` verbatim (a numeric id, say)."""
    return json_reply({"has_task": True, "task": task, "should_cancel": False, "cancel_task_id": None})


def huge_json(total: int, *, status: int = 200, declare_length: bool = False,
              headers: dict[str, str] | None = None) -> Reply:
    """`{"has_task":false,"pad":"xxxx..."}` of exactly `total` bytes, made as it is sent."""
    head, tail = b'{"has_task":false,"pad":"', b'"}'
    block = b"x" * CHUNK

    def chunks() -> Iterator[bytes]:
        yield head
        left = total - len(head) - len(tail)
        while left > 0:
            yield block if left >= CHUNK else block[:left]
            left -= CHUNK
        yield tail

    return Reply(status, chunks, total if declare_length else None,
                 {"Content-Type": "application/json"} if headers is None else headers)


class Served(NamedTuple):
    path: str
    sent: int  # body bytes handed to the socket before the reply ended or the client hung up


@dataclass
class _Rule:
    left: int
    fragment: str
    reply: Reply


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 120  # an idle keep-alive connection ends its thread eventually
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def handle(self) -> None:
        try:
            super().handle()
        except ConnectionError:  # a reply fitted in the socket buffers, and the client refused it and reset
            self.close_connection = True

    def _handle(self) -> None:
        proxy = self.server.proxy
        reply = proxy._arrived(self.path)
        body = self._request_body()
        if reply is None:
            self._forward(body)
            return
        for _ in body:  # read the request off the wire, so the connection can go on
            pass
        self._send(reply)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _handle

    def _chunked(self) -> bool:
        return "chunked" in (self.headers.get("Transfer-Encoding") or "").lower()

    def _request_body(self) -> Iterator[bytes]:
        if self._chunked():
            while size := int(self.rfile.readline().split(b";")[0], 16):
                yield self.rfile.read(size)
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return
        left = int(self.headers.get("Content-Length") or 0)
        while left > 0:
            data = self.rfile.read(min(left, CHUNK))
            if not data:
                raise ConnectionError("the client hung up mid-request")
            left -= len(data)
            yield data

    def _forward(self, body: Iterator[bytes]) -> None:
        host, port = self.server.proxy.upstream
        upstream = http.client.HTTPConnection(host, port, timeout=300)
        try:
            chunked = self._chunked()
            upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in HOP_BY_HOP or (name.lower() == "content-length" and not chunked):
                    upstream.putheader(name, value)
            if chunked:
                upstream.putheader("Transfer-Encoding", "chunked")
            upstream.endheaders()
            try:
                for data in body:
                    upstream.send(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
                if chunked:
                    upstream.send(b"0\r\n\r\n")
            except OSError:  # the upstream answered early and hung up (a 413, a 429): pass its answer on
                self.close_connection = True
            response = upstream.getresponse()
        except (OSError, http.client.HTTPException):
            self.send_error(502, "upstream unreachable")
            self.close_connection = True
            upstream.close()
            return
        try:
            headers = {k: v for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP}
            length = response.getheader("Content-Length") if not response.chunked else None
            self._relay(response.status, headers, lambda: iter(lambda: response.read1(CHUNK), b""),
                        int(length) if length is not None else None)
        finally:
            upstream.close()

    def _send(self, reply: Reply) -> None:
        sent = 0

        def counted() -> Iterator[bytes]:
            nonlocal sent
            for data in reply.chunks():
                yield data
                sent += len(data)

        try:
            self._relay(reply.status, reply.headers, counted, reply.length)
        finally:
            self.server.proxy._record_served(Served(self.path, sent))

    def _relay(self, status: int, headers: dict[str, str], chunks: Callable[[], Iterator[bytes]],
               length: int | None) -> None:
        no_body = self.command == "HEAD" or status in (204, 304)
        try:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            if length is not None:
                self.send_header("Content-Length", str(length))
            elif not no_body:
                self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            if no_body:
                return
            for data in chunks():
                if data:
                    self.wfile.write(data if length is not None else b"%x\r\n%s\r\n" % (len(data), data))
            if length is None:
                self.wfile.write(b"0\r\n\r\n")
        except OSError:  # the client hung up, as it should on a reply it refuses
            self.close_connection = True


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    proxy: HostileProxy


class HostileProxy:
    def __init__(self, upstream_url: str):
        parts = urlsplit(upstream_url)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self._lock = threading.Lock()
        self._paths: list[str] = []
        self._rules: list[_Rule] = []
        self._served: list[Served] = []
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.proxy = self
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    def start(self) -> HostileProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._thread.join()
        self._httpd.server_close()

    def __enter__(self) -> HostileProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def replace_next(self, n: int, path_contains: str, reply: Reply) -> None:
        with self._lock:
            self._rules.append(_Rule(n, path_contains, reply))

    @property
    def paths(self) -> list[str]:
        with self._lock:
            return list(self._paths)

    @property
    def served(self) -> list[Served]:
        with self._lock:
            return list(self._served)

    def _arrived(self, path: str) -> Reply | None:
        """Record the request; the reply to send instead of the upstream's, if a rule says so."""
        with self._lock:
            self._paths.append(path)
            for rule in self._rules:
                if rule.left > 0 and rule.fragment in path:
                    rule.left -= 1
                    return rule.reply
        return None

    def _record_served(self, served: Served) -> None:
        with self._lock:
            self._served.append(served)


@pytest.fixture
def hostile_proxy(dev_server) -> Iterator[HostileProxy]:
    """A HostileProxy in front of dev_server (import this fixture into the test module)."""
    with HostileProxy(dev_server.url) as proxy:
        yield proxy
