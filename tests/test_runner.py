"""One TaskRunner against the local server and a FakeBackend: crashes at every stage, cancels, refusals.

A "crash" abandons the first runner at a chosen point: it raises `Abandoned` from the status
callback right after a journal write, or its lifecycle's exit-now step is taken, or a backend
call is held and then fails after that step; that runner never goes on. A second runner, built from
`Journal(data_dir).replay()` as `Scheduler._recover` does, then finishes the task. Whatever
the point, the server hears `complete` once, gets every output, and no output twice.
"""

from __future__ import annotations

import dataclasses
import io
import tarfile
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import pytest

from agent_core import archive, config, process
from agent_core.client import Client
from agent_core.config import Config
from agent_core.errors import DockerUnavailable
from agent_core.executor import Owner
from agent_core.janitor import Janitor
from agent_core.journal import Journal, Stage, TaskRecord
from agent_core.lifecycle import Lifecycle
from agent_core.metrics import Metrics
from agent_core.outcome import CancelReason
from agent_core.runner import Abandoned, Deps, TaskRunner
from tests.fakes import FakeBackend, Script
from tests.helpers import wait_until

OUTPUTS = {f"output/{name}.txt": name.encode() * 10 for name in "abcd"}
WRITES_OUTPUTS = Script(stdout=b"done\n", outputs=OUTPUTS)


@pytest.fixture
def dev_server(make_dev_server, request):
    """The local server without a rate limit, sweeping only when a test says so; `request.param`
    (indirect parametrization) adds DevServer settings."""
    return make_dev_server(**{"rate_limit_per_minute": 0, "sweep_interval_secs": 3600,
                              **getattr(request, "param", {})})


def agent_config(tmp_path: Path, dev_server, dev_client, **settings) -> Config:
    """The config of an agent registered for a new service on `dev_server`, data under tmp_path."""
    service = dev_client.create_service("fake")
    with Client(dev_server.url) as anon:
        reg = anon.register(service["registration_token"], 1)
    path = config.init(tmp_path / "config.toml", base_url=dev_server.url)
    config.update(path, {"agent.service_id": reg.service_id, "agent.api_key": reg.api_key,
                         "paths.data_dir": str(tmp_path / "data"), "paths.min_free_disk_mb": 0,
                         "server.rate_limit_per_minute": 0, "executor.network_mode": "none", **settings})
    cfg = config.load(path)
    process.ensure_data_dir(cfg.paths.data_dir)
    return cfg


