"""Docker or Podman: which address, which engine answers, and what the backend does differently
for Podman. Pure rules first, then the backend on the tests' Podman service (scripts/podman_env.sh).

The end-to-end core on both engines is in test_run, test_reliability, test_hostile and
test_container_attacks (`@on_both_engines`).
"""

from __future__ import annotations

import contextlib
import gc
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import docker
import docker.errors
import pytest

from agent_core.config import parse
from agent_core.errors import ExecutorError
from agent_core.executor import (
    Address,
    ContainerSpec,
    DockerBackend,
    EngineInfo,
    Owner,
    State,
    create_kwargs,
    engine_address,
    engine_mismatch,
    open_backend,
)
from agent_core.executor.docker import _found, _translate, podman_kwargs, runs_as_root
from agent_core.executor.engine import engine_info_of
from tests.agent_fixtures import Agent, wait_until
from tests.docker_fixtures import BUSYBOX_IMAGE, podman_url
from tests.helpers import skip_or_fail_in_ci
from tests.test_container_attacks import python_for
from tests.test_reliability import agent_files, read_output
from tests.test_run import finish, sh

DOCKER_VERSION = {"Version": "20.10.24+dfsg1", "ApiVersion": "1.41",
                  "Components": [{"Name": "Engine", "Version": "20.10.24+dfsg1"},
                                 {"Name": "containerd", "Version": "1.6.20~ds1"}]}
PODMAN_VERSION = {"Version": "4.3.1", "ApiVersion": "1.41",
                  "Components": [{"Name": "Podman Engine", "Version": "4.3.1"}, {"Name": "Conmon"},
                                 {"Name": "OCI Runtime (runc)"}]}


def cfg_of(tmp_path: Path, executor: str = ""):
    return parse(f"[executor]\nimage = \"{BUSYBOX_IMAGE}\"\n{executor}\n", tmp_path / "config.toml")


# --- the address ------------------------------------------------------------------------------


@pytest.mark.parametrize("engine, url, env, euid, expected", [
    # executor.engine_url wins, for either engine, over every variable
    ("docker", "tcp://10.0.0.5:2375", {"DOCKER_HOST": "unix:///d.sock"}, 0,
     ("tcp://10.0.0.5:2375", "executor.engine_url", False)),
    ("podman", "unix:///srv/p.sock", {"CONTAINER_HOST": "unix:///c.sock", "DOCKER_HOST": "unix:///d.sock"}, 1000,
     ("unix:///srv/p.sock", "executor.engine_url", False)),
    # Docker: DOCKER_HOST (with its TLS variables: from_env), else the usual socket (or a docker context)
    ("docker", "", {"DOCKER_HOST": "tcp://h:2376", "CONTAINER_HOST": "unix:///c.sock"}, 0,
     ("tcp://h:2376", "DOCKER_HOST", True)),
    ("docker", "", {}, 1000, ("unix:///var/run/docker.sock", "the default", True)),
    # Podman: its own CONTAINER_HOST when it is a socket here, else DOCKER_HOST, else its usual sockets
    ("podman", "", {"CONTAINER_HOST": "unix:///c.sock", "DOCKER_HOST": "unix:///d.sock"}, 0,
     ("unix:///c.sock", "CONTAINER_HOST", False)),
    ("podman", "", {"CONTAINER_HOST": "ssh://me@h/run/podman/podman.sock", "DOCKER_HOST": "unix:///d.sock"}, 0,
     ("unix:///d.sock", "DOCKER_HOST", True)),
    ("podman", "", {"CONTAINER_HOST": "ssh://me@h/run/podman/podman.sock"}, 0,
     ("unix:///run/podman/podman.sock", "the default", False)),
    ("podman", "", {"XDG_RUNTIME_DIR": "/run/user/1000"}, 0, ("unix:///run/podman/podman.sock", "the default", False)),
    ("podman", "", {"XDG_RUNTIME_DIR": "/run/user/1000/"}, 1000,
     ("unix:///run/user/1000/podman/podman.sock", "the default", False)),
    ("podman", "", {}, 1234, ("unix:///run/user/1234/podman/podman.sock", "the default", False)),
])
def test_the_engine_address_follows_config_then_environment_then_the_usual_socket(engine, url, env, euid,
                                                                                  expected):
    address = engine_address(engine, url, env, euid)
    assert (address.url, address.source, address.from_env) == expected
    assert address.engine == engine and address.title == {"docker": "Docker", "podman": "Podman"}[engine]


