"""The `agent-core` command line, run as a real subprocess (`python -m agent_core`) against the local server."""

from __future__ import annotations

import json
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import tomlkit

from agent_core import __version__, config
from tests.agent_fixtures import agent_cli
from tests.test_client import closed_port

pytestmark = pytest.mark.timeout(90)

API_KEY = "ak_agent_" + "5" * 32  # a stand-in for tests that need "registered" without a server


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got:\n{text}"
    assert "Traceback" not in text
    return lines[0]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def make_config(tmp_path: Path, base_url: str | None = "http://127.0.0.1:1", **changes) -> Path:
    """A default config (as `init` writes it) with its data dir under tmp_path and `changes` applied."""
    path = config.init(tmp_path / "config.toml", base_url=base_url)
    config.update(path, {"paths.data_dir": str(tmp_path / "data"), **changes})
    return path


def registered_config(tmp_path: Path, **changes) -> Path:
    return make_config(tmp_path, **{"agent.service_id": "svc-1", "agent.api_key": API_KEY, **changes})


@pytest.fixture(autouse=True)
def no_token_in_env(monkeypatch):
    monkeypatch.delenv("AGENT_CORE_REGISTRATION_TOKEN", raising=False)
    monkeypatch.delenv("AGENT_CORE_CONFIG", raising=False)


# --------------------------------------------------------------------------- global options


def test_help_and_version():
    proc = agent_cli("--help", check=True)
    for command in ("init", "register", "run", "run-detached", "status", "stop"):
        assert command in proc.stdout
    assert "--config" in proc.stdout
    proc = agent_cli("--version", check=True)
    assert proc.stdout.strip() == f"agent-core, version {__version__}"


def test_config_option_before_and_after_the_command_and_from_the_environment(tmp_path, monkeypatch):
    path = make_config(tmp_path)
    before = agent_cli("status", "--json", config_path=path, check=True)
    after = agent_cli("status", "--json", "--config", str(path), check=True)
    monkeypatch.setenv("AGENT_CORE_CONFIG", str(path))
    from_env = agent_cli("status", "--json", check=True)
    for proc in (before, after, from_env):
        assert json.loads(proc.stdout)["config"] == str(path)


# --------------------------------------------------------------------------- init


def test_init_writes_a_commented_private_config_and_never_overwrites_by_accident(tmp_path):
    path = tmp_path / "sub" / "config.toml"
    proc = agent_cli("init", "--server", "127.0.0.1:8080", config_path=path, check=True)
    assert str(path) in proc.stdout
    assert mode(path) == 0o600
    text = path.read_text()
    assert sum(line.lstrip().startswith("#") for line in text.splitlines()) > 20
    cfg = config.load(path)
    assert cfg.server.base_url == "https://127.0.0.1:8080" and not cfg.agent.registered

    config.update(path, {"agent.service_id": "svc-1", "agent.api_key": API_KEY})
    kept = path.read_text()
    proc = agent_cli("init", config_path=path)
    assert proc.returncode == 2
    assert "already exists" in one_line(proc.stderr) and "--force" in proc.stderr
    assert path.read_text() == kept

    agent_cli("init", "--force", config_path=path, check=True)
    assert not config.load(path).agent.registered and mode(path) == 0o600


# --------------------------------------------------------------------------- register

HAND_WRITTEN = """\
# my agent, written by hand
[server]
base_url = "{url}"  # the local server
mystery_knob = "kept"  # a key agent-core does not know

[executor]
capacity = 3  # three at once
"""


def test_register_keeps_comments_and_unknown_keys(tmp_path, dev_server, dev_client):
    path = tmp_path / "config.toml"
    path.write_text(HAND_WRITTEN.format(url=dev_server.url))
    path.chmod(0o644)
    svc = dev_client.create_service("svc")
    token = svc["registration_token"]

    proc = agent_cli("register", "--token", token, "--name", "node-7", config_path=path)
    assert proc.returncode == 0, proc.stderr
    assert svc["id"] in proc.stdout
    assert "mystery_knob" in proc.stderr  # warned about, and kept below

    text = path.read_text()
    assert mode(path) == 0o600
    for survivor in ("# my agent, written by hand", "# the local server", 'mystery_knob = "kept"',
                     "# a key agent-core does not know", "capacity = 3  # three at once"):
        assert survivor in text
    doc = tomlkit.parse(text)
    assert doc["agent"]["service_id"] == svc["id"] and doc["agent"]["name"] == "node-7"
    api_key = doc["agent"]["api_key"]
    assert api_key.startswith("ak_agent_")
    for secret in (api_key, token):
        assert secret not in proc.stdout + proc.stderr
    assert dev_server.get_service(svc["id"])["capacity"] == 3


