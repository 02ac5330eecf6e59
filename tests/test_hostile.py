"""Nothing leaked: hostile containers and a hostile server (issue 4).

A container may leave links, FIFOs, devices, floods of files or output; a server may
send ids and names made to escape, lie about sizes, never end a download, or answer
with garbage. The host's files never reach the server, nothing is written outside
the data dir, what was skipped is said in the task's output, and the daemon goes on.
"""

from __future__ import annotations

import json
import re
import secrets
from pathlib import Path

import pytest

from agent_core.config import ExecutorConfig
from agent_core.runner import STDOUT_IN_OUTPUT
from tests.agent_fixtures import wait_until
from tests.docker_fixtures import on_both_engines
from tests.test_reliability import agent_files, calls_for, read_output
from tests.test_run import DONE, finish, sh

pytestmark = pytest.mark.docker

SERVER_MAX_FILE_BYTES = 1024 * 1024


@pytest.fixture
def dev_server(make_dev_server):
    """A server with a 1 MiB upload limit, so "larger than the server takes" is cheap to make."""
    return make_dev_server(max_file_bytes=SERVER_MAX_FILE_BYTES)


def skipped_reasons(result: dict) -> dict[str, str]:
    return {s["path"]: s["reason"] for s in (result["output"] or {}).get("skipped", [])}


def wait_done(dev_server, key: str, timeout: float = 60) -> dict:
    """A task by its raw server key (ids no URL can carry), once it is finished."""
    return wait_until(lambda: (t := dev_server.get_task(key))["status"] in DONE and t, timeout,
                      f"task {key[:40]!r} to finish")


def names_outside_data_dirs(root, *needles: str) -> list[str]:
    """Paths under `root` whose name holds one of `needles`: where an escape would have landed."""
    return [str(p) for p in root.rglob("*") if any(n in p.name for n in needles)]


@on_both_engines
def test_links_fifos_and_devices_never_carry_host_files_to_the_server(make_agent, dev_server, dev_client,
                                                                      tmp_path):
    # Given a host file with a secret, and a task that points every kind of special file at it,
    # at the host's /etc, at / and at the agent's own config (which holds the api_key)
    host_secret = tmp_path / "host-secret.txt"
    host_secret.write_text(f"host secret {secrets.token_hex(16)}\n")
    agent = make_agent({
        **sh(f"cd /workspace/output && ln -s {host_secret} secret && ln -s /etc/passwd passwd && "
             "ln -s /etc/hostname leak && ln -s / root && ln -s loop-b loop-a && ln -s loop-a loop-b && "
             "ln -s ../../../../config.toml config && mkdir dir && ln -s /etc dir/etc && "
             f"ln -s {host_secret.parent} /workspace/up && mkfifo fifo && "
             "mknod null c 1 3 && echo fine > ok.txt"),
        # MKNOD, so the task can make a device node in its workspace
        "executor.cap_add": [*ExecutorConfig().cap_add, "MKNOD"],
    })
    task = dev_client.submit_task(agent.service_id, "links")["id"]
    agent.start()
    result = dev_client.wait_for_status(task, DONE, timeout=60)
    # Then only the one regular file went up
    assert result["status"] == "completed", result
    assert {name: read_output(dev_client, task, name, tmp_path / "dl") for name in agent_files(dev_client, task)} \
        == {"output/ok.txt": b"fine\n"}
    # and every special file is listed as skipped, with why
    reasons = skipped_reasons(result)
    for link in ("secret", "passwd", "leak", "root", "loop-a", "loop-b", "config", "dir/etc"):
        assert "symbolic link" in reasons[f"output/{link}"], reasons
    assert "symbolic link" in reasons["up"]
    assert "FIFO" in reasons["output/fifo"]
    assert "device" in reasons["output/null"]
    # and no byte of a host file or the api_key reached the server, in a file or a report
    host_texts = [host_secret.read_bytes(), Path("/etc/passwd").read_bytes(), agent.cfg.agent.api_key.encode()]
    for stored in (dev_server.data_dir / "files").iterdir():
        assert not any(text in stored.read_bytes() for text in host_texts)
    for call in calls_for(dev_server, "/complete", task):
        assert host_secret.read_text().strip() not in json.dumps(call.body)


HARDENING_PROBE = (
    "{ grep -E '^(NoNewPrivs|CapEff)' /proc/self/status; echo \"uid: $(id -u)\"; "
    "echo \"pids: $(cat /sys/fs/cgroup/pids.max 2>/dev/null || cat /sys/fs/cgroup/pids/pids.max)\"; "
    "echo \"cpu: $(cat /sys/fs/cgroup/cpu.max 2>/dev/null || cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us)\"; "
    "echo \"net: $(ls /sys/class/net | tr '\\n' ' ')\"; "
    "touch /probe 2>/dev/null && echo 'root: rw' || echo 'root: ro'; "
    "touch /tmp/probe && echo 'tmp: rw' || echo 'tmp: ro'; } > /workspace/output/probe.txt")


