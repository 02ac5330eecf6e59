"""`status` from a status file: ages computed when it runs, every field rendered, old and garbled files still
readable, the engine named; and the warning about another daemon of the same service. No engine: a held pidfile
stands in for a daemon."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from agent_core import config, process
from agent_core.executor import EngineInfo
from agent_core.lifecycle import Step
from agent_core.livestatus import EngineSeen, LastError, LiveStatus, TaskEntry
from tests.agent_fixtures import agent_cli, wait_until
from tests.test_cli import API_KEY, registered_config

pytestmark = pytest.mark.timeout(90)


def full_status(now: float) -> dict:
    return {
        "pid": os.getpid(), "state": "running", "reason": "paused: disk low (812 MiB free, 1024 needed)",
        "started_at": now - 600, "last_poll": now - 3, "last_heartbeat": now - 12, "engine_ok": True,
        "capacity": 2, "name": "node-7",
        "errors": {"heartbeat": {"at": now - 40, "message": "server unavailable: HTTP 503"}},
        "tasks": [{"id": "t-1", "stage": "downloading", "started_at": now - 90, "stage_since": now - 20,
                   "container": None, "age_secs": 1.0,  # a stale stored age must not be shown
                   "progress": {"down_bytes": 3 * 1024**2, "down_total": 8 * 1024**2}},
                  {"id": "t-2", "stage": "uploading", "started_at": now - 300, "stage_since": now - 7,
                   "container": "abcdef123456",
                   "progress": {"up_files": 1, "up_files_total": 4, "up_bytes": 1024**2, "up_bytes_total": 5 * 1024**2}}],
    }


def test_ages_are_computed_at_read_time_from_timestamps():
    now = 10_000.0
    out = LiveStatus.from_json(full_status(now)).with_ages(now)
    assert out["last_poll_age_secs"] == 3 and out["last_heartbeat_age_secs"] == 12 and out["started_age_secs"] == 600
    assert [t["age_secs"] for t in out["tasks"]] == [90, 300]
    assert [t["stage_age_secs"] for t in out["tasks"]] == [20, 7]
    assert out["errors"]["heartbeat"]["age_secs"] == 40
    old = {"pid": 1, "state": "running", "tasks": [{"id": "t", "stage": "running", "age_secs": 5.0, "container": None}]}
    assert LiveStatus.from_json(old).with_ages(now)["tasks"][0]["age_secs"] == 5.0  # an older daemon's: its own age


DOCKER = EngineInfo(engine="docker", version="20.10.24", rootless=False, where="unix:///var/run/docker.sock")


def test_a_status_reads_back_as_written():
    status = LiveStatus(pid=7, state=Step.DRAINING, reason="r", name="n", started_at=1.0, stop_requested_at=2.0,
                        service_id="svc", capacity=3, engine_ok=True, engine=EngineSeen.of(DOCKER), last_poll=4.0,
                        last_heartbeat=5.0, errors={"poll": LastError(6.0, "503")},
                        tasks=(TaskEntry("t", "running", 1.5, 2.5, "abc", {"down_bytes": 3}),),
                        requests={"limit_per_minute": 60})
    assert LiveStatus.from_json(json.loads(json.dumps(status.to_json()))) == status
    # the keys status --json always had are all there, the engine beside them
    assert set(status.to_json()) == {"pid", "state", "reason", "name", "started_at", "stop_requested_at", "service_id",
                                     "capacity", "engine_ok", "last_poll", "last_heartbeat", "errors", "tasks",
                                     "requests", "engine"}
    assert status.to_json()["engine"] == {"engine": "docker", "version": "20.10.24", "rootless": False,
                                          "where": "unix:///var/run/docker.sock",
                                          "line": "docker 20.10.24 at unix:///var/run/docker.sock"}


@pytest.mark.parametrize("garbled", [None, [], "running", {"pid": "7", "state": "flying", "tasks": "t",
                                                              "errors": ["x"], "engine": 5, "capacity": True,
                                                              "started_at": "yesterday", "requests": [1]},
                                     {"tasks": [None, {"id": 5, "progress": {"down_bytes": "x"}}],
                                      "errors": {"poll": {"at": "now"}}, "engine": {"engine": "docker"}}])
def test_a_garbled_status_reads_as_absent_fields_never_an_error(garbled):
    status = LiveStatus.from_json(garbled)
    assert status.pid is None and status.state is None and status.engine is None and status.capacity is None
    assert status.started_at is None and status.requests == {}
    assert all(t.id == "?" and t.progress == {} for t in status.tasks)
    assert all(e.at is None for e in status.errors.values())
    assert status.to_json()["state"] == "starting"


@pytest.fixture
def daemon_here(tmp_path):
    """A config whose data dir is held by this test process, as if a daemon ran: write(status) sets its file
