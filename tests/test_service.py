"""`agent-core service install|uninstall`: the systemd unit, printed, checked and installed into a temp dir."""

from __future__ import annotations

import configparser
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent_core import config
from tests.agent_fixtures import agent_cli


def make_config(folder: Path, **settings) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.toml"
    config.init(path, base_url="http://127.0.0.1:9")
    if settings:
        config.update(path, settings)
    return path


def printed_unit(config_path: Path, *args: str) -> str:
    return agent_cli("service", "install", "--print", *args, config_path=config_path, check=True).stdout


def parse_unit(text: str) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(interpolation=None, strict=True)
    unit.optionxform = str  # systemd keys are case-sensitive
    unit.read_string(text)
    return unit


def exec_argv(exec_start: str) -> list[str]:
    """ExecStart as systemd splits it (enough of its rules for what we emit: quotes, %% and $$)."""
    return [a.replace("%%", "%").replace("$$", "$") for a in shlex.split(exec_start)]


def test_printed_unit_runs_this_config_and_stops_gracefully(tmp_path):
    path = make_config(tmp_path, **{"agent.shutdown_grace_secs": 45.5})
    unit = parse_unit(printed_unit(path))
    svc = unit["Service"]
    argv = exec_argv(svc["ExecStart"])
    assert Path(argv[0]).is_absolute() and os.access(argv[0], os.X_OK)
    assert argv[0] == str(Path(sys.executable).parent / "agent-core") or argv[1:3] == ["-m", "agent_core"]
    assert argv[-3:] == ["--config", str(path.absolute()), "run"]
    assert svc["Restart"] == "on-failure" and svc["KillSignal"] == "SIGTERM"
    assert int(svc["TimeoutStopSec"]) == 46 + 60  # longer than the drain, with room for the cancel step
    assert svc["WorkingDirectory"] == str(tmp_path) and svc["UMask"] == "0077"
    assert "docker.service" in unit["Unit"]["After"]
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_user_unit_wants_default_target_and_no_system_units(tmp_path):
    unit = parse_unit(printed_unit(make_config(tmp_path), "--user"))
    assert unit["Install"]["WantedBy"] == "default.target"
    assert "After" not in unit["Unit"]


def test_paths_with_spaces_percent_and_dollar_survive_systemd_quoting(tmp_path):
    path = make_config(tmp_path / "my agent 100% $HOME")
    unit = parse_unit(printed_unit(path))
    assert exec_argv(unit["Service"]["ExecStart"])[-3:] == ["--config", str(path), "run"]
    assert unit["Service"]["WorkingDirectory"] == str(path.parent).replace("%", "%%")


@pytest.mark.parametrize("folder", ["plain", "my agent 100% $HOME"])
def test_printed_unit_passes_systemd_analyze_verify(tmp_path, folder):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd); the unit was still parsed above")
    unit_file = tmp_path / "agent-core.service"  # verify wants the unit's real name
    unit_file.write_text(printed_unit(make_config(tmp_path / folder)))
    proc = subprocess.run(["systemd-analyze", "verify", str(unit_file)], capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)
    # syntax problems are only warnings ("<file>:<line>: ..."), so look for them as well as the exit code
    problems = [line for line in proc.stderr.splitlines() if str(unit_file) in line or "agent-core" in line]
    assert proc.returncode == 0 and not problems, proc.stderr


def test_install_and_uninstall_into_the_given_folder(tmp_path, monkeypatch):
    units = tmp_path / "units"
    monkeypatch.setenv("AGENT_CORE_SYSTEMD_DIR", str(units))
    path = make_config(tmp_path / "cfg")
    # When installed
    out = agent_cli("service", "install", config_path=path, check=True).stdout
    unit = units / "agent-core.service"
    assert unit.read_text() == printed_unit(path)
    assert unit.stat().st_mode & 0o777 == 0o644
    assert "systemctl daemon-reload && systemctl enable --now agent-core" in out
    assert "not registered" in out
    # and enabled (what `systemctl enable` does for WantedBy=)
    (units / "multi-user.target.wants").mkdir()
    (units / "multi-user.target.wants" / "agent-core.service").symlink_to(unit)
    # Then uninstall removes the unit and the enable link
    out = agent_cli("service", "uninstall", check=True).stdout
    assert f"removed {unit}" in out and "daemon-reload" in out
    assert not unit.exists() and not (units / "multi-user.target.wants" / "agent-core.service").is_symlink()
    # and a second uninstall has nothing to do
    assert "no unit at" in agent_cli("service", "uninstall", check=True).stdout


def test_user_install_prints_user_systemctl(tmp_path, monkeypatch):
    monkeypatch.setenv("AGENT_CORE_SYSTEMD_DIR", str(tmp_path / "units"))
    out = agent_cli("service", "install", "--user", config_path=make_config(tmp_path), check=True).stdout
    assert "systemctl --user daemon-reload && systemctl --user enable --now agent-core" in out
    assert "enable-linger" in out