@on_both_engines
def test_containers_run_hardened_as_configured(make_agent, dev_client, tmp_path):
    agent = make_agent({**sh(HARDENING_PROBE), "executor.user": "1234:1234", "executor.read_only": True,
                        "executor.pids_limit": 64, "executor.cpus": 0.5, "executor.network_mode": "none"})
    task = dev_client.submit_task(agent.service_id, "probe")["id"]
    agent.start()
    assert dev_client.wait_for_status(task, DONE, timeout=60)["status"] == "completed"
    text = read_output(dev_client, task, "output/probe.txt", tmp_path / "p").decode()
    probe = dict(line.split(":", 1) for line in text.splitlines())
    probe = {k: v.strip() for k, v in probe.items()}
    assert probe["NoNewPrivs"] == "1"
    assert int(probe["CapEff"], 16) == 0  # a non-root user keeps no capability
    assert probe["uid"] == "1234"
    assert probe["pids"] == "64"
    assert probe["cpu"].split()[0] == "50000"  # 0.5 of a 100 ms period
    assert probe["net"] == "lo"
    assert (probe["root"], probe["tmp"]) == ("ro", "rw")


HOSTILE_IDS = ["x" * 4096, "../../escape-id", "a/b-escape-id", "..", "nul\0escape-id", ".hidden-escape-id",
               "-escape-id", "escape id", "\u202eescape-id"]
HOSTILE_NAMES = ["../../evil-name", "a/b/evil-name", "nul\0evil-name", "..", ".hidden", "/etc/passwd",
                 "C:\\win\\evil-name.txt", "new\nline", "x" * 4000 + ".txt", ""]


def test_hostile_task_ids_are_refused_and_hostile_names_land_inside_input(make_agent, dev_server, dev_client,
                                                                         tmp_path):
    # Given a server that offers tasks with ids made to escape, and one with input names made to escape
    agent = make_agent(sh("cp -r /workspace/input /workspace/output/in && "
                          "cp /workspace/task.json /workspace/output/seen-task.json"))
    refused = [dev_server.faults.offer_raw_task(agent.service_id, {"id": i, "task_prompt": "p"})
               for i in HOSTILE_IDS]
    malformed = dev_server.faults.offer_raw_task(agent.service_id, {"id": "malformed", "task_prompt": "p",
                                                                   "input_files": "not a list"})
    contents = {f"in-{n}": f"content {n}\n".encode() for n in range(len(HOSTILE_NAMES))}
    named = dev_server.faults.offer_raw_task(agent.service_id, {
        "id": "hostile-names", "task_prompt": "names",
        "input_files": [{"id": f"in-{n}", "filename": name, "mime_type": None, "size_bytes": 3}
                        for n, name in enumerate(HOSTILE_NAMES)]}, files=contents)
    agent.start()
    # Then each bad id is refused: the task failed with the reason, the daemon went on
    for key in refused:
        task = wait_done(dev_server, key)
        assert task["status"] == "failed" and task["error_message"].startswith("task id refused"), task
        assert len(task["error_message"]) < 300
    task = wait_done(dev_server, malformed)  # a task we cannot parse leaves the queue with the reason
    assert task["status"] == "failed" and "input_files" in task["error_message"], task
    # and every input landed inside input/ under a sanitised name, numbered in server order
    result = wait_done(dev_server, named)
    assert result["status"] == "completed", result
    seen = json.loads(read_output(dev_client, named, "output/seen-task.json", tmp_path / "t"))
    assert [f["filename"] for f in seen["input_files"]] == HOSTILE_NAMES  # originals are kept as data
    local = [f["local_path"] for f in seen["input_files"]]
    for n, path in enumerate(local, start=1):
        assert re.fullmatch(rf"input/{n:02d}-[^/\x00-\x1f]+", path) and ".." not in path, path
        assert len(path.encode()) < 200
    for n, path in enumerate(local):
        assert read_output(dev_client, named, "output/in/" + path.split("/", 1)[1], tmp_path / "i") == \
            contents[f"in-{n}"]
    # and nothing was written outside the data dir (nor inside it, for a refused task)
    workspaces = agent.cfg.paths.data_dir / "workspaces"
    wait_until(lambda: not any(workspaces.iterdir()), 15, "the workspace to be removed")
    assert names_outside_data_dirs(tmp_path, "escape-id", "evil-name") == []
    assert names_outside_data_dirs(agent.cfg.paths.data_dir, "x" * 100) == []
    assert "Traceback" not in agent.log()
    assert agent.alive()


