"""`executor.workspace = "copy"` end to end: the workspace goes in and out through the engine's API.

Each test runs the real `agent-core run` process against the local server and a real engine,
like tests/test_run.py; the task container has no bind mount of the data dir at all.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from tests.docker_fixtures import on_both_engines
from tests.test_reliability import GiB, MiB, RssSampler, agent_files, container_status
from tests.test_run import DONE, finish, sh
from tests.agent_fixtures import wait_until

pytestmark = pytest.mark.docker

COPY = {"executor.workspace": "copy"}


@pytest.fixture
def dev_server(make_dev_server):
    return make_dev_server(max_file_bytes=GiB + MiB)  # room for the 1 GiB output


def _entries(root: Path) -> dict[str, int]:
    """Every entry under `root` (never following a link) with its file type."""
    found = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(dirpath, name)
            found[str(path.relative_to(root))] = stat.S_IFMT(os.lstat(path).st_mode)
    return found


@on_both_engines
def test_inputs_go_in_and_outputs_come_back_byte_identical(make_agent, dev_client, engine_client, tmp_path):
    # Given an executor that copies every input to output/ and writes a tree of its own,
    # with a read-only root filesystem
    agent = make_agent({**COPY, **sh(
        "grep ' /workspace ' /proc/self/mountinfo > /workspace/output/mount.txt && "
        "cp /workspace/input/* /workspace/output/ && cp /workspace/task.json /workspace/output/seen-task.json && "
        "mkdir -p /workspace/output/nested && echo deep > /workspace/output/nested/d.txt && "
        "echo top > /workspace/extra.txt && echo hidden > /workspace/.hidden"),
        "executor.read_only": True})
    files = [("data.bin", os.urandom(3 * MiB + 1)), ("notes.txt", b"hello\n")]
    task_id = dev_client.submit_task(agent.service_id, "copy me", files=files)["id"]
    # When the agent runs it
    agent.start()
    (result,) = finish(dev_client, [task_id])
    # Then the outputs are the inputs, byte for byte, as in bind mode
    assert result["status"] == "completed", result
    listed = agent_files(dev_client, task_id)
    assert set(listed) == {"output/01-data.bin", "output/02-notes.txt", "output/seen-task.json",
                           "output/nested/d.txt", "output/mount.txt", "extra.txt"}
    for name, data in files:
        (rel,) = [r for r in listed if r.endswith(name)]
        dest = tmp_path / "dl"
        dev_client.download_file(listed[rel]["id"], dest)
        assert hashlib.sha256(dest.read_bytes()).digest() == hashlib.sha256(data).digest()
    assert result["output"].get("skipped_count", 0) == 0
    # and the container, removed after the copy-out, had no bind of the data dir: /workspace was its own
    dest = tmp_path / "mount.txt"
    dev_client.download_file(listed["output/mount.txt"]["id"], dest)
    mount = dest.read_text()
    assert mount and task_id not in mount and str(agent.cfg.paths.data_dir) not in mount, mount
    assert not engine_client.api.containers(all=True, filters={"label": f"agent-core.task_id={task_id}"})


def test_a_1_gib_output_comes_back_with_flat_memory(make_agent, dev_client, docker_engine):
    agent = make_agent({**COPY, **sh("sleep 2; dd if=/dev/zero of=/workspace/output/big.bin bs=1M count=1024 "
                                     "2>/dev/null"),
                        "limits.max_output_file_bytes": "2g", "limits.max_output_bytes": "2g"})
    task_id = dev_client.submit_task(agent.service_id, "big")["id"]
    agent.start()
    wait_until(lambda: container_status(docker_engine, task_id) == "running", 60, "the task to run")
    sampler = RssSampler(agent.proc.pid)
    try:
        wait_until(lambda: sampler.mark() >= 10, 10, "a baseline of memory samples")
        baseline = max(sampler.samples)
        result = dev_client.wait_for_status(task_id, DONE, timeout=240)
        peak = max(sampler.samples)
    finally:
        sampler.stop()
    assert result["status"] == "completed", result
    (uploaded,) = agent_files(dev_client, task_id).values()
    assert uploaded["size_bytes"] == GiB
    growth = (peak - baseline) / MiB
    print(f"agent RSS: baseline {baseline / MiB:.1f} MiB, peak {peak / MiB:.1f} MiB during the 1 GiB "
          f"copy-out and upload (+{growth:.1f} MiB)")
    assert growth < 64, f"RSS grew by {growth:.1f} MiB"


HOSTILE = (
    "cd /workspace/output && echo real > real && echo inside > /workspace/secret-target && "
    "ln -s /etc/passwd link && ln -s ../../../../.. up && ln -s /workspace/secret-target inlink && "
    # a hard link to a file outside /workspace cannot be made (another filesystem: the volume); one
    # inside comes back as a link entry of the archive
    "{ ln /etc/passwd hard-outside 2>/dev/null || echo 'no cross-device hard link' >&2; } && "
    "ln real hard && mkfifo fifo && mknod null c 1 3 && mknod disk b 7 0 && "
    "echo dots > '..dots' && echo dots > 'a..b' && mkdir linkdir && ln -s / linkdir/root && "
    "ls -la /workspace/output"
)


@on_both_engines
def test_links_fifos_devices_and_dot_names_never_leave_the_container(make_agent, dev_client, tmp_path):
    # Given a root container (MKNOD added for the device nodes) that leaves everything hostile in /workspace
    agent = make_agent({**COPY, **sh(HOSTILE), "executor.cap_add": ["MKNOD"],
                        "paths.keep_workspaces": "all"})
    task_id = dev_client.submit_task(agent.service_id, "hostile")["id"]
    before = {p: os.lstat(p).st_mtime for p in ("/etc/passwd", "/")}
    # When the agent copies /workspace out
    agent.start()
    (result,) = finish(dev_client, [task_id])
    # Then the plain files are outputs and every other entry is listed as skipped, with the scan's reasons
    assert result["status"] == "completed", result
    skipped = {s["path"]: s["reason"] for s in result["output"]["skipped"]}
    hard_links = {p: skipped.pop(p) for p in ("output/hard", "output/real") if p in skipped}
    assert skipped == {
        "output/link": "symbolic link (never followed)",
        "output/up": "symbolic link (never followed)",
        "output/inlink": "symbolic link (never followed)",
        "output/linkdir/root": "symbolic link (never followed)",
        "output/fifo": "named pipe (FIFO)",
        "output/null": "device file",
        "output/disk": "device file",
    }, result["output"]
    # of the two names of one file, the archive's first is the file and the other a link entry
    (linked,) = [p for p in ("output/hard", "output/real") if hard_links.get(p) == "hard link (never followed)"]
    outputs = set(agent_files(dev_client, task_id))
    assert outputs == {"output/hard", "output/real", "output/a..b", "secret-target"} - {linked}
    # and nothing but regular files and directories was written, only in the task's workspace
    data = agent.cfg.paths.data_dir
    ws = data / "workspaces" / task_id
    kinds = _entries(ws)
    assert set(kinds.values()) <= {stat.S_IFREG, stat.S_IFDIR}, kinds
    assert "output/..dots" not in kinds  # hidden: never an output, as in a scan
    outside = {p for p, k in _entries(data).items() if not p.startswith(f"workspaces/{task_id}")
               and k != stat.S_IFDIR}
    assert not any("real" in p or "passwd" in p or "dots" in p for p in outside), outside
    assert before == {p: os.lstat(p).st_mtime for p in before}