class Node:
    """What a scheduler would give its runners, minus the scheduler: tests build runners by hand."""

    def __init__(self, cfg: Config, dev_client):
        self.cfg, self.dev_client = cfg, dev_client
        self.data_dir = Path(cfg.paths.data_dir)
        self.service_id = cfg.agent.service_id
        self.backend = FakeBackend()
        self.workspace_mode = ""  # the Deps default: executor.workspace
        self.owner = Owner.of(self.service_id, self.data_dir)
        self.launches: list = []  # each launch_result
        self.engine_downs = 0
        self.journal_errors: list = []
        self._clients: dict[Lifecycle, Client] = {}  # a lifecycle per agent process: a crash is its exit

    def client_of(self, lifecycle: Lifecycle) -> Client:
        if lifecycle not in self._clients:
            self._clients[lifecycle] = Client.from_config(self.cfg, lifecycle=lifecycle)
        return self._clients[lifecycle]

    def accept(self, prompt: str = "p", files=()) -> TaskRecord:
        """Submit a task, take it as the poll loop does, and journal it (Stage.ACCEPTED)."""
        task_id = self.dev_client.submit_task(self.service_id, prompt, files=files)["id"]
        client = self.client_of(Lifecycle())
        offer = client.poll(0, 1).task
        assert offer is not None and offer.id == task_id and client.accept(task_id)
        record = TaskRecord(task=offer)
        Journal(self.data_dir).save(record)
        return record

    def runner(self, record: TaskRecord, crash_when: Callable[[TaskRecord], bool] | None = None,
               lifecycle: Lifecycle | None = None, metrics: Metrics | None = None) -> TaskRunner:
        """A runner of its own (lifecycle, client, journal); `crash_when(record)` true at a status
        change (each follows a journal write or a phase change) abandons it there."""
        lifecycle = lifecycle or Lifecycle()

        def changed() -> None:
            if crash_when is not None and crash_when(runner.record):
                raise Abandoned()

        def engine_down() -> None:
            self.engine_downs += 1

        deps = Deps(cfg=self.cfg, client=self.client_of(lifecycle), executor=self.backend, lifecycle=lifecycle,
                    metrics=metrics or Metrics(), journal=Journal(self.data_dir), owner=self.owner,
                    janitor=Janitor(self.data_dir, None), engine_down=engine_down,
                    engine_wait=lambda: not lifecycle.exiting.is_set(), changed=changed,
                    launch_result=self.launches.append, journal_failed=self.journal_errors.append,
                    workspace_mode=self.workspace_mode)
        runner = TaskRunner(deps, record, lambda _runner: None)
        return runner

    @staticmethod
    def run(runner: TaskRunner, timeout: float = 10) -> TaskRunner:
        runner.start()
        runner.thread.join(timeout)
        assert not runner.thread.is_alive(), f"the runner is stuck in phase {runner.phase}"
        return runner

    def recover(self) -> TaskRunner:
        """A new runner for the one task the journal holds, run to its end."""
        (record,) = Journal(self.data_dir).replay()
        return self.run(self.runner(record))

    def close(self) -> None:
        for lifecycle, client in self._clients.items():
            lifecycle.exit_now()
            client.close()
        self.backend.close()


@pytest.fixture
def node(tmp_path, dev_server, dev_client):
    node = Node(agent_config(tmp_path, dev_server, dev_client), dev_client)
    yield node
    node.close()


@pytest.fixture
def copy_node(node):
    """A node whose runners copy the workspace through the engine's API."""
    node.workspace_mode = archive.COPY
    return node


def completes(dev_server, task_id: str, status: int = 200) -> list:
    return [c for c in dev_server.calls_to("/complete") if c.status == status and c.body["task_id"] == task_id]


def uploaded(dev_server, task_id: str) -> Counter:
    """How many times each output of the task was uploaded (answered 200)."""
    return Counter(f["filename"] for c in dev_server.calls_to("/files/upload")
                   if c.status == 200 and c.body["fields"].get("task_id") == task_id for f in c.body["files"])


def agent_files(dev_client, task_id: str) -> list[str]:
    return sorted(f["filename"] for f in dev_client.list_files(task_id) if f["created_by"] == "agent")


def assert_done_once(node, dev_server, task_id: str, status: str = "completed") -> dict:
    """Reported once, every output there, none uploaded twice, the journal empty."""
    (call,) = completes(dev_server, task_id)
    assert call.body["status"] == status, call.body
    assert agent_files(node.dev_client, task_id) == sorted(OUTPUTS)
    assert set(uploaded(dev_server, task_id).values()) == {1}
    assert dev_server.get_task(task_id)["status"] == status
    assert Journal(node.data_dir).replay() == [] and node.journal_errors == []
    return call.body


# --- crashes ----------------------------------------------------------------------------


def crash_at(stage: Stage) -> Callable[[TaskRecord], bool]:
    return lambda rec: rec.stage >= stage


def crash_after_uploads(n: int) -> Callable[[TaskRecord], bool]:
    return lambda rec: len(rec.uploads) >= n


class CrashAfterReport(Metrics):
    """Told the task was reported: the agent dies before its journal record is removed."""

    def task_finished(self, status: str, secs: float) -> None:
        raise Abandoned()


