"""scripts/demo.sh, the README's first command, as a user runs it (CI runs it through this test).

The demo makes its own virtualenv (./.venv), engine check, image, server and agent; these
tests only look at what it prints and at what it leaves behind: nothing.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
from pathlib import Path

import psutil
import pytest

from agent_core.executor import LABEL_SERVICE
from tests.agent_fixtures import wait_until

pytestmark = pytest.mark.docker

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "scripts" / "demo.sh"
DEMO_TIMEOUT_SECS = 300  # a run takes about a minute here; the README promises under three
TASK_PROMPTS = ("Summarise the meeting notes", "Describe the measurements", "Review the script and its notes")


def _found(pattern: str, text: str) -> str:
    match = re.search(pattern, text, re.M)
    assert match, f"no {pattern!r} in the demo's output:\n{text[-5000:]}"
    return match.group(1)


def assert_nothing_left(docker_engine, text: str, *pids: int) -> None:
    """The demo's folder, processes (by pid and by folder) and containers are all gone."""
    demo_dir = _found(r"^demo: state in (\S+)$", text)
    service_id = _found(r"^created service (\S+);", text)
    assert not Path(demo_dir).exists()
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, pid
    users = [p.info for p in psutil.process_iter(["pid", "cmdline"])
             if any(demo_dir in arg for arg in p.info["cmdline"] or ())]
    assert users == []
    containers = docker_engine.containers.list(all=True, filters={"label": f"{LABEL_SERVICE}={service_id}"})
    assert containers == []


@pytest.mark.timeout(DEMO_TIMEOUT_SECS + 60)
def test_the_demo_completes_three_tasks_and_leaves_nothing_behind(docker_engine, python_image):
    proc = subprocess.run(["bash", str(DEMO)], cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=DEMO_TIMEOUT_SECS)
    out = proc.stdout
    assert proc.returncode == 0, f"{out[-5000:]}\n--- stderr ---\n{proc.stderr[-3000:]}"
    assert out.rstrip().splitlines()[-1] == "demo: 3 tasks completed"
    # each task's status, then its outputs with their first lines
    results = re.findall(r"^task (\S+): (\w+)$", out, re.M)
    assert [status for _, status in results] == ["completed"] * 3, out[-5000:]
    for (task_id, _), prompt in zip(results, TASK_PROMPTS):
        section = out.split(f"task {task_id}: completed", 1)[1].split("\ntask ", 1)[0]
        assert re.search(r"^  output/summary\.md \(\d+ bytes\)$", section, re.M)
        assert f"  | # {prompt}" in section
        assert re.search(r"^  output/01-.+\.report\.md \(\d+ bytes\)$", section, re.M)
    assert "  | # überblick.txt" in out  # a non-ASCII name survives the round trip
    # the agent was run detached, shown by status and stopped
    for command in ("run-detached", "status", "stop"):
        assert f"$ agent-core {command}\n" in out
    agent_pid = int(_found(r"^agent started \(pid (\d+)\)", out))
    server_pid = int(_found(r"^server at \S+ \(pid (\d+)\)$", out))
    assert re.search(rf"^agent \(pid {agent_pid}\) stopped$", out, re.M)
    assert not re.search(r"rt_[0-9a-f]{8}", out)  # the registration token is never shown
    assert_nothing_left(docker_engine, out, agent_pid, server_pid)


@pytest.mark.timeout(DEMO_TIMEOUT_SECS + 60)
def test_ctrl_c_stops_the_agent_and_the_server_and_cleans_up(docker_engine, python_image):
    # Given the demo in its own process group, as in a terminal, with the agent started
    proc = subprocess.Popen(["bash", str(DEMO)], cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        wait_until(lambda: any(line.startswith("agent started (pid") for line in lines) or proc.poll() is not None,
                   DEMO_TIMEOUT_SECS, "the demo to start its agent", step=0.2)
        assert proc.poll() is None, "".join(lines)[-5000:]
        # When Ctrl+C reaches the terminal's foreground process group
        os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        reader.join(10)
        proc.stdout.close()
    out = "".join(lines)
    # Then it stops, says so, and the agent, the server, the containers and the folder are gone
    assert code == 130, out[-5000:]
    assert out.rstrip().splitlines()[-1] == "demo: interrupted; cleaned up"
    agent_pid = int(_found(r"^agent started \(pid (\d+)\)", out))
    server_pid = int(_found(r"^server at \S+ \(pid (\d+)\)$", out))
    assert_nothing_left(docker_engine, out, agent_pid, server_pid)
