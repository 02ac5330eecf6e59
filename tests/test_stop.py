"""`agent-core stop` against a stand-in daemon (tests/fake_daemon.py): progress, and no escalation by a
second plain stop."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest

from agent_core import process
from agent_core.lifecycle import Step
from agent_core.livestatus import LiveStatus
from tests.agent_fixtures import agent_cli, wait_until
from tests.test_cli import registered_config

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def fake_daemon(tmp_path):
    procs: list[subprocess.Popen] = []

    def start(exit_after: float) -> Path:
        data_dir = process.ensure_data_dir(tmp_path / "data")
        procs.append(subprocess.Popen([sys.executable, "-m", "tests.fake_daemon", str(data_dir), str(exit_after)],
                                      cwd=Path(__file__).parent.parent))
        wait_until(lambda: getattr(process.read_status(data_dir), "state", None) is Step.RUNNING, 30,
                   "the fake daemon")
        return data_dir

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def signals(data_dir: Path) -> list[str]:
    path = data_dir / "signals"
    return path.read_text().split() if path.exists() else []


def test_a_second_plain_stop_says_the_drain_is_under_way_and_sends_nothing(tmp_path, fake_daemon):
    # Given a daemon that drains for 4 s after its first SIGTERM, and a first `stop` waiting for it
    data_dir = fake_daemon(exit_after=4)
    said: list[str] = []
    first = threading.Thread(target=process.stop, args=(data_dir,),
                             kwargs={"force": False, "grace": 300, "say": said.append, "every": 0.5})
    first.start()
    wait_until(lambda: signals(data_dir) == ["draining"], 10, "the drain to start")

    # When a second plain `stop` runs
    second = agent_cli("stop", config_path=registered_config(tmp_path))

    # Then it says so, names --force, exits 0 and sends no signal
    assert second.returncode == 0, second.stderr
    assert "already under way" in second.stdout and "draining, 1 task left" in second.stdout
    assert "agent-core stop --force" in second.stdout
    first.join(30)
    assert signals(data_dir) == ["draining"]
    # and the first one showed its progress (tasks left, grace left), not a flood, then the end
    progress = [line for line in said if line.startswith("waiting for pid")]
    assert progress and all("draining, 1 task left, " in line and "s of grace left" in line for line in progress)
    assert len(progress) <= 10
    assert said[0].startswith("sent SIGTERM") and said[-1].endswith("stopped")


def test_stop_force_during_a_drain_takes_one_step_to_cancel(tmp_path, fake_daemon):
    # Given a daemon already draining (a SIGTERM from elsewhere, e.g. systemd)
    data_dir = fake_daemon(exit_after=1)
    psutil.Process(process.running_pid(data_dir)).send_signal(signal.SIGTERM)
    wait_until(lambda: signals(data_dir) == ["draining"], 10, "the drain to start")
    # When `stop --force` runs, then it sends one signal (to cancel), not two (which would exit at once)
    said: list[str] = []
    process.stop(data_dir, force=True, grace=300, say=said.append, every=0.2)
    assert signals(data_dir) == ["draining", "cancelling"]
    assert said[-1].endswith("stopped")


@pytest.mark.parametrize("status, since, expected", [
    ({"state": "draining", "tasks": [{}, {}], "stop_requested_at": 1000.0}, None, "draining, 2 tasks left, 250 s of grace left"),
    ({"state": "draining", "tasks": []}, 1040.0, "draining, 0 tasks left, 290 s of grace left"),
    ({"state": "draining", "tasks": [{}]}, None, "draining, 1 task left"),
    ({"state": "cancelling", "tasks": [{}], "stop_requested_at": 1000.0}, None, "cancelling, 1 task left"),
    ({}, None, "starting, 0 tasks left"),
])
def test_stop_progress(status, since, expected):
    assert process.stop_progress(LiveStatus.from_json(status), 300, since, now=1050.0) == expected