# docker-py's unix-socket connect() leaks its socket when connect fails (a ResourceWarning at GC).
@pytest.mark.filterwarnings("ignore::ResourceWarning", "ignore::pytest.PytestUnraisableExceptionWarning")
def test_open_backend_uses_the_configured_engine_and_url_and_connects_on_first_use(tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    sock = tmp_path / "no-podman.sock"
    backend = open_backend(cfg_of(tmp_path, f'engine = "podman"\nengine_url = "unix://{sock}"'), 3)
    assert backend.where == f"unix://{sock}"
    with pytest.raises(ExecutorError, match=rf"^Podman engine not reachable at unix://{sock}: "):
        backend.ping()
    backend.close()
    backend = open_backend(cfg_of(tmp_path, 'engine = "podman"'), 3)  # no engine_url: DOCKER_HOST first
    assert backend.where == "unix:///nonexistent/docker.sock"
    backend.close()
    gc.collect()  # let the leaked socket's warning fire here, under this test's filters


# --- which engine answers ---------------------------------------------------------------------


@pytest.mark.parametrize("version, info, expected", [
    (DOCKER_VERSION, {"SecurityOptions": ["name=seccomp,profile=default"]}, ("docker", "20.10.24+dfsg1", False)),
    (DOCKER_VERSION, {"SecurityOptions": ["name=seccomp,profile=default", "name=rootless", "name=cgroupns"]},
     ("docker", "20.10.24+dfsg1", True)),
    (PODMAN_VERSION, {"SecurityOptions": ["name=seccomp,profile=default"]}, ("podman", "4.3.1", False)),
    (PODMAN_VERSION, {"SecurityOptions": ["name=seccomp,profile=default"], "Rootless": False},
     ("podman", "4.3.1", False)),
    (PODMAN_VERSION, {"SecurityOptions": ["name=seccomp,profile=default"], "Rootless": True},  # as 4.3.1 says it
     ("podman", "4.3.1", True)),
    ({}, {}, ("docker", "?", False)),  # an engine that says nothing is taken for Docker
    ({"Components": "junk", "Version": None}, {"SecurityOptions": "rootless"}, ("docker", "?", False)),
])
def test_the_engine_names_itself_in_its_version_and_info(version, info, expected):
    found = engine_info_of(version, info, "unix:///x.sock")
    assert (found.engine, found.version, found.rootless) == expected
    assert found.line().startswith(f"{expected[0]} {expected[1]}") and found.line().endswith(" at unix:///x.sock")


def test_a_mismatch_says_which_engine_answered_and_the_two_fixes():
    docker_found = EngineInfo("docker", "20.10.24", rootless=False, where="unix:///var/run/docker.sock")
    assert engine_mismatch("docker", docker_found) is None
    warning = engine_mismatch("podman", docker_found)
    assert "executor.engine is 'podman'" in warning and "Docker 20.10.24" in warning
    assert "executor.engine = 'docker'" in warning and "executor.engine_url" in warning


# --- what differs on Podman, decided without an engine --------------------------------------


@pytest.mark.parametrize("explanation, status", [
    ('container create: creating container storage: the container name "x" is already in use by 6f78', 409),
    ("can only kill running containers. 6f78 is in state exited: container state improper", 409),
    ("OCI runtime error: something else", 500),
])
def test_podmans_conflicts_sent_as_500_carry_409(explanation, status):
    response = type("R", (), {"status_code": 500, "reason": "Internal Server Error", "url": "u"})()
    with pytest.raises(ExecutorError) as info:
        with _translate("create container x", "unix:///p.sock", engine="Podman"):
            raise docker.errors.APIError("500 Server Error", response=response, explanation=explanation)
    assert info.value.status == status and str(info.value).startswith("Podman refused to create container x (HTTP 500)")


@pytest.mark.parametrize("word, state", [("configured", State.CREATED), ("stopping", State.RUNNING),
                                         ("stopped", State.EXITED)])
def test_podmans_own_state_words_become_neutral_states(word, state):
    assert _found({"Id": "c1", "Names": ["n"], "State": word}).state is state


@pytest.mark.parametrize("user, cap_add", [("1234:1234", []), ("nobody", []), ("", ["CHOWN"]), ("0:0", ["CHOWN"])])
def test_on_podman_one_log_file_holds_what_dockers_rotated_ones_do_and_only_root_gets_capabilities(user, cap_add):
    probe = ContainerSpec(name="n", image="i", entrypoint=None, command=None, working_dir="/", environment={},
                          labels={}, binds=(), cap_add=("CHOWN",), log_max_size=2 << 20, log_max_files=3)
    docker_kwargs = create_kwargs(probe)
    kwargs = podman_kwargs(docker_kwargs, probe, user)
    assert kwargs["cap_add"] == cap_add and docker_kwargs["cap_add"] == ["CHOWN"]
    assert kwargs["log_config"]["Config"] == {"max-size": str(6 << 20)}
    assert {k: v for k, v in kwargs.items() if k not in ("cap_add", "log_config")} == \
        {k: v for k, v in docker_kwargs.items() if k not in ("cap_add", "log_config")}


@pytest.mark.parametrize("user, root", [("", True), ("root", True), ("0", True), ("0:0", True), ("root:staff", True),
                                        ("1234:1234", False), ("nobody", False), ("1000", False)])
def test_who_runs_as_root_is_decided_by_name(user, root):
    assert runs_as_root(user) is root


# --- on the tests' Podman service ---------------------------------------------------------------

@pytest.fixture
def podman_backend(podman_engine):
    address = Address("podman", podman_url(), "executor.engine_url", from_env=False)
    backend = DockerBackend(address=address, pool_size=4, wait_poll_secs=2.0)
    yield backend
    backend.close()


@pytest.fixture
def owner():
    return Owner(f"svc-{uuid.uuid4().hex[:8]}", "agent-engines")


def spec(owner: Owner, task_id: str, script: str, **kw) -> ContainerSpec:
    return ContainerSpec(name=f"agent-core-engines-{owner.service_id}-{task_id}", image=BUSYBOX_IMAGE,
                         entrypoint=("/bin/sh",), command=("-c", script), working_dir="/", environment={},
                         labels=owner.labels(task_id), binds=(), **kw)


@pytest.fixture
def podman_cleanup(podman_engine, owner):
    yield
    for c in podman_engine.api.containers(all=True, filters={"label": f"agent-core.service_id={owner.service_id}"}):
        podman_engine.api.remove_container(c["Id"], force=True)


@pytest.mark.docker
def test_podman_names_itself_and_a_docker_socket_is_a_mismatch(podman_backend, docker_engine, tmp_path):
    found = podman_backend.engine_info()
    assert (found.engine, found.rootless, found.where) == ("podman", False, podman_url())
    podman_cfg = cfg_of(tmp_path, f'engine = "podman"\nengine_url = "{podman_url()}"')
    assert engine_mismatch(podman_cfg.executor.engine, found) is None
    # When the config says Podman but Docker answers at the URL given
    at_docker = cfg_of(tmp_path, 'engine = "podman"\nengine_url = "unix:///var/run/docker.sock"')
    with contextlib.closing(open_backend(at_docker, 2)) as backend:
        warning = engine_mismatch(at_docker.executor.engine, backend.engine_info())
    assert warning is not None and "is Docker" in warning, warning


@pytest.mark.docker
def test_podman_name_conflicts_adopt_ours_replace_our_stale_ones_and_refuse_others(podman_backend, podman_engine,
                                                                                   owner, podman_cleanup):
    running = spec(owner, "t1", "sleep 30")
    first = podman_backend.create(running, owner)
    podman_backend.start(first)
    assert podman_backend.create(running, owner) == first  # adopted (Podman says 500, not 409)
    podman_backend.stop(first, grace=1)
    assert podman_backend.inspect(first).state is State.EXITED
    podman_backend.stop(first, grace=1)  # stopping an ended one is fine
    again = podman_backend.create(running, owner)
    assert again != first and podman_backend.inspect(first) is None  # the stale one replaced
    foreign = Owner(owner.service_id, "someone-else")
    with pytest.raises(ExecutorError, match="not this agent's"):
        podman_backend.create(spec(foreign, "t1", "true"), foreign)
    podman_backend.remove(again)
    podman_backend.remove(again)  # gone already: fine
    assert podman_backend.managed(owner) == []


@pytest.mark.docker
@pytest.mark.parametrize("user, cap_eff", [("1234:1234", 0), ("", 0xcb)])
def test_on_podman_added_capabilities_stay_roots_as_on_docker(podman_backend, owner, podman_cleanup, tmp_path,
                                                             user, cap_eff):
    probe = spec(owner, "caps", "grep CapEff /proc/self/status", user=user or None,
                 cap_add=("CHOWN", "DAC_OVERRIDE", "FOWNER", "SETUID", "SETGID"))
    cid = podman_backend.create(probe, owner)
    podman_backend.start(cid)
    assert podman_backend.wait(cid).code == 0
    podman_backend.save_logs(cid, lambda: open(tmp_path / "out", "w+b"), lambda: open(tmp_path / "err", "w+b"), 4096)
    assert int((tmp_path / "out").read_text().split()[1], 16) == cap_eff


# --- rootless Podman: a user of its own, its own service at its usual socket ---------------------

ROOTLESS_USER = "agent-core-rootless"
ROOTLESS_SUBIDS = "200000-265535"  # only when useradd gave the user no range of its own


def _rootless_user() -> pwd.struct_passwd:
    """A login-less user with a home (Podman's storage) and subordinate ids (its user namespace)."""
    if os.geteuid() != 0:
        skip_or_fail_in_ci("needs root to make the rootless Podman user")
    try:
        pw = pwd.getpwnam(ROOTLESS_USER)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/usr/sbin/nologin", ROOTLESS_USER], check=True,
                       capture_output=True)
        pw = pwd.getpwnam(ROOTLESS_USER)
    if not any(line.startswith(f"{ROOTLESS_USER}:") for line in Path("/etc/subuid").read_text().splitlines()):
        subprocess.run(["usermod", "--add-subuids", ROOTLESS_SUBIDS, "--add-subgids", ROOTLESS_SUBIDS, ROOTLESS_USER],
                       check=True, capture_output=True)
    return pw


