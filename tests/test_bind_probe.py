"""A bind engine must see the data dir at the same path: on this host it does; from agent-core's own
container whose data dir is not mounted at its own host path it does not, and `doctor` and `run`
say so with the mount to make (preflight.bind_problem, through a container never started)."""

from __future__ import annotations

import contextlib
import uuid

import docker
import pytest

from agent_core import preflight
from agent_core.executor import DockerBackend
from tests.agent_fixtures import agent_cli
from tests.test_image import _logs, _tar_of, agent_image  # noqa: F401  (agent_image is a fixture)

pytestmark = pytest.mark.docker

FIX = "fix: mount the data dir at the same path: -v {d}:{d}, or set workspace = \"copy\""


def _probes_left(docker_engine) -> list:
    """Containers of the busybox image with the probe's mount: none may stay behind."""
    return [c for c in docker_engine.containers.list(all=True)
            if any(m.get("Destination") == "/probe" for m in c.attrs.get("Mounts", []))]


def test_on_this_host_the_engine_sees_the_data_dir(make_agent, docker_engine):
    agent = make_agent()
    agent.cfg.paths.data_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.closing(DockerBackend()) as backend:
        assert preflight.check(agent.cfg, backend, "bind") is None
    assert list(agent.cfg.paths.data_dir.iterdir()) == [] and _probes_left(docker_engine) == []
    proc = agent_cli("doctor", config_path=agent.config_path)
    assert f"the engine sees the data dir {agent.cfg.paths.data_dir} at the same path" in proc.stdout, proc.stdout


@pytest.mark.parametrize("layout", ["another folder", "no folder"])
@pytest.mark.parametrize("command", ["doctor", "run"])
def test_from_a_container_without_the_data_dir_at_its_path_doctor_and_run_name_the_mount(
        agent_image, make_agent, docker_engine, tmp_path, layout, command):  # noqa: F811
    # Given agent-core in its container, its data dir either a host folder mounted at another path
    # (the host has a different, empty folder at that path) or the image's own volume (the host has
    # nothing at /var/lib/agent-core)
    if layout == "another folder":
        data_dir, mounted = tmp_path / "seen-by-the-agent", tmp_path / "agent-data"
        data_dir.mkdir()
        mounted.mkdir()
        volumes = {str(mounted): {"bind": str(data_dir), "mode": "rw"}}
    else:
        data_dir, volumes = "/var/lib/agent-core", {}
    agent = make_agent({"paths.data_dir": str(data_dir)})
    container = docker_engine.containers.create(
        agent_image, [command], name=f"agent-core-probe-test-{uuid.uuid4().hex[:8]}", network_mode="host",
        volumes={"/var/run/docker.sock": {"bind": "/var/run/docker.sock", "mode": "rw"}, **volumes})
    try:
        container.put_archive("/etc/agent-core", _tar_of(agent.config_path, "config.toml"))
        # When doctor or run starts there
        container.start()
        code = container.wait(timeout=120)["StatusCode"]
        out = _logs(container)
        # Then it fails, naming the data dir and the mount that would make it work
        assert code == 1, out
        assert f"the data dir {data_dir} at that path" in out, out
        assert FIX.format(d=data_dir) in out, out
        assert "Traceback" not in out, out
        if command == "doctor":
            assert any(ln.startswith("FAIL  ") and "bind workspaces" in ln for ln in out.splitlines()), out
        if layout == "another folder":
            assert "sees another folder than" in out and list(mounted.iterdir()) == [], out  # the probe is gone
    finally:
        with contextlib.suppress(docker.errors.NotFound):
            container.remove(force=True, v=True)
    assert _probes_left(docker_engine) == []
