"""Fixtures for tests that need a real engine (Docker, or Podman) and the offline test images.

`scripts/docker_env.sh` makes the Docker engine reachable and imports the images (it never
pulls); `scripts/podman_env.sh` starts a rootful Podman service on a socket of its own and
copies the images into it. Without an engine a test is skipped, except with CI=true, where it fails.

    docker_engine    session  docker.DockerClient (busybox image ensured)
    podman_engine    session  docker.DockerClient on the Podman service at podman_url() (images copied)
    busybox_image    session  "agent-core-test/busybox:latest"
    python_image     session  "agent-core-test/python:latest" (Debian bookworm + python3)
    docker_cleanup   function a Cleanup: .labels to put on containers, .track(id),
                              .track_service(sid); force-removes them all in teardown
    docker_executor  function an agent_core.executor.DockerExecutor on docker_engine

The end-to-end core runs on both engines: `@on_both_engines` parametrizes `engine`
("docker" unless a test says so), which these follow:

    engine           function "docker", or the test's parameter
    engine_client    function docker_engine or podman_engine, for tests that look at containers
    engine_cleanup   function docker_cleanup, or a Cleanup on podman_engine
    engine_settings  function the config keys that point an agent at the engine ({} for Docker)
"""

from __future__ import annotations

import os
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
    "ENGINES",
    "PYTHON_IMAGE",
    "TEST_ID_LABEL",
    "Cleanup",
    "busybox_image",
    "docker_cleanup",
    "docker_engine",
    "docker_executor",
    "engine",
    "engine_cleanup",
    "engine_client",
    "engine_settings",
    "on_both_engines",
    "podman_engine",
    "podman_url",
    "python_image",
]

ROOT = Path(__file__).resolve().parent.parent
DOCKER_ENV = ROOT / "scripts" / "docker_env.sh"
PODMAN_ENV = ROOT / "scripts" / "podman_env.sh"
PODMAN_URL_VAR = "AGENT_CORE_PODMAN_URL"  # scripts/test.sh exports it after podman_env.sh
PODMAN_DEFAULT_URL = "unix:///run/agent-core-podman/podman.sock"  # podman_env.sh's socket
ENGINES = ("docker", "podman")
on_both_engines = pytest.mark.parametrize("engine", ENGINES)
BUSYBOX_IMAGE = "agent-core-test/busybox:latest"
PYTHON_IMAGE = "agent-core-test/python:latest"
TEST_ID_LABEL = "agent-core.test-id"
MANAGED_LABEL = "agent-core.managed"
SERVICE_LABEL = "agent-core.service_id"
SCRIPT_TIMEOUT_SECS = 1200  # a cold debootstrap of the python image takes about a minute here


def _unavailable(reason: str, engine: str = "Docker") -> None:
    skip_or_fail_in_ci(f"{engine} {'is required with CI=true' if in_ci() else 'not available'}: {reason}")


def _run_env_script(script: Path, *args: str, engine: str = "Docker") -> None:
    """Run scripts/docker_env.sh or podman_env.sh; skip (or fail in CI) with its last error line."""
    try:
        proc = subprocess.run(
            ["bash", str(script), *args],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=SCRIPT_TIMEOUT_SECS,
        )
    except subprocess.TimeoutExpired:
        _unavailable(f"{script.name} {' '.join(args)} took over {SCRIPT_TIMEOUT_SECS}s", engine)
        return
    except OSError as e:
        _unavailable(f"cannot run {script}: {e}", engine)
        return
    if proc.returncode != 0:
        lines = (proc.stderr.strip() or proc.stdout.strip() or f"exit code {proc.returncode}").splitlines()
        _unavailable(f"{script.name} {' '.join(args)} failed: {lines[-1]}", engine)


def _run_docker_env(*args: str) -> None:
    _run_env_script(DOCKER_ENV, *args)


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


def podman_url() -> str:
    """Where the tests' Podman service listens: what scripts/test.sh exported, or podman_env.sh's socket."""
    return os.environ.get(PODMAN_URL_VAR) or PODMAN_DEFAULT_URL


@pytest.fixture(scope="session")
def podman_engine(docker_engine: docker.DockerClient) -> Iterator[docker.DockerClient]:
    """A client for the tests' rootful Podman service, which has the test images Docker has.

    Unless scripts/test.sh already did (and exported its URL), podman_env.sh starts the
    service and copies the images; it needs Docker's images, hence docker_engine."""
    if not os.environ.get(PODMAN_URL_VAR):
        _run_env_script(PODMAN_ENV, engine="Podman")
    url = podman_url()
    try:
        client = docker.DockerClient(base_url=url, max_pool_size=32)
        client.ping()
    except Exception as e:  # noqa: BLE001 - any failure here means "no engine"
        _unavailable(f"the Podman service at {url} does not answer: {e}", "Podman")
        return
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def engine() -> str:
    """The engine a test runs on: Docker, unless it is parametrized (`@on_both_engines`)."""
    return "docker"


@pytest.fixture
def engine_client(engine: str, request: pytest.FixtureRequest) -> docker.DockerClient:
    return request.getfixturevalue(f"{engine}_engine")


@pytest.fixture
def engine_settings(engine: str, engine_client: docker.DockerClient) -> dict[str, str]:
    """The config keys that send an agent's tasks to `engine` (none for Docker: its defaults)."""
    return {} if engine == "docker" else {"executor.engine": engine, "executor.engine_url": podman_url()}


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


def _cleaned(client: docker.DockerClient) -> Iterator[Cleanup]:
    cleanup = Cleanup(client)
    yield cleanup
    errors = cleanup.remove_all()
    if errors:
        pytest.fail("could not remove test containers: " + "; ".join(errors), pytrace=False)


@pytest.fixture
def docker_cleanup(docker_engine: docker.DockerClient) -> Iterator[Cleanup]:
    yield from _cleaned(docker_engine)


@pytest.fixture
def engine_cleanup(engine: str, engine_client: docker.DockerClient,
                   request: pytest.FixtureRequest) -> Iterator[Cleanup]:
    if engine == "docker":  # the one Cleanup a test that also asks for docker_cleanup shares
        yield request.getfixturevalue("docker_cleanup")
    else:
        yield from _cleaned(engine_client)


@pytest.fixture
def docker_executor(docker_engine: docker.DockerClient):
    """A DockerExecutor sharing the session client (closing it leaves the client open)."""
    from agent_core.executor import DockerExecutor

    executor = DockerExecutor(docker_engine, wait_poll_secs=2.0)
    yield executor
    executor.close()
