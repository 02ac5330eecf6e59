"""DockerExecutor against the real engine, with the offline busybox and python images.

Every container gets the test's `agent-core.test-id` label and is force-removed by
`docker_cleanup`. Task containers have no network (network_mode = "none").
"""

from __future__ import annotations

import gc
import json
import os
import time
import uuid
from pathlib import Path

import docker
import pytest

from agent_core.archive import COPY_OUT_PATH, clear_outputs, extract_outputs, workspace_tar
from agent_core.config import Config, LimitsConfig, parse
from agent_core.errors import ContainerVanished, DockerUnavailable, ExecutorError, ImageMissing
from agent_core.executor import (
    LABEL_AGENT,
    LABEL_SERVICE,
    LABEL_TASK,
    ContainerSpec,
    DockerExecutor,
    Exit,
    Owner,
    build_spec,
    container_name,
)
from agent_core.protocol import InputFile, Task
from agent_core.workspace import WORKSPACE_MOUNT, Workspace
from tests.helpers import skip_or_fail_in_ci

pytestmark = [pytest.mark.docker, pytest.mark.timeout(90)]


def toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def config(tmp_path: Path, image: str, *, executor_type: str = "custom", argv: list[str] | None = None,
           network_mode: str = "none", extra: str = "", tail: str = "") -> Config:
    lines = [f"image = {toml_str(image)}", f"executor_type = {toml_str(executor_type)}",
             f"network_mode = {toml_str(network_mode)}"]
    if argv:
        lines.append(f"custom_entrypoint = {toml_str(argv[0])}")
        lines.append("custom_args = [" + ", ".join(toml_str(a) for a in argv[1:]) + "]")
    text = "[executor]\n" + "\n".join(lines) + "\n" + extra + "\n" + tail
    return parse(text, tmp_path / "config.toml")


class Harness:
    """Builds specs with unique task ids and the test's cleanup labels."""

    def __init__(self, tmp_path: Path, cleanup, image: str):
        self.tmp_path, self.cleanup, self.image = tmp_path, cleanup, image
        self.service_id = "svc-" + cleanup.test_id[:12]
        cleanup.track_service(self.service_id)

    def workspace(self, task_id: str) -> Path:
        ws = self.tmp_path / "ws" / task_id
        (ws / "output").mkdir(parents=True, exist_ok=True)
        os.chmod(ws, 0o777)
        os.chmod(ws / "output", 0o777)
        return ws

    def spec(self, argv: list[str] | None = None, *, task_id: str | None = None, service_id: str | None = None,
             image: str | None = None, copy: bool = False, **kw) -> ContainerSpec:
        """`copy`: the workspace goes through the engine's API (no bind)."""
        task_id = task_id or "t-" + uuid.uuid4().hex[:16]
        cfg = config(self.tmp_path, image or self.image, argv=argv, **kw)
        return build_spec(cfg, task_id=task_id, workspace=None if copy else self.workspace(task_id),
                          owner=Owner(service_id or self.service_id, AGENT_ID), extra_labels=self.cleanup.labels)


AGENT_ID = "test-agent"


def owner_of(spec: ContainerSpec) -> Owner:
    return Owner(spec.labels[LABEL_SERVICE], spec.labels[LABEL_AGENT])


def sinks(out: Path, err: Path):
    return (lambda: open(out, "w+b")), (lambda: open(err, "w+b"))


@pytest.fixture
def h(tmp_path, docker_cleanup, busybox_image) -> Harness:
    return Harness(tmp_path, docker_cleanup, busybox_image)


def run(ex: DockerExecutor, spec: ContainerSpec, cleanup) -> tuple[str, Exit]:
    cid = cleanup.track(ex.create(spec, owner_of(spec)))
    ex.start(cid)
    return cid, ex.wait(cid)


def logs(ex: DockerExecutor, cid: str, tmp_path: Path, max_bytes: int = 1 << 20) -> tuple[bytes, bytes]:
    out, err = tmp_path / f"{cid[:12]}.out", tmp_path / f"{cid[:12]}.err"
    ex.save_logs(cid, *sinks(out, err), max_bytes)
    return out.read_bytes(), err.read_bytes()


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


