"""Nothing lost: crashes, outages, a flaky server, long tasks and big outputs (issue 4).

Each test runs the real `agent-core run` process against the local server (whose fault
knobs drive the outage) and the real Docker engine, like tests/test_run.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import stat
import threading
import time

import docker.errors
import psutil
import pytest

from agent_core.executor import LABEL_SERVICE, LABEL_TASK, Owner
from tests.agent_fixtures import wait_until
from tests.docker_fixtures import on_both_engines
from tests.test_run import DONE, finish, sh

pytestmark = pytest.mark.docker

GiB = 1024 ** 3
MiB = 1024 ** 2


@pytest.fixture
def dev_server(make_dev_server, request):
    """The real 60 s heartbeat timeout with a sweep every 2 s (so a gap shows at once), and room
    for a 1 GiB upload; indirect parametrization changes any of these."""
    settings = {"sweep_interval_secs": 2, "max_file_bytes": GiB + MiB, **getattr(request, "param", {})}
    return make_dev_server(**settings)


# --- helpers shared with test_shutdown and test_hostile ----------------------------------


def calls_for(dev_server, suffix: str, task_id: str, status: int | None = None) -> list:
    """The server calls to `suffix` about one task (JSON body or upload form), optionally by status."""
    def about(call) -> bool:
        body = call.body if isinstance(call.body, dict) else {}
        return task_id in (body.get("task_id"), (body.get("fields") or {}).get("task_id"))
    return [c for c in dev_server.calls_to(suffix) if about(c) and (status is None or c.status == status)]


def heartbeat_statuses(dev_server, service_id: str) -> list[str]:
    return [c.body["status"] for c in dev_server.calls_to("/heartbeat")
            if f"/{service_id}/" in c.path and c.status == 200]


def journal_record(agent, task_id: str) -> dict | None:
    try:
        return json.loads((agent.cfg.paths.data_dir / "journal" / f"{task_id}.json").read_text())
    except FileNotFoundError:
        return None


# The low-level list: one call, without docker-py's inspect of each container listed, which
# fails when one is removed in between (as ours are, at the end of every task).

def container_status(client, task_id: str) -> str | None:
    """The task's container state; None while it has none, or while Podman cannot list a container
    that is exiting right now (its 500 "read /proc/N/cgroup: no such process"): a poll asks again."""
    try:
        found = client.api.containers(all=True, filters={"label": f"{LABEL_TASK}={task_id}"})
    except docker.errors.APIError as e:
        if e.status_code == 500 and "no such process" in str(e):
            return None
        raise
    return found[0]["State"] if found else None


def our_task_container(client, task_id: str) -> str:
    (found,) = client.api.containers(all=True, filters={"label": f"{LABEL_TASK}={task_id}"})
    return found["Id"]


def our_containers(client, service_id: str) -> list[dict]:
    return client.api.containers(all=True, filters={"label": f"{LABEL_SERVICE}={service_id}"})


def agent_files(dev_client, task_id: str) -> dict[str, dict]:
    return {f["filename"]: f for f in dev_client.list_files(task_id) if f["created_by"] == "agent"}


def read_output(dev_client, task_id: str, name: str, dest) -> bytes:
    dev_client.download_file(agent_files(dev_client, task_id)[name]["id"], dest)
    return dest.read_bytes()


def kill_9(agent) -> None:
    agent.signal(signal.SIGKILL)
    agent.proc.wait(10)


# --- crash recovery ---------------------------------------------------------------------


@on_both_engines
def test_kill_9_then_restart_loses_nothing_and_runs_nothing_twice(make_agent, dev_server, dev_client,
                                                                  engine_client, busybox_image, tmp_path):
    # Given tasks that note on a host folder each time they start: "long" still runs when the
    # daemon dies, "short" ends while it is dead, "quick" has its result on disk but unreported,
    # and the container of "lost" is removed behind the agent's back
    runs = tmp_path / "runs"
    runs.mkdir()
    agent = make_agent({
        **sh('echo "$TASK_ID" >> /runs/started; '
             'if grep -q -e long -e lost /workspace/task.json; then sleep 15; '
             'elif grep -q short /workspace/task.json; then sleep 4; fi; '
             'echo "result of $TASK_ID" > /workspace/output/result.txt'),
        "executor.capacity": 4,
        "paths.mounts": [{"host": str(runs), "container": "/runs", "readonly": False}],
    })
    dev_server.faults.fail_next(10 ** 6, status=503, path_contains="/complete")
    long_, short, quick, lost = (dev_client.submit_task(agent.service_id, p)["id"]
                                 for p in ("long", "short", "quick", "lost"))
    agent.start()
    wait_until(lambda: (journal_record(agent, quick) or {}).get("stage") == "UPLOADED", 60,
               "the quick task's result to be journaled")
    wait_until(lambda: all(container_status(engine_client, t) == "running" for t in (long_, short, lost)), 60,
               "the long, short and lost containers to run")
    # When the daemon is killed outright, and a stray container of ours appears meanwhile
    kill_9(agent)
    dev_server.faults.clear()
    engine_client.api.remove_container(our_task_container(engine_client, lost), force=True)
    ghost = engine_client.containers.create(
        busybox_image, ["sleep", "60"], network_mode="none",
        labels=Owner.of(agent.service_id, agent.cfg.paths.data_dir).labels("ghost"))
    wait_until(lambda: container_status(engine_client, short) == "exited", 30, "the short task to end")
    assert container_status(engine_client, long_) == "running"
    agent.start()
    # Then every task completes with its own output, reported exactly once
    results = finish(dev_client, [long_, short, quick], timeout=90)
    assert [r["status"] for r in results] == ["completed"] * 3, results
    for task_id in (long_, short, quick):
        assert read_output(dev_client, task_id, "output/result.txt", tmp_path / "r") == \
            f"result of {task_id}\n".encode()
        assert len(calls_for(dev_server, "/complete", task_id, status=200)) == 1
        assert len(calls_for(dev_server, "/files/upload", task_id)) == 1  # never uploaded again
    assert len(calls_for(dev_server, "/complete", long_)) == len(calls_for(dev_server, "/complete", short)) == 1
    # and the task with nothing left to resume is failed with the reason
    lost_result = dev_client.wait_for_status(lost, DONE, timeout=30)
    assert lost_result["status"] == "failed" and "vanished" in lost_result["error_message"], lost_result
    # and no task ran twice
    assert sorted((runs / "started").read_text().split()) == sorted([long_, short, quick, lost])
    # and no container of ours is left, the stray one included
    wait_until(lambda: not our_containers(engine_client, agent.service_id), 30, "our containers to go")
    with pytest.raises(docker.errors.NotFound):
        ghost.reload()
    assert "resuming after restart at stage LAUNCHED" in agent.log()
    assert "resuming after restart at stage UPLOADED" in agent.log()
    assert not list((agent.cfg.paths.data_dir / "journal").glob("*.json"))


# --- server outages ---------------------------------------------------------------------


def test_a_20_s_server_outage_while_a_task_runs(make_agent, dev_server, dev_client, docker_engine, tmp_path):
    agent = make_agent(sh("sleep 3; echo survived > /workspace/output/result.txt"))
    task = dev_client.submit_task(agent.service_id, "outage")["id"]
    agent.start()
    wait_until(lambda: container_status(docker_engine, task) == "running", 60, "the container to run")
    # the task ends, and its upload starts, while the server is away
    dev_server.restart(down_for=20)
    result = dev_client.wait_for_status(task, DONE, timeout=120)
    assert result["status"] == "completed", result
    assert read_output(dev_client, task, "output/result.txt", tmp_path / "r") == b"survived\n"
    assert result["retry_count"] == 0
    assert agent.alive()
    assert "heartbeat failed" in agent.log()  # the outage was real, and was ridden out
    n = len(dev_server.calls_to("/heartbeat"))
    wait_until(lambda: len(dev_server.calls_to("/heartbeat")) > n, 30, "heartbeats after the outage")


@pytest.mark.parametrize("dev_server", [{"heartbeat_timeout_secs": 4}], indirect=True)
def test_a_task_the_server_requeued_while_it_ran_is_taken_back_not_run_twice(make_agent, dev_server, dev_client,
                                                                             docker_engine, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    agent = make_agent({**sh("echo run >> /runs/started; sleep 12; echo kept > /workspace/output/result.txt"),
                        "paths.mounts": [{"host": str(runs), "container": "/runs", "readonly": False}]})
    task = dev_client.submit_task(agent.service_id, "requeued")["id"]
    agent.start()
    wait_until(lambda: container_status(docker_engine, task) == "running", 60, "the container to run")
    # When the server hears no heartbeat (and answers no poll) until it has requeued the task
    dev_server.faults.fail_next(10 ** 6, status=503, path_contains="/heartbeat")
    dev_server.faults.fail_next(10 ** 6, status=503, path_contains="/poll")
    wait_until(lambda: dev_client.get_task(task)["status"] == "pending", 30, "the server to requeue the task")
    # Then the result, arriving while the task is pending again, takes it back and is accepted
    result = dev_client.wait_for_status(task, DONE, timeout=60)
    dev_server.faults.clear()
    assert result["status"] == "completed" and result["retry_count"] == 1, result
    assert read_output(dev_client, task, "output/result.txt", tmp_path / "r") == b"kept\n"
    assert (runs / "started").read_text() == "run\n"
    assert "requeued" in agent.log()


def test_a_flaky_slow_server_loses_no_task_and_no_byte(make_agent, dev_server, dev_client, tmp_path):
    # Given 5 tasks whose outputs are copies of their inputs
    agent = make_agent({**sh("cp /workspace/input/* /workspace/output/"), "executor.capacity": 3})
    inputs = {}
    for n in range(5):
        data = os.urandom(100_000 + 7919 * n)
        task = dev_client.submit_task(agent.service_id, f"t{n}", files=[(f"in-{n}.bin", data)])
        inputs[task["id"]] = hashlib.sha256(data).hexdigest()
    # When 30 % of the agent's calls are answered 500 or 429, each after 2 s
    dev_server.faults.fail_ratio(0.3, delay_secs=2, seed=4)
    agent.start()
    results = finish(dev_client, list(inputs), timeout=280)
    dev_server.faults.clear()
    # Then every task completed with byte-identical outputs, and the daemon is still there
    assert [r["status"] for r in results] == ["completed"] * 5, results
    for task_id, digest in inputs.items():
        (name,) = agent_files(dev_client, task_id)
        data = read_output(dev_client, task_id, name, tmp_path / "out")
        assert hashlib.sha256(data).hexdigest() == digest
        assert len(calls_for(dev_server, "/complete", task_id, status=200)) == 1
    faulted = [c for c in dev_server.calls if c.status in (429, 500)]
    assert len(faulted) >= 5, "the faults did not happen"
    assert agent.alive()
    assert dev_server.errors == []


# --- long tasks and big outputs ---------------------------------------------------------


class RssSampler:
    """Samples a process's resident memory every 50 ms in a thread."""

    def __init__(self, pid: int):
        self.proc = psutil.Process(pid)
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(self.proc.memory_info().rss)
            except psutil.NoSuchProcess:
                return
            self._stop.wait(0.05)

    def mark(self) -> int:
        return len(self.samples)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def test_a_90_s_task_never_goes_offline_while_a_1_gib_output_streams(make_agent, dev_server, dev_client,
                                                                      docker_engine):
    # Given the default 15 s heartbeat, a 90 s task, and a second task that writes 1 GiB
    agent = make_agent({
        **sh("if grep -q big /workspace/task.json; then "
             "dd if=/dev/zero of=/workspace/output/big.bin bs=1M count=1024 2>/dev/null; "
             "else sleep 90; echo done > /workspace/output/done.txt; fi"),
        "agent.heartbeat_interval_secs": 15,
        "limits.max_output_file_bytes": "2g",
        "limits.max_output_bytes": "2g",
    })
    long_ = dev_client.submit_task(agent.service_id, "long")["id"]
    started = time.monotonic()
    agent.start()
    wait_until(lambda: container_status(docker_engine, long_) == "running", 60, "the 90 s task to run")
    sampler = RssSampler(agent.proc.pid)
    try:
        wait_until(lambda: sampler.mark() >= 20, 10, "a baseline of memory samples")
        baseline = max(sampler.samples)
        # When the 1 GiB output is uploaded while the long task runs
        big = dev_client.submit_task(agent.service_id, "big")["id"]
        assert dev_client.wait_for_status(big, DONE, timeout=180)["status"] == "completed"
        peak = max(sampler.samples)
    finally:
        sampler.stop()
    (uploaded,) = agent_files(dev_client, big).values()
    assert uploaded["size_bytes"] == GiB
    growth = (peak - baseline) / MiB
    print(f"agent RSS: baseline {baseline / MiB:.1f} MiB, peak {peak / MiB:.1f} MiB during the 1 GiB "
          f"upload (+{growth:.1f} MiB)")
    # Then memory stayed flat while streaming
    assert growth < 64, f"RSS grew by {growth:.1f} MiB"
    result = dev_client.wait_for_status(long_, DONE, timeout=150)
    took = time.monotonic() - started
    # and in all that time the server never saw a heartbeat gap
    assert result["status"] == "completed" and result["retry_count"] == 0, result
    assert not [e for e in dev_server.events if e.get("service_id") == agent.service_id], dev_server.events
    beats = [c.time for c in dev_server.calls_to("/heartbeat") if c.status == 200]
    gaps = [b - a for a, b in zip(beats, beats[1:])]
    print(f"90 s task took {took:.0f} s; {len(beats)} heartbeats, longest gap {max(gaps):.1f} s")
    assert max(gaps) < 40  # a sanity bound: the server gives up after 60 s


