"""A broken executor is refused before it burns the queue, and pauses intake when it breaks later.

Unit tests of the decisions (which failures are the executor's, whether a user resolves in an
image), then the CLI refusing each cause, then the circuit breaker on a real engine.
"""

from __future__ import annotations

import json
import shutil
import uuid

import pytest

from agent_core import config, preflight
from agent_core.errors import ContainerVanished, DockerUnavailable, ExecutorError, ImageMissing
from tests.agent_fixtures import agent_cli, wait_until
from tests.fakes import FakeBackend
from tests.test_run import DONE, finish, sh

PASSWD = "root:x:0:0:root:/root:/bin/sh\n# a comment\nagent:x:1000:1000::/home/agent:/bin/sh\n"
GROUP = "root:x:0:\nstaff:x:50:\n"


@pytest.mark.parametrize("error, kind", [
    (ImageMissing("image x is not on this host"), "image"),
    (ExecutorError("Docker refused to create container (HTTP 404): network nonee not found"), "network"),
    (ExecutorError("Docker refused (HTTP 500): unable to find user nosuchuser: no matching entries in passwd file"),
     "user"),
    (ExecutorError("Docker refused (HTTP 500): unable to find group nogroup"), "user"),
    (ExecutorError("Docker refused (HTTP 500): OCI runtime create failed"), None),
    # Podman's words for the same causes
    (ExecutorError("Podman refused to create container x (HTTP 500): container create: unable to find network "
                   "with name or ID nonee: network not found"), "network"),
    (ExecutorError("Podman refused to start container x (HTTP 500): unable to find user nosuchuser: no matching "
                   "entries in passwd file"), "user"),
    (DockerUnavailable("Docker engine not reachable: network not found"), None),
    (ContainerVanished("container abc vanished"), None),
])
def test_which_launch_failures_are_the_executors(error, kind):
    assert preflight.kind_of(error) == kind


@pytest.mark.parametrize("user, bad", [
    ("agent", None), ("1000", None), ("1000:1000", None), ("agent:staff", None), ("4242:4242", None),
    ("root:50", None), ("nosuchuser", "the user"), ("agent:nogroup", "the group"), ("5:nogroup", "the group"),
])
def test_a_user_resolves_when_the_image_knows_it(user, bad):
    problem = preflight.user_problem(user, "img:1", PASSWD, GROUP)
    if bad is None:
        assert problem is None
    else:
        assert problem.kind == "user" and bad in problem.message and "numeric uid:gid" in problem.fix


def test_an_image_without_account_files_knows_only_numbers():
    assert preflight.user_problem("1000:1000", "img", None, None) is None
    assert preflight.user_problem("agent", "img", None, None) is not None


def test_account_names_skip_comments_and_blanks():
    assert preflight.account_names(PASSWD + "\n") == {"root", "agent"}


# --- a bind engine must see the data dir at the same path ----------------------------------------


@pytest.fixture
def bind_cfg(tmp_path):
    path = tmp_path / "config.toml"
    config.init(path, base_url="http://127.0.0.1:9")
    config.update(path, {"paths.data_dir": str(tmp_path / "data")})
    (tmp_path / "data").mkdir()
    return config.load(path)


def test_an_engine_that_sees_the_data_dir_passes_and_the_probe_is_gone(bind_cfg):
    backend = FakeBackend()
    assert preflight.check(bind_cfg, backend, "bind") is None
    assert backend.count("bound_file") == 1 and list(bind_cfg.paths.data_dir.iterdir()) == []
    assert preflight.check(bind_cfg, backend, "copy") is None and preflight.check(bind_cfg, backend) is None
    assert backend.count("bound_file") == 1  # copy mode and the breaker's rechecks do not probe


@pytest.mark.parametrize("elsewhere, said", [(False, "cannot bind-mount"), (True, "sees another folder than")])
def test_an_engine_that_sees_another_folder_at_that_path_is_refused_with_the_mount_to_make(
        bind_cfg, tmp_path, elsewhere, said):
    backend = FakeBackend()
    backend.host_root = tmp_path / "engine-host"  # the engine's host: no data dir, or another folder there
    if elsewhere:
        shutil.copytree(bind_cfg.paths.data_dir, backend.host_root / bind_cfg.paths.data_dir.relative_to("/"))
    problem = preflight.check(bind_cfg, backend, "bind")
    data_dir = bind_cfg.paths.data_dir
    assert problem.kind == "workspace" and said in problem.message and str(data_dir) in problem.message
    assert problem.fix == f'mount the data dir at the same path: -v {data_dir}:{data_dir}, or set workspace = "copy"'
    assert list(data_dir.iterdir()) == []


