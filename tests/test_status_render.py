"""`status` from a status file: ages computed when it runs, every field rendered, old files still readable;
and the warning about another daemon of the same service. No engine: a held pidfile stands in for a daemon."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from agent_core import cli, config, process
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
    out = cli.with_ages(full_status(now), now)
    assert out["last_poll_age_secs"] == 3 and out["last_heartbeat_age_secs"] == 12 and out["started_age_secs"] == 600
    assert [t["age_secs"] for t in out["tasks"]] == [90, 300]
    assert [t["stage_age_secs"] for t in out["tasks"]] == [20, 7]
    assert out["errors"]["heartbeat"]["age_secs"] == 40
    old = {"pid": 1, "state": "running", "tasks": [{"id": "t", "stage": "running", "age_secs": 5.0, "container": None}]}
    assert cli.with_ages(old, now)["tasks"][0]["age_secs"] == 5.0  # an older daemon's file: its own age


@pytest.fixture
def daemon_here(tmp_path):
    """A config whose data dir is held by this test process, as if a daemon ran: write(status) sets its file."""
    path = registered_config(tmp_path, **{"agent.name": "node-7"})
    data_dir = process.ensure_data_dir(tmp_path / "data")
    pidfile = process.PidFile(data_dir)
    pidfile.acquire()

    def write(status: dict) -> None:
        (data_dir / process.STATUSFILE).write_text(json.dumps(status))

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


def test_an_older_status_file_still_renders(daemon_here):
    path, write = daemon_here
    write({"pid": os.getpid(), "state": "draining",
           "tasks": [{"id": "t-9", "stage": "running", "age_secs": 5.0, "container": None}]})
    text = agent_cli("status", config_path=path, check=True).stdout
    assert f"running (pid {os.getpid()}, draining)" in text
    (line,) = [ln for ln in text.splitlines() if "t-9" in ln]
    assert line.split()[:4] == ["t-9", "running", "5", "s"]


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
