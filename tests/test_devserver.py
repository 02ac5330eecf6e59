"""The in-repo OpenAaaS server, exercised through real HTTP (httpx), no mocks."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest

from agent_core.devclient import DevClient, DevClientError
from agent_core.devserver import DevServer
from tests.helpers import sha256_file, wait_until

pytestmark = pytest.mark.timeout(30)

REPO = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024


# --------------------------------------------------------------------------- helpers


def multipart(*parts: tuple[str, str | None, bytes], boundary: str = "b0undary") -> tuple[bytes, str]:
    """Build a multipart body by hand, in the given order: (name, filename or None, data)."""
    out = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def start_upload(server: DevServer, agent: Agent, task_id: str, file_size: int) -> tuple[socket.socket, bytes]:
    """Send an upload's head and its parts up to the file's data, over a raw socket.

    The Content-Length announces `file_size` bytes of data; returns the socket and the
    body's tail to send after the data.
    """
    boundary = "b0undary"
    parts = (f'--{boundary}\r\nContent-Disposition: form-data; name="task_id"\r\n\r\n{task_id}\r\n'
             f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="out.bin"\r\n'
             f"Content-Type: application/octet-stream\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    head = (f"POST /api/v1/files/agent/{agent.sid}/files/upload HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"X-Service-ID: {agent.sid}\r\nX-API-Key: {agent.key}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
            f"Content-Length: {len(parts) + file_size + len(tail)}\r\n\r\n").encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(head + parts)
    return sock, tail


def read_answer(sock: socket.socket) -> http.client.HTTPResponse:
    """The HTTP answer on a raw socket, body read."""
    resp = http.client.HTTPResponse(sock)
    resp.begin()
    resp.body = resp.read()
    return resp


def is_closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


class Agent:
    """Raw agent-side calls with the three auth headers of protocol.md §1."""

    def __init__(self, url: str, service_id: str, api_key: str):
        self.sid, self.key = service_id, api_key
        self.http = httpx.Client(base_url=url, timeout=10, headers={
            "X-Service-ID": service_id, "X-API-Key": api_key, "Authorization": f"Bearer {api_key}"})

    def call(self, action: str, body: Any = None, **kwargs) -> httpx.Response:
        return self.http.post(f"/api/v1/agent/{self.sid}/{action}", json=body, **kwargs)

    def poll(self) -> dict:
        resp = self.call("poll", {"current_load": 0, "available_capacity": 1})
        assert resp.status_code == 200, resp.text
        return resp.json()

    def accept(self, task_id: str) -> httpx.Response:
        return self.call("accept", {"task_id": task_id})

    def complete(self, task_id: str, status: str = "completed", **extra: Any) -> httpx.Response:
        return self.call("complete", {"task_id": task_id, "status": status, "output": None,
                                      "error_message": None, "file_ids": [], **extra})

    def heartbeat(self, status: str = "online", load: int = 0, capacity: int = 1) -> httpx.Response:
        return self.call("heartbeat", {"status": status, "current_load": load, "capacity": capacity,
                                       "available_capacity": capacity - load})

    def upload(self, task_id: str, filename: str, content) -> httpx.Response:
        return self.http.post(f"/api/v1/files/agent/{self.sid}/files/upload", data={"task_id": task_id},
                              files={"file": (filename, content, "application/octet-stream")})

    def download_path(self, file_id: str) -> str:
        return f"/api/v1/files/agent/{self.sid}/files/{file_id}/download"

    def close(self) -> None:
        self.http.close()


@pytest.fixture
def new_agent() -> Iterator[Callable[[DevServer, DevClient], Agent]]:
    agents: list[Agent] = []

    def make(server: DevServer, client: DevClient, name: str = "svc") -> Agent:
        svc = client.create_service(name)
        resp = httpx.post(f"{server.url}/api/v1/agent/register",
                          json={"registration_token": svc["registration_token"], "capacity": 2})
        assert resp.status_code == 200, resp.text
        agents.append(Agent(server.url, svc["id"], resp.json()["api_key"]))
        return agents[-1]

    yield make
    for agent in agents:
        agent.close()


@pytest.fixture
def agent(new_agent, dev_server, dev_client) -> Agent:
    return new_agent(dev_server, dev_client)


# --------------------------------------------------------------------------- register and auth


def test_health(dev_client):
    assert dev_client.health() == {"status": "healthy"}


def test_register_is_single_use(dev_server, dev_client):
    svc = dev_client.create_service("echo")
    assert svc["registration_status"] == "pending" and svc["registration_token"].startswith("rt_")
    url = f"{dev_server.url}/api/v1/agent/register"

    first = httpx.post(url, json={"registration_token": svc["registration_token"], "capacity": 3})
    again = httpx.post(url, json={"registration_token": svc["registration_token"]})
    unknown = httpx.post(url, json={"registration_token": "rt_" + "0" * 32})
    malformed = httpx.post(url, content=b"{", headers={"Content-Type": "application/json"})

    assert first.status_code == 200
    body = first.json()
    assert body["service_id"] == svc["id"] and body["name"] == "echo" and body["status"] == "online"
    assert body["api_key"].startswith("ak_agent_") and len(body["api_key"]) == len("ak_agent_") + 32
    assert (again.status_code, unknown.status_code, malformed.status_code) == (404, 404, 400)
    assert dev_server.get_service(svc["id"])["capacity"] == 3


def test_register_revoked_service_is_403(dev_server, dev_client):
    svc = dev_client.create_service("revoked")
    dev_server.revoke_service(svc["id"])
    resp = httpx.post(f"{dev_server.url}/api/v1/agent/register",
                      json={"registration_token": svc["registration_token"]})
    assert resp.status_code == 403


def test_auth_rules(dev_server, dev_client, agent):
    poll = f"{dev_server.url}/api/v1/agent/{agent.sid}/poll"
    sid, key = {"X-Service-ID": agent.sid}, agent.key

    def status(url: str = poll, **headers: str) -> int:
        return httpx.post(url, json={}, headers={**sid, **headers}).status_code

    assert status() == 401                                               # no key at all
    assert status(**{"X-API-Key": "", "Authorization": f"Bearer {key}"}) == 401  # empty X-API-Key wins
    assert status(Authorization=f"Bearer {key}") == 200                  # Bearer is the fallback
    assert status(**{"X-API-Key": key}) == 200
    assert status(**{"X-API-Key": "ak_agent_wrong"}) == 401
    other = dev_client.create_service("other")
    assert status(f"{dev_server.url}/api/v1/agent/{other['id']}/poll", **{"X-API-Key": key}) == 403
    assert httpx.get(f"{dev_server.url}/api/v1/client/tasks/x").status_code == 401  # admin routes too

    dev_client.delete_service(agent.sid)
    deleted = agent.call("poll", {})
    assert deleted.status_code == 401 and deleted.json()["error"] == "Auth"


def test_a_service_that_never_registered_gets_401(dev_server, dev_client, agent):
    # observed: 401 like any bad key (older servers answered 500)
    never = dev_client.create_service("never registered")
    resp = httpx.post(f"{dev_server.url}/api/v1/agent/{never['id']}/poll", json={},
                      headers={"X-Service-ID": never["id"], "X-API-Key": agent.key})
    assert resp.status_code == 401 and resp.json()["error"] == "Auth"


# --------------------------------------------------------------------------- task flow


def test_poll_accept_complete_flow(dev_server, dev_client, agent):
    assert agent.poll() == {"has_task": False, "task": None, "should_cancel": False, "cancel_task_id": None}
    first = dev_client.submit_task(agent.sid, "first", output_prompt="md")
    second = dev_client.submit_task(agent.sid, "second", session_id="s-1")
    assert first["status"] == "pending" and first["retry_count"] == 0

    offered = agent.poll()
    assert offered["has_task"] and not offered["should_cancel"]
    assert offered["task"] == {"id": first["id"], "task_prompt": "first", "output_prompt": "md",
                               "session_id": None, "input_files": []}
    assert agent.poll()["task"]["id"] == first["id"]        # a pure read: offered until accepted

    accepted = agent.accept(first["id"])
    assert accepted.status_code == 200
    assert accepted.json()["success"] is True and accepted.json()["task_id"] == first["id"]
    assert agent.accept(first["id"]).status_code == 400     # no longer pending
    assert agent.poll()["task"]["session_id"] == "s-1"      # now the next one

    done = agent.complete(first["id"], output={"stdout": "hi"}, file_ids=["f1"])
    assert done.status_code == 200 and done.json() == {"success": True, "task_id": first["id"],
                                                       "status": "completed"}
    assert agent.complete(first["id"]).status_code == 400   # already terminal
    assert agent.complete(second["id"]).status_code == 400  # still pending
    task = dev_client.get_task(first["id"])
    assert task["status"] == "completed"
    assert task["output"] == {"stdout": "hi", "file_ids": ["f1"]}
    assert all(task[k] for k in ("created_at", "assigned_at", "started_at", "completed_at"))
    assert [c.body for c in dev_server.calls_to("/accept")][0] == {"task_id": first["id"]}


def test_body_parsing_errors_are_plain_text(agent):
    text_plain = agent.call("accept", content=b'{"task_id": "x"}', headers={"Content-Type": "text/plain"})
    bad_json = agent.call("complete", content=b"{nope", headers={"Content-Type": "application/json"})
    missing = agent.call("heartbeat", {"status": "online"})
    bad_enum = agent.complete("x", status="done")
    for resp, code in ((text_plain, 415), (bad_json, 400), (missing, 422), (bad_enum, 422)):
        assert resp.status_code == code
        assert resp.headers["content-type"].startswith("text/plain")

    assert agent.heartbeat(capacity=0).status_code == 400
    assert agent.heartbeat(load=-1).status_code == 400
    assert agent.heartbeat(load=2, capacity=1).status_code == 400
    assert agent.heartbeat(status="sleeping").status_code == 400
    ok = agent.heartbeat(status="offline")
    assert ok.status_code == 200 and ok.json()["acknowledged"] is True and ok.json()["service_id"] == agent.sid


def test_cancel_flow(dev_client, agent):
    pending = dev_client.submit_task(agent.sid, "never started")
    assert dev_client.cancel_task(pending["id"])["status"] == "cancelled"

    running = dev_client.submit_task(agent.sid, "running")
    waiting = dev_client.submit_task(agent.sid, "waiting")
    assert agent.accept(running["id"]).status_code == 200
    assert dev_client.cancel_task(running["id"])["status"] == "cancelling"

    for _ in range(2):  # should_cancel instead of work, on every poll
        assert agent.poll() == {"has_task": False, "task": None, "should_cancel": True,
                                "cancel_task_id": running["id"]}
    assert agent.complete(running["id"], status="cancelled").status_code == 200
    assert dev_client.get_task(running["id"])["status"] == "cancelled"
    assert agent.poll()["task"]["id"] == waiting["id"]
    with pytest.raises(DevClientError) as err:
        dev_client.cancel_task(running["id"])
    assert err.value.status_code == 400


# --------------------------------------------------------------------------- files


def test_input_files_and_agent_download(dev_server, dev_client, agent, new_agent, tmp_path):
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * 300_000)
    task = dev_client.submit_task(agent.sid, "p", files=[("a.txt", b"A"), ("b \u00e9.txt", big)])

    inputs = agent.poll()["task"]["input_files"]
    assert [(f["filename"], f["size_bytes"]) for f in inputs] == [("a.txt", 1), ("b \u00e9.txt", 300_000)]
    resp = agent.http.get(agent.download_path(inputs[1]["id"]))
    assert resp.status_code == 200 and resp.content == big.read_bytes()
    assert "filename*=UTF-8''b%20%C3%A9.txt" in resp.headers["content-disposition"]
    assert resp.headers["content-disposition"].startswith("attachment;")

    assert agent.http.get(agent.download_path("nope")).status_code == 404
    stranger = new_agent(dev_server, dev_client, "stranger")
    assert stranger.http.get(stranger.download_path(inputs[0]["id"])).status_code == 403
    assert [f["created_by"] for f in dev_client.list_files(task["id"])] == ["client", "client"]

    with pytest.raises(DevClientError) as err:  # clients may not upload path-like names
        dev_client.submit_task(agent.sid, "p", files=[("../evil", b"x")])
    assert err.value.status_code == 400


def test_agent_upload_rules(make_dev_server, new_agent, tmp_path):
    server = make_dev_server(max_file_bytes=1024)
    with DevClient(server.url, server.admin_key) as client:
        agent = new_agent(server, client)
        other = new_agent(server, client, "other")
        task = client.submit_task(agent.sid, "p")
        foreign = client.submit_task(other.sid, "p")
        upload_path = f"/api/v1/files/agent/{agent.sid}/files/upload"

        ok = agent.upload(task["id"], "output/report.md", b"# hi")
        assert ok.status_code == 200
        assert set(ok.json()) == {"file_id", "filename", "mime_type", "size_bytes", "created_at"}
        assert ok.json()["filename"] == "output/report.md" and ok.json()["size_bytes"] == 4

        body, ctype = multipart(("file", "late.txt", b"data"), ("task_id", None, task["id"].encode()))
        assert agent.http.post(upload_path, content=body, headers={"Content-Type": ctype}).status_code == 400
        assert agent.upload("no-such-task", "x.txt", b"x").status_code == 404
        assert agent.upload(foreign["id"], "x.txt", b"x").status_code == 403
        assert agent.upload(task["id"], "big.bin", b"x" * 1025).status_code == 400
        assert agent.upload(task["id"], "edge.bin", b"x" * 1024).status_code == 200

        files = client.list_files(task["id"])
        assert [(f["filename"], f["created_by"]) for f in files] == [("output/report.md", "agent"),
                                                                      ("edge.bin", "agent")]
        assert len(list((server.data_dir / "files").iterdir())) == 2  # rejected uploads left nothing
        client.download_file(files[0]["id"], tmp_path / "out" / "report.md")
        assert (tmp_path / "out" / "report.md").read_bytes() == b"# hi"
        assert server.calls_to("/upload")[0].body == {
            "fields": {"task_id": task["id"]},
            "files": [{"name": "file", "filename": "output/report.md", "size_bytes": 4}]}


def test_chunked_upload_is_accepted(dev_client, agent):
    task = dev_client.submit_task(agent.sid, "p")
    data = (b"0123456789" * 50 + b"\r\n--b0undar") * 90  # almost-delimiters inside the data
    body, ctype = multipart(("task_id", None, task["id"].encode()), ("file", "c.bin", data))

    def pieces() -> Iterator[bytes]:  # odd sizes so boundaries straddle chunks
        for i in range(0, len(body), 997):
            yield body[i:i + 997]

    resp = agent.http.post(f"/api/v1/files/agent/{agent.sid}/files/upload", content=pieces(),
                           headers={"Content-Type": ctype})
    assert resp.status_code == 200 and resp.json()["size_bytes"] == len(data)
    (stored,) = dev_client.list_files(task["id"])
    assert stored["size_bytes"] == len(data)


def test_early_answers_come_before_the_body_and_close_the_connection(make_dev_server, new_agent):
    # observed: an over-size file and a 429 are answered while the client still sends, then closed
    server = make_dev_server(max_file_bytes=64 * 1024, rate_limit_per_minute=3)
    with DevClient(server.url, server.admin_key) as client:
        agent = new_agent(server, client)
        task = client.submit_task(agent.sid, "p")

        sock, _ = start_upload(server, agent, task["id"], 64 * MiB)
        with sock:
            sent = 0
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # what a client sees sending on
                while sent < 8 * MiB:  # in pieces, far short of the 64 MiB announced
                    sock.sendall(b"x" * 16 * 1024)
                    sent += 16 * 1024
            assert sent < 8 * MiB  # cut off: the server did not read on
            too_large = read_answer(sock)
            assert too_large.status == 400 and "limit" in json.loads(too_large.body)["message"]
            assert too_large.getheader("Connection") == "close" and is_closed(sock)

        while agent.call("poll", {}).status_code != 429:
            pass
        sock, _ = start_upload(server, agent, task["id"], 64 * MiB)
        with sock:  # nothing of the file sent at all
            limited = read_answer(sock)
            assert limited.status == 429 and limited.getheader("Retry-After") == "60"
            assert is_closed(sock)

        assert [c.status for c in server.calls_to("/upload")] == [400, 429]
        assert client.health() == {"status": "healthy"}      # the server carries on
        assert list((server.data_dir / "files").iterdir()) == []
    assert server.errors == []


def test_request_timeout_cuts_off_a_slow_upload_with_an_empty_408(make_dev_server, new_agent):
    server = make_dev_server(request_timeout_secs=1)
    with DevClient(server.url, server.admin_key) as client:
        agent = new_agent(server, client)
        task = client.submit_task(agent.sid, "p")
        server.faults.slow_upload_next(1, bytes_per_sec=20_000)

        started = time.monotonic()
        cut = agent.upload(task["id"], "slow.bin", b"x" * 100_000)  # 5 s at that pace
        took = time.monotonic() - started
        assert cut.status_code == 408 and cut.content == b"" and "content-type" not in cut.headers
        assert cut.headers["connection"] == "close" and 1 <= took < 4.5

        assert agent.upload(task["id"], "quick.bin", b"x").status_code == 200  # only one was slowed
        assert [f["filename"] for f in client.list_files(task["id"])] == ["quick.bin"]
        assert [c.status for c in server.calls_to("/upload")] == [408, 200]
    assert server.errors == []


def test_request_timeout_does_not_cut_off_downloads(make_dev_server, new_agent):
    server = make_dev_server(request_timeout_secs=1)
    data = os.urandom(16 * MiB)  # more than the socket buffers hold: the server waits on the reader
    with DevClient(server.url, server.admin_key) as client:
        agent = new_agent(server, client)
        client.submit_task(agent.sid, "p", files=[("in.bin", data)])
        (input_file,) = agent.poll()["task"]["input_files"]
        with agent.http.stream("GET", agent.download_path(input_file["id"]),
                               headers={"Accept-Encoding": "identity"}) as resp:
            assert resp.status_code == 200
            time.sleep(1.5)
            received = b"".join(resp.iter_bytes())
    assert received == data


def test_downloads_are_chunked_and_gzipped_whatever_the_file_type(dev_server, dev_client, agent):
    picture = b"\x89PNG\r\n\x1a\n" + os.urandom(3000) + b"\0" * 100_000
    dev_client.submit_task(agent.sid, "p", files=[("picture.png", picture)])
    (input_file,) = agent.poll()["task"]["input_files"]
    conn = http.client.HTTPConnection("127.0.0.1", dev_server.port, timeout=10)
    try:
        for accept, gzipped in (("deflate, gzip;q=0.5", True), ("identity", False), ("gzip;q=0", False)):
            conn.request("GET", agent.download_path(input_file["id"]), headers={
                "X-Service-ID": agent.sid, "X-API-Key": agent.key, "Accept-Encoding": accept})
            resp = conn.getresponse()
            raw = resp.read()  # http.client undoes the chunking, not the gzip
            assert resp.status == 200 and resp.getheader("Content-Type") == "image/png"
            assert resp.getheader("Transfer-Encoding") == "chunked" and resp.getheader("Content-Length") is None
            assert resp.getheader("Content-Encoding") == ("gzip" if gzipped else None)
            assert (gzip.decompress(raw) if gzipped else raw) == picture
            assert len(raw) < len(picture) if gzipped else True
    finally:
        conn.close()
    decoded = agent.http.get(agent.download_path(input_file["id"]))  # httpx asks for gzip by default
    assert decoded.headers["content-encoding"] == "gzip" and decoded.content == picture


def test_overlapping_uploads_to_one_task_fail(dev_server, dev_client, agent):
    # observed: each upload first empties the task's temporary folder, so a running one loses its file
    task = dev_client.submit_task(agent.sid, "p")
    sock, tail = start_upload(dev_server, agent, task["id"], 1000)
    with sock:
        sock.sendall(b"a" * 500)
        wait_until(lambda: dev_server.stats["uploads"] == 1, what="the first upload to be under way")
        assert agent.upload(task["id"], "second.txt", b"b").status_code == 200
        sock.sendall(b"a" * 500 + tail)
        first = read_answer(sock)
    assert first.status == 500 and json.loads(first.body)["error"] == "Internal"
    assert [f["filename"] for f in dev_client.list_files(task["id"])] == ["second.txt"]
    assert len(list((dev_server.data_dir / "files").iterdir())) == 1  # the loser left nothing behind
    assert agent.upload(task["id"], "third.txt", b"c").status_code == 200  # one after the other is fine
    assert dev_server.errors == []


@pytest.mark.timeout(120)
def test_200_mib_round_trip_is_streamed(make_dev_server, new_agent, tmp_path):
    server = make_dev_server(max_file_bytes=256 * MiB)
    source = tmp_path / "source.bin"
    block = os.urandom(MiB)
    with open(source, "wb") as out:
        for i in range(200):
            out.write(i.to_bytes(4, "big") + block[4:])
    expected = sha256_file(source)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux

    with DevClient(server.url, server.admin_key, timeout=60) as client:
        agent = new_agent(server, client)
        task = client.submit_task(agent.sid, "big", files=[("source.bin", source)])
        (input_file,) = agent.poll()["task"]["input_files"]
        assert input_file["size_bytes"] == 200 * MiB

        digest = hashlib.sha256()
        with agent.http.stream("GET", agent.download_path(input_file["id"])) as resp:
            assert resp.status_code == 200
            for chunk in resp.iter_bytes(MiB):
                digest.update(chunk)
        assert digest.hexdigest() == expected

        with open(source, "rb") as src:
            uploaded = agent.upload(task["id"], "output/copy.bin", src)
        assert uploaded.status_code == 200 and uploaded.json()["size_bytes"] == 200 * MiB
        copy = client.download_file(uploaded.json()["file_id"], tmp_path / "copy.bin")
        assert sha256_file(copy) == expected

    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert grown_mib < 100, f"peak memory grew by {grown_mib:.0f} MiB: something buffered the file"


# --------------------------------------------------------------------------- sweeper, rate limit, restart


def test_a_refused_heartbeat_still_keeps_the_agent_alive(make_dev_server, new_agent):
    server = make_dev_server(heartbeat_timeout_secs=1, sweep_interval_secs=0.1)
    with DevClient(server.url, server.admin_key) as client:
        agent = new_agent(server, client)  # registered with capacity 2
        wait_until(lambda: server.get_service(agent.sid)["status"] == "offline", timeout=5,
                   what="the silent agent to be marked offline")
        silent_since = server.get_service(agent.sid)["last_heartbeat_at"]

        assert agent.heartbeat(capacity=0).status_code == 400
        svc = server.get_service(agent.sid)
        assert svc["status"] == "online" and svc["last_heartbeat_at"] != silent_since  # observed
        assert svc["capacity"] == 2                                                    # nothing else stored

        # observed: without a capacity the load is stored, unchecked against the stored capacity
        lone = agent.call("heartbeat", {"status": "busy", "current_load": 5})
        assert lone.status_code == 200 and lone.json()["acknowledged"] is True
        svc = server.get_service(agent.sid)
        assert (svc["status"], svc["current_load"], svc["capacity"]) == ("busy", 5, 2)
        assert agent.call("heartbeat", {"status": "busy", "current_load": -1}).status_code == 400


def test_sweeper_requeues_then_fails_and_spares_the_living(make_dev_server, new_agent):
    server = make_dev_server(heartbeat_timeout_secs=1, sweep_interval_secs=0.2, max_retries=1)
    with DevClient(server.url, server.admin_key) as client:
        silent, alive = new_agent(server, client, "silent"), new_agent(server, client, "alive")
        work = client.submit_task(silent.sid, "work")
        doomed = client.submit_task(silent.sid, "cancel me")
        kept = client.submit_task(alive.sid, "kept")
        for agent, task in ((silent, work), (silent, doomed), (alive, kept)):
            assert agent.accept(task["id"]).status_code == 200
        client.cancel_task(doomed["id"])

        def silent_offline() -> bool:
            alive.heartbeat()  # the living agent keeps heartbeating all along
            return any(e["type"] == "offline" and e["service_id"] == silent.sid for e in server.events)

        wait_until(silent_offline, timeout=5, what="the silent service to be marked offline")
        requeued = client.get_task(work["id"])
        assert (requeued["status"], requeued["retry_count"]) == ("pending", 1)
        assert client.get_task(doomed["id"])["status"] == "cancelled"
        assert server.get_service(silent.sid)["status"] == "offline"
        assert silent.complete(work["id"]).status_code == 400   # requeued: the old run cannot complete

        assert silent.heartbeat().status_code == 200             # back online, takes it again
        assert silent.poll()["task"]["id"] == work["id"]
        assert silent.accept(work["id"]).status_code == 200
        wait_until(lambda: alive.heartbeat() and client.get_task(work["id"])["status"] == "failed",
                   timeout=5, what="the task to fail after its last retry")

        assert not any(e.get("service_id") == alive.sid for e in server.events)
        assert client.get_task(kept["id"])["status"] == "running"


def test_rate_limit_counts_every_request_per_key(make_dev_server, new_agent):
    server = make_dev_server(rate_limit_per_minute=5, rate_window_secs=1)
    with DevClient(server.url, server.admin_key) as client:
        agent, other = new_agent(server, client), new_agent(server, client, "other")
        statuses = [agent.call("poll", {}).status_code for _ in range(5)]
        limited = agent.heartbeat()
        assert statuses == [200] * 5
        assert limited.status_code == 429 and limited.headers["retry-after"] == "60"  # whatever the window
        assert other.call("poll", {}).status_code == 200          # a separate budget per key

        # counted before auth: a wrong key fills its own window with 401s, then gets 429
        bogus = {"X-Service-ID": agent.sid, "X-API-Key": "ak_agent_bogus"}
        wrong = [httpx.post(f"{server.url}/api/v1/agent/{agent.sid}/poll", json={}, headers=bogus).status_code
                 for _ in range(6)]
        assert wrong == [401] * 5 + [429]
        assert server.stats["429"] == 2 and server.stats["rate_limited"] == 2

        # a sliding window: once the hits age out, requests pass again
        wait_until(lambda: agent.call("poll", {}).status_code == 200, timeout=5, step=0.1,
                   what="the window to slide")


def test_rate_limit_slides_per_request_and_refusals_do_not_extend_it(make_dev_server, new_agent):
    server = make_dev_server(rate_limit_per_minute=2, rate_window_secs=2)
    with DevClient(server.url, server.admin_key) as client:
        agent = new_agent(server, client)
        first = time.monotonic()
        assert agent.call("poll", {}).status_code == 200
        time.sleep(1)
        assert agent.call("poll", {}).status_code == 200

        refusals: list[str] = []  # hammered all along: were refusals counted, nothing would ever pass again
        while (resp := agent.call("poll", {})).status_code == 429 and time.monotonic() < first + 10:
            refusals.append(resp.headers["retry-after"])
            time.sleep(0.02)
        let_through = time.monotonic()

        assert resp.status_code == 200 and let_through >= first + 2  # the first hit aged out...
        assert agent.call("poll", {}).status_code == 429             # ...the second is still in the window
        assert len(refusals) > 10 and set(refusals) == {"60"}


def test_restart_on_the_same_port_keeps_state(dev_server, dev_client, agent):
    task = dev_client.submit_task(agent.sid, "survives")
    port, url = dev_server.port, dev_server.url
    assert agent.poll()["task"]["id"] == task["id"]            # leaves a pooled keep-alive connection

    dev_server.go_down()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health")
    dev_server.come_up()
    assert (dev_server.port, dev_server.url) == (port, url)
    assert agent.poll()["task"]["id"] == task["id"]            # same key, same queue

    started = time.monotonic()
    dev_server.restart(down_for=0.2)
    assert time.monotonic() - started >= 0.2
    assert agent.accept(task["id"]).status_code == 200
    assert dev_client.get_task(task["id"])["status"] == "running"


# --------------------------------------------------------------------------- fault knobs


def test_fail_next(dev_server, dev_client, agent):
    dev_server.faults.fail_next(2, status=503, retry_after=7, path_contains="/poll")
    first, second = agent.call("poll", {}), agent.call("poll", {})
    assert (first.status_code, second.status_code) == (503, 503)
    assert first.headers["retry-after"] == "7"
    assert agent.heartbeat().status_code == 200              # other paths untouched
    assert agent.call("poll", {}).status_code == 200

    dev_server.faults.fail_next(1)                           # default: agent routes only
    assert dev_client.health() == {"status": "healthy"}
    assert agent.heartbeat().status_code == 503
    assert agent.heartbeat().status_code == 200


def test_fail_ratio(dev_server, agent):
    dev_server.faults.fail_ratio(1.0, statuses=(429,), seed=1)
    resp = agent.call("poll", {})
    assert resp.status_code == 429 and resp.headers["retry-after"] == "1"

    dev_server.faults.fail_ratio(0.5, seed=42)
    seen = {agent.call("poll", {}).status_code for _ in range(40)}
    assert seen == {200, 429, 500}

    dev_server.faults.fail_ratio(0)
    assert agent.call("poll", {}).status_code == 200


def test_delay_next(dev_server, agent):
    dev_server.faults.delay_next(1, 0.3)
    started = time.monotonic()
    assert agent.call("poll", {}).status_code == 200
    assert time.monotonic() - started >= 0.3


def test_garbage_next(dev_server, agent):
    dev_server.faults.garbage_next(1, path_contains="/poll")
    resp = agent.call("poll", {})
    assert resp.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        resp.json()
    assert agent.poll()["has_task"] is False


def test_drop_next(dev_server, agent):
    dev_server.faults.drop_next(1)
    with pytest.raises(httpx.RemoteProtocolError):
        agent.call("poll", {})
    assert agent.poll()["has_task"] is False
    assert [c.status for c in dev_server.calls_to("/poll")] == [None, 200]


def test_offer_raw_task(dev_server, dev_client, agent):
    hostile = {"id": "../../etc", "task_prompt": "p", "output_prompt": None, "session_id": None,
               "input_files": [{"id": "f/../1", "filename": "../../a\0b/c", "mime_type": None,
                                "size_bytes": 10 ** 12}]}
    dev_server.faults.offer_raw_task(agent.sid, hostile, files={"f/../1": b"payload"})

    assert agent.poll()["task"] == hostile                   # verbatim
    assert agent.accept("../../etc").status_code == 200
    resp = agent.http.get(agent.download_path("f%2F..%2F1"))
    assert resp.status_code == 200 and resp.content == b"payload"
    assert agent.complete("../../etc", status="failed", error_message="unsafe").status_code == 200
    assert dev_client.get_task("../../etc")["status"] == "failed"
    assert dev_server.calls_to("/complete")[-1].body["task_id"] == "../../etc"

    long_id = {"id": "x" * 4096, "task_prompt": "p"}        # input_files missing on purpose
    dev_server.faults.offer_raw_task(agent.sid, long_id)
    assert agent.poll()["task"] == long_id


def test_endless_download(dev_server, agent):
    dev_server.faults.endless_download("forever")
    received = 0
    with agent.http.stream("GET", agent.download_path("forever")) as resp:
        assert resp.status_code == 200
        for chunk in resp.iter_bytes():
            received += len(chunk)
            if received > 8 * MiB:
                break
    assert received > 8 * MiB
    assert agent.poll()["has_task"] is False                # the server carries on


def test_cancel_unknown(dev_server, dev_client, agent):
    dev_client.submit_task(agent.sid, "blocked behind the cancel")
    dev_server.faults.cancel_unknown(agent.sid, "ghost")
    for _ in range(2):
        assert agent.poll() == {"has_task": False, "task": None, "should_cancel": True,
                                "cancel_task_id": "ghost"}
    assert agent.complete("ghost", status="cancelled").status_code == 200
    assert agent.poll()["has_task"] is True


def test_calls_are_recorded(dev_server, agent):
    agent.poll()
    agent.heartbeat(load=1, capacity=2)
    (hb,) = dev_server.calls_to("/heartbeat")
    assert (hb.method, hb.status) == ("POST", 200)
    assert hb.body == {"status": "online", "current_load": 1, "capacity": 2, "available_capacity": 1}
    assert dev_server.calls_to("/poll")[0].time <= hb.time
    assert dev_server.errors == []


def test_stop_is_prompt_with_requests_in_flight(tmp_path, new_agent):
    threads_before = set(threading.enumerate())
    server = DevServer(data_dir=tmp_path).start()
    errors: list[Exception] = []

    def slow_request() -> None:
        try:
            httpx.get(f"{server.url}/slow", timeout=10)
        except httpx.HTTPError as exc:
            errors.append(exc)

    try:
        with DevClient(server.url, server.admin_key) as client:
            agent = new_agent(server, client)
            server.faults.endless_download("forever")
            server.faults.delay_next(1, 60, path_contains="/slow")
            slow = threading.Thread(target=slow_request)
            slow.start()
            with agent.http.stream("GET", agent.download_path("forever")) as resp:
                next(resp.iter_bytes())                      # an endless body is flowing, unread
                wait_until(lambda: server.stats["delayed"] == 1, what="the slow request to arrive")
                started = time.monotonic()
                server.stop()
                assert time.monotonic() - started < 2
            slow.join(timeout=5)
    finally:
        server.stop()
    assert len(errors) == 1                                      # the held request was cut off
    assert set(threading.enumerate()) - threads_before == set()
    assert server.errors == []


# --------------------------------------------------------------------------- the script


def test_script_prints_url_and_stops_cleanly_on_sigterm(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / "dev_server.py"), "--port", "0", "--admin-key", "k",
         "--data-dir", str(tmp_path / "data")],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url_line, key_line = proc.stdout.readline().split(), proc.stdout.readline().split()
        assert url_line[0] == "url" and url_line[1].startswith("http://127.0.0.1:")
        assert key_line == ["admin_key", "k"]
        with DevClient(url_line[1], "k") as client:
            assert client.health() == {"status": "healthy"}
            assert client.create_service("demo")["registration_token"]
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0 and stdout == "" and stderr == ""


def test_slow_download_next_sends_a_download_at_about_the_rate(dev_server, dev_client):
    svc = dev_client.create_service("slow-dl")
    with httpx.Client(base_url=dev_server.url, timeout=30) as http:
        reg = http.post("/api/v1/agent/register", json={"registration_token": svc["registration_token"],
                                                         "capacity": 1}).json()
        task = dev_client.submit_task(reg["service_id"], "p", files=[("a.bin", b"x" * 200_000)])
        (f,) = dev_client.list_files(task["id"])
        dev_server.faults.slow_download_next(1, 400_000)
        url = f"/api/v1/files/agent/{reg['service_id']}/files/{f['id']}/download"
        headers = {"X-Service-ID": reg["service_id"], "X-API-Key": reg["api_key"], "Accept-Encoding": "identity"}
        started = time.monotonic()
        slow = http.get(url, headers=headers)
        took = time.monotonic() - started
        fast = http.get(url, headers=headers)  # only the next one was slowed
    assert slow.content == fast.content == b"x" * 200_000
    assert took >= 0.4