def test_a_data_dir_not_made_yet_is_probed_in_its_parent(bind_cfg):
    data_dir = bind_cfg.paths.data_dir
    data_dir.rmdir()
    backend = FakeBackend()
    assert preflight.bind_problem(bind_cfg, backend) is None
    (probed,) = [arg for name, arg in backend.calls if name == "bound_file"]
    assert probed.parent.parent == data_dir.parent
    assert not data_dir.exists() and list(data_dir.parent.glob(".bind-probe-*")) == []


def test_an_image_the_engine_lacks_is_not_the_probes_verdict(bind_cfg):
    backend = FakeBackend()
    backend.fail("bound_file", ImageMissing("image x is not on this host"))
    assert preflight.bind_problem(bind_cfg, backend) is None
    backend.fail("bound_file", DockerUnavailable("Docker engine not reachable at fake://engine: gone"))
    assert preflight.bind_problem(bind_cfg, backend).kind == "engine"


# --- the CLI refuses before it takes a task -------------------------------------------------------


@pytest.mark.docker
@pytest.mark.parametrize("setting, words", [
    ({"executor.image": "agent-core-test/never-built:nope"}, ["executor image agent-core-test/never-built:nope",
                                                             "docker build"]),
    ({"executor.network_mode": "nonee"}, ["no network 'nonee'", "docker network create"]),
    ({"executor.user": "nosuchuser"}, ["executor.user", "nosuchuser", "numeric uid:gid"]),
])
@pytest.mark.parametrize("command", ["run", "run-detached"])
def test_run_refuses_an_executor_that_cannot_work(make_agent, dev_server, dev_client, setting, words, command):
    agent = make_agent(setting)
    task = dev_client.submit_task(agent.service_id, "never taken")["id"]
    proc = agent_cli(command, config_path=agent.config_path, timeout=60)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    text = proc.stderr + proc.stdout
    for word in words:
        assert word in text, text
    assert "fix:" in text and "Traceback" not in text
    if command == "run":
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert dev_client.get_task(task)["status"] == "pending"  # nothing was accepted


# --- the circuit breaker --------------------------------------------------------------------------


@pytest.mark.docker
@pytest.mark.timeout(240)
def test_an_image_lost_while_running_pauses_intake_and_it_resumes_by_itself(make_agent, dev_client, docker_engine,
                                                                            busybox_image):
    # Given an agent on an image of its own tag
    tag = f"agent-core-test/breaker:{uuid.uuid4().hex[:8]}"
    docker_engine.images.get(busybox_image).tag(tag)
    try:
        agent = make_agent({**sh("echo ok > /workspace/output/ok.txt"), "executor.image": tag,
                            "executor.capacity": 1})
        agent.start()
        first = dev_client.submit_task(agent.service_id, "first")["id"]
        assert finish(dev_client, [first], timeout=60)[0]["status"] == "completed"
        # When the image is removed behind its back and tasks keep coming
        docker_engine.images.remove(tag)
        tasks = [dev_client.submit_task(agent.service_id, f"t{n}")["id"] for n in range(6)]
        # Then a few fail, naming the image, and then intake pauses, as status says
        status = wait_until(lambda: (s := json.loads(agent_cli("status", "--json", config_path=agent.config_path,
                                                              check=True).stdout))["daemon"].get("reason") and s, 60,
                            "status to show the pause")
        assert "paused" in json.dumps(status) and tag in json.dumps(status), status
        failed = [t for t in tasks if dev_client.get_task(t)["status"] == "failed"]
        assert 1 <= len(failed) <= 3, failed
        assert all(tag in dev_client.get_task(t)["error_message"] for t in failed)
        pending = [t for t in tasks if dev_client.get_task(t)["status"] == "pending"]
        assert len(pending) >= 3
        assert "not taking tasks after 3 launch failures" in agent.log()
        # When the image is back, the agent resumes by itself and the rest complete
        docker_engine.images.get(busybox_image).tag(tag)
        results = finish(dev_client, pending, timeout=90)
        assert [r["status"] for r in results] == ["completed"] * len(pending), results
        assert "the executor works again" in agent.log()
        assert all(r["status"] in DONE for r in finish(dev_client, tasks, timeout=30))
    finally:
        try:
            docker_engine.images.remove(tag)
        except Exception:  # noqa: BLE001 - already gone
            pass
