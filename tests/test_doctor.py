"""`agent-core doctor`: a real CLI process against the local server and the real Docker engine."""

from __future__ import annotations

import json
import os
import time

import pytest

from agent_core import config, process
from agent_core import doctor as doctormod
from agent_core.client import Client
from agent_core.errors import DockerUnavailable
from agent_core.executor import EngineInfo
from tests.agent_fixtures import agent_cli
from tests.fakes import FakeBackend
from tests.test_client import canned, closed_port  # noqa: F401  (canned is a fixture)

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
    assert [c["name"] for c in data["checks"]] == ["config", "data_dir", "engine", "image", "executor", "workspace",
                                                   "task_network", "server", "credentials", "disk"]


@pytest.mark.docker
@pytest.mark.parametrize("setting, words", [({"executor.network_mode": "nonee"}, "no network 'nonee'"),
                                            ({"executor.user": "nosuchuser"}, "nosuchuser")])
def test_doctor_fails_an_executor_that_run_would_refuse(make_agent, setting, words):
    agent = make_agent(setting)
    proc = doctor(agent.config_path)
    assert proc.returncode == 1, proc.stdout
    assert words in line(proc.stdout, "FAIL", "executor") and "fix:" in proc.stdout


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
    assert proc.returncode == 1, proc.stdout  # `run` would refuse it
    line(proc.stdout, "FAIL", "no network 'agent-core-test-no-such-network'")
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


# --- in-process: the server probe, the credentials check beside a running daemon, masking ----------------


def cfg_for(tmp_path, base_url: str, **changes):
    path = tmp_path / "config.toml"
    config.init(path, base_url=base_url)
    config.update(path, {"paths.data_dir": str(tmp_path / "data"), "server.connect_timeout_secs": 5, **changes})
    return config.load(path)


@pytest.mark.parametrize("rootless, said", [(False, "not rootless"), (True, "rootless")])
def test_the_engine_line_names_the_engine_its_version_and_whether_it_is_rootless(tmp_path, rootless, said):
    backend = FakeBackend()
    backend.engine_info = lambda: EngineInfo("podman", "4.3.1", rootless, "unix:///run/podman/podman.sock")
    (check, warning) = doctormod._engine(cfg_for(tmp_path, "http://127.0.0.1:9"), backend, "docker")
    assert (check.status, check.message) == (
        "ok", f"podman engine reachable (4.3.1) at unix:///run/podman/podman.sock, {said}")
    # configured for docker, Podman answers: a warning that says so, not a failure
    assert warning.status == "warn" and not warning.essential and "executor.engine is 'docker'" in warning.message
    (check,) = doctormod._engine(cfg_for(tmp_path / "podman", "http://127.0.0.1:9", **{"executor.engine": "podman"}),
                                 backend, "podman")
    assert check.status == "ok"


def test_an_unreachable_engine_is_named_with_its_fix(tmp_path):
    backend = FakeBackend()
    backend.fail("engine_info", DockerUnavailable(f"Docker engine not reachable at {backend.where}: refused"))
    backend.fail("ping", DockerUnavailable(f"Docker engine not reachable at {backend.where}: refused"))
    (check,) = doctormod._engine(cfg_for(tmp_path, "http://127.0.0.1:9"), backend, "docker")
    assert check.status == "FAIL" and check.failed
    assert check.message.startswith(f"docker engine not reachable at {backend.where} (refused): start the engine")


def test_a_refused_connection_is_named_with_its_fix(tmp_path):
    check = doctormod._server(cfg_for(tmp_path, f"http://127.0.0.1:{closed_port()}"))
    assert check.status == "FAIL" and "connection refused" in check.message and "server runs" in check.message


@pytest.mark.parametrize("status, body, ctype", [
    (404, b"<html><body>Not Found</body></html>", "text/html"),
    (200, b'{"status": "degraded"}', "application/json"),
    (200, b"<html>welcome</html>", "text/html; charset=utf-8"),
])
def test_an_answer_that_is_not_openaaas_is_named_with_its_fix(tmp_path, canned, status, body, ctype):
    check = doctormod._server(cfg_for(tmp_path, canned(status, body, ctype)))
    assert check.status == "FAIL" and "not as an OpenAaaS server" in check.message
    assert f"HTTP {status}, {ctype.split(';')[0]}" in check.message and "API root" in check.message


