"""`agent-core status` on a running daemon: each running task with its stage, container and age."""

from __future__ import annotations

import json
import os
import time

import pytest

from tests.agent_fixtures import agent_cli, wait_until
from tests.test_run import DONE, containers_of, sh

pytestmark = pytest.mark.docker


@pytest.fixture
def dev_server(make_dev_server):
    """Takes files up to 1 GiB: one test stages a 200 MiB input."""
    return make_dev_server(max_file_bytes=1024 ** 3)


def live_status(agent) -> dict:
    """`status --json`'s daemon part."""
    shown = agent_cli("status", "--json", config_path=agent.config_path, check=True)
    return json.loads(shown.stdout)["daemon"]


def test_status_shows_a_running_task_with_its_stage_and_container(make_agent, dev_client, docker_engine):
    # Given a daemon running a task that sleeps 10 s
    agent = make_agent(sh("sleep 10"))
    task_id = dev_client.submit_task(agent.service_id, "sleepy")["id"]
    agent.start()

    # When the container runs, `status --json` lists the task in stage "running"
    def running_task():
        tasks = live_status(agent).get("tasks") or []
        return next((t for t in tasks if t["id"] == task_id and t["stage"] == "running"), None)

    task = wait_until(running_task, 60, "status to show the task running")
    (container,) = containers_of(docker_engine, agent.service_id)
    assert task["container"] == container["Id"][:12]
    assert 0 <= task["age_secs"] < 60
    daemon = live_status(agent)
    assert daemon["running"] and daemon["state"] == "running"
    now = time.time()
    # heartbeats every 5 s and polls every 0.5 s in this setup: both are recent
    assert now - daemon["last_heartbeat"] < 30 and now - daemon["last_poll"] < 30
    # and the text form has one line for it: id, stage, age, container
    text = agent_cli("status", config_path=agent.config_path, check=True).stdout
    (line,) = [ln for ln in text.splitlines() if task_id in ln]
    assert line.split()[:2] == [task_id, "running"] and line.endswith(f"container {container['Id'][:12]}")
    assert "last poll" in text and "last heartbeat" in text

    # After the task, it is gone from the list while the daemon goes on
    assert dev_client.wait_for_status(task_id, DONE, timeout=60)["status"] == "completed"
    wait_until(lambda: live_status(agent).get("tasks") == [], 30, "the task to leave the status")
    assert "none running" in agent_cli("status", config_path=agent.config_path, check=True).stdout
    assert agent.alive()


def _accepted_at(dev_client, task_id: str) -> float:
    """When the server saw the accept: the truth a task's age is measured against."""
    from datetime import datetime

    task = dev_client.get_task(task_id)
    stamp = task.get("started_at") or task.get("assigned_at")
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def test_status_is_true_at_the_moment_it_is_read(make_agent, dev_server, dev_client, tmp_path):
    # Given a 20 s task with a 200 MiB input and 50 outputs, and polls every second
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        for _ in range(200):
            f.write(os.urandom(1024 * 1024))  # incompressible: the transfer takes a while
    agent = make_agent({**sh("sleep 12; i=0; while [ $i -lt 50 ]; do head -c 1048576 /dev/urandom "
                             "> /workspace/output/f$i; i=$((i+1)); done"),
                        "server.poll_interval_secs": 1})
    dev_server.faults.slow_download_next(1, 40 * 1024 * 1024)  # about 5 s, as over a real link
    task_id = dev_client.submit_task(agent.service_id, "truth", files=[("big.bin", big)])["id"]
    agent.start()
    # When `status --json` is sampled every second
    samples = []
    deadline = time.monotonic() + 120
    while dev_client.get_task(task_id)["status"] not in DONE and time.monotonic() < deadline:
        before = time.time()
        daemon = live_status(agent)
        samples.append((before, time.time(), daemon))
        time.sleep(max(0.0, 1.0 - (time.time() - before)))
    assert dev_client.get_task(task_id)["status"] == "completed"
    accepted = _accepted_at(dev_client, task_id)
    # Then each sample's age is within 1 s of the truth, and the last poll is never stale
    shown = [(lo, hi, next(t for t in d.get("tasks", []) if t["id"] == task_id), d) for lo, hi, d in samples
             if any(t["id"] == task_id for t in d.get("tasks", []))]
    assert len(shown) >= 15, len(shown)
    for lo, hi, task, daemon in shown:
        assert lo - accepted - 1 <= task["age_secs"] <= hi - accepted + 1, (task, lo - accepted)
        assert daemon["last_poll_age_secs"] <= 1 + 1 + (hi - lo), daemon
    # and the download's bytes and the uploaded files rise while they move
    down = [t["progress"]["down_bytes"] for _, _, t, _ in shown if t["stage"] == "downloading"
            and "down_bytes" in t.get("progress", {})]
    up = [t["progress"]["up_files"] for _, _, t, _ in shown if t["stage"] == "uploading"]
    assert down == sorted(down) and up == sorted(up), (down, up)
    assert all(t["progress"].get("down_total") == 200 * 1024 * 1024 for _, _, t, _ in shown
               if t["stage"] == "downloading")
    assert len(set(down)) >= 2 or len(set(up)) >= 2, (down, up)


