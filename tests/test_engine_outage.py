"""A Docker engine outage during a run, on a real second engine (issue 13 item 7).

The agent runs on a private dockerd of the test's own (tests/private_engine.py); the test stops
that engine in the middle of a task and starts it again. The daemon must survive, say so in its
log, `status` and /healthz, take no new task while the engine is gone, and end the task exactly
once: failed with a reason when the engine's shutdown killed the container, re-attached with
its outputs when the container lived through it (--live-restore). An engine that goes while the
agent is idle must be noticed before a task is taken, not by failing one.
"""

from __future__ import annotations

import os
import subprocess
import time
from contextlib import closing
from dataclasses import dataclass
from typing import Callable

import httpx
import pytest
import requests.exceptions

from agent_core.executor import LABEL_TASK
from tests.agent_fixtures import Agent, agent_cli, wait_until
from tests.docker_fixtures import BUSYBOX_IMAGE
from tests.private_engine import PrivateEngine, make_private_engine  # noqa: F401  (the fixture)
from tests.test_metrics import free_port
from tests.test_reliability import calls_for, read_output
from tests.test_run import DONE, sh
from tests.test_status import live_status

pytestmark = pytest.mark.docker

# The first task sleeps long enough to be cut in the middle; the second ends at once.
SCRIPT = ('echo "$TASK_ID" >> /runs/started; '
          'if grep -q long /workspace/task.json; then sleep 20; fi; '
          'echo "result of $TASK_ID" > /workspace/output/result.txt')
DOWN_FOR_SECS = 6  # twelve poll intervals: time to take the queued task, were intake not paused


def container_state(engine, task_id: str) -> str | None:
    with closing(engine.client()) as client:
        found = client.api.containers(all=True, filters={"label": f"{LABEL_TASK}={task_id}"})
    return found[0]["State"] if found else None


def healthz(url: str) -> tuple[int, dict] | None:
    try:
        r = httpx.get(f"{url}/healthz", timeout=10)
    except httpx.TransportError:
        return None  # not listening yet
    return r.status_code, r.json()


# --- the private engine itself -------------------------------------------------------------


def test_the_private_engine_serves_tls_only_to_a_client_with_a_certificate(make_private_engine, docker_engine):
    engine = make_private_engine(tls=True)
    with closing(engine.tls_client()) as client:
        assert client.ping()
        out = client.containers.run(BUSYBOX_IMAGE, ["echo", "over tls"], network_mode="none", remove=True)
        assert out == b"over tls\n"
    # a client without a certificate is turned away by the TLS handshake
    with closing(engine.tls_client(client_cert=False, timeout=10)) as bare, \
            pytest.raises(requests.exceptions.ConnectionError):
        bare.ping()
    # and the environment form works for the docker CLI
    shown = subprocess.run(["docker", "info", "--format", "{{.DockerRootDir}}"], capture_output=True, text=True,
                           timeout=30, env={**os.environ, **engine.tls_env()})
    assert shown.stdout.strip() == str(engine.data_root), shown.stderr
    # the system engine is another: its data root, not ours
    assert docker_engine.info()["DockerRootDir"] != str(engine.data_root)


# --- the outage ----------------------------------------------------------------------------


@dataclass
class Setup:
    agent: Agent
    metrics: str  # the agent's /metrics and /healthz endpoint


@pytest.fixture
def agent_on(make_agent, tmp_path) -> Callable[[PrivateEngine], Setup]:
    """agent_on(engine) -> an agent whose tasks run SCRIPT on `engine`, with room for two tasks."""
    def make(engine: PrivateEngine) -> Setup:
        runs = tmp_path / "runs"
        runs.mkdir()
        port = free_port()
        agent = make_agent({**sh(SCRIPT), "executor.engine_url": engine.url, "metrics.listen": f"127.0.0.1:{port}",
                            "paths.mounts": [{"host": str(runs), "container": "/runs", "readonly": False}]})
        return Setup(agent, f"http://127.0.0.1:{port}")
    return make


def started(tmp_path) -> list[str]:
    """The tasks whose containers started, once per start."""
    return sorted((tmp_path / "runs" / "started").read_text().split())


def assert_paused_for_the_engine(setup: Setup, daemon: dict) -> None:
    """Status (both forms), the log and /healthz all say the engine is gone."""
    assert daemon["reason"] == "paused: engine unreachable" and daemon["engine_ok"] is False, daemon
    agent = setup.agent
    assert "engine unreachable" in agent_cli("status", config_path=agent.config_path, check=True).stdout
    assert "container engine unreachable" in agent.log()
    assert healthz(setup.metrics) == (503, {"engine": False, "server": True, "ok": False})
    assert agent.alive()


