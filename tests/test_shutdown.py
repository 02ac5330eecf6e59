"""The shutdown ladder end to end: SIGTERM drains, a second cancels, a third exits at once;
`agent-core stop` walks the same ladder (issue 4)."""

from __future__ import annotations

import json
import signal
import time

import psutil
import pytest

from agent_core import process
from tests.agent_fixtures import agent_cli, wait_until
from tests.test_reliability import (calls_for, container_status, heartbeat_statuses, journal_record,
                                    our_containers, read_output)
from tests.test_run import DONE, sh

pytestmark = pytest.mark.docker

GRACE = 30  # agent.shutdown_grace_secs in make_agent


def daemon_state(agent) -> str | None:
    live = process.read_status(agent.cfg.paths.data_dir)
    return live.state_name if live is not None else None


def start_running(agent, dev_client, docker_engine, *, start: bool = True) -> str:
    """Submit a task (start the agent's `run` process) and wait until its container runs."""
    task = dev_client.submit_task(agent.service_id, "work")["id"]
    if start:
        agent.start()
    wait_until(lambda: container_status(docker_engine, task) == "running", 60, "the task's container")
    return task


def step(agent, state: str) -> None:
    """One SIGTERM, then wait until the daemon shows it took it (signals sent together would merge)."""
    agent.signal(signal.SIGTERM)
    wait_until(lambda: daemon_state(agent) == state or not agent.alive(), 10, f"state {state}")


def test_sigterm_drains_a_running_task_then_goes_offline(make_agent, dev_server, dev_client, docker_engine,
                                                         tmp_path):
    agent = make_agent(sh("sleep 5; echo finished > /workspace/output/result.txt"))
    task = start_running(agent, dev_client, docker_engine)
    signalled = time.monotonic()
    step(agent, "draining")
    late = dev_client.submit_task(agent.service_id, "too late")["id"]  # a drain takes no new work
    assert agent.proc.wait(GRACE + 10) == 0
    print(f"drained and exited {time.monotonic() - signalled:.1f} s after SIGTERM")
    result = dev_client.get_task(task)
    assert result["status"] == "completed", result
    assert read_output(dev_client, task, "output/result.txt", tmp_path / "r") == b"finished\n"
    assert dev_client.get_task(late)["status"] == "pending"
    assert heartbeat_statuses(dev_server, agent.service_id)[-1] == "offline"
    assert not our_containers(docker_engine, agent.service_id)


def test_a_second_sigterm_cancels_the_running_task_with_its_outputs(make_agent, dev_server, dev_client,
                                                                    docker_engine, tmp_path):
    # Given a task that has written part of its output and then waits (and ends on SIGTERM)
    agent = make_agent(sh("echo partial > /workspace/output/partial.txt; trap 'exit 143' TERM; "
                          "sleep 120 & wait"))
    task = start_running(agent, dev_client, docker_engine)
    step(agent, "draining")
    step(agent, "cancelling")
    assert agent.proc.wait(30) == 0
    result = dev_client.get_task(task)
    assert result["status"] == "failed" and result["error_message"] == "agent shutting down", result
    assert read_output(dev_client, task, "output/partial.txt", tmp_path / "p") == b"partial\n"
    assert heartbeat_statuses(dev_server, agent.service_id)[-1] == "offline"
    assert not our_containers(docker_engine, agent.service_id)


def test_a_third_sigterm_exits_at_once_and_the_next_start_recovers_the_task(make_agent, dev_server,
                                                                            dev_client, docker_engine,
                                                                            tmp_path):
    # Given a task that ignores SIGTERM (so its container outlives the daemon), counting its starts
    runs = tmp_path / "runs"
    runs.mkdir()
    agent = make_agent({
        **sh("echo once >> /runs/started; echo partial > /workspace/output/partial.txt; "
             "trap '' TERM; sleep 120"),
        "paths.mounts": [{"host": str(runs), "container": "/runs", "readonly": False}],
    })
    task = start_running(agent, dev_client, docker_engine)
    step(agent, "draining")
    step(agent, "cancelling")
    # the cancel is journaled before the container is told to stop
    wait_until(lambda: journal_record(agent, task)["cancel_reason"] == "agent_stopping", 10, "the cancel")
    signalled = time.monotonic()
    agent.signal(signal.SIGTERM)
    assert agent.proc.wait(10) == 1
    print(f"exited {time.monotonic() - signalled:.1f} s after the third SIGTERM")
    # the task was left to the journal, its container to the next start
    assert journal_record(agent, task)["stage"] == "LAUNCHED"
    assert container_status(docker_engine, task) == "running"  # it ignores SIGTERM; the kill is 10 s away
    assert dev_client.get_task(task)["status"] == "running"
    # When the agent starts again, it takes the task up where it was and finishes the cancel
    agent.start()
    result = dev_client.wait_for_status(task, DONE, timeout=60)
    assert result["status"] == "failed" and result["error_message"] == "agent shutting down", result
    assert read_output(dev_client, task, "output/partial.txt", tmp_path / "p") == b"partial\n"
    assert (runs / "started").read_text() == "once\n"
    assert len(calls_for(dev_server, "/complete", task)) == 1
    assert "resuming after restart at stage LAUNCHED" in agent.log()
    wait_until(lambda: not our_containers(docker_engine, agent.service_id), 15, "the container to go")


def test_stop_force_cancels_a_detached_agent_and_waits_for_it(make_agent, dev_server, dev_client,
                                                              docker_engine):
    # Given a detached agent running a task that ignores SIGTERM (it must be killed after 10 s)
    agent = make_agent(sh("sleep 120"))
    assert agent_cli("run-detached", config_path=agent.config_path).returncode == 0
    pid = process.running_pid(agent.cfg.paths.data_dir)
    try:
        task = start_running(agent, dev_client, docker_engine, start=False)
        # When it is stopped with --force
        stopped = agent_cli("stop", "--force", config_path=agent.config_path, timeout=120)
    finally:
        if psutil.pid_exists(pid) and process.running_pid(agent.cfg.paths.data_dir) == pid:
            psutil.Process(pid).kill()
    # Then the task was reported failed, the daemon left by itself, and nothing is left behind
    assert stopped.returncode == 0, stopped.stderr
    assert f"agent (pid {pid}) stopped" in stopped.stdout, stopped.stdout
    result = dev_client.get_task(task)
    assert result["status"] == "failed" and result["error_message"] == "agent shutting down", result
    assert process.running_pid(agent.cfg.paths.data_dir) is None
    wait_until(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE,
               10, "the daemon process to end")  # the pidfile lock goes a moment before the process
    assert heartbeat_statuses(dev_server, agent.service_id)[-1] == "offline"
    assert not our_containers(docker_engine, agent.service_id)
    status = json.loads(agent_cli("status", "--json", config_path=agent.config_path, check=True).stdout)
    assert status["daemon"]["running"] is False
