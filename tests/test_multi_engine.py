"""One service over two engines, end to end (issue 15 item 2): the system Docker engine with bind
workspaces, and a private dockerd of the test's own (tests/private_engine.py) reached over
tcp://127.0.0.1:<port> with TLS client certificates the test makes, in copy mode.

Tasks spread over both without ever exceeding an engine's capacity and every output arrives
byte-identical; then the second engine stops in the middle of a run: new tasks go to the first,
the daemon keeps serving, and the stopped engine's task ends exactly once: re-attached after a
quick restart, or failed naming the engine after executor.engine_grace_secs.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from contextlib import closing

import docker
import httpx
import pytest

from agent_core.executor import LABEL_SERVICE, LABEL_TASK
from tests.agent_fixtures import Agent, wait_until
from tests.private_engine import PrivateEngine, make_private_engine  # noqa: F401  (the fixture)
from tests.test_engine_outage import healthz
from tests.test_metrics import free_port
from tests.test_reliability import calls_for, read_output
from tests.test_run import DONE, sh

pytestmark = [pytest.mark.docker, pytest.mark.timeout(240)]

LINES = 300
# a result that depends on the task only, with a few bytes no text mode would keep; long tasks sleep first
SCRIPT = ('if grep -q long /workspace/task.json; then sleep 15; else sleep 1; fi; i=0; '
          f'while [ $i -lt {LINES} ]; do echo "$TASK_ID line $i"; i=$((i+1)); done > /workspace/output/result.bin; '
          "printf '\\000\\001\\377\\r\\n' >> /workspace/output/result.bin")


def expected(task_id: str) -> bytes:
    return b"".join(f"{task_id} line {i}\n".encode() for i in range(LINES)) + b"\x00\x01\xff\r\n"


def two_engines(remote: PrivateEngine, local_capacity: int, remote_capacity: int) -> list[dict]:
    tls = remote.tls
    assert tls is not None
    return [{"name": "local", "url": "unix:///var/run/docker.sock", "capacity": local_capacity},
            {"name": "remote", "url": remote.tcp_url, "capacity": remote_capacity,
             "tls_ca": str(tls.client_dir / "ca.pem"), "tls_cert": str(tls.client_dir / "cert.pem"),
             "tls_key": str(tls.client_dir / "key.pem")}]


class Sampler:
    """Counts, many times a second, the agent's containers on each engine (by its labels)."""

    def __init__(self, service_id: str, clients: dict[str, docker.DockerClient]):
        self.service_id, self.clients = service_id, clients
        self.most = Counter()
        self.tasks: dict[str, set[str]] = {name: set() for name in clients}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            for name, client in self.clients.items():
                found = client.api.containers(all=True, filters={"label": f"{LABEL_SERVICE}={self.service_id}"})
                self.most[name] = max(self.most[name], len(found))
                self.tasks[name] |= {c["Labels"][LABEL_TASK] for c in found}

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def accepted_on(agent: Agent) -> dict[str, str]:
    """task id -> the engine its log line says it was accepted on."""
    return dict(re.findall(r"task (\S+): accepted \(\d+ input files\) on engine '(\w+)'", agent.log()))


