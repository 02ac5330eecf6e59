"""The agent against what the real server was seen to do (protocol.md, lines marked *observed*).

The in-repo server does each of these (tests/test_devserver.py shows it); here the agent copes.
Early answers, 408s and the 429 window are in tests/test_upload_refusals.py and
tests/test_budget.py.
"""

from __future__ import annotations

import time

import pytest

from agent_core import config
from tests.agent_fixtures import agent_cli
from tests.test_reliability import calls_for, read_output
from tests.test_run import DONE, finish, sh

pytestmark = pytest.mark.docker


def test_a_service_that_never_registered_is_refused_in_one_line(make_agent, dev_client):
    # Given a config naming a service that exists but never registered (the server answers 401)
    agent = make_agent()
    never = dev_client.create_service("never-registered")
    config.update(agent.config_path, {"agent.service_id": never["id"], "agent.api_key": "ak_agent_" + "0" * 32})
    # Then `run` stops at once, exit 1, saying the server refused the credentials; no traceback
    agent.start()
    assert agent.proc.wait(60) == 1
    assert "refused our credentials" in agent.log() and "Traceback" not in agent.log()


def test_uploads_for_one_task_never_overlap(make_agent, dev_server, dev_client, tmp_path):
    # The server fails overlapping uploads to one task (500): the agent sends them one at a time
    agent = make_agent({**sh("i=0; while [ $i -lt 30 ]; do echo $i > /workspace/output/f$i; i=$((i+1)); done"),
                        "executor.capacity": 2})
    tasks = [dev_client.submit_task(agent.service_id, f"many {n}")["id"] for n in range(2)]
    agent.start()
    results = finish(dev_client, tasks, timeout=120)
    assert [r["status"] for r in results] == ["completed"] * 2, results
    for task in tasks:
        uploads = calls_for(dev_server, "/files/upload", task)
        assert len(uploads) == 30 and {c.status for c in uploads} == {200}, [c.status for c in uploads]
        assert read_output(dev_client, task, "output/f7", tmp_path / "f7") == b"7\n"


def test_a_refused_heartbeat_is_no_reason_to_stop(make_agent, dev_server, dev_client):
    # Given heartbeats answered 400 for a while (the real server still counts them as alive)
    agent = make_agent({**sh("sleep 6; echo ok > /workspace/output/ok.txt"), "agent.heartbeat_interval_secs": 1})
    dev_server.faults.fail_next(5, status=400, path_contains="/heartbeat")
    task = dev_client.submit_task(agent.service_id, "beats")["id"]
    agent.start()
    # Then the agent goes on: the task completes and heartbeats work again afterwards
    assert dev_client.wait_for_status(task, DONE, timeout=60)["status"] == "completed"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not any(c.status == 200 for c in dev_server.calls_to("/heartbeat")):
        time.sleep(0.2)
    statuses = [c.status for c in dev_server.calls_to("/heartbeat")]
    assert 400 in statuses and 200 in statuses, statuses
    assert agent.alive() and "heartbeat failed" in agent.log()
    assert agent_cli("status", config_path=agent.config_path, check=True).returncode == 0


def test_input_downloads_ask_for_the_stored_bytes_not_gzip(tmp_path, caplog):
    """The server gzips any download that accepts it; the agent asks for identity
    (docs/download-encoding.md) and says what each request did at DEBUG."""
    import http.server
    import logging
    import threading

    from agent_core.client import Client
    from agent_core.workspace import open_input

    seen: list[str | None] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the stdlib's name
            seen.append(self.headers.get("Accept-Encoding"))
            body = b"stored bytes\n" * 1000
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        with caplog.at_level(logging.DEBUG, logger="agent_core.client"), \
                Client(f"http://127.0.0.1:{httpd.server_address[1]}", service_id="s", api_key="k") as client:
            size = client.download("file-1", lambda: open_input(tmp_path / "in.bin"), 10 ** 6)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert seen == ["identity"] and size == 13000 and (tmp_path / "in.bin").read_bytes() == b"stored bytes\n" * 1000
    assert "download /api/v1/files/agent/s/files/file-1/download -> 200" in caplog.text
