"""agent-core's own image (Dockerfile, scripts/build_image.sh): built offline from the Debian test
image and the project's wheel, it runs a task end to end as PID 1 with only the engine socket
mounted (copy-mode workspaces), and `docker stop` drains it."""

from __future__ import annotations

import io
import subprocess
import tarfile
import uuid
from pathlib import Path

import docker
import pytest

from tests.docker_fixtures import PYTHON_IMAGE

pytestmark = pytest.mark.docker

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "agent-core-test/agent:latest"
DONE = ("completed", "failed", "cancelled")


@pytest.fixture(scope="module")
def agent_image(docker_engine, python_image) -> str:
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "build_image.sh"), "--base", PYTHON_IMAGE,
                           "--tag", IMAGE], capture_output=True, text=True, timeout=600,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return IMAGE


def test_the_image_runs_a_task_as_pid_1_with_only_the_socket_and_docker_stop_drains(
        agent_image, make_agent, dev_client, docker_engine):
    # Given a registered config for copy-mode workspaces, its data dir inside the agent's container
    agent = make_agent({"executor.workspace": "copy", "paths.data_dir": "/var/lib/agent-core",
                        "executor.executor_type": "custom", "executor.custom_entrypoint": "/bin/sh",
                        "executor.custom_args": ["-c", "sleep \"$(cat /workspace/input/*)\"; "
                                                       "echo done > /workspace/output/r.txt"]})
    # and the agent's container with the engine socket as its only mount (the config is copied in)
    container = docker_engine.containers.create(
        agent_image, ["--config", "/etc/agent-core/config.toml", "run"],
        name=f"agent-core-image-test-{uuid.uuid4().hex[:8]}", network_mode="host",  # the server is on 127.0.0.1
        volumes={"/var/run/docker.sock": {"bind": "/var/run/docker.sock", "mode": "rw"}})
    try:
        # (the image's VOLUMEs for the config and the data dir are anonymous volumes, nothing of the host)
        assert [m["Destination"] for m in container.attrs["Mounts"] if m["Type"] == "bind"] == \
            ["/var/run/docker.sock"]
        container.put_archive("/etc/agent-core", _tar_of(agent.config_path, "config.toml"))
        container.start()
        # When a quick task comes, it completes through the agent in the container
        quick = dev_client.submit_task(agent.service_id, "quick", files=[("secs", b"0")])["id"]
        assert _wait(dev_client, container, quick, DONE)["status"] == "completed", _logs(container)
        assert any(f["filename"] == "output/r.txt" for f in dev_client.list_files(quick))
        # and `docker stop` while a 5 s task runs drains it: the task completes, the agent exits 0
        slow = dev_client.submit_task(agent.service_id, "slow", files=[("secs", b"5")])["id"]
        _wait(dev_client, container, slow, ("running",))
        container.stop(timeout=120)
        assert dev_client.get_task(slow)["status"] == "completed", _logs(container)
        container.reload()
        assert container.attrs["State"]["ExitCode"] == 0, _logs(container)
        assert "drain" in _logs(container).lower()
    finally:
        try:
            container.remove(force=True, v=True)
        except docker.errors.NotFound:
            pass


def _tar_of(path: Path, name: str) -> bytes:
    data = path.read_bytes()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo(name)
        info.size, info.mode = len(data), 0o600
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _wait(dev_client, container, task_id: str, statuses: tuple[str, ...]) -> dict:
    try:
        return dev_client.wait_for_status(task_id, statuses, timeout=120)
    except TimeoutError as e:
        raise AssertionError(f"{e}; the agent's log:\n{_logs(container)}") from None


def _logs(container) -> str:
    return container.logs().decode(errors="replace")[-4000:]
