"""Several engines for one service (`[[executor.engines]]`): the config, the pool's choice and the
capacity it offers (pure), then the Scheduler with real TaskRunners against the local server and
two FakeBackends: tasks spread by free slots, each engine's capacity holds, and an engine that
stops answering takes no new task while its running one is re-attached when it is back within
executor.engine_grace_secs, or fails naming the engine after it. The end-to-end form on two real
engines is tests/test_multi_engine.py.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest

from agent_core import config
from agent_core.engines import EnginePool, Slots, offer, pick
from agent_core.errors import ConfigError
from agent_core.executor import build_spec, open_backend
from agent_core.journal import Journal, Stage, TaskRecord
from agent_core.protocol import Task
from agent_core.scheduler import Scheduler
from agent_core.workspace import Workspace
from tests.fakes import FakeBackend, Script
from tests.helpers import wait_until
from tests.test_runner import agent_config, dev_server  # noqa: F401  (the module's server fixture)
from tests.test_scheduler import FAST, Agent, scheduler_on, stop_all

pytestmark = pytest.mark.timeout(120)


def parse(text: str) -> config.Config:
    return config.parse(text, Path("/etc/agent-core/config.toml"))


# --- the config ---------------------------------------------------------------------------


def test_without_the_table_the_one_engine_is_the_executor_settings():
    ex = parse('[executor]\nengine = "podman"\nengine_url = "unix:///run/p.sock"\ncapacity = 3\n'
               'workspace = "copy"\n').executor
    assert ex.engines == () and ex.total_capacity == 3 and ex.engine_grace_secs == 300
    assert ex.engine_list == (config.EngineConfig(name="default", url="unix:///run/p.sock", engine="podman",
                                                  capacity=3, workspace="copy"),)


def test_the_engines_table_takes_defaults_from_the_executor_and_the_url():
    ex = parse('''
[executor]
engine = "podman"
capacity = 3
engine_grace_secs = 30
[[executor.engines]]
url = "unix:///run/podman/podman.sock"
[[executor.engines]]
name = "build-2"
engine = "docker"
url = "tcp://10.0.0.2:2376"
capacity = 5
tls_ca = "certs/ca.pem"
tls_cert = "certs/cert.pem"
tls_key = "/abs/key.pem"
[[executor.engines]]
url = "ssh://me@build-3"
workspace = "bind"
''').executor
    local, remote, ssh = ex.engine_list
    assert (local.name, local.engine, local.capacity, local.workspace, local.tls) == (
        "engine-1", "podman", 3, "bind", False)
    assert (remote.name, remote.engine, remote.capacity, remote.workspace) == ("build-2", "docker", 5, "copy")
    assert (remote.tls_ca, remote.tls_cert, remote.tls_key) == (
        Path("/etc/agent-core/certs/ca.pem"), Path("/etc/agent-core/certs/cert.pem"), Path("/abs/key.pem"))
    assert (ssh.name, ssh.workspace) == ("engine-3", "bind")  # said so: the engine sees the data dir
    assert ex.total_capacity == 11 and ex.engine_grace_secs == 30


@pytest.mark.parametrize("table, error", [
    ('name = "a"', "executor.engines[0].url: is required"),
    ('url = "http://x"', "executor.engines[0].url: must be"),
    ('url = "unix:///x"\nname = "a b"', "executor.engines[0].name: use letters"),
    ('url = "unix:///x"\ntls_ca = "ca.pem"', "executor.engines[0].tls_ca: TLS settings need a tcp:// url"),
    ('url = "tcp://h:1"\ntls_cert = "c.pem"', "tls_cert and tls_key go together"),
    ('url = "tcp://h:1"\ncapacity = 0', "executor.engines[0].capacity: must be ≥ 1"),
    ('url = "tcp://h:1"\nworkspace = "nfs"', "executor.engines[0].workspace: must be one of bind, copy"),
    ('url = "tcp://h:1"\nengine = "lxc"', "executor.engines[0].engine: must be one of docker, podman"),
    ('url = "tcp://h:1"\ncapacty = 2', "executor.engines[0].capacty: unknown key"),
])
def test_a_bad_engine_table_is_refused_naming_the_key(table, error):
    with pytest.raises(ConfigError, match=error.replace("[", r"\[").replace("]", r"\]")):
        parse(f"[[executor.engines]]\n{table}\n")


def test_two_engines_may_share_neither_a_name_nor_an_address():
    with pytest.raises(ConfigError, match=r"engines\[1\].name: 'a' names two engines"):
        parse('[[executor.engines]]\nname = "a"\nurl = "unix:///x"\n[[executor.engines]]\nname = "a"\nurl = "tcp://h:1"\n')
    with pytest.raises(ConfigError, match=r"engines\[1\].url: 'unix:///x' is also engine 'engine-1'"):
        parse('[[executor.engines]]\nurl = "unix:///x"\n[[executor.engines]]\nurl = "unix:///x"\n')
    with pytest.raises(ConfigError, match="at least one"):
        parse("[executor]\nengines = []\n")


def test_an_ssh_engine_without_paramiko_is_a_clear_error_not_a_shell(monkeypatch):
    cfg = parse('[[executor.engines]]\nname = "far"\nurl = "ssh://me:secret@build-3"\n')
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "paramiko" else real(name, *a))
    with pytest.raises(ConfigError, match="engine 'far' at build-3: an ssh:// engine needs the paramiko package") as e:
        open_backend(cfg, 2, cfg.executor.engine_list[0])
    assert "secret" not in str(e.value)


def test_a_tls_file_that_is_not_there_is_a_config_error(tmp_path):
    cfg = parse(f'[[executor.engines]]\nurl = "tcp://127.0.0.1:1"\ntls_ca = "{tmp_path}/none.pem"\n')
    with pytest.raises(ConfigError, match="engine 'engine-1'"):
        open_backend(cfg, 2, cfg.executor.engine_list[0])


# --- the choice and the offer (pure) -----------------------------------------------------


def test_a_task_goes_to_the_reachable_engine_with_the_most_free_slots():
    a, b = Slots("a", True, 2, 1), Slots("b", True, 4, 1)
    assert pick([a, b]) == "b"
    assert pick([Slots("a", True, 2, 0), Slots("b", True, 4, 2)]) == "a"  # equals: the first listed
    assert pick([a, Slots("b", False, 4, 0)]) == "a"  # one that does not answer takes nothing
    assert pick([Slots("a", True, 2, 2), Slots("b", True, 1, 3)]) is None  # full (over-full after a restart)
    assert pick([Slots("a", False, 2, 0)]) is None


def test_the_offer_is_the_sum_over_the_engines_that_answer():
    assert offer([Slots("a", True, 2, 1), Slots("b", True, 3, 2)]) == (3, 5)
    assert offer([Slots("a", True, 2, 1), Slots("b", False, 3, 2)]) == (1, 2)
    # none answers: all of them (intake is paused anyway; a capacity of 0 is no heartbeat)
    assert offer([Slots("a", False, 2, 1), Slots("b", False, 3, 0)]) == (1, 5)


# --- the scheduler on two engines ---------------------------------------------------------


class Two(Agent):
    def __init__(self, scheduler: Scheduler, a: FakeBackend, b: FakeBackend, dev_server):
        super().__init__(scheduler, a, dev_server)
        self.a, self.b = a, b

    def on(self, backend: FakeBackend) -> set[str]:
        return {c.task_id for c in backend.running()}

    def offered(self) -> list[int]:
        """The capacity of each heartbeat so far."""
        return [c.body["capacity"] for c in self.dev_server.calls_to("/heartbeat")
                if self.scheduler.service_id in c.path and c.status == 200]


@pytest.fixture
def make_two(tmp_path, dev_server, dev_client):
    """make_two(cap_a, cap_b, **config changes) -> Two (not started): engines "a" and "b" on FakeBackends."""
    made: list[Two] = []

    def make(cap_a: int = 2, cap_b: int = 2, **settings) -> Two:
        engines = [{"name": "a", "url": "unix:///fake/a.sock", "capacity": cap_a},
                   {"name": "b", "url": "tcp://127.0.0.1:1", "capacity": cap_b}]
        cfg = agent_config(tmp_path, dev_server, dev_client, **{**FAST, "executor.engines": engines, **settings})
        a, b = FakeBackend("fake://a"), FakeBackend("fake://b")
        made.append(Two(scheduler_on(cfg, EnginePool.of(cfg, [a, b])), a, b, dev_server))
        return made[-1]

    yield make
    stop_all(made, lambda agent: [agent.a, agent.b])


def submit(agent: Two, dev_client, n: int, script: Script | None = None) -> list[str]:
    ids = []
    for i in range(n):
        task_id = dev_client.submit_task(agent.scheduler.service_id, f"p{i}")["id"]
        for backend in (agent.a, agent.b):
            backend.script(task_id, script or Script(hold=True))
        ids.append(task_id)
    return ids


def journaled_engine(agent: Two, task_id: str) -> str | None:
    return json.loads((agent.data_dir / "journal" / f"{task_id}.json").read_text())["engine"]


def test_tasks_spread_over_both_engines_and_each_keeps_its_capacity(make_two, dev_client):
    # Given engines of capacity 1 and 3
    agent = make_two(1, 3)
    agent.start()
    wait_until(lambda: 4 in agent.offered(), 10, "a heartbeat offering 1 + 3")
    # When five tasks that run until released come
    ids = submit(agent, dev_client, 5)
    wait_until(lambda: len(agent.on(agent.a)) + len(agent.on(agent.b)) == 4, 10, "four containers")
    # Then the smaller engine has one, the larger three, and the fifth waits on the server
    assert len(agent.on(agent.a)) == 1 and len(agent.on(agent.b)) == 3
    assert [dev_client.get_task(t)["status"] for t in ids].count("pending") == 1
    for task_id in agent.on(agent.a):
        assert journaled_engine(agent, task_id) == "a"
    def shown() -> list[tuple]:  # the status file is rewritten a moment after each change
        return [(e["name"], e["up"], e["running"], e["capacity"], e["workspace"]) for e in agent.status()["engines"]]
    wait_until(lambda: shown() == [("a", True, 1, 1, "bind"), ("b", True, 3, 3, "copy")], 10, "the engines in status")
    assert {t["engine"] for t in agent.status()["tasks"]} == {"a", "b"}
    # And as tasks end the fifth runs, everything completes, the copy engine's through the API
    for task_id in ids:
        for backend in (agent.a, agent.b):
            backend.release(task_id)
    for task_id in ids:
        assert dev_client.wait_for_status(task_id, ("completed", "failed"), timeout=20)["status"] == "completed"
    assert agent.b.count("put_archive") >= 3 and agent.a.count("put_archive") == 0
    agent.scheduler.request_stop()
    assert agent.join() == 0


def test_equal_engines_share_the_load(make_two, dev_client):
    agent = make_two(2, 2)
    agent.start()
    submit(agent, dev_client, 4)
    wait_until(lambda: len(agent.on(agent.a)) == 2 and len(agent.on(agent.b)) == 2, 10, "two on each")


def test_an_engine_that_stops_answering_takes_no_new_task_and_leaves_the_offer(make_two, dev_client):
    # Given two idle engines, and then "a" does not answer
    agent = make_two(2, 2, **{"agent.heartbeat_interval_secs": 0.3})
    agent.start()
    agent.a.go_down()
    # Then the probe notices it while idle: the offer is b's alone, the status and reason say why
    wait_until(lambda: agent.offered()[-1:] == [2], 10, "a heartbeat offering b's capacity")
    wait_until(lambda: [e["up"] for e in agent.status()["engines"]] == [False, True], 10, "a down in status")
    status = agent.status()
    assert status["engine_ok"] is True
    assert "engine unreachable: 'a' since" in status["reason"] and "tasks go to the others" in status["reason"]
    # When tasks come, they all go to b, as many as it has room for
    ids = submit(agent, dev_client, 3)
    wait_until(lambda: len(agent.on(agent.b)) == 2, 10, "two tasks on b")
    assert agent.a.count("create") == 0
    assert [dev_client.get_task(t)["status"] for t in ids].count("pending") == 1
    # And once a is back it takes the third
    agent.a.come_back()
    wait_until(lambda: len(agent.on(agent.a)) == 1, 20, "the third task on a")
    assert agent.offered()[-1] == 4 or wait_until(lambda: agent.offered()[-1] == 4, 5, "the full offer")


def test_a_running_task_is_re_attached_when_its_engine_is_back_within_the_grace(make_two, dev_client):
    agent = make_two(1, 1)
    agent.start()
    ids = submit(agent, dev_client, 2)
    wait_until(lambda: len(agent.on(agent.a)) == 1 and len(agent.on(agent.b)) == 1, 10, "one on each")
    [on_a] = agent.on(agent.a)
    # When a goes away while its task runs, and comes back a moment later
    agent.a.go_down()
    wait_until(lambda: not agent.status()["engines"][0]["up"], 10, "a shown as down")
    assert agent.scheduler.lifecycle.step.state == "running"
    agent.a.come_back()
    wait_until(lambda: agent.status()["engines"][0]["up"], 20, "a back")
    # Then the task goes on in the same container and completes, once; b's task is untouched
    for task_id in ids:
        agent.a.release(task_id)
        agent.b.release(task_id)
    for task_id in ids:
        assert dev_client.wait_for_status(task_id, ("completed", "failed"), timeout=20)["status"] == "completed"
    assert agent.a.count("create") == 1 and dev_client.get_task(on_a)["status"] == "completed"
    agent.scheduler.request_stop()
    assert agent.join() == 0


def test_a_running_task_fails_naming_its_engine_after_the_grace_and_the_other_goes_on(make_two, dev_client):
    agent = make_two(1, 1, **{"executor.engine_grace_secs": 1})
    agent.start()
    ids = submit(agent, dev_client, 2)
    wait_until(lambda: len(agent.on(agent.a)) == 1 and len(agent.on(agent.b)) == 1, 10, "one on each")
    [on_a], [on_b] = agent.on(agent.a), agent.on(agent.b)
    # When a stays away past the grace
    agent.a.go_down()
    task = dev_client.wait_for_status(on_a, ("completed", "failed"), timeout=20)
    # Then its task fails with the reason, naming the engine; b's still runs and completes
    assert task["status"] == "failed"
    assert "container engine 'a' at fake://a did not answer for 1 s (executor.engine_grace_secs)" in \
        task["error_message"]
    assert dev_client.get_task(on_b)["status"] == "running"
    agent.b.release(on_b)
    assert dev_client.wait_for_status(on_b, ("completed", "failed"), timeout=20)["status"] == "completed"
    # And a new task goes to b while a is away; a's leftover container is removed once it is back
    [third] = submit(agent, dev_client, 1, Script())
    assert dev_client.wait_for_status(third, ("completed", "failed"), timeout=20)["status"] == "completed"
    assert agent.b.count("create") == 2
    agent.a.come_back()
    wait_until(lambda: not agent.a.of_task(on_a), 20, "a's leftover container removed")
    assert set(ids) == {on_a, on_b}
    agent.scheduler.request_stop()
    assert agent.join() == 0


def test_a_restart_re_attaches_on_the_journaled_engine_and_fails_a_task_of_an_engine_gone(make_two, dev_client):
    # Given the journal of an earlier run: a task whose container ran on b, and one on an engine
    # no longer configured
    agent = make_two(1, 1)
    sched, journal = agent.scheduler, Journal(agent.data_dir)
    ids = []
    for engine in ("b", "old"):
        task_id = dev_client.submit_task(sched.service_id, engine)["id"]
        assert sched.client.accept(task_id)
        ids.append(task_id)
    agent.b.script(ids[0], Script(outputs={"output/r.txt": b"from b"}))
    container = agent.b.create(build_spec(sched.cfg, task_id=ids[0], owner=sched.owner, workspace=None), sched.owner)
    agent.b.start(container)
    Workspace.for_task(agent.data_dir, ids[0]).create()
    journal.save(TaskRecord(task=Task(id=ids[0], task_prompt="b"), stage=Stage.LAUNCHED, container_id=container,
                            launched_at=time.time(), engine="b"))
    journal.save(TaskRecord(task=Task(id=ids[1], task_prompt="old"), stage=Stage.LAUNCHED, container_id="c" * 64,
                            launched_at=time.time(), engine="old"))
    # When the agent starts
    agent.start()
    # Then b's task is followed on b to its end, with its output; the other fails with the reason
    task = dev_client.wait_for_status(ids[1], ("completed", "failed"), timeout=20)
    assert task["status"] == "failed" and "container engine 'old', which is no longer configured" in \
        task["error_message"]
    assert dev_client.wait_for_status(ids[0], ("completed", "failed"), timeout=20)["status"] == "completed"
    assert agent.b.count("inspect") == 1 and agent.a.count("inspect") == 0 and agent.a.count("wait") == 0
    assert agent.b.count("get_archive") == 1 and not agent.b.containers  # copied out, then removed
    agent.scheduler.request_stop()
    assert agent.join() == 0
