"""The Scheduler with real TaskRunners against the local server and a FakeBackend: the shutdown
ladder and the circuit breaker, driven only through `run`, `request_stop`, `load` and the
status file, with tasks submitted to the server like any other.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import pytest

from agent_core import process
from agent_core import scheduler as scheduler_mod
from agent_core.client import Client
from agent_core.errors import DockerUnavailable, ImageMissing
from agent_core.executor import EngineInfo
from agent_core.journal import Journal
from agent_core.lifecycle import Lifecycle, Step
from agent_core.scheduler import ExitNow, Scheduler
from tests.fakes import FakeBackend, Script
from tests.helpers import wait_until
from tests.test_runner import agent_config, dev_server  # noqa: F401  (the module's server fixture)

FAST = {"agent.heartbeat_interval_secs": 0.2, "agent.shutdown_grace_secs": 1,
        "server.poll_interval_secs": 0.2, "executor.capacity": 1}


class Agent:
    """A Scheduler serving in a thread, with the FakeBackend behind it."""

    def __init__(self, scheduler: Scheduler, backend: FakeBackend, dev_server):
        self.scheduler, self.backend, self.dev_server = scheduler, backend, dev_server
        self.data_dir = Path(scheduler.cfg.paths.data_dir)
        self.result: dict = {}
        self.thread = threading.Thread(target=lambda: self.result.setdefault("code", scheduler.run()),
                                       daemon=True)

    def start(self) -> Agent:
        self.thread.start()
        wait_until(lambda: self.scheduler.last_poll, 10, "the first poll")
        return self

    def join(self, timeout: float = 15) -> int:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the scheduler did not stop"
        return self.result["code"]

    def status(self) -> dict:
        return json.loads((self.data_dir / process.STATUSFILE).read_text())

    def heartbeats(self) -> list[str]:
        return [c.body["status"] for c in self.dev_server.calls_to("/heartbeat")
                if self.scheduler.service_id in c.path and c.status == 200]

    def running(self, task_id: str) -> bool:
        return [c.status for c in self.backend.of_task(task_id)] == ["running"]


def scheduler_on(cfg, executor) -> Scheduler:
    """A Scheduler with a client of its own on `executor` (a backend, or an engine pool)."""
    lifecycle = Lifecycle()
    return Scheduler(cfg, Client.from_config(cfg, lifecycle=lifecycle), executor, lifecycle=lifecycle)


def stop_all(agents: list[Agent], backends_of) -> None:
    """Teardown: exit at once, end every held call of the agent's backends, close its client."""
    for agent in agents:
        agent.scheduler.lifecycle.exit_now()
        for backend in backends_of(agent):
            backend.close()
        agent.thread.join(10)
        agent.scheduler.client.close()


@pytest.fixture
def make_agent_node(tmp_path, dev_server, dev_client):
    """make_agent_node(**config changes) -> Agent (not started); stopped in teardown."""
    made: list[Agent] = []

    def make(**settings) -> Agent:
        cfg = agent_config(tmp_path, dev_server, dev_client, **{**FAST, **settings})
        backend = FakeBackend()
        made.append(Agent(scheduler_on(cfg, backend), backend, dev_server))
        return made[-1]

    yield make
    stop_all(made, lambda agent: [agent.backend])


def submit_held(agent: Agent, dev_client, prompt: str = "p") -> str:
    """A task whose container runs until released or stopped."""
    task_id = dev_client.submit_task(agent.scheduler.service_id, prompt)["id"]
    agent.backend.script(task_id, Script(hold=True))
    return task_id


def started(agent: Agent, task_id: str) -> None:
    wait_until(lambda: agent.scheduler.load == 1 and agent.running(task_id), 10, "the task's container")


# --- the shutdown ladder --------------------------------------------------------------


def test_the_ladder_moves_one_way_and_sets_its_flags_on_the_way():
    lifecycle = Lifecycle()
    assert lifecycle.step is Step.RUNNING and not lifecycle.stopping.is_set()
    assert lifecycle.advance() is Step.DRAINING and lifecycle.stopping.is_set() and not lifecycle.exiting.is_set()
    asked = lifecycle.stop_requested_at
    assert asked is not None
    assert lifecycle.reach(Step.RUNNING) is Step.DRAINING  # never back up
    assert lifecycle.advance() is Step.CANCELLING and lifecycle.stop_requested_at == asked
    assert lifecycle.advance() is Step.EXITING and lifecycle.exiting.is_set()
    assert lifecycle.advance() is Step.EXITING
    assert [Step.of(s.state) for s in Step] == list(Step) and Step.of("starting") is None


