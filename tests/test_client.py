"""agent_core.client.Client against the local OpenAaaS server: every endpoint and error case of protocol.md §2.

Real HTTP on 127.0.0.1 throughout; faults come from the server's `.faults` knobs,
and the few answers the dev server never gives (204 on poll, plain-text bodies
on demand) from a canned one-answer server below.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterator, NamedTuple
from urllib.parse import unquote

import pytest

from agent_core import config
from agent_core.budget import RequestBudget
from agent_core.client import UPLOAD_CUT_OFFS, Client, path_segment
from agent_core.devclient import DevClient
from agent_core.errors import (AuthRejected, ProtocolViolation, ServerRejected, ServerUnavailable, TaskGone,
                               UploadRefused, WorkspaceError)
from agent_core.protocol import Completion, Heartbeat, PollResult, Registration
from agent_core.workspace import open_input
from tests.helpers import sha256_file, wait_until
from tests.hostile_proxy import body_reply, hostile_proxy, huge_json, poll_offer  # noqa: F401 (a fixture)

pytestmark = pytest.mark.timeout(60)

MiB = 1024 * 1024


# --------------------------------------------------------------------------- helpers


class Service(NamedTuple):
    id: str
    api_key: str


def register(server, dev_client, name: str = "svc", capacity: int = 2) -> Service:
    svc = dev_client.create_service(name)
    with Client(server.url) as client:
        reg = client.register(svc["registration_token"], capacity)
    return Service(reg.service_id, reg.api_key)


@pytest.fixture
def service(dev_server, dev_client) -> Service:
    return register(dev_server, dev_client)


@pytest.fixture
def client(dev_server, service) -> Iterator[Client]:
    with Client(dev_server.url, service_id=service.id, api_key=service.api_key) as c:
        yield c


def statuses(server, suffix: str) -> list[int | None]:
    return [c.status for c in server.calls_to(suffix)]


def running_task(client: Client, dev_client, service: Service, **submit) -> dict:
    task = dev_client.submit_task(service.id, "work", **submit)
    assert client.accept(task["id"]) is True
    return task


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Canned(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _CannedServer

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        status, content_type, body = self.server.answer
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST


class _CannedServer(ThreadingHTTPServer):
    daemon_threads = True
    answer: tuple[int, str | None, bytes]


@pytest.fixture
def canned() -> Iterator[Callable[..., str]]:
    """canned(status, body=b"", content_type=None) -> URL of a server giving that answer to every request."""
    servers: list[tuple[_CannedServer, threading.Thread]] = []

    def make(status: int, body: bytes = b"", content_type: str | None = None) -> str:
        httpd = _CannedServer(("127.0.0.1", 0), _Canned)
        httpd.answer = (status, content_type, body)
        thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        servers.append((httpd, thread))
        return f"http://127.0.0.1:{httpd.server_address[1]}"

    yield make
    for httpd, thread in servers:
        httpd.shutdown()
        thread.join()
        httpd.server_close()


# --------------------------------------------------------------------------- register


def test_register_returns_a_typed_registration_and_sends_the_capacity(dev_server, dev_client):
    svc = dev_client.create_service("echo")
    with Client(dev_server.url + "/") as client:
        reg = client.register(svc["registration_token"], 3)
    assert isinstance(reg, Registration)
    assert reg.service_id == svc["id"] and reg.name == "echo"
    assert reg.api_key.startswith("ak_agent_") and reg.api_key not in repr(reg)
    assert dev_server.get_service(svc["id"])["capacity"] == 3
    assert [c.path for c in dev_server.calls_to("/register")] == ["/api/v1/agent/register"]


@pytest.mark.parametrize("case, status, words", [
    ("reused", 404, "unknown or already used"),
    ("unknown", 404, "unknown or already used"),
    ("revoked", 403, "revoked"),
    ("malformed", 400, "malformed"),
    ("active", 409, "already active"),
])
def test_register_refusals_are_one_clear_message_and_not_retried(dev_server, dev_client, case, status, words):
    svc = dev_client.create_service("svc")
    token = svc["registration_token"]
    if case == "reused":
        with Client(dev_server.url) as client:
            client.register(token, 1)
    elif case == "unknown":
        token = "rt_" + "0" * 32
    elif case == "revoked":
        dev_server.revoke_service(svc["id"])
    else:  # the client never sends a malformed body, and 409 is rare: the server is told to answer so
        dev_server.faults.fail_next(1, status=status, path_contains="/register")
    before = len(dev_server.calls_to("/register"))

    with Client(dev_server.url) as client, pytest.raises(ServerRejected) as err:
        client.register(token, 1)
    assert err.value.status == status and err.value.endpoint == "register"
    message = str(err.value)
    assert words in message and f"({status})" in message and "\n" not in message
    assert token not in message
    assert len(dev_server.calls_to("/register")) == before + 1


def test_register_retries_5xx_then_succeeds(dev_server, dev_client):
    svc = dev_client.create_service("svc")
    dev_server.faults.fail_next(2, status=500, path_contains="/register")
    with Client(dev_server.url) as client:
        reg = client.register(svc["registration_token"], 1)
    assert reg.service_id == svc["id"]
    assert statuses(dev_server, "/register") == [500, 500, 200]


def test_register_gives_up_after_a_few_5xx(dev_server, dev_client):
    svc = dev_client.create_service("svc")
    dev_server.faults.fail_next(10, status=503, path_contains="/register")
    with Client(dev_server.url) as client, pytest.raises(ServerUnavailable) as err:
        client.register(svc["registration_token"], 1)
    assert err.value.status == 503 and "503" in str(err.value)
    assert statuses(dev_server, "/register") == [503] * 4


def test_register_with_the_server_unreachable_names_the_url():
    url = f"http://127.0.0.1:{closed_port()}"
    with Client(url) as client, pytest.raises(ServerUnavailable) as err:
        client.register("rt_" + "1" * 32, 1)
    assert url in str(err.value) and "rt_" not in str(err.value)


def test_tls_to_a_plain_http_server_is_a_clear_error(dev_server):
    url = dev_server.url.replace("http://", "https://")
    with Client(url) as client, pytest.raises(ServerUnavailable) as err:
        client.register("rt_" + "1" * 32, 1)
    message = str(err.value)
    assert url in message and "TLS error" in message and "\n" not in message


# --------------------------------------------------------------------------- poll


def test_poll_with_nothing_to_do(client, dev_server):
    assert client.poll(0, 2) == PollResult()
    (call,) = dev_server.calls_to("/poll")
    assert call.status == 200 and call.body == {"current_load": 0, "available_capacity": 2}


def test_poll_204_means_nothing_to_do(canned):
    with Client(canned(204), service_id="s", api_key="ak_agent_x") as client:
        assert client.poll(1, 2) == PollResult()


def test_poll_offers_a_task_with_null_session_and_its_input_files(client, dev_client, service):
    task = dev_client.submit_task(service.id, "hello", output_prompt="a poem",
                                  files=[("a.txt", b"alpha"), ("b.bin", b"\0" * 10)])
    offered = client.poll(0, 2).task
    assert offered is not None and offered.id == task["id"]
    assert offered.task_prompt == "hello" and offered.output_prompt == "a poem"
    assert offered.session_id is None
    assert [(f.filename, f.size_bytes) for f in offered.input_files] == [("a.txt", 5), ("b.bin", 10)]


def test_poll_tolerates_missing_input_files(client, dev_server, service):
    dev_server.faults.offer_raw_task(service.id, {"id": "raw-1", "task_prompt": "p", "session_id": None})
    offered = client.poll(0, 1).task
    assert offered is not None and offered.id == "raw-1" and offered.input_files == ()


def test_poll_reports_a_cancel(client, dev_client, service):
    task = running_task(client, dev_client, service)
    dev_client.cancel_task(task["id"])
    result = client.poll(1, 2)
    assert result.cancel_task_id == task["id"] and result.task is None


def test_poll_garbage_is_a_protocol_violation_and_poll_is_not_retried(client, dev_server):
    dev_server.faults.garbage_next(1, path_contains="/poll")
    with pytest.raises(ProtocolViolation):
        client.poll(0, 1)
    assert statuses(dev_server, "/poll") == [200]


# --------------------------------------------------------------------------- accept


def test_accept_is_true_then_false_for_a_task_no_longer_pending(client, dev_client, service, dev_server):
    task = dev_client.submit_task(service.id, "x")
    assert client.accept(task["id"]) is True
    assert dev_client.get_task(task["id"])["status"] == "running"
    assert client.accept(task["id"]) is False  # the server's 400
    assert client.accept("no-such-task") is False
    assert statuses(dev_server, "/accept") == [200, 400, 400]


def test_accept_409_means_not_ours(client, dev_client, service, dev_server):
    task = dev_client.submit_task(service.id, "x")
    dev_server.faults.fail_next(1, status=409, path_contains="/accept")
    assert client.accept(task["id"]) is False
    assert statuses(dev_server, "/accept") == [409]


def test_accept_retried_after_a_dropped_connection(client, dev_client, service, dev_server):
    task = dev_client.submit_task(service.id, "x")
    dev_server.faults.drop_next(1, path_contains="/accept")
    assert client.accept(task["id"]) is True
    assert statuses(dev_server, "/accept") == [None, 200]
    assert dev_client.get_task(task["id"])["status"] == "running"


def test_accept_whose_reply_was_lost_after_the_server_took_it(dev_server, dev_client, service):
    # the first attempt times out on our side while the server goes on and accepts;
    # the retry then meets "not pending" (400), which here means "ours already"
    task = dev_client.submit_task(service.id, "x")
    dev_server.faults.delay_next(1, 0.3, path_contains="/accept")
    with Client(dev_server.url, service_id=service.id, api_key=service.api_key, read_timeout=0.1) as client:
        assert client.accept(task["id"]) is True
    assert statuses(dev_server, "/accept") == [200, 400]
    assert dev_client.get_task(task["id"])["status"] == "running"


# --------------------------------------------------------------------------- download


def test_download_streams_to_disk(client, dev_client, service, tmp_path):
    data = os.urandom(3 * MiB + 17)  # several chunks
    task = running_task(client, dev_client, service, files=[("in.bin", data)])
    (f,) = dev_client.list_files(task["id"])
    dest = tmp_path / "in.bin"
    assert client.download(f["id"], lambda: open_input(dest), max_bytes=len(data)) == len(data)
    assert dest.read_bytes() == data
    assert stat.S_IMODE(dest.stat().st_mode) == 0o644  # the container may run as another user


def test_download_larger_than_max_bytes_fails(client, dev_client, service, dev_server, tmp_path):
    task = running_task(client, dev_client, service, files=[("in.bin", b"x" * 1000)])
    (f,) = dev_client.list_files(task["id"])
    with pytest.raises(WorkspaceError, match="max_input_bytes"):
        client.download(f["id"], lambda: open_input(tmp_path / "in.bin"), max_bytes=999)
    assert statuses(dev_server, "/download") == [200]


def test_endless_download_stops_at_max_bytes(client, dev_server, tmp_path):
    dev_server.faults.endless_download("endless")
    dest = tmp_path / "endless.bin"
    with pytest.raises(WorkspaceError, match="max_input_bytes"):
        client.download("endless", lambda: open_input(dest), max_bytes=5 * MiB)
    assert dest.stat().st_size <= 5 * MiB
    assert len(dev_server.calls_to("/download")) == 1  # a limit is final, not retried


@pytest.mark.parametrize("whose, status", [("unknown", 404), ("foreign", 403)])
def test_download_refused_is_final(client, dev_server, dev_client, tmp_path, whose, status):
    file_id = "no-such-file"
    if whose == "foreign":
        other = dev_client.submit_task(dev_client.create_service("other")["id"], "x", files=[("a", b"a")])
        file_id = dev_client.list_files(other["id"])[0]["id"]
    with pytest.raises(ServerRejected) as err:
        client.download(file_id, lambda: open_input(tmp_path / "x"), max_bytes=MiB)
    assert err.value.status == status
    assert statuses(dev_server, "/download") == [status]


# --------------------------------------------------------------------------- upload


def test_upload_sends_task_id_before_the_file(client, dev_client, service, dev_server, tmp_path):
    task = running_task(client, dev_client, service)
    src = tmp_path / "report.md"
    src.write_bytes(b"# report\n" * 1000)
    up = client.upload(task["id"], "output/report.md", lambda: open(src, "rb"))
    assert up.filename == "output/report.md" and up.size_bytes == src.stat().st_size
    (call,) = dev_server.calls_to("/upload")
    assert call.status == 200  # the server answers 400 when the file part comes first
    assert call.body == {"fields": {"task_id": task["id"]},
                         "files": [{"name": "file", "filename": "output/report.md",
                                    "size_bytes": src.stat().st_size}]}
    (stored,) = [f for f in dev_client.list_files(task["id"]) if f["created_by"] == "agent"]
    assert stored["id"] == up.file_id
    assert dev_client.download_file(up.file_id, tmp_path / "back").read_bytes() == src.read_bytes()


def test_upload_retried_on_5xx_reopens_the_file(client, dev_client, service, dev_server, tmp_path):
    task = running_task(client, dev_client, service)
    src = tmp_path / "out.txt"
    src.write_bytes(b"payload")
    opened = []

    def open_file():
        opened.append(1)
        return open(src, "rb")

    dev_server.faults.fail_next(1, status=500, path_contains="/upload")
    up = client.upload(task["id"], "out.txt", open_file)
    assert up.size_bytes == 7 and len(opened) == 2
    assert statuses(dev_server, "/upload") == [500, 200]


@pytest.fixture
def on_server(make_dev_server, tmp_path) -> Callable[..., tuple]:
    """on_server(**DevServer kwargs, budget=None) -> (server, client, task id of a running task)."""
    def make(budget: RequestBudget | None = None, **kwargs) -> tuple:
        server = make_dev_server(**kwargs)
        with DevClient(server.url, server.admin_key) as dev:
            svc = register(server, dev)
            client = Client(server.url, service_id=svc.id, api_key=svc.api_key, budget=budget)
            task = running_task(client, dev, svc)
        made.append(client)
        return server, client, task["id"]

    made: list[Client] = []
    yield make
    for client in made:
        client.close()


def big_file(tmp_path, size: int):
    path = tmp_path / f"big-{size}.bin"
    with open(path, "wb") as f:
        f.truncate(size)  # sparse: costs no disk
    return lambda: open(path, "rb")


def test_upload_over_the_servers_size_limit_is_refused_once(on_server, tmp_path):
    # the server answers 400 as soon as it has read 1 MiB of 30 and closes the connection
    server, client, task_id = on_server(max_file_bytes=MiB)
    with pytest.raises(UploadRefused) as err:
        client.upload(task_id, "big.bin", big_file(tmp_path, 30 * MiB))
    assert err.value.status == 400 and "limit" in str(err.value)
    assert statuses(server, "/upload") == [400]


def test_a_400_not_about_the_size_is_an_ordinary_refusal(client, dev_server, tmp_path):
    dev_server.faults.fail_next(1, status=400, path_contains="/upload")  # "injected fault"
    with pytest.raises(ServerRejected) as err:
        client.upload("t", "a.bin", big_file(tmp_path, 10))
    assert err.value.status == 400 and not isinstance(err.value, UploadRefused)


def test_a_429_during_an_upload_waits_for_the_window_not_for_retry_after(on_server, tmp_path):
    # Given a server window of 3 requests per 3 s, filled, and a client that knows that window
    server, client, task_id = on_server(rate_limit_per_minute=3, rate_window_secs=3,
                                        budget=RequestBudget(0, 0, window=3.5))
    client.poll(0, 1)
    client.poll(0, 1)  # with accept: 3 in the window
    # When a 5 MiB upload is answered 429 (Retry-After: 60) while it is still being sent
    up = client.upload(task_id, "out.bin", big_file(tmp_path, 5 * MiB))
    # Then it is retried once the window has room, long before 60 s
    assert up.size_bytes == 5 * MiB
    first, second = server.calls_to("/upload")
    assert (first.status, second.status) == (429, 200)
    assert second.time - first.time < 10


def test_an_upload_past_the_request_timeout_is_tried_twice_then_refused(on_server, tmp_path):
    server, client, task_id = on_server(request_timeout_secs=1)
    server.faults.slow_upload_next(5, bytes_per_sec=MiB)
    with pytest.raises(UploadRefused) as err:
        client.upload(task_id, "slow.bin", big_file(tmp_path, 3 * MiB))
    assert statuses(server, "/upload") == [408, 408]
    assert err.value.status == 408 and "request timeout" in str(err.value) and "408 after 1." in str(err.value)


def test_one_408_on_upload_is_retried(on_server, tmp_path):
    server, client, task_id = on_server(request_timeout_secs=1)
    server.faults.slow_upload_next(1, bytes_per_sec=MiB)
    assert client.upload(task_id, "slow.bin", big_file(tmp_path, 3 * MiB)).size_bytes == 3 * MiB
    assert statuses(server, "/upload") == [408, 200]


class _RawUploads:
    """For what the dev server never does: a 413 before the body is read, or a connection
    reset part-way through the body. Each upload gets the next of `replies` ("413", "reset",
    "ok"; the last one repeats); GET /health answers 200 unless `healthy` is cleared."""

    def __init__(self, replies: list[str]):
        self.replies = replies
        self.uploads: list[str] = []
        self.healthy = threading.Event()
        self.healthy.set()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def close(self) -> None:
        self._sock.close()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                data = conn.recv(65536)
                if not data:
                    return
                head += data
            if head.startswith(b"GET /health"):
                status = b"200 OK" if self.healthy.is_set() else b"503 Down"
                conn.sendall(b"HTTP/1.1 " + status + b"\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
                return
            reply = self.replies[min(len(self.uploads), len(self.replies) - 1)]
            self.uploads.append(reply)
            if reply == "413":  # at once, then read what still comes so that the answer is not lost
                conn.sendall(b"HTTP/1.1 413 Payload Too Large\r\nContent-Type: text/plain\r\n"
                             b"Content-Length: 17\r\nConnection: close\r\n\r\nrequest too large")
                conn.shutdown(socket.SHUT_WR)
                while conn.recv(65536):
                    pass
            elif reply == "reset":
                conn.recv(65536)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            else:
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length:")))
                left = length - len(head.partition(b"\r\n\r\n")[2])
                while left > 0:
                    left -= len(conn.recv(65536))
                body = b'{"file_id": "f1", "filename": "a.bin", "size_bytes": 1}'
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                             b"Connection: close\r\n\r\n%s" % (len(body), body))


@pytest.fixture
def raw_uploads() -> Iterator[Callable[..., tuple[_RawUploads, Client]]]:
    made: list[tuple[_RawUploads, Client]] = []

    def make(*replies: str) -> tuple[_RawUploads, Client]:
        server = _RawUploads(list(replies))
        made.append((server, Client(server.url, service_id="svc", api_key="ak_agent_x")))
        return made[-1]

    yield make
    for server, client in made:
        client.close()
        server.close()


def test_a_413_answered_before_the_body_is_read_is_refused_once(raw_uploads, tmp_path):
    server, client = raw_uploads("413")
    with pytest.raises(UploadRefused) as err:
        client.upload("t", "big.bin", big_file(tmp_path, 20 * MiB))
    assert err.value.status == 413 and "request too large" in str(err.value)
    assert server.uploads == ["413"]


def test_connection_resets_during_the_send_are_retried(raw_uploads, tmp_path):
    server, client = raw_uploads("reset", "reset", "ok")
    assert client.upload("t", "a.bin", big_file(tmp_path, 8 * MiB)).file_id == "f1"
    assert server.uploads == ["reset", "reset", "ok"]


def test_a_file_cut_off_again_and_again_by_a_server_that_is_up_is_given_up(raw_uploads, tmp_path):
    server, client = raw_uploads("reset")
    with pytest.raises(UploadRefused) as err:
        client.upload("t", "a.bin", big_file(tmp_path, 8 * MiB))
    assert f"closed the connection during the upload {UPLOAD_CUT_OFFS} times" in str(err.value)
    assert f"of {8 * MiB} bytes" in str(err.value)
    assert server.uploads == ["reset"] * UPLOAD_CUT_OFFS


def test_cut_offs_while_the_server_is_down_are_not_the_files_fault(raw_uploads, tmp_path):
    # /health failing says the server is in trouble, not the file: keep trying until it is up
    server, client = raw_uploads("reset")
    server.healthy.clear()
    threading.Timer(6, server.healthy.set).start()
    with pytest.raises(UploadRefused):
        client.upload("t", "a.bin", big_file(tmp_path, 8 * MiB))
    assert len(server.uploads) > UPLOAD_CUT_OFFS


# --------------------------------------------------------------------------- complete


def test_complete(client, dev_client, service, dev_server, tmp_path):
    task = running_task(client, dev_client, service)
    src = tmp_path / "o.txt"
    src.write_bytes(b"o")
    up = client.upload(task["id"], "output/o.txt", lambda: open(src, "rb"))
    client.complete(Completion(task["id"], "completed", output={"files": ["output/o.txt"], "stdout": "hi"},
                               file_ids=(up.file_id,)))
    done = dev_client.get_task(task["id"])
    assert done["status"] == "completed"
    assert done["output"] == {"files": ["output/o.txt"], "stdout": "hi", "file_ids": [up.file_id]}
    assert statuses(dev_server, "/complete") == [200]


def test_complete_400_is_task_gone_and_final(client, dev_client, service, dev_server):
    task = running_task(client, dev_client, service)
    client.complete(Completion(task["id"], "failed", error_message="boom"))
    with pytest.raises(TaskGone) as err:
        client.complete(Completion(task["id"], "completed"))  # already terminal
    assert err.value.status == 400 and "invalid status transition" in str(err.value)
    with pytest.raises(TaskGone):
        client.complete(Completion("no-such-task", "completed"))
    assert statuses(dev_server, "/complete") == [200, 400, 400]


def test_complete_whose_reply_was_lost_is_not_task_gone(dev_server, dev_client, service):
    # the server completes the task but our read times out; the retry meets 400, which
    # here means "done already", not "the server refused our result"
    with Client(dev_server.url, service_id=service.id, api_key=service.api_key, read_timeout=0.1) as client:
        task = running_task(client, dev_client, service)
        dev_server.faults.delay_next(1, 0.3, path_contains="/complete")
        client.complete(Completion(task["id"], "completed"))
    assert statuses(dev_server, "/complete") == [200, 400]
    assert dev_client.get_task(task["id"])["status"] == "completed"


# --------------------------------------------------------------------------- heartbeat


def test_heartbeat(client, dev_server, service):
    client.heartbeat(Heartbeat("busy", 2, 2))
    svc = dev_server.get_service(service.id)
    assert svc["status"] == "busy" and svc["current_load"] == 2
    (call,) = dev_server.calls_to("/heartbeat")
    assert call.body == {"status": "busy", "current_load": 2, "capacity": 2, "available_capacity": 0}


@pytest.mark.parametrize("beat", [Heartbeat("online", 3, 2), Heartbeat("online", 0, 0),
                                  Heartbeat("online", -1, 2), Heartbeat("sleepy", 0, 1)])
def test_heartbeat_breaking_the_rules_is_rejected(client, dev_server, beat):
    with pytest.raises(ServerRejected) as err:
        client.heartbeat(beat)
    assert err.value.status == 400 and not isinstance(err.value, AuthRejected)
    assert statuses(dev_server, "/heartbeat") == [400]


def test_wrong_key_is_auth_rejected(dev_server, service):
    wrong = "ak_agent_" + "f" * 32
    with Client(dev_server.url, service_id=service.id, api_key=wrong) as client:
        with pytest.raises(AuthRejected) as err:
            client.heartbeat(Heartbeat("online", 0, 1))
        assert err.value.status == 401 and wrong not in str(err.value)
        with pytest.raises(AuthRejected):
            client.complete(Completion("t", "completed"))  # final even for the call retried until acknowledged
    assert statuses(dev_server, "/heartbeat") == [401] and statuses(dev_server, "/complete") == [401]


# --------------------------------------------------------------------------- error bodies and garbage


def test_plain_text_error_bodies_become_readable_messages(canned):
    text = "Failed to deserialize the JSON body into the target type: missing field `status`"
    with Client(canned(422, text.encode(), "text/plain; charset=utf-8"), service_id="s",
                api_key="ak_agent_x") as client:
        with pytest.raises(ServerRejected) as err:
            client.heartbeat(Heartbeat("online", 0, 1))
    assert err.value.status == 422 and text in str(err.value)

    text = "Failed to parse the request body as JSON: expected value at line 1 column 1"
    with Client(canned(400, text.encode(), "text/plain"), service_id="s", api_key="ak_agent_x") as client:
        with pytest.raises(TaskGone) as err:
            client.complete(Completion("t", "completed"))
    assert text in str(err.value)

    html = b"<html>\n<body>\n  Bad   Gateway\n</body></html>"
    with Client(canned(502, html, "text/html"), service_id="s", api_key="ak_agent_x") as client:
        with pytest.raises(ServerUnavailable) as err:
            client.poll(0, 1)
    assert err.value.status == 502 and "\n" not in str(err.value) and "Bad Gateway" in str(err.value)


@pytest.mark.parametrize("endpoint", ["/accept", "/complete", "/register"])
def test_garbage_200_is_retried_for_retried_calls(dev_server, dev_client, service, client, endpoint):
    task = dev_client.submit_task(service.id, "x")
    dev_server.faults.garbage_next(1, path_contains=endpoint)
    if endpoint == "/register":
        svc = dev_client.create_service("again")
        with Client(dev_server.url) as c:
            assert c.register(svc["registration_token"], 1).service_id == svc["id"]
    else:
        assert client.accept(task["id"]) is True
        if endpoint == "/complete":
            client.complete(Completion(task["id"], "completed"))
            assert dev_client.get_task(task["id"])["status"] == "completed"
    assert statuses(dev_server, endpoint)[-2:] == [200, 200]


def test_heartbeat_does_not_depend_on_its_reply_body(client, dev_server):
    # heartbeat reads no reply body: a garbage 200 still counts as delivered
    dev_server.faults.garbage_next(1, path_contains="/heartbeat")
    client.heartbeat(Heartbeat("online", 0, 1))
    assert statuses(dev_server, "/heartbeat") == [200]


# --------------------------------------------------------------------------- retries


@pytest.mark.parametrize("status", [500, 502, 503, 408])
def test_retried_on_5xx_and_408(client, dev_client, service, dev_server, status):
    task = running_task(client, dev_client, service)
    dev_server.faults.fail_next(1, status=status, path_contains="/complete")
    client.complete(Completion(task["id"], "completed"))
    assert statuses(dev_server, "/complete") == [status, 200]
    assert dev_client.get_task(task["id"])["status"] == "completed"


def test_429_honours_retry_after(client, dev_client, service, dev_server):
    task = running_task(client, dev_client, service)
    dev_server.faults.fail_next(1, status=429, retry_after=1, path_contains="/complete")
    client.complete(Completion(task["id"], "completed"))
    first, second = dev_server.calls_to("/complete")
    assert (first.status, second.status) == (429, 200)
    assert 0.9 <= second.time - first.time < 30  # jittered backoff alone could come after 0.5 s


@pytest.mark.parametrize("status", [401, 403, 404, 405, 413, 422])
def test_other_4xx_are_never_retried(client, dev_server, status):
    dev_server.faults.fail_next(5, status=status, path_contains="/complete")
    with pytest.raises(ServerRejected) as err:
        client.complete(Completion("t", "completed"))
    assert err.value.status == status and not isinstance(err.value, TaskGone)
    assert statuses(dev_server, "/complete") == [status]


@pytest.mark.parametrize("call", ["poll", "heartbeat"])
def test_poll_and_heartbeat_are_not_retried(client, dev_server, call):
    dev_server.faults.fail_next(5, status=503, path_contains=f"/{call}")
    with pytest.raises(ServerUnavailable):
        client.poll(0, 1) if call == "poll" else client.heartbeat(Heartbeat("online", 0, 1))
    assert statuses(dev_server, f"/{call}") == [503]


# --------------------------------------------------------------------------- proxy


@pytest.mark.parametrize("use_system_proxy", [False, True])
def test_use_system_proxy(dev_server, service, tmp_path, monkeypatch, use_system_proxy):
    for name in ("http_proxy", "all_proxy", "ALL_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{closed_port()}")
    path = config.init(tmp_path / "config.toml", base_url=dev_server.url)
    config.update(path, {"server.use_system_proxy": use_system_proxy, "agent.service_id": service.id,
                         "agent.api_key": service.api_key})
    with Client.from_config(config.load(path)) as client:
        if use_system_proxy:
            with pytest.raises(ServerUnavailable):
                client.poll(0, 1)
            assert dev_server.calls_to("/poll") == []  # went to the (dead) proxy
        else:
            assert client.poll(0, 1) == PollResult()
            assert statuses(dev_server, "/poll") == [200]


# --------------------------------------------------------------------------- ids in URL paths


@pytest.mark.parametrize("value, segment", [
    ("../../../../../health", "..%2F..%2F..%2F..%2F..%2Fhealth"),
    ("x?y=1#frag", "x%3Fy%3D1%23frag"),
    ("..", "%2E%2E"),
    (".", "%2E"),
    ("a/b", "a%2Fb"),
    ("a%2Fb", "a%252Fb"),
    ("%2e%2e", "%252e%252e"),
    ("a\\b", "a%5Cb"),
    ("new\nline", "new%0Aline"),
    ("a b", "a%20b"),
    ("é", "%C3%A9"),
    ("...", "..."),  # not a dot segment: nothing folds it
    ("report.v2", "report.v2"),
    ("4f9c2a3e-8d1b-4c55-9a57-0b6f0e2d7c11", "4f9c2a3e-8d1b-4c55-9a57-0b6f0e2d7c11"),
])
def test_every_id_is_exactly_one_path_segment(value, segment):
    assert path_segment(value) == segment
    assert unquote(segment) == value


def test_an_empty_id_is_refused_before_any_request(client, dev_server, tmp_path):
    with pytest.raises(ProtocolViolation, match="empty id"):
        client.download("", lambda: open_input(tmp_path / "x"), max_bytes=MiB)
    assert dev_server.calls_to("/download") == []


HOSTILE_FILE_IDS = ["../../../../../health", "x?y=1#frag", "..", ".", "a%2Fb", "a/b", "%2e%2e"]


def test_hostile_file_ids_reach_the_server_intact_as_one_segment(client, dev_server, service, tmp_path):
    # Given input files stored under ids made to leave the download route
    files = {file_id: f"content of {file_id}".encode() for file_id in HOSTILE_FILE_IDS}
    dev_server.faults.offer_raw_task(service.id, {"id": "t", "input_files": [
        {"id": i, "filename": "f", "size_bytes": 1} for i in HOSTILE_FILE_IDS]}, files=files)
    # When each is downloaded, Then each arrives whole: the server read back exactly that id
    for n, file_id in enumerate(HOSTILE_FILE_IDS):
        dest = tmp_path / f"in-{n}"
        client.download(file_id, lambda: open_input(dest), max_bytes=MiB)
        assert dest.read_bytes() == files[file_id]
    # and every request went to the download route, the id as one segment
    assert [c.path for c in dev_server.calls_to("/download")] == [
        f"/api/v1/files/agent/{service.id}/files/{path_segment(i)}/download" for i in HOSTILE_FILE_IDS]


def test_a_hostile_service_id_stays_one_segment(hostile_proxy, tmp_path):
    with Client(hostile_proxy.url, service_id="../../health", api_key="ak_agent_x") as client:
        with pytest.raises(AuthRejected):
            client.poll(0, 1)
        with pytest.raises(AuthRejected):
            client.download("..", lambda: open_input(tmp_path / "x"), max_bytes=MiB)
    assert hostile_proxy.paths == ["/api/v1/agent/..%2F..%2Fhealth/poll",
                                   "/api/v1/files/agent/..%2F..%2Fhealth/files/%2E%2E/download"]


# --------------------------------------------------------------------------- replies of any size

CAP = MiB
HUGE = 1024 * MiB  # never sent whole: the client hangs up on it
# what the proxy may hand to its socket before it notices the hang-up: the cap plus loopback buffers
HUNG_UP_EARLY = 64 * MiB


@pytest.fixture
def proxied(hostile_proxy, service) -> Iterator[Client]:
    """A client with a 1 MiB reply cap, talking to dev_server through the hostile proxy."""
    with Client(hostile_proxy.url, service_id=service.id, api_key=service.api_key, max_reply_bytes=CAP) as c:
        yield c


def sent_of_replaced(proxy) -> list[int]:
    """Body bytes the proxy sent for each replaced reply, once each has ended."""
    return [s.sent for s in wait_until(lambda: proxy.served, 30, "the replaced reply to end")]


def test_max_reply_bytes_comes_from_the_config(tmp_path):
    path = config.init(tmp_path / "config.toml", base_url="http://127.0.0.1:9")
    config.update(path, {"limits.max_reply_bytes": "2m"})
    with Client.from_config(config.load(path), registered=False) as client:
        assert client.max_reply_bytes == 2 * MiB
    with Client("http://127.0.0.1:9") as client:
        assert client.max_reply_bytes == 16 * MiB


def test_a_reply_at_the_cap_is_read_and_one_byte_more_is_refused(proxied, hostile_proxy):
    hostile_proxy.replace_next(1, "/poll", huge_json(CAP))
    assert proxied.poll(0, 1) == PollResult()
    hostile_proxy.replace_next(1, "/poll", huge_json(CAP + 1))
    with pytest.raises(ProtocolViolation) as err:
        proxied.poll(0, 1)
    assert str(err.value) == f"poll: reply larger than limits.max_reply_bytes ({CAP} bytes)"


@pytest.mark.parametrize("call", ["poll", "heartbeat"])
def test_a_huge_reply_is_refused_at_the_cap_and_not_retried(proxied, hostile_proxy, call):
    hostile_proxy.replace_next(1, f"/{call}", huge_json(HUGE))
    with pytest.raises(ProtocolViolation, match="limits.max_reply_bytes"):
        proxied.poll(0, 1) if call == "poll" else proxied.heartbeat(Heartbeat("online", 0, 1))
    (sent,) = sent_of_replaced(hostile_proxy)
    assert sent < HUNG_UP_EARLY  # the client stopped reading and closed the connection
    assert len(hostile_proxy.paths) == 1
    assert proxied.poll(0, 1) == PollResult()  # and the next call works, on a new connection


def test_a_declared_length_over_the_cap_is_refused_before_reading(hostile_proxy, service):
    # a cap above what loopback buffers hold: had the body been read up to the cap, the proxy would show it
    with Client(hostile_proxy.url, service_id=service.id, api_key=service.api_key,
                max_reply_bytes=4 * HUNG_UP_EARLY) as client:
        hostile_proxy.replace_next(1, "/poll", huge_json(HUGE, declare_length=True))
        with pytest.raises(ProtocolViolation, match="limits.max_reply_bytes"):
            client.poll(0, 1)
    (sent,) = sent_of_replaced(hostile_proxy)
    assert sent < HUNG_UP_EARLY


@pytest.mark.parametrize("endpoint", ["/register", "/accept", "/upload", "/complete"])
def test_huge_replies_to_retried_calls_are_refused_then_retried(proxied, hostile_proxy, dev_client, service,
                                                               tmp_path, endpoint):
    task = dev_client.submit_task(service.id, "x")
    if endpoint != "/accept":
        assert proxied.accept(task["id"]) is True
    hostile_proxy.replace_next(1, endpoint, huge_json(HUGE))
    if endpoint == "/register":
        token = dev_client.create_service("again")["registration_token"]
        with Client(hostile_proxy.url, max_reply_bytes=CAP) as anonymous:
            assert anonymous.register(token, 1).api_key
    elif endpoint == "/accept":
        assert proxied.accept(task["id"]) is True
    elif endpoint == "/upload":
        (tmp_path / "out.txt").write_bytes(b"out")
        assert proxied.upload(task["id"], "output/out.txt", lambda: open(tmp_path / "out.txt", "rb")).file_id
    else:
        proxied.complete(Completion(task["id"], "completed"))
        assert dev_client.get_task(task["id"])["status"] == "completed"
    (sent,) = sent_of_replaced(hostile_proxy)
    assert sent < HUNG_UP_EARLY
    assert len([p for p in hostile_proxy.paths if p.endswith(endpoint)]) == 2


@pytest.mark.parametrize("call, status, error", [("heartbeat", 500, ServerUnavailable),
                                                 ("heartbeat", 422, ServerRejected),
                                                 ("download", 404, ServerRejected)])
def test_huge_error_bodies_are_read_a_few_kib_at_most(proxied, hostile_proxy, tmp_path, call, status, error):
    hostile_proxy.replace_next(1, f"/{call}" if call == "heartbeat" else "/download",
                               huge_json(HUGE, status=status, headers={"Content-Type": "text/plain"}))
    with pytest.raises(error) as err:
        if call == "heartbeat":
            proxied.heartbeat(Heartbeat("online", 0, 1))
        else:
            proxied.download("f", lambda: open_input(tmp_path / "f"), max_bytes=MiB)
    assert err.value.status == status and len(str(err.value)) < 300
    assert '{"has_task":false,"pad":"xxx' in str(err.value)
    (sent,) = sent_of_replaced(hostile_proxy)
    assert sent < HUNG_UP_EARLY


def test_json_nested_to_exhaust_the_parser_is_not_json_to_us(proxied, hostile_proxy):
    hostile_proxy.replace_next(1, "/poll", body_reply(b"[" * 100_000))
    with pytest.raises(ProtocolViolation, match="not JSON"):
        proxied.poll(0, 1)
    hostile_proxy.replace_next(1, "/heartbeat", body_reply(b"[" * 100_000, status=422))
    with pytest.raises(ServerRejected) as err:
        proxied.heartbeat(Heartbeat("online", 0, 1))
    assert err.value.status == 422


@pytest.mark.parametrize("value", ["soon", "Mon, 99 Foo 2024 25:61:00 GMT", "1e999x"])
def test_an_unreadable_retry_after_is_no_hint(proxied, hostile_proxy, value):
    hostile_proxy.replace_next(1, "/poll", body_reply(b"{}", status=503, headers={"Retry-After": value}))
    with pytest.raises(ServerUnavailable) as err:
        proxied.poll(0, 1)
    assert err.value.status == 503 and err.value.retry_after is None


def test_a_poll_offering_a_numeric_task_id_is_ignored_and_polling_goes_on(proxied, hostile_proxy, dev_client,
                                                                         service):
    task = dev_client.submit_task(service.id, "real")
    hostile_proxy.replace_next(1, "/poll", poll_offer({"id": 12345, "task_prompt": "p"}))
    assert proxied.poll(0, 1) == PollResult(ignored="task id is a number, not a string: skipped")
    offered = proxied.poll(0, 1).task
    assert offered is not None and offered.id == task["id"]


# --------------------------------------------------------------------------- secrets


def test_secrets_never_appear_in_errors_or_logs(dev_server, dev_client, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    for name in ("agent_core", "httpx", "httpcore"):
        caplog.set_level(logging.DEBUG, logger=name)
    errors: list[Exception] = []

    def expect_error(fn: Callable[[], object]) -> None:
        with pytest.raises(Exception) as err:
            fn()
        errors.append(err.value)

    svc = dev_client.create_service("svc")
    token = svc["registration_token"]
    dev_server.faults.fail_next(1, status=500, path_contains="/register")
    with Client(dev_server.url) as anonymous:
        reg = anonymous.register(token, 2)
        expect_error(lambda: anonymous.register(token, 2))  # used token
    wrong_key = "ak_agent_" + "e" * 32
    secrets = [token, reg.api_key, wrong_key]

    with Client(dev_server.url, service_id=reg.service_id, api_key=reg.api_key) as client:
        task = dev_client.submit_task(reg.service_id, "x", files=[("in.txt", b"data")])
        assert client.poll(0, 2).task is not None
        dev_server.faults.garbage_next(1, path_contains="/accept")
        assert client.accept(task["id"]) is True
        (f,) = dev_client.list_files(task["id"])
        client.download(f["id"], lambda: open_input(tmp_path / "in.txt"), max_bytes=100)
        expect_error(lambda: client.download(f["id"], lambda: open_input(tmp_path / "in2.txt"), max_bytes=1))
        expect_error(lambda: client.download("nope", lambda: open_input(tmp_path / "x"), max_bytes=1))
        (tmp_path / "out.txt").write_text("out")
        dev_server.faults.fail_next(1, status=503, path_contains="/upload")
        up = client.upload(task["id"], "out.txt", lambda: open(tmp_path / "out.txt", "rb"))
        client.heartbeat(Heartbeat("online", 1, 2))
        expect_error(lambda: client.heartbeat(Heartbeat("online", 5, 2)))
        dev_server.faults.fail_next(1, status=429, retry_after=1, path_contains="/heartbeat")
        expect_error(lambda: client.heartbeat(Heartbeat("online", 1, 2)))
        client.complete(Completion(task["id"], "completed", file_ids=(up.file_id,)))
        expect_error(lambda: client.complete(Completion(task["id"], "completed")))
    with Client(dev_server.url, service_id=reg.service_id, api_key=wrong_key) as client:
        expect_error(lambda: client.poll(0, 1))

    assert any("retrying" in r.getMessage() for r in caplog.records)  # the failures were logged
    assert len(errors) == 7
    logged = caplog.text + "\n".join(f"{r.getMessage()} {r.args!r}" for r in caplog.records)
    shown = "\n".join(f"{e} {e.args!r}" for e in errors)
    for secret in secrets:
        assert secret not in logged and secret not in shown


# --------------------------------------------------------------------------- memory


TRANSFER = """
import json, resource, sys
from pathlib import Path
from agent_core.client import Client
from agent_core.workspace import open_input