def abandon_on_first_call(node, record):
    """The agent exits before the runner's first request (its download)."""
    lifecycle = Lifecycle()
    lifecycle.exit_now()
    node.run(node.runner(record, lifecycle=lifecycle))


def crash_held_at(node, record, method: str, after: int = 0):
    """The runner's call of `method` (after `after` more) is held; the agent dies (abort, then the call fails)."""
    gate = node.backend.block(method, after)
    lifecycle = Lifecycle()
    runner = node.runner(record, lifecycle=lifecycle)
    runner.start()
    assert gate.reached.wait(5)
    lifecycle.exit_now()
    gate.release(DockerUnavailable("the agent died"))
    runner.thread.join(5)
    assert not runner.thread.is_alive()
    return runner


def crash_in_wait(node, record):
    """The runner waits on its running container; the agent dies (abort, then the wait fails)."""
    node.backend.script(record.task_id, dataclasses.replace(WRITES_OUTPUTS, hold=True))
    crash_held_at(node, record, "wait")
    node.backend.release(record.task_id)  # the container ends while no agent runs


def crash_when(predicate):
    def crash(node, record):
        node.run(node.runner(record, crash_when=predicate))
    return crash


def crash_after_report(node, record):
    node.run(node.runner(record, metrics=CrashAfterReport()))


CRASHES = {
    "after accept": (abandon_on_first_call, Stage.ACCEPTED),
    "after staging": (crash_when(crash_at(Stage.STAGED)), Stage.STAGED),
    "after create, before start": (crash_when(crash_at(Stage.LAUNCHED)), Stage.LAUNCHED),
    "after launch, while running": (crash_in_wait, Stage.LAUNCHED),
    "after exit": (crash_when(crash_at(Stage.EXITED)), Stage.EXITED),
    "half-way through the uploads": (crash_when(crash_after_uploads(2)), Stage.EXITED),
    "after the last upload": (crash_when(crash_after_uploads(len(OUTPUTS))), Stage.EXITED),
    "after the uploads are journaled": (crash_when(crash_at(Stage.UPLOADED)), Stage.UPLOADED),
    "after complete, before the journal is cleared": (crash_after_report, Stage.UPLOADED),
}


def crash_in_copy_out(method: str, after: int = 0):
    """The container exited; the copy-out is held at its start ("get_archive") or half-way
    ("get_archive_chunk") while the agent dies, so the copy-out fails after the exit-now step."""
    def crash(node, record):
        runner = crash_held_at(node, record, method, after)
        if after:  # what came before the break is on disk: the next copy-out must start afresh
            assert (runner.workspace.output_dir / "a.txt").read_bytes() == OUTPUTS["output/a.txt"]
    return crash


COPY_CRASHES = {
    **CRASHES,
    "after exit, before the copy-out": (crash_in_copy_out("get_archive"), Stage.LAUNCHED),
    # the fake's chunks are 1000 bytes: the input and output/a.txt are through by the fourth
    "half-way through the copy-out": (crash_in_copy_out("get_archive_chunk", after=3), Stage.LAUNCHED),
}


@pytest.mark.parametrize("point", list(CRASHES))
def test_a_crash_at_any_point_is_finished_by_the_next_start_and_reported_once(node, dev_server, point):
    crash_and_recover(node, dev_server, *CRASHES[point])


@pytest.mark.parametrize("point", list(COPY_CRASHES))
def test_in_copy_mode_a_crash_at_any_point_is_finished_by_the_next_start_and_reported_once(copy_node, dev_server,
                                                                                            point):
    crash_and_recover(copy_node, dev_server, *COPY_CRASHES[point])
    # and the staging went in before every start, and the container went only after the last copy-out
    calls = [name for name, _ in copy_node.backend.calls]
    assert calls.index("put_archive") < calls.index("start")
    assert max(i for i, name in enumerate(calls) if name == "get_archive") < calls.index("remove")
    assert all(names == ["input/01-in.txt", "task.json"] for names in copy_node.backend.put_names.values())


