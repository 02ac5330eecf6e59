"""Logs: stable JSON lines, the task id on every task line (text and JSON), and no secret anywhere."""

from __future__ import annotations

import io
import json
import re
import logging
import threading
from pathlib import Path

import pytest

from agent_core import logs
from tests.agent_fixtures import agent_cli, wait_until
from tests.test_run import DONE, containers_of, sh

KEYS = {"ts", "level", "logger", "msg"}  # always there
OPTIONAL = {"task_id", "exc"}            # when about a task / with an exception
SECRET = "sk-very-secret-api-key-1234"


@pytest.fixture
def capture():
    """capture(fmt, secrets) -> a StringIO that gets what `agent_core.*` loggers say, through our handler."""
    logger = logging.getLogger("agent_core")
    saved = logger.level, logger.propagate
    handlers: list[logging.Handler] = []

    def start(fmt: str, secrets: list[str] | None = None) -> io.StringIO:
        out = io.StringIO()
        handler = logs.make_handler(fmt, stream=out, secrets=secrets)
        handlers.append(handler)
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
        logger.propagate = False  # keep pytest's own capture out of it
        return out

    yield start
    for handler in handlers:
        logger.removeHandler(handler)
    logger.setLevel(saved[0])
    logger.propagate = saved[1]


def in_task_thread(task_id: str, fn) -> None:
    """Run `fn` the way a runner's thread does: with the task set as the thread's current task."""
    def run():
        logs.current_task.set(task_id)
        fn()

    t = threading.Thread(target=run)
    t.start()
    t.join()


def parse_lines(text: str) -> list[dict]:
    """Every line as JSON, each with the stable keys and nothing else."""
    entries = []
    for line in text.splitlines():
        entry = json.loads(line)  # every line, not just most
        assert KEYS <= set(entry) <= KEYS | OPTIONAL, line
        entries.append(entry)
    return entries


# --- the formatters and filters -------------------------------------------------------------


def test_json_lines_have_stable_keys_and_the_task_id_of_the_thread(capture):
    out = capture("json")
    client_log = logging.getLogger("agent_core.client")
    logging.getLogger("agent_core.scheduler").info("agent running")
    # a line from a module that knows nothing of tasks, logged in a task's thread
    in_task_thread("t-123", lambda: client_log.warning("upload failed (attempt %d)", 1))
    # an explicit task id wins over the thread's
    in_task_thread("t-123", lambda: client_log.info("task %s: x", "t-9", extra={"task_id": "t-9"}))
    try:
        raise ValueError("boom")
    except ValueError:
        client_log.exception("it broke")
    first, in_thread, explicit, failed = parse_lines(out.getvalue())
    assert set(first) == KEYS and first["level"] == "info" and first["logger"] == "agent_core.scheduler"
    assert first["ts"].endswith("Z") and first["msg"] == "agent running"
    assert in_thread["task_id"] == "t-123" and in_thread["msg"] == "upload failed (attempt 1)"
    assert explicit["task_id"] == "t-9"
    assert failed["level"] == "error" and "ValueError: boom" in failed["exc"] and "task_id" not in failed


def test_text_lines_name_the_task_once(capture):
    out = capture("text")
    log = logging.getLogger("agent_core.runner")
    in_task_thread("t-123", lambda: log.info("task %s: completed", "t-123"))
    in_task_thread("t-123", lambda: logging.getLogger("agent_core.executor").warning("stop c1 failed"))
    log.info("agent running")
    named, added, plain = out.getvalue().splitlines()
    assert named.endswith("agent_core.runner: task t-123: completed")
    assert added.endswith("agent_core.executor: task t-123: stop c1 failed")  # the id is put in front
    assert plain.endswith("agent_core.runner: agent running")


def test_secrets_are_masked_in_messages_and_tracebacks(capture):
    out = capture("json", secrets=[SECRET])
    log = logging.getLogger("agent_core.client")
    log.warning("server echoed %s", f"X-API-Key: {SECRET}")
    try:
        raise RuntimeError(f"header {SECRET}")
    except RuntimeError:
        log.exception("request failed")
    echoed, failed = parse_lines(out.getvalue())
    assert echoed["msg"] == f"server echoed X-API-Key: {logs.MASK}"
    assert f"header {logs.MASK}" in failed["exc"]
    assert SECRET not in out.getvalue()


def test_an_uncaught_thread_exception_becomes_a_json_line(capture):
    out = capture("json")

    def crash():
        raise KeyError("lost")

    t = threading.Thread(target=crash, name="worker")
    logs._log_uncaught(threading.ExceptHookArgs((KeyError, KeyError("lost"), None, t)))
    (entry,) = parse_lines(out.getvalue())
    assert entry["level"] == "critical" and "thread worker" in entry["msg"] and "KeyError" in entry["exc"]


