"""Host paths for Windows and POSIX hosts: pure functions, so both flavours are tested on any OS."""

from __future__ import annotations

from pathlib import Path, PurePosixPath, PureWindowsPath

import pytest

from agent_core import hostpaths
from agent_core.config import parse
from agent_core.errors import ConfigError

WIN_BASE = r"C:\agent"
WIN_HOME = r"C:\Users\ops"


def win(value: str) -> str:
    path = hostpaths.resolve(value, WIN_BASE, flavour=hostpaths.WINDOWS, home=WIN_HOME)
    assert isinstance(path, PureWindowsPath)
    return hostpaths.bind_source(path, flavour=hostpaths.WINDOWS)


@pytest.mark.parametrize("value, expected", [
    ("C:/models", r"C:\models"),
    (r"C:\models", r"C:\models"),
    (r"c:\models\v1", r"c:\models\v1"),
    ("D:/data/x", r"D:\data\x"),
    (r"\\server\share\creds", r"\\server\share\creds"),
    ("//server/share/creds", r"\\server\share\creds"),
    (r"\models", r"C:\models"),  # rooted: the config file's drive
    ("/models", r"C:\models"),
    ("data", r"C:\agent\data"),
    ("./data", r"C:\agent\data"),
    (r".\data\sub", r"C:\agent\data\sub"),
    (r"..\shared", r"C:\shared"),  # Windows folds .. lexically
    ("C:data", r"C:\agent\data"),  # drive-relative on the config's own drive
    ("~/.pi", r"C:\Users\ops\.pi"),
    (r"~\.pi", r"C:\Users\ops\.pi"),
])
def test_windows_forms_resolve_to_native_bind_sources(value, expected):
    assert win(value) == expected


def test_windows_drive_relative_path_on_another_drive_is_refused():
    with pytest.raises(ValueError, match="D:/"):
        win("D:data")


@pytest.mark.parametrize("value, expected", [
    ("/srv/models", "/srv/models"),
    ("data", "/etc/agent/data"),
    ("./data", "/etc/agent/data"),
    ("~/.pi", "/home/ops/.pi"),
    ("//srv/x", "//srv/x"),  # a legal POSIX path, not UNC
])
def test_posix_paths_stay_posix(value, expected):
    path = hostpaths.resolve(value, "/etc/agent", flavour=hostpaths.POSIX, home="/home/ops", wsl=False)
    assert isinstance(path, PurePosixPath)
    assert hostpaths.bind_source(path, flavour=hostpaths.POSIX) == expected


@pytest.mark.parametrize("value", ["C:/models", r"C:\models", r"\\server\share\x"])
def test_windows_paths_on_a_posix_host_are_refused(value):
    with pytest.raises(ValueError, match="Windows path"):
        hostpaths.resolve(value, "/etc/agent", flavour=hostpaths.POSIX, wsl=False)


@pytest.mark.parametrize("value, expected", [
    ("C:/models", "/mnt/c/models"),
    (r"D:\data\x", "/mnt/d/data/x"),
    ("C:/", "/mnt/c"),
    ("/home/ops", "/home/ops"),
])
def test_windows_drive_paths_in_wsl_are_the_drive_mounts(value, expected):
    assert str(hostpaths.resolve(value, "/etc/agent", flavour=hostpaths.POSIX, wsl=True)) == expected


def test_unc_paths_in_wsl_are_refused():
    with pytest.raises(ValueError, match="Windows path"):
        hostpaths.resolve(r"\\server\share", "/etc/agent", flavour=hostpaths.POSIX, wsl=True)


# --- through the config, on this host ------------------------------------------


def test_config_resolves_data_dir_and_mounts_against_its_folder(tmp_path):
    text = '[paths]\ndata_dir = "state"\n[[paths.mounts]]\nhost = "creds"\ncontainer = "/creds"\n'
    cfg = parse(text, tmp_path / "config.toml")
    assert cfg.paths.data_dir == tmp_path / "state"
    assert cfg.paths.mounts[0].host == tmp_path / "creds"
    assert isinstance(cfg.paths.data_dir, Path)


@pytest.mark.skipif(hostpaths.current_flavour() != hostpaths.POSIX, reason="a POSIX host's view")
@pytest.mark.parametrize("section, key", [
    ('[paths]\ndata_dir = "C:/agent/data"', "paths.data_dir"),
    ('[[paths.mounts]]\nhost = \'C:\\models\'\ncontainer = "/m"', r"paths.mounts\[0\].host"),
])
def test_config_names_the_key_holding_a_windows_path_on_posix(tmp_path, monkeypatch, section, key):
    monkeypatch.setattr(hostpaths, "running_in_wsl", lambda: False)
    with pytest.raises(ConfigError, match=rf"{key}: 'C:.*' is a Windows path"):
        parse(section + "\n", tmp_path / "config.toml")