def test_register_when_registered_does_not_call_the_server(tmp_path, dev_server, dev_client):
    path = registered_config(tmp_path, **{"server.base_url": dev_server.url})
    token = dev_client.create_service("svc")["registration_token"]
    calls = len(dev_server.calls)
    proc = agent_cli("register", "--token", token, config_path=path)
    assert proc.returncode == 0
    assert "already registered" in proc.stdout and "svc-1" in proc.stdout and "--force" in proc.stdout
    assert len(dev_server.calls) == calls
    assert config.load(path).agent.api_key == API_KEY


def test_register_force_registers_again_with_a_new_token(tmp_path, dev_server, dev_client, monkeypatch):
    path = registered_config(tmp_path, **{"server.base_url": dev_server.url})
    svc = dev_client.create_service("svc")
    monkeypatch.setenv("AGENT_CORE_REGISTRATION_TOKEN", svc["registration_token"])  # no --token
    proc = agent_cli("register", "--force", config_path=path)
    assert proc.returncode == 0, proc.stderr
    cfg = config.load(path)
    assert cfg.agent.service_id == svc["id"] and cfg.agent.api_key not in (None, API_KEY)
    assert svc["registration_token"] not in proc.stdout + proc.stderr
    assert svc["id"] in proc.stdout


@pytest.mark.parametrize("case, words", [
    ("used", "already used"),
    ("unknown", "already used"),
    ("revoked", "revoked"),
    ("conflict", "already active"),
    ("server error", "503"),
    ("server down", "cannot reach the server"),
    ("tls", "TLS error"),
])
def test_register_failures_are_one_line_and_exit_1(tmp_path, dev_server, dev_client, case, words):
    svc = dev_client.create_service("svc")
    token = svc["registration_token"]
    url = dev_server.url
    if case == "used":
        path = make_config(tmp_path / "first", base_url=url)
        agent_cli("register", "--token", token, config_path=path, check=True)
    elif case == "unknown":
        token = "rt_" + "7" * 32
    elif case == "revoked":
        dev_server.revoke_service(svc["id"])
    elif case == "conflict":
        dev_server.faults.fail_next(1, status=409, path_contains="/register")
    elif case == "server error":
        dev_server.faults.fail_next(10, status=503, path_contains="/register")
    elif case == "server down":
        url = f"http://127.0.0.1:{closed_port()}"
    elif case == "tls":
        url = url.replace("http://", "https://")
    path = make_config(tmp_path, base_url=url)

    proc = agent_cli("register", "--token", token, config_path=path)
    assert proc.returncode == 1
    line = one_line(proc.stderr)
    assert line.startswith("error: register: ") and words in line
    assert proc.stdout == ""
    assert token not in proc.stdout + proc.stderr
    assert not config.load(path).agent.registered and mode(path) == 0o600


def test_register_without_a_token_and_no_terminal_is_a_usage_error(tmp_path, dev_server):
    path = make_config(tmp_path, base_url=dev_server.url)
    proc = agent_cli("register", config_path=path)
    assert proc.returncode == 2
    assert "--token" in one_line(proc.stderr)
    assert dev_server.calls == []


# --------------------------------------------------------------------------- bad and missing configs


