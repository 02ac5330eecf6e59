"""The server's lifecycle: `DevServer` (start/stop, go down and come up, the sweeper thread, what
tests look at) and the HTTP plumbing under it (`_Handler`, `_HTTPServer`)."""

from __future__ import annotations

import json
import secrets
import socket
import socketserver
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs

from agent_core.devserver.bodies import _MAX_SMALL_BODY, _Body, _Request
from agent_core.devserver.faults import Faults
from agent_core.devserver.ratelimit import _RateLimiter
from agent_core.devserver.responses import _error, _HttpError, _Response
from agent_core.devserver.routes import _App, Call
from agent_core.devserver.state import _save_stream, _Store


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
            # recorded before the headers go out: a client that has its answer finds the call in
            # the log, and an endless stream is visible while it runs
            record(resp.status)
            recorded = True
            self.end_headers()
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