@pytest.fixture(scope="module")
def rootless_podman(podman_engine, docker_engine, tmp_path_factory):
    """(the user, their XDG_RUNTIME_DIR, a client): `podman system service` run by that user at
    the rootless default address, with the busybox test image."""
    pw = _rootless_user()
    runtime = Path(f"/run/user/{pw.pw_uid}")  # what logind would make
    runtime.mkdir(parents=True, exist_ok=True)
    os.chown(runtime, pw.pw_uid, pw.pw_gid)
    runtime.chmod(0o700)
    url = engine_address("podman", "", {"XDG_RUNTIME_DIR": str(runtime)}, pw.pw_uid).url
    # podman_env.sh's containers.conf (default_ulimits = []) serves the rootless service too
    conf = Path(podman_url().removeprefix("unix://")).parent / "containers.conf"
    log = tmp_path_factory.mktemp("rootless") / "podman-service.log"
    with open(log, "wb") as out:
        service = subprocess.Popen(["podman", "system", "service", "--time=0", url], user=pw.pw_uid,
                                   group=pw.pw_gid, cwd="/", stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True,
                                   env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": pw.pw_dir,
                                        "XDG_RUNTIME_DIR": str(runtime), "CONTAINERS_CONF": str(conf)})
    client = docker.DockerClient(base_url=url, version="1.41")  # (no version probe before it is up)
    try:
        try:  # (the socket first: docker-py leaks a socket for each refused connect)
            wait_until(lambda: Path(url.removeprefix("unix://")).is_socket() or service.poll() is not None, 30,
                       "the rootless Podman socket")
            client.ping()
        except Exception as e:  # noqa: BLE001 - any failure here means "no rootless Podman"
            skip_or_fail_in_ci(f"rootless Podman did not start ({e}): {log.read_text(errors='replace')[-800:]}")
        if not client.images.list(name=BUSYBOX_IMAGE):
            client.images.load(b"".join(docker_engine.api.get_image(BUSYBOX_IMAGE)))
        yield pw, runtime, client
    finally:
        for c in client.api.containers(all=True, filters={"label": "agent-core.managed=true"}):
            client.api.remove_container(c["Id"], force=True)
        client.close()
        service.terminate()
        service.wait(30)


