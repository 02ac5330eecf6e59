"""Fixtures for tests that need the real Docker engine and the offline test images.

`scripts/docker_env.sh` makes the engine reachable and imports the images (it never
pulls). Without an engine a test is skipped, except with CI=true, where it fails.

    docker_engine    session  docker.DockerClient (busybox image ensured)
    busybox_image    session  "agent-core-test/busybox:latest"
    python_image     session  "agent-core-test/python:latest" (Debian bookworm + python3)
    docker_cleanup   function a Cleanup: .labels to put on containers, .track(id),
                              .track_service(sid); force-removes them all in teardown
    docker_executor  function an agent_core.executor.DockerExecutor on docker_engine
"""

from __future__ import annotations

import subprocess
import time
import uuid
from pathlib import Path
from typing import Iterator

import docker
import pytest

from tests.helpers import in_ci, skip_or_fail_in_ci

__all__ = [
    "BUSYBOX_IMAGE",
    "PYTHON_IMAGE",
    "TEST_ID_LABEL",
    "Cleanup",
    "busybox_image",
    "docker_cleanup",
    "docker_engine",
    "docker_executor",
    "python_image",
]

ROOT = Path(__file__).resolve().parent.parent
DOCKER_ENV = ROOT / "scripts" / "docker_env.sh"
BUSYBOX_IMAGE = "agent-core-test/busybox:latest"
PYTHON_IMAGE = "agent-core-test/python:latest"
TEST_ID_LABEL = "agent-core.test-id"
MANAGED_LABEL = "agent-core.managed"
SERVICE_LABEL = "agent-core.service_id"
SCRIPT_TIMEOUT_SECS = 1200  # a cold debootstrap of the python image takes about a minute here


def _unavailable(reason: str) -> None:
    skip_or_fail_in_ci(f"Docker {'is required with CI=true' if in_ci() else 'not available'}: {reason}")


def _run_docker_env(*args: str) -> None:
    """Run scripts/docker_env.sh; skip (or fail in CI) with its last error line."""
    try:
        proc = subprocess.run(
            ["bash", str(DOCKER_ENV), *args],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=SCRIPT_TIMEOUT_SECS,
        )
    except subprocess.TimeoutExpired:
        _unavailable(f"{DOCKER_ENV.name} {' '.join(args)} took over {SCRIPT_TIMEOUT_SECS}s")
        return
    except OSError as e:
        _unavailable(f"cannot run {DOCKER_ENV}: {e}")
        return
    if proc.returncode != 0:
        lines = (proc.stderr.strip() or proc.stdout.strip() or f"exit code {proc.returncode}").splitlines()
        _unavailable(f"{DOCKER_ENV.name} {' '.join(args)} failed: {lines[-1]}")


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[docker.DockerClient]:
    """A client for a reachable engine on which the busybox test image exists."""
    _run_docker_env("--no-python")
    try:
        client = docker.DockerClient.from_env(max_pool_size=32)
        client.ping()
    except Exception as e:  # noqa: BLE001 - any failure here means "no engine"
        _unavailable(f"docker.from_env() failed after docker_env.sh succeeded: {e}")
        return
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="session")
def busybox_image(docker_engine: docker.DockerClient) -> str:
    return BUSYBOX_IMAGE


@pytest.fixture(scope="session")
def python_image(docker_engine: docker.DockerClient) -> str:
    """The bookworm + python3 image; the first build on a machine runs debootstrap."""
    _run_docker_env()
    return PYTHON_IMAGE


class Cleanup:
    """Records the containers a test makes; all of them are force-removed in teardown.

    Put `labels` on every container the test creates. Containers made by code under
    test (which labels its own) are found by `track(id)`, `track_service(service_id)`,
    or, failing those, as agent-core-managed containers created since the test began.
    """

    def __init__(self, client: docker.DockerClient):
        self.client = client
        self.test_id = uuid.uuid4().hex
        self.labels = {TEST_ID_LABEL: self.test_id}
        self.started = time.time() - 1.0
        self._ids: set[str] = set()
        self._services: set[str] = set()
        # On, it also sweeps every agent-core-managed container created since the test began,
        # even one a concurrent test session or a benchmark made on the same engine: so it is
        # off unless a test asks for it; agents are found by track_service().
        self.sweep_managed = False

    def track(self, container_id: str) -> str:
        self._ids.add(container_id)
        return container_id

    def track_service(self, service_id: str) -> None:
        self._services.add(service_id)

    def _labelled(self, label: str) -> list[dict]:
        return self.client.api.containers(all=True, filters={"label": label})

    def leftovers(self) -> set[str]:
        ids = set(self._ids)
        ids.update(c["Id"] for c in self._labelled(f"{TEST_ID_LABEL}={self.test_id}"))
        for sid in self._services:
            ids.update(c["Id"] for c in self._labelled(f"{SERVICE_LABEL}={sid}"))
        if self.sweep_managed:
            ids.update(c["Id"] for c in self._labelled(f"{MANAGED_LABEL}=true")
                       if float(c.get("Created", 0)) >= self.started)
        return ids

    def remove_all(self) -> list[str]:
        errors = []
        for cid in self.leftovers():
            try:
                self.client.api.remove_container(cid, force=True, v=True)
            except docker.errors.NotFound:
                pass
            except docker.errors.APIError as e:
                if e.status_code == 409 and "already in progress" in str(e):
                    continue  # the code under test is removing it right now
                errors.append(f"{cid[:12]}: {e}")
        return errors


@pytest.fixture
def docker_cleanup(docker_engine: docker.DockerClient) -> Iterator[Cleanup]:
    cleanup = Cleanup(docker_engine)
    yield cleanup
    errors = cleanup.remove_all()
    if errors:
        pytest.fail("could not remove test containers: " + "; ".join(errors), pytrace=False)


@pytest.fixture
def docker_executor(docker_engine: docker.DockerClient):
    """A DockerExecutor sharing the session client (closing it leaves the client open)."""
    from agent_core.executor import DockerExecutor

    executor = DockerExecutor(docker_engine, wait_poll_secs=2.0)
    yield executor
    executor.close()