def crash_and_recover(node, dev_server, crash, journaled) -> None:
    # Given an accepted task with an input, whose container writes four outputs
    record = node.accept(files=[("in.txt", b"input")])
    node.backend.script(record.task_id, WRITES_OUTPUTS)
    # When the agent dies at that point
    crash(node, record)
    (kept,) = Journal(node.data_dir).replay()
    assert kept.stage is journaled
    before = uploaded(dev_server, record.task_id)
    # and a new runner takes the task up from the journal
    node.recover()
    # Then the task is reported once as completed, with all of its outputs, none sent twice
    body = assert_done_once(node, dev_server, record.task_id)
    assert body["output"]["stdout"] == "done\n"
    assert sorted(body["output"]["files"]) == sorted(OUTPUTS)
    assert len(body["file_ids"]) == len(OUTPUTS)
    # and the second runner sent only what the first had not
    assert uploaded(dev_server, record.task_id) - before == Counter(set(OUTPUTS) - set(before))
    # and the task ran in one container, started once
    assert node.backend.count("create") == 1 and node.backend.count("start") == 1


def test_a_crash_between_exit_and_removal_still_removes_the_container(node, dev_server):
    # The EXITED record is written before the container is removed; the recovered runner starts
    # at collect, and removes the container when it is done.
    record = node.accept()
    node.backend.script(record.task_id, Script(outputs=OUTPUTS))
    node.run(node.runner(record, crash_when=crash_at(Stage.EXITED)))
    node.recover()
    assert_done_once(node, dev_server, record.task_id)
    assert node.backend.of_task(record.task_id) == []


def test_in_copy_mode_what_the_archive_cannot_bring_is_listed_as_a_scan_lists_it(copy_node, dev_server):
    # Given a container whose /workspace comes back with a link, a FIFO, an escape and a file too big
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, data in [("./output/a.txt", tarfile.REGTYPE, b"a"),
                                 ("./output/link", tarfile.SYMTYPE, b""),
                                 ("./output/fifo", tarfile.FIFOTYPE, b""),
                                 ("./../escape", tarfile.REGTYPE, b"x"),
                                 ("./output/big", tarfile.REGTYPE, b"b" * 2000)]:
            info = tarfile.TarInfo(name)
            info.type, info.size, info.linkname = kind, len(data), "/etc/passwd" * (kind == tarfile.SYMTYPE)
            tar.addfile(info, io.BytesIO(data))
    record = copy_node.accept()
    copy_node.backend.script(record.task_id, Script(archive=buf.getvalue()))
    copy_node.cfg = dataclasses.replace(copy_node.cfg, limits=dataclasses.replace(
        copy_node.cfg.limits, max_output_file_bytes=1000))
    # When it runs
    copy_node.run(copy_node.runner(record))
    # Then the file arrives, and the rest is listed with the scan's words
    (call,) = completes(dev_server, record.task_id)
    assert call.body["status"] == "completed" and call.body["output"]["files"] == ["output/a.txt"]
    assert call.body["output"]["skipped"] == [
        {"path": "./../escape", "reason": archive.DOT_DOT},
        {"path": "output/big", "reason": "2000 bytes: over the per-file limit of 1000"},
        {"path": "output/fifo", "reason": "named pipe (FIFO)"},
        {"path": "output/link", "reason": "symbolic link (never followed)"},
    ]
    assert call.body["output"]["skipped_count"] == 4


def test_in_copy_mode_an_engine_outage_during_the_copy_out_is_ridden_out(copy_node, dev_server):
    record = copy_node.accept()
    copy_node.backend.script(record.task_id, WRITES_OUTPUTS)
    copy_node.backend.fail("get_archive_chunk", DockerUnavailable("engine restarting"))
    copy_node.run(copy_node.runner(record))
    assert_done_once(copy_node, dev_server, record.task_id)
    assert copy_node.engine_downs == 1 and copy_node.backend.count("get_archive") == 2