def test_a_lifecycle_wait_is_cut_short_by_the_exit_or_by_its_cancel():
    lifecycle, cancel = Lifecycle(), threading.Event()
    assert lifecycle.wait(0.05, cancel) is False
    threading.Timer(0.1, cancel.set).start()
    began = time.monotonic()
    assert lifecycle.wait(10, cancel) is True and time.monotonic() - began < 1
    threading.Timer(0.1, lifecycle.exit_now).start()
    assert lifecycle.wait(10, threading.Event()) is True and lifecycle.wait(10) is True



def test_a_drain_that_outlasts_the_grace_cancels_by_itself_then_goes_offline(
        make_agent_node, dev_server, dev_client):
    # Given a task that only ends when stopped
    agent = make_agent_node()
    task_id = submit_held(agent, dev_client)
    agent.start()
    started(agent, task_id)
    # When the first signal comes
    asked = time.monotonic()
    agent.scheduler.request_stop()
    assert agent.status()["state"] == "draining"
    # Then after the grace (1 s) the scheduler stops the container and reports the task failed
    assert agent.join() == 0
    assert time.monotonic() - asked >= 1.0
    task = dev_server.get_task(task_id)
    assert (task["status"], task["error_message"]) == ("failed", "agent shutting down")
    assert agent.backend.count("stop") == 1 and agent.backend.of_task(task_id) == []
    beats = agent.heartbeats()
    assert beats[-1] == "offline" and beats.count("offline") == 1
    assert "busy" in beats  # heartbeats went on while the task drained
    assert Journal(agent.data_dir).replay() == []


def test_a_task_that_ends_within_the_grace_is_not_cancelled(make_agent_node, dev_server, dev_client):
    agent = make_agent_node()
    task_id = submit_held(agent, dev_client)
    agent.start()
    started(agent, task_id)
    agent.scheduler.request_stop()
    polls = len(dev_server.calls_to("/poll"))
    threading.Timer(0.3, agent.backend.release, args=(task_id,)).start()
    assert agent.join() == 0
    assert dev_server.get_task(task_id)["status"] == "completed"
    assert agent.backend.count("stop") == 0
    assert len(dev_server.calls_to("/poll")) <= polls + 1  # no new work is taken while draining
    assert agent.heartbeats()[-1] == "offline"


def test_the_second_signal_cancels_without_waiting_for_the_grace(make_agent_node, dev_server, dev_client):
    agent = make_agent_node(**{"agent.shutdown_grace_secs": 60})
    task_id = submit_held(agent, dev_client)
    agent.start()
    started(agent, task_id)
    agent.scheduler.request_stop()
    asked = time.monotonic()
    agent.scheduler.request_stop()
    assert agent.status()["state"] == "cancelling"
    assert agent.join() == 0
    assert time.monotonic() - asked < 10  # not the 60 s grace
    task = dev_server.get_task(task_id)
    assert (task["status"], task["error_message"]) == ("failed", "agent shutting down")
    assert agent.heartbeats()[-1] == "offline"