a = json.loads(sys.argv[1])


def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def open_source():
    return open(a["source"], "rb")


with Client(a["url"], service_id=a["sid"], api_key=a["key"]) as client:
    # warm up every code path on the small file, so imports and buffers are not counted
    client.download(a["small_id"], lambda: open_input(Path(a["dest"])), max_bytes=1 << 40)
    client.upload(a["task_id"], "output/small.bin", lambda: open(a["dest"], "rb"))
    base = peak_mib()
    size = client.download(a["big_id"], lambda: open_input(Path(a["dest"])), max_bytes=1 << 40)
    after_download = peak_mib()
    uploaded = client.upload(a["task_id"], "output/copy.bin", open_source)
    after_upload = peak_mib()
print(json.dumps({"size": size, "file_id": uploaded.file_id, "uploaded_size": uploaded.size_bytes,
                  "download_growth": after_download - base, "upload_growth": after_upload - after_download}))
"""


@pytest.mark.timeout(300)
def test_200_mib_download_and_upload_keep_memory_flat(make_dev_server, tmp_path):
    server = make_dev_server(max_file_bytes=256 * MiB)
    source = tmp_path / "source.bin"
    block = os.urandom(MiB)
    with open(source, "wb") as out:
        for i in range(200):
            out.write(i.to_bytes(4, "big") + block[4:])  # every MiB different
    expected = sha256_file(source)

    with DevClient(server.url, server.admin_key, timeout=120) as dev:
        svc = register(server, dev)
        task = dev.submit_task(svc.id, "big", files=[("small.bin", b"s" * 1000), ("big.bin", source)])
        with Client(server.url, service_id=svc.id, api_key=svc.api_key) as client:
            assert client.accept(task["id"]) is True
        ids = {f["filename"]: f["id"] for f in dev.list_files(task["id"])}
        dest = tmp_path / "downloaded.bin"
        args = {"url": server.url, "sid": svc.id, "key": svc.api_key, "task_id": task["id"],
                "small_id": ids["small.bin"], "big_id": ids["big.bin"], "source": str(source), "dest": str(dest)}
        proc = subprocess.run([sys.executable, "-c", TRANSFER, json.dumps(args)], capture_output=True,
                              text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr
        result = json.loads(proc.stdout)

        assert result["size"] == result["uploaded_size"] == 200 * MiB
        assert sha256_file(dest) == expected
        dest.unlink()  # disk: keep at most a few copies at once
        assert sha256_file(dev.download_file(result["file_id"], tmp_path / "copy.bin")) == expected
    for phase in ("download", "upload"):
        grown = result[f"{phase}_growth"]
        assert grown < 64, f"peak memory grew by {grown:.0f} MiB during the {phase}: the file was buffered"
