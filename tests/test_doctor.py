"""`agent-core doctor`: a real CLI process against the local server and the real Docker engine."""

from __future__ import annotations

import json

import pytest

from agent_core import config
from tests.agent_fixtures import agent_cli

NO_ENGINE = "unix:///nonexistent.sock"


def doctor(config_path, *args):
    proc = agent_cli("doctor", *args, config_path=config_path)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def line(out: str, status: str, words: str) -> str:
    """The one output line with this status that mentions `words`."""
    found = [ln for ln in out.splitlines() if ln.startswith(f"{status:<6}") and words in ln]
    assert len(found) == 1, f"no single {status!r} line about {words!r} in:\n{out}"
    return found[0]


@pytest.mark.docker
def test_healthy_setup_passes(make_agent, docker_engine):
    agent = make_agent()
    proc = doctor(agent.config_path)
    assert proc.returncode == 0, proc.stdout
    assert all(ln.startswith("ok    ") for ln in proc.stdout.splitlines()), proc.stdout
    version = docker_engine.version()["Version"]
    line(proc.stdout, "ok", f"docker engine reachable ({version})")
    line(proc.stdout, "ok", f"executor image {agent.cfg.executor.image} present")
    line(proc.stdout, "ok", "credentials accepted")
    line(proc.stdout, "ok", "task network none: tasks reach nothing")  # make_agent's network_mode
    assert agent.cfg.agent.api_key not in proc.stdout + proc.stderr
    # the same as JSON
    data = json.loads(doctor(agent.config_path, "--json").stdout)
    assert data["ok"] is True
    assert [c["name"] for c in data["checks"]] == ["config", "data_dir", "engine", "image", "task_network",
                                                   "server", "credentials", "disk"]


@pytest.mark.docker
def test_bridge_network_and_open_metrics_are_warnings(make_agent, docker_engine):
    # Given the default bridge network and metrics on every address
    agent = make_agent({"executor.network_mode": "bridge", "metrics.listen": "0.0.0.0:9464"})
    proc = doctor(agent.config_path)
    assert proc.returncode == 0, proc.stdout
    network = line(proc.stdout, "warn", "task network bridge")
    if docker_engine.networks.list(names=["bridge"]):
        assert "169.254.169.254" in network and "host services reachable" in network
        assert 'network_mode = "none"' in network and "DOCKER-USER" in network
    else:  # dockerd --bridge=none
        assert "network bridge not found" in network and "not reachable" in network
    assert "127.0.0.1:9464" in line(proc.stdout, "warn", "metrics.listen = '0.0.0.0:9464' is not a loopback")
    data = json.loads(doctor(agent.config_path, "--json").stdout)
    assert {c["name"]: c["status"] for c in data["checks"]}["task_network"] == "warn"


@pytest.mark.docker
def test_missing_network_is_named(make_agent):
    agent = make_agent({"executor.network_mode": "agent-core-test-no-such-network",
                        "metrics.listen": "127.0.0.1:9464"})
    proc = doctor(agent.config_path)
    assert proc.returncode == 0, proc.stdout
    line(proc.stdout, "warn", "task network agent-core-test-no-such-network not found")
    line(proc.stdout, "ok", "is loopback only")


@pytest.mark.docker
def test_stopped_engine_fails_naming_it(make_agent, monkeypatch):
    agent = make_agent()
    monkeypatch.setenv("DOCKER_HOST", NO_ENGINE)  # for the doctor subprocess only
    proc = doctor(agent.config_path)
    assert proc.returncode == 1
    assert NO_ENGINE in line(proc.stdout, "FAIL", "docker engine not reachable")
    line(proc.stdout, "skip", "executor image")
    line(proc.stdout, "skip", "task network not checked")
    line(proc.stdout, "ok", "credentials accepted")  # the rest is still checked


@pytest.mark.docker
def test_missing_image_fails_naming_it(make_agent):
    agent = make_agent({"executor.image": "agent-core-test/never-built:latest"})
    proc = doctor(agent.config_path)
    assert proc.returncode == 1
    assert "docker build" in line(proc.stdout, "FAIL", "agent-core-test/never-built:latest missing")


@pytest.mark.docker
def test_revoked_key_fails_on_credentials(make_agent, dev_server):
    agent = make_agent()
    dev_server.revoke_service(agent.service_id)
    proc = doctor(agent.config_path)
    assert proc.returncode == 1
    assert "register --force" in line(proc.stdout, "FAIL", "credentials refused")
    line(proc.stdout, "ok", "reachable (/health)")


@pytest.mark.docker
def test_warnings_do_not_fail(make_agent, docker_engine):
    # Given a disk limit no disk meets, and GPUs on an engine that may lack the nvidia runtime
    agent = make_agent({"paths.min_free_disk_mb": 1 << 40, "executor.gpu.vendor": "nvidia"})
    proc = doctor(agent.config_path)
    assert proc.returncode == 0, proc.stdout
    line(proc.stdout, "warn", "below paths.min_free_disk_mb")
    gpu_status = "ok" if "nvidia" in (docker_engine.info().get("Runtimes") or {}) else "warn"
    line(proc.stdout, gpu_status, "GPU: ")


def test_invalid_config_fails_first(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('[executor]\ncapacity = 0\n')
    proc = doctor(path)
    assert proc.returncode == 1
    assert "executor.capacity" in line(proc.stdout, "FAIL", "config invalid")


def test_unusable_data_dir_unreachable_server_and_no_registration_fail(tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", NO_ENGINE)  # keeps this test off the real engine
    path = tmp_path / "config.toml"
    config.init(path, base_url="http://127.0.0.1:9")
    (tmp_path / "taken").write_text("a file, not a folder")
    config.update(path, {"paths.data_dir": str(tmp_path / "taken" / "data")})
    proc = doctor(path)
    assert proc.returncode == 1
    assert "paths.data_dir" in line(proc.stdout, "FAIL", "is not a folder")
    line(proc.stdout, "FAIL", "server http://127.0.0.1:9 not reachable")
    line(proc.stdout, "FAIL", "not registered")
