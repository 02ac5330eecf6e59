"""A root container against the host, and agents against each other (issue 11, items 1-3).

The task container runs as root (busybox has no USER). It plants links and FIFOs at every
name the agent writes or reads, in every folder of its workspace; it leaves root-owned,
mode-0 folders behind for an agent that is not root. Two agents of two services share one
engine with clashing task ids. None of it may reach the host or the other agent.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from agent_core.devclient import DevClient
from agent_core.executor import LABEL_SERVICE
from tests.agent_fixtures import REPO, Agent, wait_until
from tests.docker_fixtures import on_both_engines
from tests.helpers import skip_or_fail_in_ci
from tests.test_reliability import calls_for, container_status, read_output
from tests.test_run import DONE, finish, sh

pytestmark = pytest.mark.docker

# Every name the agent writes or reads for a task, and common log names besides.
PLANTED_NAMES = ["stdout.log", "stderr.log", "task.json", ".task.json.tmp", "agent.log", "status.json",
                 "journal.json", "output.log", "log.txt", "out.log", "err.log", "container.log"]
PLANTED_DIRS = ["/workspace", "/workspace/output", "/workspace/input", "/workspace/.agent-core",
                "/workspace/.hidden", "/workspace/output/.cache", "/workspace/output/sub", "/workspace/tasks"]


@pytest.fixture
def dev_server(make_dev_server):
    """No server-side rate limit: a task with 300 outputs must not wait for 429 windows here."""
    return make_dev_server(rate_limit_per_minute=1_000_000)


def plant(kind: str, target: str = "") -> str:
    """A shell script that puts a link to `target` (kind "ln") or a FIFO (kind "fifo") at every name."""
    make = f'ln -sfn "{target}"' if kind == "ln" else "mkfifo"
    return (f"for d in {' '.join(PLANTED_DIRS)}; do mkdir -p $d; "
            f"for n in {' '.join(PLANTED_NAMES)} \"$TASK_ID.json\"; do rm -rf \"$d/$n\"; {make} \"$d/$n\"; "
            "done; done; echo planted; echo planted-too >&2; echo fine > /workspace/output/ok.txt; ")


@on_both_engines
def test_links_at_the_agents_file_names_change_no_host_file(make_agent, dev_client, tmp_path):
    # Given a host file and a host folder, and tasks that point a link at one of them from every
    # name the agent uses, in every folder of the workspace, hidden ones included
    victim = tmp_path / "victim.txt"
    victim.write_text("untouched\n")
    victim_dir = tmp_path / "victim-dir"
    victim_dir.mkdir()
    agent = make_agent(sh(f"if grep -q to-dir /workspace/task.json; then T={victim_dir}; else T={victim}; fi; "
                          + plant("ln", "$T") + "exit 3"))
    tasks = [dev_client.submit_task(agent.service_id, p)["id"] for p in ("to-file", "to-dir")]
    agent.start()
    # Then both tasks finish (failed, with their own stderr as the reason), the host file is
    # unchanged and nothing was created in the host folder
    results = finish(dev_client, tasks, timeout=90)
    for result in results:
        assert result["status"] == "failed" and "planted-too" in result["error_message"], result
        assert result["output"]["stdout"] == "planted\n"
    assert victim.read_text() == "untouched\n"
    assert list(victim_dir.iterdir()) == []
    # and the one real output went up; every link is listed as skipped
    for task in tasks:
        assert read_output(dev_client, task, "output/ok.txt", tmp_path / "dl") == b"fine\n"
    skipped = {s["path"] for s in results[0]["output"]["skipped"]}
    assert {"output/stdout.log", "output/sub/stderr.log", "stdout.log"} <= skipped
    assert agent.alive()


@on_both_engines
def test_fifos_at_the_agents_file_names_hang_nothing_not_even_across_a_restart(make_agent, dev_client,
                                                                               engine_client):
    # Given a task that plants FIFOs at every name, then runs on for a while
    # (task.json is read first: it is about to become a FIFO too)
    agent = make_agent(sh("grep -q slow /workspace/task.json && SLOW=1; " + plant("fifo")
                          + 'if [ -n "$SLOW" ]; then sleep 8; fi'))
    slow = dev_client.submit_task(agent.service_id, "slow")["id"]
    agent.start()
    wait_until(lambda: container_status(engine_client, slow) == "running", 60, "the slow task to run")
    time.sleep(1)  # the FIFOs are planted
    # When the agent is killed in the middle and started again
    agent.signal(signal.SIGKILL)
    agent.proc.wait(10)
    agent.start()
    # Then the task finishes within a minute, and the next task runs too
    started = time.monotonic()
    (result,) = finish(dev_client, [slow], timeout=60)
    assert result["status"] == "completed", result
    assert time.monotonic() - started < 60
    nxt = dev_client.submit_task(agent.service_id, "next")["id"]
    (result,) = finish(dev_client, [nxt], timeout=60)
    assert result["status"] == "completed" and result["output"]["stdout"] == "planted\n", result
    skipped = {s["path"]: s["reason"] for s in result["output"]["skipped"]}
    assert "FIFO" in skipped["output/stdout.log"]


def test_two_services_with_the_same_task_id_keep_to_their_own_containers(make_dev_server, tmp_path,
                                                                        busybox_image, docker_cleanup,
                                                                        docker_engine):
    # Given two servers, each with an agent of its own service on this one engine, and a task
    # with the same id on each, running at the same time
    servers = [make_dev_server(), make_dev_server()]
    clients = [DevClient(s.url, s.admin_key) for s in servers]
    agents = []
    for i, (server, client) in enumerate(zip(servers, clients)):
        root = tmp_path / f"agent{i}"
        root.mkdir()
        agents.append(Agent(root, server.url, client, {
            "server.poll_interval_secs": 0.5, "executor.image": busybox_image, "executor.network_mode": "none",
            "paths.min_free_disk_mb": 0, "agent.shutdown_grace_secs": 30,
            **sh("grep -o 'prompt of [a-z]*' /workspace/task.json | head -1 > /workspace/output/who.txt; "
                 "sleep 4")}))
        docker_cleanup.track_service(agents[-1].service_id)
    try:
        for agent, server, name in zip(agents, servers, ("alpha", "beta")):
            server.faults.offer_raw_task(agent.service_id, {"id": "same-42", "task_prompt": f"prompt of {name}"})
            agent.start()
        wait_until(lambda: len(docker_engine.api.containers(filters={"label": "agent-core.task_id=same-42"})) == 2,
                   60, "both containers to run at once")
        # Then each task's output is its own container's, reported to its own server
        for agent, server, client, name in zip(agents, servers, clients, ("alpha", "beta")):
            result = wait_until(lambda: (t := server.get_task("same-42"))["status"] in DONE and t, 60,
                                f"the {name} task to finish")
            assert result["status"] == "completed", result
            assert read_output(client, "same-42", "output/who.txt", tmp_path / "dl") == f"prompt of {name}\n".encode()
            assert len(calls_for(server, "/complete", "same-42", status=200)) == 1
        # and neither agent adopted or removed the other's container
        for agent in agents:
            assert "adopting" not in agent.log() and "leftover container" not in agent.log()
            assert "not this agent's" not in agent.log()
    finally:
        for agent in agents:
            agent.stop()
        for client in clients:
            client.close()


NONROOT_USER = "agent-core-test"


def _nonroot_user() -> tuple[str, str, dict[str, str]]:
    """A system user in the docker group (made if missing), a python it can run and the
    environment that finds agent-core there; skips where that cannot be."""
    if os.geteuid() != 0:
        skip_or_fail_in_ci("needs root to make a non-root user")
    try:
        grp.getgrnam("docker")
    except KeyError:
        skip_or_fail_in_ci("no docker group on this host")
    try:
        pwd.getpwnam(NONROOT_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                        "--groups", "docker", NONROOT_USER], check=True, capture_output=True)
    return NONROOT_USER, *python_for(NONROOT_USER)


def python_for(user: str) -> tuple[str, dict[str, str]]:
    """A python `user` may run that finds agent-core and its packages, and the environment for it."""
    # The venv's interpreter may sit where the user cannot go (pyenv under /root): then the
    # system's python of the same version runs this checkout and the venv's packages.
    site_packages = next(p for p in sys.path if p.endswith("site-packages") and p.startswith(sys.prefix))
    env = {"PYTHONPATH": f"{REPO}:{site_packages}"}
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for python in (sys.executable, f"/usr/bin/{version}", f"/usr/local/bin/{version}"):
        try:
            probe = subprocess.run([python, "-c", "import agent_core, docker, httpx, psutil"], user=user,
                                   env={**os.environ, **env}, capture_output=True, cwd="/")
        except OSError:
            continue
        if probe.returncode == 0:
            return python, env
    skip_or_fail_in_ci(f"no python that {user} may run finds agent-core and its packages")


def test_a_non_root_agent_survives_root_owned_leftovers(dev_server, dev_client, busybox_image, docker_cleanup,
                                                        docker_engine):
    user, python, env = _nonroot_user()
    pw = pwd.getpwnam(user)
    # Given an agent whose folders belong to a user in the docker group, not to root
    root = Path(tempfile.mkdtemp(prefix="agent-core-nonroot-", dir="/tmp"))
    try:
        os.chmod(root, 0o755)
        leaves_mess = sh("mkdir -p /workspace/locked/deep /workspace/output/locked && "
                         "echo x > /workspace/locked/deep/f && echo y > /workspace/output/locked/g && "
                         "chmod 0 /workspace/locked/deep /workspace/locked /workspace/output/locked && "
                         "echo fine > /workspace/output/ok.txt")
        agent = Agent(root, dev_server.url, dev_client, {
            "server.poll_interval_secs": 0.5, "executor.image": busybox_image, "executor.network_mode": "none",
            "paths.min_free_disk_mb": 0, "agent.shutdown_grace_secs": 30, **leaves_mess})
        docker_cleanup.track_service(agent.service_id)
        data_dir = agent.cfg.paths.data_dir
        data_dir.mkdir(mode=0o700)
        for path in (root, agent.config_path, data_dir):
            os.chown(path, pw.pw_uid, pw.pw_gid)
        # and a workspace left by a root container before a crash: root-owned, mode 0
        (data_dir / "workspaces").mkdir(mode=0o700)
        os.chown(data_dir / "workspaces", pw.pw_uid, pw.pw_gid)
        stale = data_dir / "workspaces" / "stale-task"
        stale.mkdir()
        os.chown(stale, pw.pw_uid, pw.pw_gid)
        docker_engine.containers.run(busybox_image, ["sh", "-c", "mkdir -p /w/d/e && echo z > /w/d/e/f && "
                                                     "chmod 0 /w/d/e /w/d"],
                                     volumes={str(stale): {"bind": "/w", "mode": "rw"}}, network_mode="none",
                                     labels=docker_cleanup.labels, remove=True)
        # When it starts, and runs a task that leaves the same kind of mess
        agent.start(user=user, python=python, env=env)
        task = dev_client.submit_task(agent.service_id, "mess")["id"]
        (result,) = finish(dev_client, [task], timeout=90)
        # Then it started, served the task, and the leftovers are gone (removed by a root
        # container of the executor image), or else named in its log
        assert result["status"] == "completed", (result, agent.log()[-3000:])
        assert read_output(dev_client, task, "output/ok.txt", root / "dl") == b"fine\n"

        def cleaned() -> bool:
            entries = [p for d in ("workspaces", "tasks", "trash") if (data_dir / d).is_dir()
                       for p in (data_dir / d).iterdir()]
            return not entries
        wait_until(cleaned, 60, "the leftovers to be removed")
        assert "removed" in agent.log() and "with a root container" in agent.log()
        assert agent.alive()
        assert agent.stop() == 0
        # and no clean-up container is left behind
        assert not docker_engine.api.containers(all=True, filters={"label": f"{LABEL_SERVICE}={agent.service_id}"})
    finally:
        if "agent" in locals() and agent.alive():
            agent.stop()
        subprocess.run(["chmod", "-R", "u+rwx", str(root)], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def _write_bytes(pid: int) -> int:
    """Bytes the process caused to be written to storage (/proc/<pid>/io)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    raise AssertionError("no write_bytes in /proc/<pid>/io")


