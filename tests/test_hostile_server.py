"""A hostile server, end to end: the real `agent-core run` behind a proxy that lies (issue 4).

The proxy (tests/hostile_proxy.py) stands between the agent and the local server. It
sends a reply of 300 MB, offers tasks whose ids cannot be answered, and records every
path the agent asks for: none may leave the agent routes, whatever ids the server sends.
"""

from __future__ import annotations

import re
import threading

import psutil
import pytest

from agent_core import config
from agent_core.client import path_segment
from tests.agent_fixtures import wait_until
from tests.hostile_proxy import hostile_proxy, huge_json, poll_offer  # noqa: F401 (a fixture)
from tests.test_hostile import wait_done
from tests.test_run import DONE, sh

pytestmark = pytest.mark.docker

MiB = 1024 ** 2
MB = 1000 ** 2


def start_behind(agent, proxy) -> None:
    config.update(agent.config_path, {"server.base_url": proxy.url})
    agent.start()


class RssSampler:
    """The largest RSS of a process, sampled every 10 ms from start to stop."""

    def __init__(self, pid: int):
        self._process = psutil.Process(pid)
        self._stop = threading.Event()
        self.peak = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def polls(proxy) -> int:
    return sum(p.endswith("/poll") for p in proxy.paths)


def test_a_300_mb_poll_reply_is_refused_and_the_agent_serves_on(make_agent, dev_client, hostile_proxy):
    # Given an agent that has settled into polling through the proxy
    agent = make_agent()
    start_behind(agent, hostile_proxy)
    wait_until(lambda: polls(hostile_proxy) >= 3, 30, "the agent to poll")
    baseline = psutil.Process(agent.proc.pid).memory_info().rss
    # When the next poll is answered with 300 MB of JSON, sent without a length
    with RssSampler(agent.proc.pid) as rss:
        hostile_proxy.replace_next(1, "/poll", huge_json(300 * MB))
        (served,) = wait_until(lambda: hostile_proxy.served, 60, "the huge reply to end")
        wait_until(lambda: "reply larger than limits.max_reply_bytes" in agent.log(), 30, "the refusal to be logged")
    # Then the agent hung up early, its memory grew by far less than the reply
    assert served.sent < 100 * MB
    assert rss.peak - baseline < 64 * MiB, f"RSS grew by {(rss.peak - baseline) / MiB:.0f} MiB"
    # and it serves on: a task submitted now completes
    task = dev_client.submit_task(agent.service_id, "after")["id"]
    assert dev_client.wait_for_status(task, DONE, timeout=60)["status"] == "completed"
    assert agent.alive() and "Traceback" not in agent.log()


HOSTILE_FILE_IDS = ["../../../../../health", "x?y=1#frag", "..", "a%2Fb"]


def test_hostile_file_ids_never_take_the_agent_off_its_routes(make_agent, dev_server, dev_client,
                                                             hostile_proxy):
    # Given tasks whose input files have ids made to reach other paths of the server
    agent = make_agent(sh("cat /workspace/input/* > /workspace/output/got.txt"))
    keys = [dev_server.faults.offer_raw_task(
        agent.service_id,
        {"id": f"hostile-file-{n}", "task_prompt": "p",
         "input_files": [{"id": file_id, "filename": "in.txt", "size_bytes": 4}]},
        files={file_id: b"data"}) for n, file_id in enumerate(HOSTILE_FILE_IDS)]
    start_behind(agent, hostile_proxy)
    # When the agent runs them (the dev server reads each id back from its one segment)
    results = [wait_done(dev_server, key) for key in keys]
    # Then every request it sent stayed on the agent routes, each id one segment of its own
    sid = re.escape(agent.service_id)
    agent_route = re.compile(rf"/api/v1/agent/{sid}/(poll|accept|complete|heartbeat)")
    files_route = re.compile(rf"/api/v1/files/agent/{sid}/files/(upload|(?P<id>[^/?#]+)/download)")
    downloads = []
    for path in hostile_proxy.paths:
        match = agent_route.fullmatch(path) or files_route.fullmatch(path)
        assert match, f"the agent asked for {path!r}"
        if match.re is files_route and match["id"]:
            downloads.append(match["id"])
    assert set(downloads) == {path_segment(i) for i in HOSTILE_FILE_IDS}
    # and the tasks ran on what they were given, the daemon alive
    assert [r["status"] for r in results] == ["completed"] * len(keys), results
    assert agent.alive() and "Traceback" not in agent.log()


def test_a_numeric_task_id_ahead_of_a_normal_task_does_not_stop_it(make_agent, dev_client, hostile_proxy):
    # Given a proxy that offers a task with a numeric id on the first 3 polls, ahead of a real task
    agent = make_agent()
    hostile_proxy.replace_next(3, "/poll", poll_offer({"id": 12345, "task_prompt": "numeric"}))
    task = dev_client.submit_task(agent.service_id, "normal")["id"]
    start_behind(agent, hostile_proxy)
    # Then the real task completes once the proxy lets the server's answer through
    assert dev_client.wait_for_status(task, DONE, timeout=60)["status"] == "completed"
    assert len(hostile_proxy.served) == 3
    # and the skipped offer was logged with why, not as a failed poll
    log = agent.log()
    assert "task id is a number, not a string: skipped" in log
    assert "poll failed" not in log
    assert agent.alive()