def test_a_tls_failure_is_named_with_its_fix(tmp_path, canned):
    url = canned(200, b'{"status": "healthy"}', "application/json").replace("http://", "https://")
    check = doctormod._server(cfg_for(tmp_path, url))
    assert check.status == "FAIL" and "TLS failed" in check.message and "http://" in check.message


def test_a_healthy_server_passes(tmp_path, canned):
    check = doctormod._server(cfg_for(tmp_path, canned(200, b'{"status": "healthy"}', "application/json")))
    assert check.status == "ok"


def test_beside_a_running_daemon_no_heartbeat_is_sent(tmp_path, canned):
    # Given a daemon holding the data dir whose last heartbeat was 7 s ago
    url = canned(500, b"must not be called")
    cfg = cfg_for(tmp_path, url, **{"agent.service_id": "svc-1", "agent.api_key": "ak_" + "2" * 32})
    data_dir = process.ensure_data_dir(cfg.paths.data_dir)
    pidfile = process.PidFile(data_dir)
    pidfile.acquire()
    try:
        status = {"pid": os.getpid(), "state": "running", "last_heartbeat": time.time() - 7, "tasks": [{}]}
        (data_dir / process.STATUSFILE).write_text(json.dumps(status))
        with Client.from_config(cfg) as client:
            check = doctormod._credentials(cfg, client)
        assert check.status == "ok" and "last heartbeat: 7 s ago" in check.message and f"pid {os.getpid()}" in check.message
        # and a heartbeat error newer than the last success is a warning naming it
        status["errors"] = {"heartbeat": {"at": time.time(), "message": "HTTP 401 service revoked"}}
        (data_dir / process.STATUSFILE).write_text(json.dumps(status))
        with Client.from_config(cfg) as client:
            check = doctormod._credentials(cfg, client)
        assert check.status == "warn" and "HTTP 401 service revoked" in check.message
    finally:
        pidfile.release()


def test_the_api_key_is_masked_in_every_line_and_config_warnings_are_listed(tmp_path, monkeypatch):
    key = "ak_" + "3" * 32
    cfg = cfg_for(tmp_path, "http://127.0.0.1:9", **{"agent.service_id": "svc-1", "agent.api_key": key,
                                                      "executor.capasity": 3})
    cfg.path.chmod(0o640)
    # a server that echoes the key back in an error
    monkeypatch.setattr(doctormod, "_server_checks",
                        lambda _cfg: iter([doctormod.Check("server", "FAIL", f"HTTP 400: bad key {key}")]))
    monkeypatch.setattr(doctormod, "_engine_checks", lambda _cfg: iter([]))
    checks = doctormod.run(cfg.path)
    text = doctormod.render(checks) + doctormod.to_json(checks)
    assert key not in text and "bad key ***" in text
    assert "did you mean `executor.capacity`?" in line(doctormod.render(checks), "warn", "executor.capasity")
    assert f"chmod 600 {cfg.path}" in line(doctormod.render(checks), "warn", "readable by other users")
    assert doctormod.exit_code([c for c in checks if c.name == "config"]) == 0


@pytest.mark.parametrize("seen_elsewhere", [False, True])
def test_the_workspace_line_says_whether_the_engine_sees_the_data_dir(tmp_path, seen_elsewhere):
    cfg = cfg_for(tmp_path, "http://127.0.0.1:9")
    backend = FakeBackend()
    if seen_elsewhere:
        backend.host_root = tmp_path / "engine-host"
    check = doctormod._workspace(cfg, backend)
    data_dir = cfg.paths.data_dir
    if not seen_elsewhere:
        assert (check.status, check.message) == (
            "ok", f"the engine sees the data dir {data_dir} at the same path (bind workspaces)")
    else:
        assert check.failed and f"fix: mount the data dir at the same path: -v {data_dir}:{data_dir}" in check.message
