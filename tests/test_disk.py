"""A full disk under the data dir: tasks fail fast with the reason, nothing stays stuck or full.

The data dir sits on a small tmpfs of the test's own (root is needed to mount it).
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.agent_fixtures import wait_until
from tests.helpers import skip_or_fail_in_ci
from tests.test_reliability import container_status
from tests.test_run import DONE, finish, sh

pytestmark = pytest.mark.docker

TMPFS_MB = 24
MiB = 1024 * 1024


@pytest.fixture
def small_disk(tmp_path):
    if os.geteuid() != 0:
        skip_or_fail_in_ci("mounting a tmpfs needs root")
    where = tmp_path / "small-disk"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_MB}m,mode=0755", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def small_disk_agent(make_agent, small_disk, script="echo ok > /workspace/output/ok.txt"):
    return make_agent({**sh(script), "paths.data_dir": str(small_disk / "data"), "paths.min_free_disk_mb": 0})


def input_bytes(agent) -> int:
    inputs = agent.cfg.paths.data_dir / "workspaces"
    return sum(p.stat().st_size for p in inputs.rglob("*") if p.is_file()) if inputs.exists() else 0


def test_inputs_that_do_not_fit_fail_at_once_and_a_lying_size_fails_mid_download(make_agent, small_disk,
                                                                                dev_server, dev_client):
    agent = small_disk_agent(make_agent, small_disk)
    big = os.urandom(40 * MiB)  # under the server's 50 MiB file limit, over the disk
    # Given a task whose inputs declare more than the disk has
    honest = dev_client.submit_task(agent.service_id, "honest", files=[("big.bin", big)])["id"]
    agent.start()
    started = time.monotonic()
    (result,) = finish(dev_client, [honest], timeout=30)
    # Then it fails within seconds, saying why, before a byte is downloaded
    assert result["status"] == "failed" and "MiB free" in result["error_message"], result
    assert "inputs need" in result["error_message"]
    assert time.monotonic() - started < 15
    assert not dev_server.calls_to("/download")
    # Given a task whose input lies about its size: the disk fills during the download
    (stored,) = dev_client.list_files(honest)
    liar = dev_server.faults.offer_raw_task(agent.service_id, {
        "id": "liar", "task_prompt": "liar",
        "input_files": [{"id": stored["id"], "filename": "big.bin", "mime_type": None, "size_bytes": 10}]})
    result = wait_until(lambda: (t := dev_server.get_task(liar))["status"] in DONE and t, 60, "the liar to end")
    # Then it fails on the server with the reason, and its partial file is gone
    assert result["status"] == "failed" and "space" in result["error_message"].lower(), result
    wait_until(lambda: input_bytes(agent) == 0, 15, "the partial input to be removed")
    # and the next small task completes
    small = dev_client.submit_task(agent.service_id, "small")["id"]
    assert finish(dev_client, [small], timeout=60)[0]["status"] == "completed"
    assert agent.alive()


def test_a_journal_that_cannot_be_written_still_reports_and_pauses_intake(make_agent, small_disk, dev_client,
                                                                          docker_engine):
    agent = small_disk_agent(make_agent, small_disk, "sleep 3")
    task = dev_client.submit_task(agent.service_id, "fills")["id"]
    agent.start()
    wait_until(lambda: container_status(docker_engine, task) == "running", 60, "the container to run")
    # When the disk fills up while the task runs
    filler = Path(small_disk) / "filler"
    subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=1M", f"count={TMPFS_MB}"], capture_output=True)
    # Then the task is still reported, and the log says the journal could not be written
    (result,) = finish(dev_client, [task], timeout=60)
    assert result["status"] == "completed", result
    wait_until(lambda: "cannot write the journal record" in agent.log(), 10, "the journal error in the log")
    # and no task is taken while the disk is full
    waiting = dev_client.submit_task(agent.service_id, "waits")["id"]
    time.sleep(3)
    assert dev_client.get_task(waiting)["status"] == "pending"
    # until space is back
    filler.unlink()
    assert finish(dev_client, [waiting], timeout=60)[0]["status"] == "completed"
    assert agent.alive()