def test_floods_are_capped_and_the_daemon_stays_healthy(make_agent, dev_server, dev_client, tmp_path):
    # Given tasks that write 100,000 files, flood stdout, and write a file the server will refuse
    agent = make_agent({
        **sh("cd /workspace/output; "
             "if grep -q many /workspace/task.json; then seq 100000 | xargs touch; "
             "elif grep -q flood /workspace/task.json; then yes 'flood line' | head -c 30000000; "
             "echo LAST; exit 1; "
             f"elif grep -q big /workspace/task.json; then head -c {2 * SERVER_MAX_FILE_BYTES} /dev/zero > big.bin; "
             "echo small > small.txt; "
             "else echo calm > calm.txt; fi"),
        "executor.capacity": 3,
        "limits.max_output_files": 50,
        "limits.log_max_bytes": "256k",
        "paths.keep_workspaces": "failed",
    })
    many, flood, big = (dev_client.submit_task(agent.service_id, p)["id"] for p in ("many", "flood", "big"))
    agent.start()
    many_r, flood_r, big_r = finish(dev_client, [many, flood, big], timeout=180)
    # Then the 100,000 files were capped at max_output_files, the rest counted as skipped
    assert many_r["status"] == "completed", many_r
    assert len(agent_files(dev_client, many)) == len(many_r["output"]["files"]) == 50
    assert many_r["output"]["skipped_count"] == 100_000 - 50
    assert len(many_r["output"]["skipped"]) <= 101
    # and the flood's log was capped on disk and in the report
    assert flood_r["status"] == "failed" and flood_r["error_message"].startswith("exit code 1"), flood_r
    assert flood_r["error_message"].endswith("LAST") and len(flood_r["error_message"]) < 2100
    assert len(flood_r["output"]["stdout"]) <= STDOUT_IN_OUTPUT
    stdout_log = agent.cfg.paths.data_dir / "tasks" / flood / "stdout.log"
    assert stdout_log.stat().st_size <= 256 * 1024 and stdout_log.read_bytes().endswith(b"LAST\n")
    # and the file over the server's limit failed the task, naming it; the rest was uploaded
    assert big_r["status"] == "failed", big_r
    assert "output/big.bin" in big_r["error_message"] and str(2 * SERVER_MAX_FILE_BYTES) in big_r["error_message"]
    assert list(agent_files(dev_client, big)) == ["output/small.txt"]
    assert "refused by the server" in skipped_reasons(big_r)["output/big.bin"]
    # and the daemon is healthy: the next task runs, and the finished workspaces are gone
    calm = dev_client.submit_task(agent.service_id, "calm")["id"]
    assert dev_client.wait_for_status(calm, DONE, timeout=60)["status"] == "completed"
    assert agent.alive()
    workspaces = agent.cfg.paths.data_dir / "workspaces"
    wait_until(lambda: sorted(p.name for p in workspaces.iterdir()) == sorted([flood, big]), 30,
               "only the failed tasks' workspaces to be kept")


def test_a_hostile_server_fails_tasks_with_reasons_and_the_daemon_goes_on(make_agent, dev_server, dev_client,
                                                                         tmp_path):
    # Given tasks with a download that never ends, a size over the limit, and a size that lies
    runs = tmp_path / "runs"
    runs.mkdir()
    agent = make_agent({
        **sh("echo run >> /runs/$TASK_ID; cat /workspace/input/* > /workspace/output/got.txt 2>/dev/null || true"),
        "limits.max_input_bytes": "1m",
        "executor.capacity": 1,
        "paths.mounts": [{"host": str(runs), "container": "/runs", "readonly": False}],
    })
    offer = dev_server.faults.offer_raw_task
    dev_server.faults.endless_download("endless-file")
    endless = offer(agent.service_id, {"id": "endless", "input_files": [
        {"id": "endless-file", "filename": "e.bin", "size_bytes": 10}]})
    huge = offer(agent.service_id, {"id": "huge", "input_files": [
        {"id": "huge-file", "filename": "h.bin", "size_bytes": 10 ** 13}]})
    lying = offer(agent.service_id, {"id": "lying", "input_files": [
        {"id": "lying-file", "filename": "l.txt", "size_bytes": 2}]}, files={"lying-file": b"longer than said\n"})
    # and replies that are not JSON, or not there at all
    dev_server.faults.garbage_next(2, path_contains="/poll")
    dev_server.faults.garbage_next(1, path_contains="/accept")
    dev_server.faults.drop_next(1, path_contains="/complete")
    agent.start()
    # Then each bad task failed with its reason, the honest part of the lying one was used
    endless_r = wait_done(dev_server, endless)
    assert endless_r["status"] == "failed" and "limits.max_input_bytes" in endless_r["error_message"], endless_r
    huge_r = wait_done(dev_server, huge)
    assert huge_r["status"] == "failed" and "declares 10000000000000 bytes" in huge_r["error_message"], huge_r
    lying_r = wait_done(dev_server, lying)
    assert lying_r["status"] == "completed", lying_r
    assert read_output(dev_client, lying, "output/got.txt", tmp_path / "g") == b"longer than said\n"
    # and nothing ran twice, though an accept and a complete had no usable answer
    assert sorted(p.name for p in runs.iterdir()) == ["lying"]
    assert (runs / "lying").read_text() == "run\n"
    assert len(calls_for(dev_server, "/complete", lying, status=200)) == 1
    assert "not JSON" in agent.log()
    # and the daemon goes on
    nxt = dev_client.submit_task(agent.service_id, "after")["id"]
    assert dev_client.wait_for_status(nxt, DONE, timeout=60)["status"] == "completed"
    assert agent.alive()
