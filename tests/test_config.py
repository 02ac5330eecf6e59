"""Config loading, validation and comment-keeping edits (no server, no Docker)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from agent_core import config
from agent_core.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_example_file_is_the_default_that_init_writes():
    assert (REPO / "config.toml.example").read_text() == config.default_text()


def test_defaults_load_and_match_the_dataclasses(tmp_path):
    cfg = config.load(write(tmp_path, config.default_text()))
    assert cfg.executor == config.ExecutorConfig()
    assert cfg.limits == config.LimitsConfig()
    assert cfg.server.poll_interval_secs == 5 and cfg.server.rate_limit_per_minute == 150
    assert cfg.paths.data_dir == tmp_path / "data"
    assert cfg.unknown_keys == ()
    assert not cfg.agent.registered


@pytest.mark.parametrize("text, key", [
    ("[executor]\ncapacity = 0", "executor.capacity"),
    ("[executor]\ncapacity = \"2\"", "executor.capacity"),
    ("[server]\nbase_url = \"ftp://x\"", "server.base_url"),
    ("[server]\npoll_interval_secs = 0", "server.poll_interval_secs"),
    ("[executor]\nexecutor_type = \"ruby\"", "executor.executor_type"),
    ("[executor]\nmemory_limit = \"lots\"", "executor.memory_limit"),
    ("[executor]\nexecutor_type = \"custom\"", "executor.custom_entrypoint"),
    ("[executor]\ncustom_args = \"--a --b\"", "executor.custom_args"),
    ("[executor]\nworking_dir = \"work\"", "executor.working_dir"),
    ("[agent]\nheartbeat_interval_secs = 30", "agent.heartbeat_interval_secs"),
    ("[[paths.mounts]]\nhost = \"/tmp\"\ncontainer = \"relative\"", "paths.mounts[0].container"),
    ("[[paths.mounts]]\nhost = \"/tmp\"\ncontainer = \"/workspace/x\"", "paths.mounts[0].container"),
    ("[[paths.mounts]]\ncontainer = \"/x\"", "paths.mounts[0].host"),
    ("[paths]\nkeep_workspaces = \"some\"", "paths.keep_workspaces"),
    ("[limits]\nmax_output_bytes = \"1x\"", "limits.max_output_bytes"),
    ("[server]\nrate_limit_per_minute = 10\nheartbeat_reserve = 10", "server.heartbeat_reserve"),
    ("[server\n", "not valid TOML"),
])
def test_bad_values_name_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError) as e:
        config.load(write(tmp_path, text))
    assert key in str(e.value)
    assert "\n" not in str(e.value)


def test_bare_host_gets_https_and_paths_resolve_against_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir("/")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = config.load(write(tmp_path, """
[server]
base_url = "example.org/"
[paths]
data_dir = "state"
[[paths.mounts]]
host = "~/creds"
container = "/creds"
[[paths.mounts]]
host = "rel"
container = "/rel"
readonly = false
"""))
    assert cfg.server.base_url == "https://example.org"
    assert cfg.paths.data_dir == tmp_path / "state"
    assert cfg.paths.mounts == (config.Mount(tmp_path / "home" / "creds", "/creds", True),
                                config.Mount(tmp_path / "rel", "/rel", False))


def test_unknown_keys_are_warned_about_and_kept(tmp_path, caplog):
    path = write(tmp_path, "[server]\nbase_url = \"http://h\"\nshiny = 1\n[extra]\na = 1\n")
    cfg = config.load(path)
    assert set(cfg.unknown_keys) == {"server.shiny", "extra"}
    assert "server.shiny" in caplog.text
    config.update(path, {"agent.service_id": "s1"})
    text = path.read_text()
    assert "shiny = 1" in text and "[extra]" in text


@pytest.mark.parametrize("value, expected", [
    ("4g", 4 * 1024**3), ("512m", 512 * 1024**2), ("10kb", 10240), ("1GiB", 1024**3), (123, 123), ("7", 7),
])
def test_parse_size(value, expected):
    assert config.parse_size(value) == expected


def test_update_keeps_comments_order_and_is_0600(tmp_path):
    path = write(tmp_path, "# my comment\n[server]\nbase_url = \"http://h\"  # inline\n\n[agent]\nname = \"n\"\n")
    os.chmod(path, 0o644)
    config.update(path, {"agent.service_id": "svc", "agent.api_key": "ak_agent_x"})
    text = path.read_text()
    assert text.startswith("# my comment\n[server]\nbase_url = \"http://h\"  # inline\n")
    assert text.index("name") < text.index("service_id")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    cfg = config.load(path)
    assert cfg.agent.registered and cfg.agent.api_key == "ak_agent_x"
    assert "ak_agent_x" not in repr(cfg)
    assert not list(tmp_path.glob(".config.toml.*"))  # no temp file left behind


def test_update_refuses_to_write_an_invalid_file(tmp_path):
    path = write(tmp_path, "[executor]\ncapacity = 2\n")
    with pytest.raises(ConfigError):
        config.update(path, {"executor.capacity": 0})
    assert path.read_text() == "[executor]\ncapacity = 2\n"


def test_init_refuses_to_overwrite(tmp_path):
    path = tmp_path / "sub" / "config.toml"
    config.init(path, base_url="127.0.0.1:9")
    assert config.load(path).server.base_url == "https://127.0.0.1:9"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(ConfigError, match="--force"):
        config.init(path)
    config.init(path, force=True)