# --- workspaces, permissions, secrets, disk ---------------------------------------------


def test_finished_workspaces_go_even_when_another_uid_locked_them(make_agent, dev_client, dev_server):
    # Given tasks run as uid 1234 that leave read-only and unreadable directories in output/
    agent = make_agent({
        **sh("mkdir -p /workspace/output/a/b /workspace/output/c && echo x > /workspace/output/a/b/f && "
             "echo y > /workspace/output/c/g && chmod 0 /workspace/output/c && chmod 500 /workspace/output/a/b "
             "/workspace/output/a && echo ok > /workspace/output/ok.txt; "
             "if grep -q slow /workspace/task.json; then sleep 3; fi; "
             "if grep -q fail /workspace/task.json; then exit 1; fi"),
        "executor.user": "1234:1234",
        "paths.keep_workspaces": "failed",
    })
    ok, failed, slow = (dev_client.submit_task(agent.service_id, p)["id"] for p in ("ok", "fail", "slow"))
    agent.start()
    # while a task runs, its journal record and the live status exist; they must not hold a secret
    record = wait_until(lambda: journal_record(agent, slow), 60, "the slow task's journal record")
    live_status = (agent.cfg.paths.data_dir / "status.json").read_text()
    results = finish(dev_client, [ok, failed, slow])
    assert [r["status"] for r in results] == ["completed", "failed", "completed"], results
    workspaces = agent.cfg.paths.data_dir / "workspaces"
    # Then the completed tasks' workspaces are gone and the failed one is kept for debugging
    wait_until(lambda: not (workspaces / ok).exists() and not (workspaces / slow).exists(), 15,
               "the completed workspaces to be removed")
    kept = workspaces / failed
    assert (kept / "output" / "ok.txt").read_text() == "ok\n"
    assert os.stat(kept / "output" / "a" / "b" / "f").st_uid == 1234
    # and the data dir is 0700, the config 0600
    assert stat.S_IMODE(os.stat(agent.cfg.paths.data_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(agent.config_path).st_mode) == 0o600
    # and neither the api_key nor the registration token is in the journal, logs or status
    agent.stop()
    secrets = [agent.cfg.agent.api_key, agent.token]
    assert all(secrets)
    texts = {"journal record": json.dumps(record), "status": live_status}
    for path in agent.root.rglob("*"):
        if path.is_file() and path != agent.config_path:
            texts[str(path)] = path.read_text(errors="replace")
    assert texts.keys() > {str(agent.log_path)}
    for where, text in texts.items():
        for secret in secrets:
            assert secret not in text, f"a secret is in {where}"


def test_no_task_is_taken_while_the_disk_is_nearly_full(make_agent, dev_client, dev_server):
    agent = make_agent({"paths.min_free_disk_mb": 10 ** 9})
    task = dev_client.submit_task(agent.service_id, "waits")["id"]
    agent.start()
    wait_until(lambda: "not taking tasks" in agent.log(), 30, "the disk guard's log line")
    polls = len(dev_server.calls_to("/poll"))
    wait_until(lambda: len(dev_server.calls_to("/poll")) > polls + 2, 30, "more polls")
    assert re.search(r"not taking tasks: only \d+ MiB free", agent.log())
    assert dev_client.get_task(task)["status"] == "pending"
    assert dev_server.calls_to("/accept") == []
    assert agent.alive()
