"""build_spec() and create_kwargs(): pure, no Docker engine needed."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from docker.models.containers import _create_container_args

from agent_core.config import Config, parse
from agent_core.errors import ConfigError, UnsafePath, WorkspaceError
from agent_core.executor import (
    LABEL_AGENT,
    LABEL_MANAGED,
    LABEL_SERVICE,
    LABEL_TASK,
    Bind,
    ContainerSpec,
    Owner,
    build_spec,
    container_name,
    create_kwargs,
)


def make_cfg(tmp_path: Path, executor: str = "", extra: str = "") -> Config:
    text = f"[executor]\nimage = \"img:1\"\n{executor}\n{extra}\n"
    return parse(text, tmp_path / "config.toml")


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    w = tmp_path / "workspaces" / "t1"
    w.mkdir(parents=True)
    return w


OWNER = Owner("svc-9", "a1b2c3")


def spec_for(cfg: Config, ws: Path, **kw) -> ContainerSpec:
    return build_spec(cfg, task_id=kw.pop("task_id", "t1"), workspace=ws, owner=OWNER, **kw)


# --- names and ownership -----------------------------------------------------


def test_container_name_is_unique_per_service_and_agent():
    name = container_name(OWNER, "abc-1.2_3")
    assert name == f"agent-core-{OWNER.key}-abc-1.2_3" and len(OWNER.key) == 12
    others = [Owner("svc-8", "a1b2c3"), Owner("svc-9", "d4e5f6")]
    assert all(container_name(o, "abc-1.2_3") != name for o in others)


def test_owner_of_names_the_data_dir(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "a")
    assert Owner.of("s", tmp_path / "a") == Owner.of("s", tmp_path / "link")  # the same folder
    assert Owner.of("s", tmp_path / "a").agent_id != Owner.of("s", tmp_path / "b").agent_id


def test_a_container_is_ours_only_when_every_label_says_so():
    labels = OWNER.labels("t1")
    assert OWNER.owns(labels) and OWNER.owns(labels, "t1") and not OWNER.owns(labels, "t2")
    for key, value in [(LABEL_MANAGED, "false"), (LABEL_SERVICE, "svc-8"), (LABEL_AGENT, "other")]:
        assert not OWNER.owns({**labels, key: value})
    for key in (LABEL_MANAGED, LABEL_SERVICE, LABEL_AGENT, LABEL_TASK):
        assert not OWNER.owns({k: v for k, v in labels.items() if k != key}, "t1")
    assert not OWNER.owns(None) and not OWNER.owns({})


@pytest.mark.parametrize("bad", ["", "-x", ".x", "a/b", "../x", "a b", "a\n", "x" * 129, "é"])
def test_container_name_rejects_unsafe_ids(bad):
    with pytest.raises(UnsafePath):
        container_name(OWNER, bad)


def test_build_spec_rejects_unsafe_task_id(tmp_path, ws):
    with pytest.raises(UnsafePath):
        spec_for(make_cfg(tmp_path), ws, task_id="../etc")


# --- executor types (protocol.md §5) -----------------------------------------


def test_standard_keeps_image_entrypoint_and_cmd(tmp_path, ws):
    spec = spec_for(make_cfg(tmp_path), ws)
    assert spec.entrypoint is None and spec.command is None
    kw = create_kwargs(spec)
    assert "entrypoint" not in kw and "command" not in kw


def test_bash_runs_default_script(tmp_path, ws):
    spec = spec_for(make_cfg(tmp_path, 'executor_type = "bash"'), ws)
    assert spec.entrypoint == ("bash", "/workspace/run.sh")
    assert spec.command is None
    assert create_kwargs(spec)["entrypoint"] == ["bash", "/workspace/run.sh"]


def test_python_runs_default_script_under_working_dir(tmp_path, ws):
    spec = spec_for(make_cfg(tmp_path, 'executor_type = "python"\nworking_dir = "/work"'), ws)
    assert spec.entrypoint == ("python", "/work/run.py")
    assert spec.working_dir == "/work"


def test_script_path_overrides_default(tmp_path, ws):
    spec = spec_for(make_cfg(tmp_path, 'executor_type = "python"\nscript_path = "/opt/main.py"'), ws)
    assert spec.entrypoint == ("python", "/opt/main.py")


def test_custom_is_a_proper_argv_never_a_shell_string(tmp_path, ws):
    cfg = make_cfg(tmp_path, 'executor_type = "custom"\ncustom_entrypoint = "/usr/local/bin/run me"\n'
                             'custom_args = ["--flag", "a b; rm -rf /", "$HOME"]')
    spec = spec_for(cfg, ws)
    assert spec.entrypoint == ("/usr/local/bin/run me",)
    assert spec.command == ("--flag", "a b; rm -rf /", "$HOME")
    kw = create_kwargs(spec)
    assert kw["entrypoint"] == ["/usr/local/bin/run me"]
    assert kw["command"] == ["--flag", "a b; rm -rf /", "$HOME"]


def test_custom_without_args_clears_image_cmd(tmp_path, ws):
    spec = spec_for(make_cfg(tmp_path, 'executor_type = "custom"\ncustom_entrypoint = "/bin/x"'), ws)
    assert create_kwargs(spec)["command"] == []


# --- mounts ---------------------------------------------------------------------


def test_workspace_bound_rw_at_workspace(tmp_path, ws):
    spec = spec_for(make_cfg(tmp_path), ws)
    assert spec.binds[0] == Bind(str(ws), "/workspace", readonly=False)
    mount = create_kwargs(spec)["mounts"][0]
    assert mount == {"Target": "/workspace", "Source": str(ws), "Type": "bind", "ReadOnly": False}


def test_relative_workspace_is_made_absolute(tmp_path, ws, monkeypatch):
    monkeypatch.chdir(ws.parent)
    spec = spec_for(make_cfg(tmp_path), Path("t1"))
    assert spec.binds[0].host == str(ws)


def test_missing_workspace_is_an_error(tmp_path):
    with pytest.raises(WorkspaceError):
        spec_for(make_cfg(tmp_path), tmp_path / "nope")


def test_a_copied_workspace_is_a_volume_of_the_container_not_a_bind(tmp_path):
    (tmp_path / "creds").mkdir()
    extra = '[[paths.mounts]]\nhost = "creds"\ncontainer = "/home/agent/.pi"\n'
    spec = build_spec(make_cfg(tmp_path, extra=extra), task_id="t1", workspace=None, owner=OWNER)
    assert spec.binds == (Bind(str(tmp_path / "creds"), "/home/agent/.pi", readonly=True),)
    assert spec.volumes == ("/workspace",)
    mounts = create_kwargs(spec)["mounts"]
    assert [(m["Target"], m["Type"], m["Source"]) for m in mounts] == [
        ("/home/agent/.pi", "bind", str(tmp_path / "creds")), ("/workspace", "volume", None)]
    assert build_spec(make_cfg(tmp_path), task_id="t1", workspace=tmp_path, owner=OWNER).volumes == ()


def test_config_mounts_ro_and_rw(tmp_path, ws):
    (tmp_path / "creds").mkdir()
    (tmp_path / "cache").mkdir()
    extra = ('[[paths.mounts]]\nhost = "creds"\ncontainer = "/home/agent/.pi"\n'
             '[[paths.mounts]]\nhost = "cache"\ncontainer = "/cache"\nreadonly = false\n')
    spec = spec_for(make_cfg(tmp_path, extra=extra), ws)
    assert spec.binds[1:] == (
        Bind(str(tmp_path / "creds"), "/home/agent/.pi", readonly=True),
        Bind(str(tmp_path / "cache"), "/cache", readonly=False),
    )
    mounts = create_kwargs(spec)["mounts"]
    assert [(m["Target"], m["ReadOnly"], m["Type"]) for m in mounts] == [
        ("/workspace", False, "bind"), ("/home/agent/.pi", True, "bind"), ("/cache", False, "bind")]


def test_missing_mount_host_names_the_key(tmp_path, ws):
    (tmp_path / "here").mkdir()
    extra = ('[[paths.mounts]]\nhost = "here"\ncontainer = "/a"\n'
             '[[paths.mounts]]\nhost = "gone"\ncontainer = "/b"\n')
    with pytest.raises(ConfigError, match=r"paths\.mounts\[1\]\.host") as exc:
        spec_for(make_cfg(tmp_path, extra=extra), ws)
    assert str(tmp_path / "gone") in str(exc.value)


# --- environment and labels -------------------------------------------------------


def test_environment_task_id_and_timeout(tmp_path, ws):
    spec = spec_for(make_cfg(tmp_path, "timeout_minutes = 2.5"), ws)
    assert dict(spec.environment) == {"TASK_ID": "t1", "TIMEOUT": "150"}
    assert dict(spec_for(make_cfg(tmp_path), ws).environment)["TIMEOUT"] == "0"


def test_labels(tmp_path, ws):
    spec = spec_for(make_cfg(tmp_path), ws, extra_labels={"agent-core.test-id": "u1"})
    assert dict(spec.labels) == {LABEL_MANAGED: "true", LABEL_SERVICE: "svc-9", LABEL_AGENT: "a1b2c3",
                                 LABEL_TASK: "t1", "agent-core.test-id": "u1"}
    assert spec.task_id == "t1"
    assert create_kwargs(spec)["labels"] == dict(spec.labels)


def test_extra_labels_cannot_override_ours(tmp_path, ws):
    with pytest.raises(ValueError):
        spec_for(make_cfg(tmp_path), ws, extra_labels={LABEL_TASK: "other"})


def test_name_image_working_dir(tmp_path, ws):
    kw = create_kwargs(spec_for(make_cfg(tmp_path), ws))
    assert (kw["name"], kw["image"], kw["working_dir"]) == (f"agent-core-{OWNER.key}-t1", "img:1", "/workspace")
    assert kw["detach"] is True and kw["tty"] is False and kw["auto_remove"] is False


# --- hardening -------------------------------------------------------------------


def test_default_hardening(tmp_path, ws):
    spec = spec_for(make_cfg(tmp_path), ws)
    kw = create_kwargs(spec)
    assert "no-new-privileges" in kw["security_opt"]
    assert kw["cap_drop"] == ["ALL"]
    assert kw["cap_add"] == ["CHOWN", "DAC_OVERRIDE", "FOWNER", "SETUID", "SETGID"]
    assert kw["pids_limit"] == 1024
    assert kw["network_mode"] == "bridge"
    assert kw["read_only"] is False and "tmpfs" not in kw
    assert "mem_limit" not in kw and "nano_cpus" not in kw and "user" not in kw


def test_configured_hardening(tmp_path, ws):
    cfg = make_cfg(tmp_path, 'network_mode = "none"\nuser = "65534:65534"\nread_only = true\n'
                             'pids_limit = 0\ncpus = 1.5\ncap_drop = ["ALL"]\ncap_add = []')
    kw = create_kwargs(spec_for(cfg, ws))
    assert kw["network_mode"] == "none"
    assert kw["user"] == "65534:65534"
    assert kw["read_only"] is True
    assert kw["tmpfs"] == {"/tmp": "rw,nosuid,nodev,mode=1777"}
    assert "pids_limit" not in kw  # 0 = no limit
    assert kw["nano_cpus"] == 1_500_000_000
    assert kw["cap_add"] == []


def test_no_new_privileges_cannot_be_dropped(tmp_path, ws):
    spec = spec_for(make_cfg(tmp_path), ws)
    weakened = dataclasses.replace(spec, security_opt=("seccomp=unconfined",))
    assert "no-new-privileges" in weakened.security_opt


@pytest.mark.parametrize("text,expected", [
    ('"512m"', 512 * 1024**2), ('"4g"', 4 * 1024**3), ('"4GiB"', 4 * 1024**3), ("1073741824", 1024**3),
])
def test_memory_limit_parsing(tmp_path, ws, text, expected):
    kw = create_kwargs(spec_for(make_cfg(tmp_path, f"memory_limit = {text}"), ws))
    assert kw["mem_limit"] == expected
    assert kw["memswap_limit"] == expected


def test_bad_memory_limit_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="executor.memory_limit"):
        make_cfg(tmp_path, 'memory_limit = "lots"')


def test_log_rotation_bounds_disk_use(tmp_path, ws):
    kw = create_kwargs(spec_for(make_cfg(tmp_path, extra='[limits]\nlog_max_bytes = "4m"'), ws))
    assert kw["log_config"]["Type"] == "json-file"
    assert kw["log_config"]["Config"] == {"max-size": str(8 * 1024**2), "max-file": "3"}
    tiny = create_kwargs(spec_for(make_cfg(tmp_path, extra="[limits]\nlog_max_bytes = 10"), ws))
    assert tiny["log_config"]["Config"]["max-size"] == str(1024**2)  # a floor, never unbounded


# --- the spec itself ---------------------------------------------------------------


def test_spec_is_frozen_and_rejects_unknown_options(tmp_path, ws):
    spec = spec_for(make_cfg(tmp_path), ws)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.image = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        spec.environment["X"] = "1"  # type: ignore[index]
    with pytest.raises(TypeError):
        dataclasses.replace(spec, privileged=True)


@pytest.mark.parametrize("executor", ["", 'executor_type = "bash"', 'executor_type = "custom"\n'
                                      'custom_entrypoint = "/x"\ncustom_args = ["a"]\nmemory_limit = "1g"\n'
                                      'read_only = true\ncpus = 0.5\nuser = "1:1"'])
def test_kwargs_are_all_known_to_docker_py(tmp_path, ws, executor):
    """docker-py sorts create kwargs into container and host config and raises on leftovers."""
    kw = create_kwargs(spec_for(make_cfg(tmp_path, executor), ws))
    image = kw.pop("image")
    command = kw.pop("command", None)
    args = _create_container_args({**kw, "image": image, "command": command, "version": "1.41"})
    host = args["host_config"]
    assert host["SecurityOpt"] == ["no-new-privileges"]
    assert host["Mounts"][0]["Target"] == "/workspace"
    assert host["LogConfig"]["Type"] == "json-file"


# --- error mapping and log capping (pure) ------------------------------------------


def _api_error(status: int, explanation: str, cls=None):
    import docker.errors
    import requests

    response = requests.Response()
    response.status_code = status
    response.url = "http+docker://localhost/v1.41/containers/create"
    return (cls or docker.errors.APIError)("boom", response=response, explanation=explanation)


@pytest.mark.parametrize("raised,expected,status", [
    ("read_timeout", "DockerUnavailable", None),
    ("connection", "DockerUnavailable", None),
    ("socket", "DockerUnavailable", None),
    ("docker_exception", "DockerUnavailable", None),
    ("image_not_found", "ImageMissing", None),
    ("not_found", "ContainerVanished", 404),
    ("conflict", "ExecutorError", 409),
    ("server_error", "ExecutorError", 500),
])
def test_translate_maps_every_third_party_error(raised, expected, status):
    import docker.errors
    import requests

    from agent_core import errors
    from agent_core.executor.docker import _translate

    exc = {
        "read_timeout": lambda: requests.exceptions.ReadTimeout("read timed out"),
        "connection": lambda: requests.exceptions.ConnectionError("refused"),
        "socket": lambda: ConnectionResetError(104, "reset"),
        "docker_exception": lambda: docker.errors.DockerException("Error while fetching server API version"),
        "image_not_found": lambda: _api_error(404, "No such image: img:1", docker.errors.ImageNotFound),
        "not_found": lambda: _api_error(404, "No such container: x", docker.errors.NotFound),
        "conflict": lambda: _api_error(409, "name already in use"),
        "server_error": lambda: _api_error(500, "driver failed"),
    }[raised]()
    with pytest.raises(errors.ExecutorError) as info:
        with _translate("do it", "unix:///x.sock", image="img:1"):
            raise exc
    assert type(info.value).__name__ == expected
    assert info.value.__cause__ is None and info.value.__suppress_context__
    if status is not None:
        assert info.value.status == status
    if expected == "DockerUnavailable":
        assert str(info.value).startswith("Docker engine not reachable at unix:///x.sock: ")
    if expected == "ImageMissing":
        assert "img:1" in str(info.value) and "must be built or loaded" in str(info.value)
    if raised == "server_error":
        assert "driver failed" in str(info.value)


@pytest.mark.parametrize("limit", [0, 1, 7, 100, 4096])
def test_tail_file_keeps_the_last_bytes(tmp_path, limit):
    import random

    from agent_core.executor.docker import _TailFile

    rng = random.Random(limit)
    data = bytes(rng.randrange(256) for _ in range(20_000))
    tail = _TailFile(open(tmp_path / "log", "w+b"), limit, "the log")
    pos = 0
    while pos < len(data):
        n = rng.choice([1, 3, 50, 999, 5000])
        tail.write(data[pos:pos + n])
        pos += n
        assert tail.size < 2 * limit if limit else tail.size == 0
    tail.close()
    assert (tmp_path / "log").read_bytes() == (data[-limit:] if limit else b"")
    assert tail.seen == len(data)


@pytest.mark.parametrize("word, state", [("created", "CREATED"), ("running", "RUNNING"), ("paused", "PAUSED"),
                                         ("restarting", "RESTARTING"), ("exited", "EXITED"), ("dead", "EXITED"),
                                         ("removing", "OTHER"), ("hibernating", "OTHER"), ("", "OTHER")])
@pytest.mark.parametrize("listed", [False, True])  # inspect gives State as a mapping, list as the word
def test_docker_status_words_become_neutral_states(word, state, listed):
    from agent_core.executor import State
    from agent_core.executor.docker import _found

    found = _found({"Id": "c1", "Name": "/n", "State": word if listed else {"Status": word}})
    assert (found.state, found.status) == (State[state], word)
    assert found.state.live == (state in ("RUNNING", "PAUSED", "RESTARTING"))


def test_purge_spec_sees_only_the_entry_as_root_without_network(tmp_path):
    from agent_core.executor.spec import PURGE_MOUNT, PURGE_TASK, purge_spec

    spec = purge_spec("img:1", tmp_path, OWNER)
    assert spec.binds == (Bind(str(tmp_path), PURGE_MOUNT, readonly=False),)
    assert spec.entrypoint == ("rm", "-rf", f"{PURGE_MOUNT}/ws") and spec.command == ()
    assert (spec.user, spec.network_mode, spec.cap_drop, spec.cap_add) == ("0:0", "none", ("ALL",),
                                                                            ("DAC_OVERRIDE", "FOWNER"))
    assert OWNER.owns(spec.labels, PURGE_TASK) and spec.name.startswith(container_name(OWNER, "purge-"))
    assert purge_spec("img:1", tmp_path, OWNER).name != spec.name  # two purges never collide


def test_open_backend_connects_on_first_use_only(tmp_path, monkeypatch):
    from agent_core.executor import DockerBackend, open_backend

    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    backend = open_backend(make_cfg(tmp_path), 3)
    assert isinstance(backend, DockerBackend) and backend.where == "unix:///nonexistent/docker.sock"
    backend.close()