def test_status_names_an_unreachable_server_low_disk_and_a_lost_engine_with_their_times(
        make_agent, dev_server, dev_client, tmp_path):
    from tests.engine_proxy import EngineProxy

    # Given an agent whose engine is reached through a proxy the test can cut
    proxy = EngineProxy(tmp_path / "engine.sock").start()
    agent = make_agent(sh("sleep 6"))
    agent.start(env={"DOCKER_HOST": proxy.url})
    wait_until(lambda: live_status(agent).get("state") == "running", 30, "the agent to run")
    try:
        # When the engine goes away in the middle of a task
        task = dev_client.submit_task(agent.service_id, "outage")["id"]
        wait_until(lambda: any(t["stage"] == "running" for t in live_status(agent).get("tasks", [])), 60,
                   "the task to run")
        proxy.cut()
        # Then status says intake is paused because the engine is unreachable, with the error's time
        daemon = wait_until(lambda: (d := live_status(agent)).get("reason") == "paused: engine unreachable" and d,
                            60, "status to name the engine")
        assert daemon["engine_ok"] is False and daemon["errors"]["engine"]["age_secs"] < 60
        text = agent_cli("status", config_path=agent.config_path, check=True).stdout
        assert "engine unreachable" in text
        # and when it is back the task ends (exactly once) and the reason is gone
        proxy.start()
        assert dev_client.wait_for_status(task, DONE, timeout=60)["status"] in ("completed", "failed")
        wait_until(lambda: live_status(agent).get("reason") is None, 30, "the pause to end")
    finally:
        proxy.cut()
    # When the server goes away: status names it, since when and why
    dev_server.stop()
    daemon = wait_until(lambda: (d := live_status(agent)).get("reason", "") and
                        d["reason"].startswith("server unreachable since") and d, 60, "status to name the server")
    assert "poll" in daemon["errors"] and daemon["errors"]["poll"]["age_secs"] < 60
    assert "server unreachable since" in agent_cli("status", config_path=agent.config_path, check=True).stdout
    agent.stop()


def test_status_names_low_disk(make_agent):
    agent = make_agent({"paths.min_free_disk_mb": 10 ** 9})
    agent.start()
    daemon = wait_until(lambda: (d := live_status(agent)).get("reason") and d, 30, "status to name the disk")
    assert daemon["reason"].startswith("paused: disk low") and "min_free_disk_mb" in daemon["reason"]
    assert daemon["errors"]["disk"]["age_secs"] < 30
    assert "paused: disk low" in agent_cli("status", config_path=agent.config_path, check=True).stdout


def test_a_stop_while_the_engine_is_gone_leaves_the_task_to_the_next_start(make_agent, dev_client, tmp_path):
    from tests.engine_proxy import EngineProxy

    proxy = EngineProxy(tmp_path / "engine.sock").start()
    agent = make_agent({**sh("sleep 8; echo done > /workspace/output/r.txt"), "agent.shutdown_grace_secs": 2})
    agent.start(env={"DOCKER_HOST": proxy.url})
    task = dev_client.submit_task(agent.service_id, "stranded")["id"]
    wait_until(lambda: any(t["stage"] == "running" for t in live_status(agent).get("tasks", [])), 60,
               "the task to run")
    proxy.cut()
    # When the agent is stopped while it cannot reach its engine, it still leaves within the ladder
    started = time.monotonic()
    agent.stop(timeout=60)
    assert time.monotonic() - started < 30
    assert "left for the next start" in agent.log()
    # and the next start, with the engine back, finishes the task exactly once
    proxy.start()
    agent.start(env={"DOCKER_HOST": proxy.url})
    assert dev_client.wait_for_status(task, DONE, timeout=60)["status"] == "completed"
    proxy.cut()