(a dict as JSON, a str as it is)."""
    path = registered_config(tmp_path, **{"agent.name": "node-7"})
    data_dir = process.ensure_data_dir(tmp_path / "data")
    pidfile = process.PidFile(data_dir)
    pidfile.acquire()

    def write(status: dict | str) -> None:
        (data_dir / process.STATUSFILE).write_text(status if isinstance(status, str) else json.dumps(status))

    yield path, write
    pidfile.release()


def test_status_renders_state_reason_errors_and_task_progress(daemon_here):
    path, write = daemon_here
    write(full_status(time.time()))
    text = agent_cli("status", config_path=path, check=True).stdout
    lines = text.splitlines()
    assert any(ln.startswith("daemon") and ln.endswith(
        f"running (pid {os.getpid()}, running: paused: disk low (812 MiB free, 1024 needed))") for ln in lines), text
    for shown in ("last poll", "3 s ago", "12 s ago", "engine          reachable", "tasks           2 of capacity 2",
                  "last heartbeat error  40 s ago: server unavailable: HTTP 503", "up              600 s"):
        assert any(" ".join(shown.split()) in " ".join(ln.split()) for ln in lines), (shown, text)
    (t1,) = [ln for ln in lines if ln.split()[:1] == ["t-1"]]  # not "pytest-1..." in a path
    assert t1.split()[:4] == ["t-1", "downloading", "90", "s"] and "(stage 20 s)" in t1
    assert "down 3.0/8.0 MiB" in t1 and t1.endswith("container -")
    (t2,) = [ln for ln in lines if ln.split()[:1] == ["t-2"]]
    assert "up 1/4 files 1.0/5.0 MiB" in t2 and t2.endswith("container abcdef123456")
    assert API_KEY not in text

    data = json.loads(agent_cli("status", "--json", config_path=path, check=True).stdout)["daemon"]
    assert data["reason"].startswith("paused: disk low") and data["errors"]["heartbeat"]["age_secs"] >= 40
    assert data["tasks"][0]["age_secs"] >= 90 and data["tasks"][0]["progress"]["down_total"] == 8 * 1024**2


@pytest.mark.parametrize("engine_ok, rootless, shown", [
    (True, False, "docker 20.10.24 at unix:///var/run/docker.sock"),
    (True, True, "docker 20.10.24 (rootless) at unix:///var/run/docker.sock"),
    (False, False, "NOT reachable at unix:///var/run/docker.sock (no new tasks)"),
])
def test_status_names_the_engine(daemon_here, engine_ok, rootless, shown):
    path, write = daemon_here
    engine = EngineSeen.of(EngineInfo("docker", "20.10.24", rootless, "unix:///var/run/docker.sock"))
    write(LiveStatus(pid=os.getpid(), state=Step.RUNNING, engine_ok=engine_ok, engine=engine).to_json())
    text = agent_cli("status", config_path=path, check=True).stdout
    (line,) = [ln for ln in text.splitlines() if ln.startswith("engine ")]
    assert line.split(None, 1)[1] == shown, text
    daemon = json.loads(agent_cli("status", "--json", config_path=path, check=True).stdout)["daemon"]
    assert daemon["engine"]["rootless"] is rootless and daemon["engine_ok"] is engine_ok


def test_a_garbled_status_file_shows_the_daemon_starting(daemon_here):
    path, write = daemon_here
    write({"pid": os.getpid(), "state": "running", "tasks": "not a list", "errors": 7, "started_at": "x"})
    text = agent_cli("status", config_path=path, check=True).stdout
    assert f"running (pid {os.getpid()}, running)" in text and "none running" in text
    write('{"pid": ')  # cut off mid-write (the daemon writes atomically, but a disk can fail)
    assert f"running (pid {os.getpid()}, starting)" in agent_cli("status", config_path=path, check=True).stdout


def test_an_older_status_file_still_renders(daemon_here):
    path, write = daemon_here
    write({"pid": os.getpid(), "state": "draining",
           "tasks": [{"id": "old-task-9", "stage": "running", "age_secs": 5.0, "container": None}]})
    text = agent_cli("status", config_path=path, check=True).stdout
    assert f"running (pid {os.getpid()}, draining)" in text
    # (the line that starts with the id: the config's path may hold any short string, e.g. pytest-99)
    (line,) = [ln for ln in text.splitlines() if ln.split()[:1] == ["old-task-9"]]
    assert line.split()[:4] == ["old-task-9", "running", "5", "s"]


@pytest.mark.parametrize("cmdline, cwd, env, expected", [
    (["/v/bin/agent-core", "--config", "/etc/a.toml", "run"], "/x", {}, "/etc/a.toml"),
    (["/usr/bin/python3", "-m", "agent_core", "run", "--config=rel.toml"], "/srv", {}, "/srv/rel.toml"),
    (["agent-core", "run"], "/srv", {"AGENT_CORE_CONFIG": "/etc/b.toml"}, "/etc/b.toml"),
    (["agent-core", "run"], "/srv", {}, "/srv/config.toml"),
    (["agent-core", "status"], "/srv", {}, None),
    (["/usr/bin/vim", "config.toml"], "/srv", {}, None),
    (["agent-core", "run"], None, {}, None),  # cwd not readable
])
def test_which_config_another_agent_process_uses(cmdline, cwd, env, expected):
    found = process.config_of(cmdline, cwd, env)
    assert (str(found) if found else None) == expected


def test_another_daemon_on_the_same_service_is_warned_about(tmp_path):
    # Given another "agent-core run" process (a sleeping stand-in) whose config has our service id
    ours = registered_config(tmp_path / "a")
    theirs = registered_config(tmp_path / "b")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "-m", "agent_core",
                              "--config", str(theirs), "run"])
    try:
        wait_until(lambda: process._agent_args(__import__("psutil").Process(other.pid).cmdline()), 10, "it to start")
        (warning,) = process.same_service_elsewhere(config.load(ours))
        assert f"pid {other.pid}" in warning and str(tmp_path / "b" / "data") in warning
        text = agent_cli("status", config_path=ours, check=True).stdout
        assert f"another agent-core (pid {other.pid}" in text
        # a config of another service, or the same data dir, is no warning
        config.update(theirs, {"agent.service_id": "svc-2"})
        assert process.same_service_elsewhere(config.load(ours)) == []
    finally:
        other.kill()
        other.wait()