def test_the_third_signal_exits_at_once_and_the_next_start_reports_the_task(
        make_agent_node, dev_server, dev_client):
    # Given a task whose container cannot be stopped (the engine hangs on stop)
    agent = make_agent_node(**{"agent.shutdown_grace_secs": 60})
    task_id = submit_held(agent, dev_client)
    stuck = agent.backend.block("stop")
    agent.start()
    started(agent, task_id)
    agent.scheduler.request_stop()
    agent.scheduler.request_stop()
    assert stuck.reached.wait(5)
    # When the third signal comes, it raises ExitNow at once and every request is cut short
    asked = time.monotonic()
    with pytest.raises(ExitNow):
        agent.scheduler.request_stop()
    assert time.monotonic() - asked < 1.0
    assert agent.scheduler.lifecycle.step is Step.EXITING and agent.scheduler.lifecycle.exiting.is_set()
    # and the task is left to the journal, unreported (the container ends once the agent is gone)
    agent.backend.release(task_id)
    agent.join()
    assert [c for c in dev_server.calls_to("/complete") if c.body["task_id"] == task_id] == []
    assert [r.task_id for r in Journal(agent.data_dir).replay()] == [task_id]
    # Then the next start reports it, with the reason journaled before the stop
    lifecycle = Lifecycle()
    with Client.from_config(agent.scheduler.cfg, lifecycle=lifecycle) as client:
        assert Scheduler(agent.scheduler.cfg, client, agent.backend, lifecycle=lifecycle, burst=True).run() == 0
    task = dev_server.get_task(task_id)
    assert (task["status"], task["error_message"]) == ("failed", "agent shutting down")
    assert Journal(agent.data_dir).replay() == []


# --- the engine ---------------------------------------------------------------------------


def test_the_status_names_the_engine_and_reads_it_again_when_it_is_back(make_agent_node, dev_client):
    # Given a running agent: its status names the engine it reached at start
    agent = make_agent_node()
    agent.start()
    assert agent.status()["engine"]["line"] == "fake 0 at fake://engine" and agent.status()["engine_ok"] is True
    # When a launch finds the engine gone, and it answers again two pings later at another address
    agent.backend.fail("create", DockerUnavailable("the engine went away"))
    agent.backend.fail("ping", DockerUnavailable("still away"), times=2)
    agent.backend.where = "fake://engine-2"
    task_id = dev_client.submit_task(agent.scheduler.service_id, "lost")["id"]
    # Then the status says it is down, then names it afresh
    wait_until(lambda: agent.status()["engine_ok"] is False, 10, "the engine to show as down")
    wait_until(lambda: agent.status()["engine_ok"], 20, "the engine to be back")
    assert agent.status()["engine"]["line"] == "fake 0 at fake://engine-2"
    assert dev_client.wait_for_status(task_id, ("completed", "failed"), timeout=10)["status"] == "failed"
    agent.scheduler.request_stop()
    assert agent.join() == 0


def test_an_engine_that_answers_as_another_than_configured_is_a_warning_not_a_refusal(make_agent_node, caplog):
    agent = make_agent_node(**{"executor.engine": "podman"})
    agent.backend.engine_info = lambda: EngineInfo("docker", "20.10", False, agent.backend.where)
    with caplog.at_level(logging.WARNING, logger="agent_core.scheduler"):
        agent.start()
        wait_until(lambda: agent.status().get("engine"), 10, "the engine described")
    assert any("executor.engine is 'podman'" in r.getMessage() for r in caplog.records), caplog.text
    assert agent.status()["engine_ok"] is True  # tasks still run: both engines can


# --- the circuit breaker ------------------------------------------------------------------


def test_three_launches_without_the_image_pause_intake_until_it_is_back(
        make_agent_node, dev_server, dev_client, monkeypatch):
    monkeypatch.setattr(scheduler_mod, "RECHECK_SECS", 0.2)
    agent = make_agent_node()
    agent.backend.image_ok = False
    agent.backend.fail("create", ImageMissing("executor image open-aaas-executor:latest is missing"), times=3)
    failing = [dev_client.submit_task(agent.scheduler.service_id, f"t{n}")["id"] for n in range(3)]
    agent.start()
    # Given three launches in a row that found no image
    for task_id in failing:
        dev_client.wait_for_status(task_id, "failed", timeout=10)
    # Then intake pauses, and the status says why
    reason = wait_until(lambda: agent.status()["reason"], 5, "a reason in the status")
    assert reason.startswith("paused since") and "is not on this host" in reason
    later = dev_client.submit_task(agent.scheduler.service_id, "later")["id"]
    time.sleep(0.6)  # three poll intervals, and as many rechecks
    assert dev_server.get_task(later)["status"] == "pending"
    # When the image is back, the next recheck resumes intake
    agent.backend.image_ok = True
    assert dev_client.wait_for_status(later, ("completed", "failed"), timeout=10)["status"] == "completed"
    wait_until(lambda: agent.status()["reason"] is None, 5, "the reason cleared")
    agent.scheduler.request_stop()
    assert agent.join() == 0