@pytest.mark.parametrize("change, key", [
    ({"executor.capacity": 0}, "executor.capacity"),
    ({"server.base_url": "ftp://x"}, "server.base_url"),
])
@pytest.mark.parametrize("command", [("status",), ("register", "--token", "rt_x"), ("run",), ("stop",)])
def test_an_invalid_config_is_exit_2_naming_the_key(tmp_path, change, key, command):
    path = make_config(tmp_path)
    doc = tomlkit.parse(path.read_text())
    (dotted, value), = change.items()
    section, name = dotted.split(".")
    doc[section][name] = value  # past config.update, which refuses to write an invalid file
    path.write_text(tomlkit.dumps(doc))
    proc = agent_cli(*command, config_path=path)
    assert proc.returncode == 2
    line = one_line(proc.stderr)
    assert key in line and str(path) in line
    assert "rt_x" not in proc.stdout + proc.stderr


def test_a_missing_config_is_exit_2_with_a_hint(tmp_path):
    path = tmp_path / "nowhere.toml"
    proc = agent_cli("status", config_path=path)
    assert proc.returncode == 2
    line = one_line(proc.stderr)
    assert str(path) in line and "agent-core init" in line


# --------------------------------------------------------------------------- status, stop, run


def test_status_unregistered(tmp_path):
    path = make_config(tmp_path, **{"server.poll_interval_secs": 2.5})
    proc = agent_cli("status", config_path=path, check=True)
    out = proc.stdout
    for shown in (str(path), str(tmp_path / "data"), "http://127.0.0.1:1", "poll every 2.5 s", "not running"):
        assert shown in out
    assert "registered  no" in out
    assert "name        agent-core" in out  # the reference's default name


def test_status_shows_the_agent_name(tmp_path):
    path = registered_config(tmp_path, **{"agent.name": "node-7"})
    assert "name        node-7" in agent_cli("status", config_path=path, check=True).stdout.splitlines()
    assert json.loads(agent_cli("status", "--json", config_path=path, check=True).stdout)["name"] == "node-7"


@pytest.mark.parametrize("reader", ["head -c1", "true"])  # `true` has left before the first write
def test_status_into_a_closed_pipe_ends_without_a_traceback(tmp_path, reader):
    path = registered_config(tmp_path)
    cmd = f"{shlex.quote(sys.executable)} -m agent_core --config {shlex.quote(str(path))} status | {reader}"
    proc = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and len(proc.stdout) == (1 if reader.startswith("head") else 0)
    assert proc.stderr == ""


def test_status_registered_shows_everything_but_the_api_key(tmp_path):
    path = registered_config(tmp_path, **{"executor.capacity": 4, "executor.memory_limit": "512m",
                                          "executor.timeout_minutes": 30})
    text = agent_cli("status", config_path=path, check=True).stdout
    for shown in ("yes, service svc-1", "capacity 4", "memory 512m", "timeout 30 min", "image open-aaas-executor",
                  "not running"):
        assert shown in text
    data = json.loads(agent_cli("status", "--json", config_path=path, check=True).stdout)
    assert data["config"] == str(path) and data["data_dir"] == str(tmp_path / "data")
    assert data["server"]["base_url"] == "http://127.0.0.1:1" and data["server"]["poll_interval_secs"] == 5
    assert data["registered"] is True and data["service_id"] == "svc-1"
    assert data["executor"]["capacity"] == 4 and data["executor"]["memory_limit"] == "512m"
    assert data["daemon"] == {"running": False}
    assert API_KEY not in text and API_KEY not in json.dumps(data)


def test_stop_with_nothing_running_says_so(tmp_path):
    path = registered_config(tmp_path)
    proc = agent_cli("stop", config_path=path)
    assert proc.returncode == 0
    assert "no agent is running" in one_line(proc.stdout) and proc.stderr == ""


def test_run_with_the_docker_engine_unreachable_is_one_line_exit_1(tmp_path, monkeypatch):
    path = registered_config(tmp_path)
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent.sock")
    proc = agent_cli("run", config_path=path, timeout=60)
    assert proc.returncode == 1
    line = one_line(proc.stderr)
    assert "Docker" in line and "/nonexistent.sock" in line
    assert API_KEY not in proc.stdout + proc.stderr