# --- a full run ---------------------------------------------------------------------------


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.docker
def test_a_json_run_logs_only_json_lines_with_task_ids_and_no_secret(make_agent, dev_client, docker_engine):
    # Given an agent logging JSON, and tasks that complete, fail and get cancelled
    agent = make_agent({**sh("if grep -q long /workspace/task.json; then sleep 60; fi; "
                             "if grep -q bad /workspace/task.json; then echo boom >&2; exit 3; fi; "
                             "cp /workspace/input/* /workspace/output/"),
                        "logging.format": "json"})
    secrets = {"api_key": agent.cfg.agent.api_key, "registration token": agent.token}
    assert all(secrets.values())
    long_task = dev_client.submit_task(agent.service_id, "long", files=[("a.txt", b"a")])["id"]
    ok = [dev_client.submit_task(agent.service_id, f"ok {n}", files=[(f"in{n}.txt", b"data")])["id"]
          for n in range(2)]
    bad = dev_client.submit_task(agent.service_id, "bad")["id"]
    agent.start()
    results = {t: dev_client.wait_for_status(t, DONE, timeout=90)["status"] for t in [*ok, bad]}
    assert results == {ok[0]: "completed", ok[1]: "completed", bad: "failed"}

    # While the long task runs, nothing the daemon wrote, nor `status`, holds a secret
    wait_until(lambda: containers_of(docker_engine, agent.service_id), 60, "the long task's container")
    data_dir = agent.cfg.paths.data_dir
    wait_until(lambda: any("journal" in p for p in files_under(data_dir)), 10, "a journal record")
    written = files_under(data_dir)
    assert str(data_dir / "status.json") in written
    shown = {"status --json": agent_cli("status", "--json", config_path=agent.config_path, check=True).stdout,
             "status": agent_cli("status", config_path=agent.config_path, check=True).stdout}
    for what, secret in secrets.items():
        for path, content in written.items():
            assert secret.encode() not in content, f"the {what} is in {path}"
        for command, output in shown.items():
            assert secret not in output, f"the {what} is in the output of `{command}`"

    dev_client.cancel_task(long_task)
    assert dev_client.wait_for_status(long_task, DONE, timeout=30)["status"] == "cancelled"
    assert agent.stop() == 0

    # Then every line of the log is one JSON object with the stable keys
    text = agent.log()
    entries = parse_lines(text)
    for what, secret in secrets.items():
        assert secret not in text, f"the {what} is in the log"
    # and every line about a task carries its id
    ours = {long_task, bad, *ok}
    for entry in entries:
        named = [t for t in ours if t in entry["msg"]]
        if named:
            assert entry.get("task_id") == named[0], entry
        if "task_id" in entry:
            assert entry["task_id"] in ours, entry
    by_task = {t: [e["msg"] for e in entries if e.get("task_id") == t] for t in ours}
    assert all(any("accepted" in m for m in msgs) for msgs in by_task.values()), by_task
    assert any(m.endswith("cancelled (cancelled on request)") for m in by_task[long_task]), by_task[long_task]
    assert any("failed (exit code 3" in m for m in by_task[bad]), by_task[bad]
    # and each task's container start, exit and upload summary have an INFO line of their own
    assert_task_lines({t: [e["msg"] for e in entries if e.get("task_id") == t and e["level"].upper() == "INFO"]
                       for t in ok}, bad=[e["msg"] for e in entries if e.get("task_id") == bad])


def assert_task_lines(by_task: dict[str, list[str]], bad: list[str]) -> None:
    for task_id, msgs in by_task.items():
        assert any(re.search(r"container \w{12} started \(image ", m) for m in msgs), msgs
        assert any(re.search(r"container exited with code 0 after [\d.]+ s$", m) for m in msgs), msgs
        assert any(re.search(r"uploaded 1 files \(4 bytes\), skipped 0, in [\d.]+ s", m) for m in msgs), msgs
    assert any("container exited with code 3 after" in m for m in bad), bad


def test_a_text_run_logs_container_start_exit_and_upload_summary_at_info(make_agent, dev_client):
    agent = make_agent({**sh("if grep -q bad /workspace/task.json; then exit 3; fi; "
                             "cp /workspace/input/* /workspace/output/"), "logging.level": "info"})
    ok = dev_client.submit_task(agent.service_id, "ok", files=[("in.txt", b"data")])["id"]
    bad = dev_client.submit_task(agent.service_id, "bad")["id"]
    agent.start()
    for task in (ok, bad):
        dev_client.wait_for_status(task, DONE, timeout=60)
    assert agent.stop() == 0
    lines = agent.log().splitlines()
    info = [ln.split(": ", 1)[1] for ln in lines if " INFO " in ln and ": task " in ln]
    assert_task_lines({ok: [m.split(": ", 1)[1] for m in info if m.startswith(f"task {ok}: ")]},
                      bad=[m for m in info if m.startswith(f"task {bad}: ")])
    assert any("agent agent-core running: service" in ln for ln in lines)


def test_the_log_file_rotates_by_size_and_every_generation_is_private(tmp_path):
    path = tmp_path / "agent.log"
    handler = logs.make_handler("text", file=path, max_bytes=2000, backups=2, secrets=[SECRET])
    logger = logging.getLogger("agent_core.test_rotation")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        for i in range(200):
            logger.warning("line %d with %s", i, SECRET)
    finally:
        logger.removeHandler(handler)
        handler.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["agent.log", "agent.log.1", "agent.log.2"]
    for p in tmp_path.iterdir():
        assert p.stat().st_size <= 2000 and (p.stat().st_mode & 0o777) == 0o600
        assert SECRET not in p.read_text()
    assert "line 199" in path.read_text()


def test_max_bytes_0_never_rotates(tmp_path):
    handler = logs.make_handler("json", file=tmp_path / "agent.log", max_bytes=0, backups=3)
    logger = logging.getLogger("agent_core.test_rotation")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        for i in range(100):
            logger.warning("line %d %s", i, "x" * 100)
    finally:
        logger.removeHandler(handler)
        handler.close()
    assert [p.name for p in tmp_path.iterdir()] == ["agent.log"]
    assert len(parse_lines((tmp_path / "agent.log").read_text())) == 100
