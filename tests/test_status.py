"""`agent-core status` on a running daemon: each running task with its stage, container and age."""

from __future__ import annotations

import json
import time

import pytest

from tests.agent_fixtures import agent_cli, wait_until
from tests.test_run import DONE, containers_of, sh

pytestmark = pytest.mark.docker


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