# --- cancels, refusals, requeues ----------------------------------------------------------


def test_a_cancel_before_launch_reports_cancelled_and_creates_no_container(node, dev_server, dev_client):
    record = node.accept(files=[("in.txt", b"input")])
    dev_client.cancel_task(record.task_id)  # the server now says "cancelling"
    runner = node.runner(record)
    runner.cancel(CancelReason.SERVER)
    node.run(runner)
    (call,) = completes(dev_server, record.task_id)
    assert call.body["status"] == "cancelled" and call.body["error_message"] == "cancelled on request"
    assert node.backend.count("create") == 0 and node.launches == []
    assert dev_server.get_task(record.task_id)["status"] == "cancelled"
    assert Journal(node.data_dir).replay() == []


@pytest.mark.parametrize("dev_server", [{"max_file_bytes": 1000}], indirect=True)
def test_an_output_the_server_refuses_fails_the_task_by_name_and_the_rest_arrive(node, dev_server, dev_client):
    record = node.accept()
    node.backend.script(record.task_id, Script(outputs={**OUTPUTS, "output/big.bin": b"x" * 2000}))
    node.run(node.runner(record))
    (call,) = completes(dev_server, record.task_id)
    assert call.body["status"] == "failed"
    assert "output files refused by the server: output/big.bin (2000 bytes)" in call.body["error_message"]
    assert agent_files(dev_client, record.task_id) == sorted(OUTPUTS)
    refusals = [c.status for c in dev_server.calls_to("/files/upload") if c.status != 200]
    assert refusals == [400]  # refused once: never tried again


@pytest.mark.parametrize("dev_server", [{"heartbeat_timeout_secs": 0.1}], indirect=True)
def test_a_complete_refused_after_a_requeue_accepts_the_task_again_and_reports_it(node, dev_server):
    # Given a task the server requeued while it ran here (the agent looked silent)
    record = node.accept()
    node.backend.script(record.task_id, Script(outputs=OUTPUTS))
    time.sleep(0.2)
    dev_server.sweep()
    assert dev_server.get_task(record.task_id)["status"] == "pending"
    # When the runner reports it
    node.run(node.runner(record))
    # Then the refused complete was followed by an accept and a complete that landed
    assert len(completes(dev_server, record.task_id, status=400)) == 1
    assert [c.status for c in dev_server.calls_to("/accept")] == [200, 200]
    assert_done_once(node, dev_server, record.task_id)


# --- downloads through an outage -------------------------------------------------------------


def test_an_outage_during_the_download_is_ridden_out(node, dev_server):
    # Given a download answered 503 more often than a call's few tries (one retry loop, the client's)
    record = node.accept(files=[("in.txt", b"input")])
    node.backend.script(record.task_id, WRITES_OUTPUTS)
    dev_server.faults.fail_next(6, status=503, retry_after=0, path_contains="/download")
    # Then the task runs once the server is back, its input whole
    node.run(node.runner(record))
    assert [c.status for c in dev_server.calls_to("/download")] == [503] * 6 + [200]
    assert_done_once(node, dev_server, record.task_id)


def test_a_cancel_ends_a_download_retried_through_an_outage(node, dev_server, dev_client):
    record = node.accept(files=[("in.txt", b"input")])
    dev_server.faults.fail_next(1000, status=503, retry_after=0.2, path_contains="/download")
    runner = node.runner(record)
    runner.start()
    wait_until(lambda: len(dev_server.calls_to("/download")) >= 2, 10, "the download to be retried")
    dev_client.cancel_task(record.task_id)
    runner.cancel(CancelReason.SERVER)
    runner.thread.join(5)
    assert not runner.thread.is_alive()
    (call,) = completes(dev_server, record.task_id)
    assert call.body["status"] == "cancelled" and node.backend.count("create") == 0
