"""`agent-core run` end to end: the real CLI process, the local server and the real engine
(the core of it on Docker and on Podman: `@on_both_engines`)."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import uuid

import pytest

from agent_core.executor import LABEL_SERVICE
from tests.agent_fixtures import agent_cli, wait_until
from tests.docker_fixtures import on_both_engines

pytestmark = pytest.mark.docker

DONE = ("completed", "failed", "cancelled")


def sh(script: str) -> dict:
    """Config for a custom executor that runs `script` with busybox sh."""
    return {"executor.executor_type": "custom", "executor.custom_entrypoint": "/bin/sh",
            "executor.custom_args": ["-c", script]}


def finish(dev_client, task_ids, timeout=120):
    return [dev_client.wait_for_status(t, DONE, timeout=timeout) for t in task_ids]


def containers_of(client, service_id):
    # the low-level listing: the high-level one raises when a container goes while it lists
    return client.api.containers(all=True, filters={"label": f"{LABEL_SERVICE}={service_id}"})


@on_both_engines
def test_outputs_arrive_byte_identical_and_task_json_follows_the_contract(make_agent, dev_client, tmp_path):
    # Given an executor that copies every input to output/ and keeps a copy of task.json
    agent = make_agent(sh("cp /workspace/input/* /workspace/output/ && "
                          "cp /workspace/task.json /workspace/output/seen-task.json && "
                          "mkdir -p /workspace/output/nested && echo deep > /workspace/output/nested/d.txt && "
                          "echo top > /workspace/extra.txt && echo hidden > /workspace/.hidden"))
    tasks = []
    for n in range(3):
        files = [(f"data {n}.bin", os.urandom(200_000 + n)), (f"notes-{n}.txt", f"hello {n}\n".encode())]
        task = dev_client.submit_task(agent.service_id, f"prompt {n}", output_prompt="summarise", files=files)
        tasks.append((task["id"], files))
    # When the agent runs
    agent.start()
    results = finish(dev_client, [t for t, _ in tasks])
    # Then every task completed and every output arrived byte-identical
    assert [r["status"] for r in results] == ["completed"] * 3, results
    for n, ((task_id, files), result) in enumerate(zip(tasks, results)):
        listed = {f["filename"]: f for f in dev_client.list_files(task_id) if f["created_by"] == "agent"}
        dest = tmp_path / "task.json"
        dev_client.download_file(listed["output/seen-task.json"]["id"], dest)
        seen = json.loads(dest.read_text())
        assert seen["task_id"] == task_id
        assert seen["prompt"] == seen["task_prompt"] == f"prompt {n}"
        assert seen["output_prompt"] == "summarise" and seen["session_id"] is None
        local = [f["local_path"] for f in seen["input_files"]]
        assert [p.split("-", 1)[0] for p in local] == ["input/01", "input/02"]
        assert [f["filename"] for f in seen["input_files"]] == [name for name, _ in files]
        copies = [f"output/{p.rsplit('/', 1)[1]}" for p in local]
        # task.json, input/ and hidden files are not outputs
        assert set(listed) == {*copies, "output/seen-task.json", "output/nested/d.txt", "extra.txt"}
        for copy, (_, data) in zip(copies, files):
            dest = tmp_path / "dl"
            dev_client.download_file(listed[copy]["id"], dest)
            assert hashlib.sha256(dest.read_bytes()).digest() == hashlib.sha256(data).digest()
        assert set(result["output"]["files"]) == set(listed)
        assert len(result["output"]["file_ids"]) == len(listed) and "stdout" in result["output"]


@on_both_engines
def test_capacity_is_never_exceeded(make_agent, dev_client, engine_client):
    agent = make_agent({**sh("sleep 2"), "executor.capacity": 2})
    ids = [dev_client.submit_task(agent.service_id, f"t{n}")["id"] for n in range(6)]
    most = 0
    stop = threading.Event()

    def sample():
        nonlocal most
        while not stop.is_set():
            most = max(most, len(containers_of(engine_client, agent.service_id)))
            stop.wait(0.2)

    sampler = threading.Thread(target=sample)
    sampler.start()
    agent.start()
    try:
        results = finish(dev_client, ids)
    finally:
        stop.set()
        sampler.join()
    assert [r["status"] for r in results] == ["completed"] * 6
    assert 1 <= most <= 2


def test_a_queue_drains_at_docker_speed_not_one_task_per_poll(make_agent, dev_client):
    agent = make_agent({**sh("true"), "executor.capacity": 4, "server.poll_interval_secs": 5})
    ids = [dev_client.submit_task(agent.service_id, f"t{n}")["id"] for n in range(20)]
    started = time.monotonic()
    agent.start()
    results = finish(dev_client, ids)
    took = time.monotonic() - started
    print(f"20 tasks at capacity 4 with a 5 s poll interval: {took:.1f} s")
    assert [r["status"] for r in results] == ["completed"] * 20
    assert took < 50, took  # one task per poll interval would need 100 s


@on_both_engines
def test_exit_code_and_timeout_become_failures(make_agent, dev_client, engine_client):
    agent = make_agent({**sh("echo working; if grep -q slow /workspace/task.json; then sleep 60; fi; "
                             "echo boom >&2; exit 3"), "executor.timeout_minutes": 0.05})
    failing = dev_client.submit_task(agent.service_id, "fast")["id"]
    slow = dev_client.submit_task(agent.service_id, "slow")["id"]
    agent.start()
    failed, timed_out = finish(dev_client, [failing, slow])
    assert failed["status"] == "failed"
    assert failed["error_message"].startswith("exit code 3") and "boom" in failed["error_message"]
    assert timed_out["status"] == "failed" and timed_out["error_message"] == "timed out after 3 s"
    wait_until(lambda: not containers_of(engine_client, agent.service_id), 15, "containers to be removed")


def test_a_missing_image_fails_the_task_and_the_daemon_goes_on(make_agent, dev_client, docker_engine, busybox_image):
    # (a missing image at start is refused before any task: tests/test_preflight.py)
    tag = f"agent-core-test/goes-missing:{uuid.uuid4().hex[:8]}"
    docker_engine.images.get(busybox_image).tag(tag)
    agent = make_agent({"executor.image": tag})
    agent.start()
    wait_until(lambda: "running: service" in agent.log(), 60, "the agent to run")
    docker_engine.images.remove(tag)
    first = dev_client.submit_task(agent.service_id, "a")["id"]
    result = dev_client.wait_for_status(first, DONE, timeout=60)
    assert result["status"] == "failed"
    assert tag in result["error_message"]
    second = dev_client.submit_task(agent.service_id, "b")["id"]
    assert dev_client.wait_for_status(second, DONE, timeout=60)["status"] == "failed"
    assert agent.alive()


@on_both_engines
def test_cancel_stops_the_container_and_the_next_task_runs(make_agent, dev_client, engine_client):
    agent = make_agent({**sh("if grep -q long /workspace/task.json; then sleep 60; fi; echo ok"),
                        "executor.capacity": 1})
    long_task = dev_client.submit_task(agent.service_id, "long")["id"]
    agent.start()
    wait_until(lambda: containers_of(engine_client, agent.service_id), 30, "the container to start")
    asked = time.monotonic()
    dev_client.cancel_task(long_task)
    assert dev_client.wait_for_status(long_task, DONE, timeout=30)["status"] == "cancelled"
    wait_until(lambda: not containers_of(engine_client, agent.service_id), 15, "the container to go")
    assert time.monotonic() - asked < 15
    nxt = dev_client.submit_task(agent.service_id, "next")["id"]
    assert dev_client.wait_for_status(nxt, DONE, timeout=60)["status"] == "completed"


@pytest.fixture
def standard_image(docker_engine, busybox_image):
    """An image whose own CMD is the task (the `standard` executor type)."""
    import io

    dockerfile = (f"FROM {busybox_image}\n"
                  "CMD [\"/bin/sh\", \"-c\", \"echo standard > /workspace/output/result.txt\"]\n")
    tag = "agent-core-test/standard:latest"
    docker_engine.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=tag, rm=True, network_mode="none")
    return tag


def _write_probe(script_dir):
    script_dir.mkdir()
    (script_dir / "run.sh").write_text(
        "echo \"bash $BASH_VERSION $TASK_ID $TIMEOUT\" > /workspace/output/result.txt\n"
        "touch /ro/attempt 2>/dev/null && echo writable >> /workspace/output/result.txt || "
        "echo read-only >> /workspace/output/result.txt\n")
    (script_dir / "run.py").write_text(
        "import os, sys\n"
        "open('/workspace/output/result.txt', 'w').write(f\"python {sys.version_info[0]} {os.environ['TASK_ID']}\\n\")\n"
        "try:\n    open('/ro/attempt', 'w')\nexcept OSError:\n"
        "    open('/workspace/output/result.txt', 'a').write('read-only\\n')\n")


@pytest.mark.parametrize("kind", ["standard", "bash", "python", "custom"])
def test_every_executor_type_runs_with_a_read_only_mount(kind, make_agent, dev_client, tmp_path,
                                                         python_image, standard_image):
    scripts = tmp_path / "scripts"
    _write_probe(scripts)
    settings = {"executor.executor_type": kind,
                "paths.mounts": [{"host": str(scripts), "container": "/ro", "readonly": True}]}
    if kind == "standard":
        settings["executor.image"] = standard_image
    elif kind in ("bash", "python"):
        settings |= {"executor.image": python_image, "executor.script_path": f"/ro/run.{'sh' if kind == 'bash' else 'py'}"}
    else:
        settings |= {"executor.custom_entrypoint": "/bin/sh", "executor.custom_args": ["/ro/run.sh"]}
    agent = make_agent(settings)
    task = dev_client.submit_task(agent.service_id, "probe")["id"]
    agent.start()
    result = dev_client.wait_for_status(task, DONE, timeout=90)
    assert result["status"] == "completed", result
    (file,) = [f for f in dev_client.list_files(task) if f["created_by"] == "agent"]
    dest = tmp_path / "result.txt"
    dev_client.download_file(file["id"], dest)
    text = dest.read_text()
    assert not (scripts / "attempt").exists()
    if kind == "standard":
        assert text == "standard\n"
    else:
        assert "read-only" in text and "writable" not in text
        assert text.startswith({"bash": "bash 5", "python": f"python 3 {task}", "custom": "bash "}[kind])


def test_detached_status_stop_round_trip_and_a_second_run_is_refused(make_agent):
    agent = make_agent()
    started = agent_cli("run-detached", config_path=agent.config_path)
    assert started.returncode == 0, started.stderr
    assert "pid" in started.stdout
    status = json.loads(agent_cli("status", "--json", config_path=agent.config_path, check=True).stdout)
    assert status["daemon"]["running"] and status["daemon"]["pid"] > 0
    assert status["service_id"] == agent.service_id and status["registered"] is True
    assert agent.cfg.agent.api_key not in json.dumps(status)
    text = agent_cli("status", config_path=agent.config_path, check=True).stdout
    assert f"pid {status['daemon']['pid']}" in text
    second = agent_cli("run", config_path=agent.config_path, timeout=60)
    assert second.returncode == 1 and "already running" in second.stderr
    assert "Traceback" not in second.stderr
    stopped = agent_cli("stop", config_path=agent.config_path, check=True)
    assert "stopped" in stopped.stdout
    status = json.loads(agent_cli("status", "--json", config_path=agent.config_path, check=True).stdout)
    assert status["daemon"]["running"] is False
    assert not (agent.cfg.paths.data_dir / "agent.pid").exists()
