"""A registered agent against the local server, run as a real `agent-core` process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agent_core import config
from tests.helpers import wait_until  # noqa: F401  (the tests import it from here)

REPO = Path(__file__).resolve().parent.parent


def agent_cli(*args: str, config_path: Path | None = None, check: bool = False, timeout: float = 120,
              input: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "agent_core"]
    if config_path is not None:
        cmd += ["--config", str(config_path)]
    proc = subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=timeout,
                          input=input, stdin=None if input is not None else subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"agent-core {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
    return proc


class Agent:
    """One agent-core configuration, registered with the local server, and its `run` process."""

    def __init__(self, root: Path, server_url: str, dev_client: Any, settings: dict[str, Any]):
        self.root = root
        self.config_path = root / "config.toml"
        config.init(self.config_path, base_url=server_url)
        service = dev_client.create_service(f"svc-{root.name}")
        self.service_id = service["id"]
        self.token = service["registration_token"]  # for tests that check it never leaks
        config.update(self.config_path, {"paths.data_dir": str(root / "data"), **settings})
        agent_cli("register", "--token", service["registration_token"], config_path=self.config_path,
                  check=True)
        self.cfg = config.load(self.config_path)
        self.log_path = root / "agent-run.log"
        self.proc: subprocess.Popen | None = None

    def start(self, *args: str, user: str | None = None, python: str = sys.executable,
              env: dict[str, str] | None = None) -> subprocess.Popen:
        """`run` in the background; `user` runs it as that user, in the docker group."""
        log = open(self.log_path, "ab")
        as_user: dict[str, Any] = {"env": {**os.environ, **(env or {})}}
        if user is not None:
            as_user.update(user=user, group=user, extra_groups=["docker"])
            as_user["env"]["HOME"] = str(self.root)
        self.proc = subprocess.Popen(
            [python, "-m", "agent_core", "--config", str(self.config_path), "run", "--log-level",
             "debug", *args], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **as_user)
        log.close()
        return self.proc

    def signal(self, signum: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 120) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


@pytest.fixture
def make_agent(tmp_path, dev_server, dev_client, busybox_image, engine_settings, engine_cleanup):
    """make_agent({"executor.capacity": 4, ...}) -> a registered Agent (dotted config keys), on the
    test's `engine` (Docker unless the test is `@on_both_engines`)."""
    agents: list[Agent] = []

    def make(settings: dict[str, Any] | None = None) -> Agent:
        defaults = {
            "server.poll_interval_secs": 0.5,
            "executor.image": busybox_image,
            "executor.network_mode": "none",
            "executor.capacity": 2,
            "agent.heartbeat_interval_secs": 5,
            "agent.shutdown_grace_secs": 30,
            "paths.min_free_disk_mb": 0,
            **engine_settings,
        }
        defaults.update(settings or {})
        root = tmp_path / f"agent{len(agents)}"
        root.mkdir()
        agent = Agent(root, dev_server.url, dev_client, defaults)
        engine_cleanup.track_service(agent.service_id)
        agents.append(agent)
        return agent

    yield make
    for agent in agents:
        if agent.alive() and agent.stop() != 0:
            print(agent.log()[-5000:])  # pytest shows it when the test failed