@pytest.mark.docker
def test_a_rootless_podman_runs_a_task_of_an_agent_run_by_its_user(rootless_podman, dev_server, dev_client):
    pw, runtime, client = rootless_podman
    python, env = python_for(ROOTLESS_USER)
    root = Path(tempfile.mkdtemp(prefix="agent-core-rootless-", dir="/tmp"))
    try:
        # Given an agent of that user with engine = "podman" and no engine_url: the rootless socket
        os.chmod(root, 0o755)
        agent = Agent(root, dev_server.url, dev_client, {
            "server.poll_interval_secs": 0.5, "executor.image": BUSYBOX_IMAGE, "executor.network_mode": "none",
            "paths.min_free_disk_mb": 0, "agent.shutdown_grace_secs": 30, "executor.engine": "podman",
            **sh("cp /workspace/input/* /workspace/output/ && id -u > /workspace/output/uid.txt")})
        agent.cfg.paths.data_dir.mkdir(mode=0o700)
        for path in (root, agent.config_path, agent.cfg.paths.data_dir):
            os.chown(path, pw.pw_uid, pw.pw_gid)
        data = os.urandom(300_000)
        task = dev_client.submit_task(agent.service_id, "rootless", files=[("in.bin", data)])["id"]
        # When it runs
        agent.start(user=ROOTLESS_USER, python=python,
                    env={**env, "XDG_RUNTIME_DIR": str(runtime), "DOCKER_HOST": "", "CONTAINER_HOST": ""})
        (result,) = finish(dev_client, [task], timeout=120)
        # Then the task ran there (root in its container is the user outside) and its output is identical
        assert result["status"] == "completed", (result, agent.log()[-3000:])
        assert read_output(dev_client, task, "output/uid.txt", root / "dl") == b"0\n"
        copy = next(name for name in agent_files(dev_client, task) if name.endswith("in.bin"))
        assert read_output(dev_client, task, copy, root / "dl") == data
        assert agent.stop() == 0
        # and the engine says it is rootless
        found = DockerBackend(client).engine_info()
        assert (found.engine, found.rootless) == ("podman", True)
    finally:
        if "agent" in locals() and agent.alive():
            agent.stop()
        subprocess.run(["chmod", "-R", "u+rwx", str(root)], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