def test_a_big_prompt_with_many_outputs_is_written_to_disk_about_once(make_agent, dev_server, dev_client):
    # Given a 5 MiB prompt and a task that writes 300 outputs of 8 KiB
    prompt = "p" * (5 * 1024 * 1024)
    outputs, size = 300, 8192
    agent = make_agent({**sh(f"i=0; while [ $i -lt {outputs} ]; do head -c {size} /dev/zero > /workspace/output/f$i; "
                             "i=$((i+1)); done"),
                        "server.rate_limit_per_minute": 0})  # 300 uploads at 150/min would take minutes
    agent.start()
    wait_until(lambda: agent.cfg.paths.data_dir.joinpath("status.json").exists(), 30, "the agent to start")
    before = _write_bytes(agent.proc.pid)
    # (offered directly: the dev server's client API takes at most 1 MiB of JSON)
    task = dev_server.faults.offer_raw_task(agent.service_id, {"id": "big-prompt", "task_prompt": prompt})
    (result,) = finish(dev_client, [task], timeout=120)
    assert result["status"] == "completed" and len(result["output"]["files"]) == outputs, result
    # Then the agent wrote less than 3 x (prompt + outputs): task.json (which holds the prompt
    # twice, as task_prompt and prompt) and the journal's copy, not one journal rewrite per upload
    written = _write_bytes(agent.proc.pid) - before
    budget = 3 * (len(prompt) + outputs * size)
    print(f"agent wrote {written} bytes for a {len(prompt)}-byte prompt and {outputs * size} bytes of outputs")
    assert written < budget, (written, budget)
