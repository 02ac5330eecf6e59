"""Uploads the server answers early, refuses or cuts off, end to end with the real daemon.

The server answers an upload over its size limit, or over its rate limit, while the body is
still going out and closes the connection; it answers 408 to one running past its request
timeout (protocol.md §1, §2.5). The daemon lives through all of it: a file the server will
never take fails its task by name, everything else arrives, and nothing runs twice.
"""

from __future__ import annotations

import time
from collections import Counter

import pytest

from tests.helpers import sha256_file, wait_until
from tests.test_reliability import agent_files, calls_for, read_output
from tests.test_run import DONE, sh

pytestmark = pytest.mark.docker

MiB = 1024 ** 2


@pytest.fixture
def dev_server(make_dev_server, request):
    """The local server, with the DevServer settings of `request.param` (indirect parametrization)."""
    return make_dev_server(**getattr(request, "param", {}))


def finish_alive(agent, dev_server, task_ids: list[str], timeout: float) -> list[dict]:
    """Wait for the tasks to finish, checking all the while that the daemon is still there."""
    done: dict[str, dict] = {}
    deadline = time.monotonic() + timeout
    while True:
        assert agent.alive(), f"the daemon died:\n{agent.log()[-3000:]}"
        for task_id in task_ids:
            if task_id not in done and (task := dev_server.get_task(task_id))["status"] in DONE:
                done[task_id] = task
        if len(done) == len(task_ids):
            return [done[t] for t in task_ids]
        assert time.monotonic() < deadline, f"{len(task_ids) - len(done)} tasks unfinished after {timeout} s"
        time.sleep(0.2)


@pytest.mark.parametrize("dev_server", [{"max_file_bytes": 10 * MiB}], indirect=True)
def test_an_output_over_the_servers_limit_fails_its_task_by_name_and_the_daemon_goes_on(
        make_agent, dev_server, dev_client):
    # Given a server that takes 10 MiB per file, an agent that would send 60, and a task writing 30 and two small ones
    agent = make_agent({
        **sh("echo a > /workspace/output/a.txt; echo b > /workspace/output/b.txt; "
             "if grep -q big /workspace/task.json; then "
             "dd if=/dev/zero of=/workspace/output/big.bin bs=1M count=30 2>/dev/null; fi"),
        "limits.max_output_file_bytes": "60m",
    })
    big = dev_client.submit_task(agent.service_id, "big")["id"]
    # When it runs, and another task after it
    agent.start()
    first = finish_alive(agent, dev_server, [big], timeout=90)[0]
    after = dev_client.submit_task(agent.service_id, "small")["id"]
    second = finish_alive(agent, dev_server, [after], timeout=60)[0]
    # Then the big file is named in the failure, the small ones arrived, and the next task completed
    assert first["status"] == "failed", first
    assert f"output/big.bin ({30 * MiB} bytes)" in first["error_message"]
    assert "limit" in first["error_message"]
    assert sorted(agent_files(dev_client, big)) == ["output/a.txt", "output/b.txt"]
    assert len([c for c in calls_for(dev_server, "/upload", big) if c.status == 400]) == 1  # refused once
    assert second["status"] == "completed", second
    assert agent.alive()


def test_429s_on_uploads_cost_time_not_tasks(make_agent, dev_server, dev_client, tmp_path):
    # Given the server's 150 requests a minute and an agent without a budget of its own,
    # with a host file each container start appends to
    starts = tmp_path / "starts"
    starts.mkdir(mode=0o777)
    starts.chmod(0o777)
    agent = make_agent({
        **sh('echo "$TASK_ID" >> /log/starts; echo ok > /workspace/output/o.txt'),
        "executor.capacity": 4,
        "server.rate_limit_per_minute": 0,
        "paths.mounts": [{"host": str(starts), "container": "/log", "readonly": False}],
    })
    ids = [dev_client.submit_task(agent.service_id, f"t{n}")["id"] for n in range(60)]
    # When it drains 60 tasks: some 250 requests, so 429s come
    agent.start()
    # (which calls the server's own 429s hit is chance: in its 429 spell, the next uploads get
    # one too, answered the same way, early, with Retry-After: 60)
    wait_until(lambda: dev_server.stats["429"], 60, "the server's rate limit to be hit")
    dev_server.faults.fail_next(3, status=429, retry_after=60, path_contains="/files/upload")
    results = finish_alive(agent, dev_server, ids, timeout=240)
    # Then every task completed once: one container start and one acknowledged complete each
    assert [r["status"] for r in results] == ["completed"] * 60, [r for r in results if r["status"] != "completed"]
    assert [c.status for c in dev_server.calls_to("/upload")].count(429) > 0, "no 429 landed on an upload"
    assert Counter((starts / "starts").read_text().split()) == Counter(ids)
    assert all(len(calls_for(dev_server, "/complete", t, status=200)) == 1 for t in ids)
    assert not [e for e in dev_server.events if e["type"] in ("offline", "requeue")], dev_server.events
    assert agent.alive()


@pytest.mark.parametrize("dev_server", [{"max_file_bytes": 1024 ** 3}], indirect=True)
def test_a_100_mib_output_arrives_byte_identical_with_the_default_config(make_agent, dev_server, dev_client,
                                                                         tmp_path):
    # Given a server that takes 1 GiB files and an agent whose config leaves the limit to the server
    agent = make_agent(sh("dd if=/dev/urandom of=/workspace/output/big.bin bs=1M count=100 2>/dev/null && "
                          "sha256sum /workspace/output/big.bin | cut -c1-64 > /workspace/output/big.sha256"))
    task = dev_client.submit_task(agent.service_id, "big")["id"]
    agent.start()
    (result,) = finish_alive(agent, dev_server, [task], timeout=120)
    # Then the 100 MiB arrived whole
    assert result["status"] == "completed", result
    assert agent_files(dev_client, task)["output/big.bin"]["size_bytes"] == 100 * MiB
    digest = read_output(dev_client, task, "output/big.sha256", tmp_path / "digest").decode().strip()
    read_output(dev_client, task, "output/big.bin", tmp_path / "big.bin")
    assert sha256_file(tmp_path / "big.bin") == digest


@pytest.mark.parametrize("dev_server", [{"request_timeout_secs": 2}], indirect=True)
def test_an_upload_slower_than_the_servers_request_timeout_fails_its_task_after_two_tries(
        make_agent, dev_server, dev_client):
    # Given a server that cuts uploads off after 2 s, and reads this one at 1 MiB/s
    agent = make_agent(sh("dd if=/dev/zero of=/workspace/output/slow.bin bs=1M count=5 2>/dev/null"))
    dev_server.faults.slow_upload_next(5, bytes_per_sec=MiB)
    task = dev_client.submit_task(agent.service_id, "slow")["id"]
    agent.start()
    (result,) = finish_alive(agent, dev_server, [task], timeout=90)
    # Then the task failed naming the file, its size and the timeout, after at most 2 tries
    assert result["status"] == "failed", result
    assert f"output/slow.bin ({5 * MiB} bytes)" in result["error_message"]
    assert "request timeout" in result["error_message"]
    uploads = calls_for(dev_server, "/upload", task)
    assert 1 <= len(uploads) <= 2 and {c.status for c in uploads} == {408}
    assert agent.alive()