def test_run_unregistered_is_a_usage_error(tmp_path, dev_server):
    # stdin is not a terminal here: nothing is asked, the line names the command to run
    path = make_config(tmp_path, base_url=dev_server.url)
    proc = agent_cli("run", config_path=path)
    assert proc.returncode == 2
    assert "agent-core register --token <TOKEN>" in one_line(proc.stderr)
    assert dev_server.calls == []


def test_run_with_a_missing_mount_host_path_is_a_config_error(tmp_path):
    path = registered_config(tmp_path)
    config.update(path, {"paths.mounts": [{"host": str(tmp_path / "gone"), "container": "/creds"}]})
    proc = agent_cli("run", config_path=path, timeout=60)
    assert proc.returncode == 2
    line = one_line(proc.stderr)
    assert "paths.mounts[0].host" in line and "does not exist" in line


# --------------------------------------------------------------------------- what an operator sees


def test_help_reads_like_a_manual():
    text = agent_cli("--help", check=True).stdout
    assert "..." not in text.partition("Commands:")[2]  # every summary whole
    for words in ("Getting started:", "agent-core init --server", "agent-core register --token", "agent-core run",
                  "AGENT_CORE_CONFIG", "Exit codes: 0 success, 1 runtime failure", "2 usage or configuration error"):
        assert words in text, words
    assert "Ctrl+C: drain" in text and "--force" in agent_cli("stop", "--help", check=True).stdout


def test_a_failed_init_writes_nothing_and_the_corrected_retry_works(tmp_path):
    path = tmp_path / "config.toml"
    proc = agent_cli("init", "--server", "ftp://x", config_path=path)
    assert proc.returncode == 2 and "scheme" in one_line(proc.stderr)
    assert list(tmp_path.iterdir()) == []
    agent_cli("init", "--server", "http://127.0.0.1:9", config_path=path, check=True)
    assert config.load(path).server.base_url == "http://127.0.0.1:9"


def test_init_force_keeps_a_private_backup_and_says_where(tmp_path):
    path = registered_config(tmp_path)
    old = path.read_text()
    proc = agent_cli("init", "--force", config_path=path, check=True)
    (backup,) = tmp_path.glob("config.toml.bak-*")
    assert f"kept the old file as {backup} (mode 0600)" in proc.stdout
    assert backup.read_text() == old and mode(backup) == 0o600 and API_KEY in old


def test_register_through_a_symlinked_config_keeps_the_link(tmp_path, dev_server, dev_client):
    target = make_config(tmp_path / "real", base_url=dev_server.url)
    link = tmp_path / "config.toml"
    link.symlink_to(target)
    token = dev_client.create_service("linked")["registration_token"]
    agent_cli("register", "--token", token, config_path=link, check=True)
    assert link.is_symlink() and config.load(target).agent.registered


def test_unknown_keys_are_one_plain_warning_each_once_per_command(tmp_path, dev_server, dev_client):
    path = make_config(tmp_path, base_url=dev_server.url, **{"executor.capasity": 3, "extra_knob": 1})
    token = dev_client.create_service("typo")["registration_token"]
    proc = agent_cli("register", "--token", token, config_path=path, check=True)  # loads the file twice
    warnings = proc.stderr.strip().splitlines()
    assert warnings == [f"warning: {path}: unknown key `executor.capasity` is ignored: did you mean "
                        "`executor.capacity`?", f"warning: {path}: unknown key `extra_knob` is ignored"], proc.stderr
    assert len(agent_cli("status", config_path=path, check=True).stderr.strip().splitlines()) == 2


def test_a_config_others_can_read_is_warned_about_with_the_fix(tmp_path):
    path = registered_config(tmp_path)
    path.chmod(0o644)
    proc = agent_cli("status", config_path=path, check=True)
    line = one_line(proc.stderr)
    assert line.startswith("warning: ") and line.endswith(f"chmod 600 {path}")


def test_run_logs_to_a_private_log_file_when_told(tmp_path, monkeypatch):
    # run-detached's child is `run --log-file <data_dir>/agent.log`
    path = registered_config(tmp_path)
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent.sock")
    log_file = tmp_path / "agent.log"
    proc = agent_cli("run", "--log-file", str(log_file), config_path=path, timeout=60)
    assert proc.returncode == 1 and mode(log_file) == 0o600