def test_twenty_tasks_spread_over_two_engines_within_each_capacity(
        make_private_engine, make_agent, docker_engine, dev_client, dev_server, tmp_path):
    # Given an agent on the system engine (bind) and a private one over TLS (copy), 2 + 2
    remote = make_private_engine(tls=True)
    agent = make_agent({**sh(SCRIPT), "executor.engines": two_engines(remote, 2, 2)})
    assert [(e.name, e.workspace) for e in agent.cfg.executor.engine_list] == [("local", "bind"), ("remote", "copy")]
    ids = [dev_client.submit_task(agent.service_id, f"task {i}")["id"] for i in range(20)]
    # When it runs them all
    with closing(remote.tls_client()) as remote_client, \
            Sampler(agent.service_id, {"local": docker_engine, "remote": remote_client}) as sampler:
        agent.start()
        ended = [dev_client.wait_for_status(t, DONE, timeout=120) for t in ids]
    # Then both engines ran tasks, never more at once than their capacity, and every output is exact
    assert [t["status"] for t in ended] == ["completed"] * 20, [t for t in ended if t["status"] != "completed"]
    assert sampler.tasks["local"] and sampler.tasks["remote"], sampler.tasks
    assert sampler.tasks["local"].isdisjoint(sampler.tasks["remote"])
    assert sampler.most["local"] <= 2 and sampler.most["remote"] <= 2, sampler.most
    placed = accepted_on(agent)
    assert {placed[t] for t in ids} == {"local", "remote"}
    for i, task_id in enumerate(ids):
        assert read_output(dev_client, task_id, "output/result.bin", tmp_path / f"out{i}") == expected(task_id)
        assert len(calls_for(dev_server, "/complete", task_id)) == 1
    # and the server was offered the sum of the two
    assert {c.body["capacity"] for c in dev_server.calls_to("/heartbeat") if agent.service_id in c.path} == {4}


@pytest.mark.parametrize("back_after_secs, grace, status", [(3, 120, "completed"), (None, 4, "failed")],
                         ids=["quick-restart", "past-the-grace"])
def test_the_second_engine_stopped_mid_run(
        back_after_secs, grace, status, make_private_engine, make_agent, dev_client, dev_server, tmp_path):
    # Given local (capacity 1) and remote (capacity 2, keeps its containers through a restart):
    # the first task goes to remote, the one with more room
    remote = make_private_engine(tls=True, live_restore=True)
    port = free_port()
    agent = make_agent({**sh(SCRIPT), "executor.engines": two_engines(remote, 1, 2),
                        "executor.engine_grace_secs": grace, "metrics.listen": f"127.0.0.1:{port}",
                        "agent.heartbeat_interval_secs": 1})
    metrics = f"http://127.0.0.1:{port}"
    long_task = dev_client.submit_task(agent.service_id, "long")["id"]
    agent.start()
    with closing(remote.tls_client()) as client:
        wait_until(lambda: client.api.containers(filters={"label": f"{LABEL_TASK}={long_task}"}), 60,
                   "the long task to run on the remote engine")
    assert accepted_on(agent)[long_task] == "remote"

    # When the remote engine stops in the middle of it
    remote.stop()
    wait_until(lambda: 'agent_core_engine_up{engine="remote"} 0.0' in httpx.get(f"{metrics}/metrics").text, 30,
               "the metrics to show the remote engine down")
    # Then new tasks go to the local engine, the daemon serving on
    short = [dev_client.submit_task(agent.service_id, f"short {i}")["id"] for i in range(3)]
    for task_id in short:
        assert dev_client.wait_for_status(task_id, DONE, timeout=60)["status"] == "completed"
        assert accepted_on(agent)[task_id] == "local"
    assert healthz(metrics) == (200, {"engine": True, "server": True, "ok": True})
    assert agent.alive() and "container engine 'remote' at tcp://127.0.0.1" in agent.log()

    if back_after_secs is not None:
        assert dev_client.get_task(long_task)["status"] == "running"
        remote.start()
    # And the remote engine's task ends exactly once, as the variant says
    ended = dev_client.wait_for_status(long_task, DONE, timeout=90)
    assert ended["status"] == status, ended
    if status == "completed":
        assert read_output(dev_client, long_task, "output/result.bin", tmp_path / "long") == expected(long_task)
    else:
        assert f"container engine 'remote' at {remote.tcp_url} did not answer for {grace} s" in ended["error_message"]
        remote.start()  # its leftover container is swept once it is back
        with closing(remote.tls_client()) as client:
            wait_until(lambda: not client.api.containers(all=True, filters={"label": f"{LABEL_TASK}={long_task}"}),
                       60, "the leftover container removed")
    time.sleep(1)
    assert len(calls_for(dev_server, "/complete", long_task)) == 1
    wait_until(lambda: 'agent_core_engine_up{engine="remote"} 1.0' in httpx.get(f"{metrics}/metrics").text, 30,
               "the metrics to show the remote engine back")
    assert agent.alive()