# --- the engine -------------------------------------------------------------------


def test_ping_and_image_present(docker_executor, busybox_image):
    docker_executor.ping()
    assert docker_executor.image_present(busybox_image)
    assert not docker_executor.image_present("agent-core-test/no-such-image:" + uuid.uuid4().hex[:8])


# docker-py's unix-socket connect() leaks its socket when connect fails (a ResourceWarning at GC).
@pytest.mark.filterwarnings("ignore::ResourceWarning", "ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.timeout(30)
def test_unreachable_engine_is_docker_unavailable(tmp_path, monkeypatch):
    sock = tmp_path / "no-engine.sock"
    monkeypatch.setenv("DOCKER_HOST", f"unix://{sock}")
    ex = DockerExecutor()
    with pytest.raises(DockerUnavailable, match=r"^Docker engine not reachable at unix://.*no-engine\.sock: "):
        ex.ping()
    with pytest.raises(DockerUnavailable):
        ex.managed(Owner("s", "a"))
    ex.close()
    # An injected client that cannot connect (version pinned, so nothing is fetched up front).
    ex = DockerExecutor(docker.DockerClient(base_url=f"unix://{sock}", version="1.41"))
    with pytest.raises(DockerUnavailable, match="not reachable at unix://"):
        ex.ping()
    with pytest.raises(DockerUnavailable):
        ex.inspect("whatever")
    ex.close()
    gc.collect()  # let the leaked sockets' warnings fire here, under this test's filters


# --- lifecycle -------------------------------------------------------------------------


def test_exit_code_and_logs(h, docker_executor, tmp_path):
    spec = h.spec(["sh", "-c", "echo out; echo err >&2; exit 3"])
    cid, exit_ = run(docker_executor, spec, h.cleanup)
    assert exit_ == Exit(code=3, oom_killed=False)
    assert logs(docker_executor, cid, tmp_path) == (b"out\n", b"err\n")
    found = docker_executor.inspect(cid)
    assert found is not None and found.status == "exited" and found.name == spec.name
    docker_executor.remove(cid)
    assert docker_executor.inspect(cid) is None


def test_environment_and_workspace(h, docker_executor, tmp_path):
    spec = h.spec(["sh", "-c", 'echo "$TASK_ID $TIMEOUT $(pwd)" > /workspace/output/env.txt'],
                  extra="timeout_minutes = 1")
    cid, exit_ = run(docker_executor, spec, h.cleanup)
    assert exit_.code == 0
    ws = Path(spec.binds[0].host)
    assert (ws / "output" / "env.txt").read_text() == f"{spec.task_id} 60 /workspace\n"


def test_wait_outlasts_read_timeouts(h, docker_engine, tmp_path):
    """wait() loops over HTTP read timeouts (docker-py #1966/#2964) until the container exits."""
    ex = DockerExecutor(docker_engine, wait_poll_secs=0.5)
    spec = h.spec(["sh", "-c", "sleep 3; exit 7"])
    cid = h.cleanup.track(ex.create(spec, owner_of(spec)))
    ex.start(cid)
    assert ex.wait(cid) == Exit(code=7, oom_killed=False)
    assert ex.inspect(cid).status == "exited"


@pytest.mark.timeout(30)
def test_stop_sleeping_container(h, docker_executor):
    spec = h.spec(["sleep", "60"])  # PID 1 without a SIGTERM handler: stop must fall back to SIGKILL
    cid = h.cleanup.track(docker_executor.create(spec, owner_of(spec)))
    docker_executor.start(cid)
    assert docker_executor.inspect(cid).status == "running"
    started = time.monotonic()
    docker_executor.stop(cid, grace=2)
    assert docker_executor.wait(cid).code in (137, 143)
    assert time.monotonic() - started < 15
    assert docker_executor.inspect(cid).status == "exited"
    docker_executor.stop(cid, grace=2)  # already stopped: no error
    docker_executor.remove(cid)
    docker_executor.stop(cid, grace=2)  # gone: no error
    docker_executor.remove(cid)  # gone: no error


def test_gone_container_is_vanished(h, docker_executor):
    cid, _ = run(docker_executor, h.spec(["true"]), h.cleanup)
    docker_executor.remove(cid)
    with pytest.raises(ContainerVanished):
        docker_executor.wait(cid)
    with pytest.raises(ContainerVanished):
        docker_executor.start(cid)
    assert docker_executor.inspect(cid) is None


def test_oom_kill_is_reported(h, docker_executor):
    spec = h.spec(["sh", "-c", 'x=$(head -c 200000000 /dev/zero | tr "\\0" a); echo survived'],
                  extra='memory_limit = "32m"')
    _, exit_ = run(docker_executor, spec, h.cleanup)
    assert exit_ == Exit(code=137, oom_killed=True)


# --- logs --------------------------------------------------------------------------------


LINE = "0123456789" * 9 + "abcdefghi"  # 99 characters and a newline


def test_logs_are_capped_and_keep_the_end(h, docker_executor, tmp_path):
    flood = (f"yes {LINE} | head -c 600000; echo STDOUT-END; "
             f"yes {LINE[::-1]} | head -c 600000 >&2; echo STDERR-END >&2")
    spec = h.spec(["sh", "-c", flood], tail='[limits]\nlog_max_bytes = "1m"')
    cid, exit_ = run(docker_executor, spec, h.cleanup)
    assert exit_.code == 0
    out, err = tmp_path / "out.log", tmp_path / "err.log"
    saved = docker_executor.save_logs(cid, *sinks(out, err), 100_000)
    assert out.stat().st_size == 100_000 and err.stat().st_size == 100_000
    assert out.read_bytes().endswith(f"{LINE}\nSTDOUT-END\n".encode())
    assert err.read_bytes().endswith(f"{LINE[::-1]}\nSTDERR-END\n".encode())
    assert saved.truncated
    assert (saved.stdout_bytes, saved.stderr_bytes) == (600_000 + 11, 600_000 + 11)


def test_engine_log_of_a_flooding_container_is_bounded(h, docker_executor, docker_engine, tmp_path):
    """The json-file driver rotates: about 3 files of 2 * log_max_bytes, whatever the task prints."""
    spec = h.spec(["sh", "-c", f"yes {LINE} | head -c 30000000"], tail='[limits]\nlog_max_bytes = "1m"')
    cid, exit_ = run(docker_executor, spec, h.cleanup)
    assert exit_.code == 0
    log_path = docker_engine.api.inspect_container(cid)["LogPath"]
    if not log_path or not os.path.exists(log_path):
        skip_or_fail_in_ci("the engine's log files are not visible from here (a remote engine?)")
    files = [p for p in Path(log_path).parent.iterdir() if p.name.startswith(Path(log_path).name)]
    assert 1 <= len(files) <= 3
    assert sum(p.stat().st_size for p in files) <= 3 * 2 * 1024**2 + 64 * 1024
    saved = docker_executor.save_logs(cid, *sinks(tmp_path / "o", tmp_path / "e"), 1024**2)
    assert (tmp_path / "o").stat().st_size == 1024**2
    assert saved.stdout_bytes < 30_000_000  # the rotated-away head is gone


def test_logs_with_zero_cap_are_empty_files(h, docker_executor, tmp_path):
    cid, _ = run(docker_executor, h.spec(["sh", "-c", "echo a; echo b >&2"]), h.cleanup)
    assert logs(docker_executor, cid, tmp_path, max_bytes=0) == (b"", b"")


# --- images ------------------------------------------------------------------------------


def test_missing_image_is_image_missing(h, docker_executor):
    image = "agent-core-test/never-built:" + uuid.uuid4().hex[:8]
    spec = h.spec(["true"], image=image)
    with pytest.raises(ImageMissing, match="must be built or loaded") as exc:
        docker_executor.create(spec, owner_of(spec))
    assert image in str(exc.value)
    assert docker_executor.inspect(spec.name) is None


# --- name conflicts (409) ------------------------------------------------------------------


def test_conflict_adopts_our_running_container(h, docker_executor):
    spec = h.spec(["sleep", "60"])
    cid = h.cleanup.track(docker_executor.create(spec, owner_of(spec)))
    docker_executor.start(cid)
    assert docker_executor.create(spec, owner_of(spec)) == cid
    docker_executor.stop(cid, grace=0)


def test_conflict_replaces_a_created_container(h, docker_executor):
    spec = h.spec(["true"])
    first = h.cleanup.track(docker_executor.create(spec, owner_of(spec)))
    second = h.cleanup.track(docker_executor.create(spec, owner_of(spec)))
    assert second != first
    assert docker_executor.inspect(first) is None
    assert docker_executor.inspect(spec.name).id == second


def test_conflict_replaces_an_exited_container(h, docker_executor):
    spec = h.spec(["true"])
    first, _ = run(docker_executor, spec, h.cleanup)
    second = h.cleanup.track(docker_executor.create(spec, owner_of(spec)))
    assert second != first and docker_executor.inspect(first) is None


@pytest.mark.parametrize("which", ["unlabelled", "another service", "another agent", "another task"])
def test_a_foreign_container_with_our_name_is_neither_adopted_nor_removed(h, docker_executor, docker_engine,
                                                                          busybox_image, which):
    """Same name and running, but some label is not ours: a clear error, and it is left alone."""
    spec = h.spec(["true"])
    ours = owner_of(spec).labels(spec.task_id)
    labels = {"unlabelled": {}, "another service": {**ours, LABEL_SERVICE: "svc-other"},
              "another agent": {**ours, LABEL_AGENT: "agent-other"},
              "another task": {**ours, LABEL_TASK: "other"}}[which]
    foreign = docker_engine.api.create_container(
        busybox_image, ["sleep", "60"], name=spec.name, labels={**h.cleanup.labels, **labels},
        host_config=docker_engine.api.create_host_config(network_mode="none"))["Id"]
    h.cleanup.track(foreign)
    docker_engine.api.start(foreign)
    with pytest.raises(ExecutorError, match="not this agent's"):
        docker_executor.create(spec, owner_of(spec))
    assert docker_executor.inspect(foreign).status == "running"
    docker_executor.stop(foreign, grace=0)


# --- listing ------------------------------------------------------------------------------------


def test_managed_lists_only_the_owners_containers(h, docker_executor, docker_engine, busybox_image):
    other_service = h.service_id + "-b"
    h.cleanup.track_service(other_service)
    a1 = h.spec(["true"])
    a2 = h.spec(["sleep", "60"])
    b1 = h.spec(["true"], service_id=other_service)
    before = time.time()
    ids = {s.task_id: h.cleanup.track(docker_executor.create(s, owner_of(s))) for s in (a1, a2, b1)}
    docker_executor.start(ids[a2.task_id])
    # the same service, another agent (data dir), and unlabelled: none of them ours
    twin = h.cleanup.track(docker_engine.api.create_container(
        busybox_image, ["true"], labels={**h.cleanup.labels, **Owner(h.service_id, "twin").labels("t9")},
        host_config=docker_engine.api.create_host_config(network_mode="none"))["Id"])
    unlabelled = h.cleanup.track(docker_engine.api.create_container(
        busybox_image, ["true"], labels=h.cleanup.labels,
        host_config=docker_engine.api.create_host_config(network_mode="none"))["Id"])

    owner = owner_of(a1)
    mine = {f.task_id: f for f in docker_executor.managed(owner)}
    assert set(mine) == {a1.task_id, a2.task_id}
    f1, f2 = mine[a1.task_id], mine[a2.task_id]
    assert (f1.id, f1.name, f1.service_id, f1.status) == (ids[a1.task_id], container_name(owner, a1.task_id),
                                                           h.service_id, "created")
    assert f1.owned_by(owner, a1.task_id) and f2.status == "running"
    assert before - 5 < f1.created < time.time() + 5
    assert {f.id for f in docker_executor.managed(owner_of(b1))} == {ids[b1.task_id]}
    assert twin not in {f.id for f in docker_executor.managed(owner)} and unlabelled not in mine
    docker_executor.stop(ids[a2.task_id], grace=0)


def test_purge_removes_root_owned_leftovers(h, docker_executor, tmp_path):
    """A root container deletes what only root may: mode-0 directories owned by root."""
    entry = tmp_path / "trash-entry"
    locked = entry / "ws" / "locked"
    (locked / "deep").mkdir(parents=True)
    (locked / "deep" / "f").write_text("x")
    os.chmod(locked / "deep", 0)
    os.chmod(locked, 0)
    docker_executor.purge(h.image, entry, Owner(h.service_id, AGENT_ID))
    assert list(entry.iterdir()) == []
    assert docker_executor.managed(Owner(h.service_id, AGENT_ID)) == []


# --- mounts, types and isolation ---------------------------------------------------------------------


def test_readonly_mount_cannot_be_written(h, docker_executor, tmp_path):
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro" / "secret").write_text("s3cret\n")
    (tmp_path / "rw").mkdir()
    os.chmod(tmp_path / "rw", 0o777)
    mounts = ('[[paths.mounts]]\nhost = "ro"\ncontainer = "/data"\n'
              '[[paths.mounts]]\nhost = "rw"\ncontainer = "/scratch"\nreadonly = false\n')
    script = ("cat /data/secret; if echo x > /data/new 2>/dev/null; then echo WROTE; exit 1; fi; "
              "echo ok > /scratch/note")
    cid, exit_ = run(docker_executor, h.spec(["sh", "-c", script], tail=mounts), h.cleanup)
    assert exit_.code == 0, logs(docker_executor, cid, tmp_path)
    assert logs(docker_executor, cid, tmp_path)[0] == b"s3cret\n"
    assert not (tmp_path / "ro" / "new").exists()
    assert (tmp_path / "rw" / "note").read_text() == "ok\n"


def test_read_only_root_with_tmpfs_tmp(h, docker_executor, tmp_path):
    script = "if touch /etc/x 2>/dev/null; then exit 1; fi; echo t > /tmp/t && echo w > /workspace/w"
    cid, exit_ = run(docker_executor, h.spec(["sh", "-c", script], extra="read_only = true"), h.cleanup)
    assert exit_.code == 0, logs(docker_executor, cid, tmp_path)


def test_network_none(h, docker_executor, tmp_path):
    cid, exit_ = run(docker_executor, h.spec(["sh", "-c", "tail -n +3 /proc/net/dev | cut -d: -f1"]),
                     h.cleanup)
    assert exit_.code == 0
    assert logs(docker_executor, cid, tmp_path)[0].split() == [b"lo"]


def test_hardening_applies(h, docker_executor, docker_engine, tmp_path):
    spec = h.spec(["sh", "-c", "grep -E '^(NoNewPrivs|CapEff)' /proc/self/status"],
                  extra='user = "65534:65534"\npids_limit = 64')
    cid, exit_ = run(docker_executor, spec, h.cleanup)
    assert exit_.code == 0
    out = logs(docker_executor, cid, tmp_path)[0].decode()
    assert "NoNewPrivs:\t1" in out
    assert "CapEff:\t0000000000000000" in out  # a non-root user keeps no effective capabilities
    host = docker_engine.api.inspect_container(cid)["HostConfig"]
    assert host["PidsLimit"] == 64 and host["NetworkMode"] == "none" and host["CapDrop"] == ["ALL"]


def test_bash_executor_type_in_busybox(h, docker_executor, tmp_path):
    spec = h.spec(executor_type="bash")
    Path(spec.binds[0].host, "run.sh").write_text("echo bash-ran $TASK_ID\nexit 4\n")
    cid, exit_ = run(docker_executor, spec, h.cleanup)
    assert exit_.code == 4
    assert logs(docker_executor, cid, tmp_path)[0] == f"bash-ran {spec.task_id}\n".encode()


@pytest.mark.timeout(600)  # the first build of the python image runs debootstrap
def test_python_executor_type(h, docker_executor, python_image, tmp_path):
    spec = h.spec(executor_type="python", image=python_image)
    ws = Path(spec.binds[0].host)
    (ws / "run.py").write_text(
        "import json, os, sys\n"
        "json.dump({'argv': sys.argv, 'task': os.environ['TASK_ID'], 'cwd': os.getcwd()},\n"
        "          open('/workspace/output/result.json', 'w'))\n"
        "print('to stderr', file=sys.stderr)\n"
    )
    cid, exit_ = run(docker_executor, spec, h.cleanup)
    assert exit_.code == 0, logs(docker_executor, cid, tmp_path)
    result = json.loads((ws / "output" / "result.json").read_text())
    assert result == {"argv": ["/workspace/run.py"], "task": spec.task_id, "cwd": "/workspace"}
    assert logs(docker_executor, cid, tmp_path) == (b"", b"to stderr\n")


def test_engine_refusal_is_executor_error_with_explanation(h, docker_executor):
    spec = h.spec(["true"], network_mode="no-such-network-" + uuid.uuid4().hex[:6])
    with pytest.raises(ExecutorError) as exc:
        cid = h.cleanup.track(docker_executor.create(spec, owner_of(spec)))
        docker_executor.start(cid)
    assert not isinstance(exc.value, (ImageMissing, DockerUnavailable))
    assert "no-such-network" in str(exc.value)


# --- the workspace through the engine's API --------------------------------------------


def test_a_workspace_goes_in_and_comes_back_through_the_api(h, docker_executor, tmp_path):
    # Given a staged workspace and a container with a read-only root and no workspace bind
    task = Task(id="t1", task_prompt="p", output_prompt="o", session_id="s",
                input_files=(InputFile(id="f", filename="in.bin", mime_type="", size_bytes=3),))
    ws = Workspace.for_task(tmp_path / "data", task.id)
    ws.create()
    rel, path = ws.input_path(1, "in.bin")
    blob = os.urandom(3 * 1024 * 1024 + 5)
    path.write_bytes(blob)
    ws.write_task_json(task, [rel])
    spec = h.spec(["sh", "-c", "cat /workspace/task.json > /dev/null && cp /workspace/input/01-in.bin "
                   "/workspace/output/copy.bin && ls -ld /workspace/output | cut -c1-10"],
                  copy=True, extra="read_only = true\nuser = \"1234:1234\"")
    cid = h.cleanup.track(docker_executor.create(spec, owner_of(spec)))
    # When it goes in before the start, and comes back after the exit
    docker_executor.put_archive(cid, WORKSPACE_MOUNT, workspace_tar(ws.root))
    docker_executor.start(cid)
    assert docker_executor.wait(cid).code == 0
    out, _ = logs(docker_executor, cid, tmp_path)
    clear_outputs(ws.root)
    skipped = extract_outputs(docker_executor.get_archive(cid, COPY_OUT_PATH), ws.root, LimitsConfig())
    # Then a user that is not root wrote output/ as in a bind mount, and the bytes are the same
    assert out == b"drwxrwxrwx\n"
    assert skipped == []
    assert (ws.output_dir / "copy.bin").read_bytes() == blob
    docker_executor.remove(cid)


def test_the_archive_calls_on_a_gone_container_are_vanished(h, docker_executor):
    cid = h.cleanup.track(docker_executor.create(h.spec(["true"], copy=True), owner_of(h.spec(["true"]))))
    docker_executor.remove(cid)
    with pytest.raises(ContainerVanished):
        docker_executor.put_archive(cid, WORKSPACE_MOUNT, iter([bytes(1024)]))
    with pytest.raises(ContainerVanished):
        list(docker_executor.get_archive(cid, COPY_OUT_PATH))