def test_default_folders(monkeypatch, tmp_path):
    from agent_core import service

    monkeypatch.delenv("AGENT_CORE_SYSTEMD_DIR", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert service.unit_dir(user=False) == Path("/etc/systemd/system")
    assert service.unit_dir(user=True) == tmp_path / "systemd" / "user"


def test_unwritable_folder_is_one_line_exit_1(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("AGENT_CORE_SYSTEMD_DIR", str(blocker / "sub"))
    proc = agent_cli("service", "install", config_path=make_config(tmp_path / "cfg"))
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: cannot write") and "--user" in proc.stderr
    assert "Traceback" not in proc.stderr


def instance_config(folder: Path, name: str, **settings) -> config.Config:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.toml"
    config.init(path, base_url="http://127.0.0.1:9", changes={"paths.data_dir": f"./{name}-data", **settings})
    return config.load(path)


def test_instances_share_one_template_and_each_has_its_stop_timeout(tmp_path, monkeypatch):
    from agent_core import service

    units = tmp_path / "units"
    monkeypatch.setenv("AGENT_CORE_SYSTEMD_DIR", str(units))
    said: list[str] = []
    alpha = instance_config(tmp_path / "etc", "alpha", **{"agent.shutdown_grace_secs": 30})
    beta = instance_config(tmp_path / "etc", "beta")
    service.install(alpha, user=False, print_only=False, say=said.append, instance="alpha")
    service.install(beta, user=False, print_only=False, say=said.append, instance="beta")
    template = parse_unit((units / "agent-core@.service").read_text())
    argv = exec_argv(template["Service"]["ExecStart"])
    assert argv[-3:] == ["--config", str(tmp_path / "etc" / "%i.toml"), "run"]
    assert "TimeoutStopSec" not in template["Service"]
    for name, grace in (("alpha", 30), ("beta", 300)):
        dropin = parse_unit((units / f"agent-core@{name}.service.d" / "agent-core.conf").read_text())
        assert int(dropin["Service"]["TimeoutStopSec"]) == grace + 60
    assert any(line.endswith("systemctl daemon-reload && systemctl enable --now agent-core@beta") for line in said)
    # Uninstalling one instance keeps the template for the other; the last one takes it along
    assert service.uninstall(user=False, say=said.append, instance="alpha")
    assert (units / "agent-core@.service").exists() and not (units / "agent-core@alpha.service.d").exists()
    assert service.uninstall(user=False, say=said.append, instance="beta")
    assert not (units / "agent-core@.service").exists()


def test_an_instance_refuses_a_misnamed_config_a_shared_data_dir_and_a_second_folder(tmp_path, monkeypatch):
    from agent_core import service
    from agent_core.errors import AgentError

    monkeypatch.setenv("AGENT_CORE_SYSTEMD_DIR", str(tmp_path / "units"))
    alpha = instance_config(tmp_path / "etc", "alpha")
    with pytest.raises(AgentError, match="pass --config .*/gamma.toml"):
        service.check_instance(alpha, "gamma")
    with pytest.raises(AgentError, match="letters, digits"):
        service.check_instance(alpha, "../alpha")
    instance_config(tmp_path / "etc", "twin", **{"paths.data_dir": "./alpha-data"})
    with pytest.raises(AgentError, match="alpha.toml and twin.toml share the data dir"):
        service.check_instance(alpha, "alpha")
    other = instance_config(tmp_path / "elsewhere", "delta")
    service.install(other, user=False, print_only=False, say=lambda _: None, instance="delta")
    lone = instance_config(tmp_path / "third", "epsilon")
    with pytest.raises(AgentError, match="one template serves one config folder"):
        service.install(lone, user=False, print_only=False, say=lambda _: None, instance="epsilon")


def test_the_template_passes_systemd_analyze_verify_as_an_instance(tmp_path):
    from agent_core import service

    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    cfg = instance_config(tmp_path / "my etc 100%", "alpha")
    unit_file = tmp_path / "agent-core@alpha.service"  # verify reads the template under the instance's name
    unit_file.write_text(service.render_template(cfg.path.parent, user=False))
    proc = subprocess.run(["systemd-analyze", "verify", str(unit_file)], capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0 and "agent-core" not in proc.stderr, proc.stderr


def test_the_cli_installs_and_removes_an_instance(tmp_path, monkeypatch):
    units = tmp_path / "units"
    monkeypatch.setenv("AGENT_CORE_SYSTEMD_DIR", str(units))
    cfg = instance_config(tmp_path / "etc", "alpha")
    out = agent_cli("service", "install", "--instance", "alpha", config_path=cfg.path, check=True).stdout
    assert "enable --now agent-core@alpha" in out and (units / "agent-core@.service").exists()
    printed = agent_cli("service", "install", "--print", "--instance", "alpha", config_path=cfg.path,
                        check=True).stdout
    assert "%i.toml" in printed and "TimeoutStopSec=360" in printed
    wrong = agent_cli("service", "install", "--instance", "beta", config_path=cfg.path)
    assert wrong.returncode == 1 and "beta.toml" in wrong.stderr and "Traceback" not in wrong.stderr
    out = agent_cli("service", "uninstall", "--instance", "alpha", check=True).stdout
    assert "stop agent-core@alpha" in out and not (units / "agent-core@.service").exists()