def assert_not_taken(dev_server, dev_client, task_id: str) -> None:
    assert dev_client.get_task(task_id)["status"] == "pending"
    assert not calls_for(dev_server, "/accept", task_id)


def assert_resumed(setup: Setup, dev_client, task_id: str, tmp_path) -> None:
    """The engine is back: the queued task runs and completes, the pause is over, health is back."""
    assert dev_client.wait_for_status(task_id, DONE, timeout=60)["status"] == "completed"
    assert read_output(dev_client, task_id, "output/result.txt", tmp_path / "q") == f"result of {task_id}\n".encode()
    wait_until(lambda: live_status(setup.agent).get("reason") is None, 30, "the pause to end")
    assert healthz(setup.metrics) == (200, {"engine": True, "server": True, "ok": True})
    assert "container engine is back" in setup.agent.log()
    assert setup.agent.alive()


@dataclass(frozen=True)
class Variant:
    live_restore: bool
    status: str  # how the cut task ends
    says: tuple[str, ...] = ()  # what its error message must name (lower case)


VARIANTS = {
    # the engine's shutdown stops the container (SIGTERM, then SIGKILL after 10 s): the task cannot
    # complete, and its error must say why: the exit code alone would not tell it from any other kill
    "plain": Variant(live_restore=False, status="failed", says=("exit code 137", "engine")),
    # the container lives through the restart: the agent waits on it again and uploads its result
    "live-restore": Variant(live_restore=True, status="completed"),
}


@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
def test_an_engine_outage_mid_task_pauses_intake_and_ends_the_task_once(
        variant, make_private_engine, agent_on, dev_server, dev_client, tmp_path):
    # Given an agent on a private engine, running a 20 s task
    engine = make_private_engine(live_restore=variant.live_restore)
    setup = agent_on(engine)
    long_task = dev_client.submit_task(setup.agent.service_id, "long")["id"]
    setup.agent.start()
    wait_until(lambda: container_state(engine, long_task) == "running", 60, "the task to run on the private engine")
    assert wait_until(lambda: healthz(setup.metrics), 30, "/healthz")[0] == 200

    # When the engine stops in the middle of the task
    engine.stop()
    # Then the daemon lives on, keeps the task, and says why it takes nothing
    def paused_or_ended() -> dict | None:
        daemon = live_status(setup.agent)
        ended = dev_client.get_task(long_task)["status"] in DONE
        return daemon if ended or daemon.get("reason") == "paused: engine unreachable" else None

    daemon = wait_until(paused_or_ended, 60, "status to name the engine")
    cut = dev_client.get_task(long_task)
    assert cut["status"] == "running", f"the task was reported while its engine was away: {cut}"
    assert_paused_for_the_engine(setup, daemon)
    # and a task queued meanwhile is not taken
    queued = dev_client.submit_task(setup.agent.service_id, "short")["id"]
    time.sleep(DOWN_FOR_SECS)
    assert_not_taken(dev_server, dev_client, queued)
    assert dev_client.get_task(long_task)["status"] == "running"  # still not reported

    # When the engine is back
    engine.start()
    # Then the cut task ends exactly once, as the variant says
    ended = dev_client.wait_for_status(long_task, DONE, timeout=90)
    assert ended["status"] == variant.status, ended
    if variant.status == "completed":
        assert read_output(dev_client, long_task, "output/result.txt", tmp_path / "r") == \
            f"result of {long_task}\n".encode()
    assert all(piece in (ended["error_message"] or "").lower() for piece in variant.says), ended
    assert len(calls_for(dev_server, "/complete", long_task)) == 1
    # and the queued task then runs, and each ran once
    assert_resumed(setup, dev_client, queued, tmp_path)
    assert started(tmp_path) == sorted([long_task, queued])


def test_an_engine_gone_while_idle_is_noticed_before_a_task_is_taken(
        make_private_engine, agent_on, dev_server, dev_client, tmp_path):
    # Given an idle agent on a private engine
    engine = make_private_engine()
    setup = agent_on(engine)
    setup.agent.start()
    wait_until(lambda: healthz(setup.metrics) == (200, {"engine": True, "server": True, "ok": True}), 30,
               "the agent to be healthy")
    # When the engine stops and a task is queued
    engine.stop()
    queued = dev_client.submit_task(setup.agent.service_id, "short")["id"]
    time.sleep(DOWN_FOR_SECS)
    # Then the task is left to wait, not taken and failed, and the daemon says why
    shown = dev_client.get_task(queued)
    assert shown["status"] == "pending", f"the task was taken while the engine was away: {shown}"
    assert_not_taken(dev_server, dev_client, queued)
    assert_paused_for_the_engine(setup, live_status(setup.agent))
    # and when the engine is back the task runs, once
    engine.start()
    assert_resumed(setup, dev_client, queued, tmp_path)
    assert started(tmp_path) == [queued]
