"""`run` on a terminal, as the reference agent behaves: the first start's questions, the token prompt, and
what happens without a terminal. The terminal is a pseudo-terminal, the process's controlling one."""

from __future__ import annotations

import os
import pty
import select
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from agent_core import config, process
from agent_core.lifecycle import Step
from tests.agent_fixtures import agent_cli, wait_until
from tests.test_cli import make_config, one_line, registered_config

pytestmark = pytest.mark.timeout(120)

# Make the pty the controlling terminal (getpass and Ctrl+C need one), then become agent-core.
_AS_LOGIN_TTY = ("import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
                 "os.execv(sys.executable, [sys.executable, '-m', 'agent_core', *sys.argv[1:]])")


class Terminal:
    """One `agent-core` process on a pseudo-terminal: type into it, read what it shows."""

    def __init__(self, *args: str, cwd: Path, env: dict[str, str] | None = None):
        master, slave = pty.openpty()
        self.master = master
        self.transcript = ""
        self.proc = subprocess.Popen([sys.executable, "-c", _AS_LOGIN_TTY, *args], cwd=cwd,
                                     stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                                     env={**os.environ, **(env or {})})
        os.close(slave)

    def _read(self, timeout: float) -> bool:
        """Read what is there within `timeout`; False once the process has closed the terminal."""
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return True
        try:
            data = os.read(self.master, 4096)
        except OSError:  # EIO: every end of the terminal's other side is closed
            return False
        self.transcript += data.decode(errors="replace")
        return bool(data)

    def expect(self, text: str, timeout: float = 30) -> None:
        wait_until(lambda: text in self.transcript or not self._read(0.2) and text in self.transcript,
                   timeout, f"{text!r} on the terminal; it shows:\n{self.transcript}")

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def wait(self, timeout: float = 60) -> int:
        """The exit code, once the process has left; the transcript then holds everything it printed."""
        try:
            code = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        while self._read(1):
            pass
        os.close(self.master)
        return code


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    monkeypatch.delenv("AGENT_CORE_REGISTRATION_TOKEN", raising=False)
    monkeypatch.delenv("AGENT_CORE_CONFIG", raising=False)


NO_DOCKER = {"DOCKER_HOST": "unix:///nonexistent.sock"}  # `run` stops right after the part under test


# --------------------------------------------------------------------------- the first start


@pytest.mark.docker
def test_first_start_asks_writes_the_file_registers_and_runs(tmp_path, dev_server, dev_client, busybox_image,
                                                             docker_cleanup):
    # Given no config file in the current folder, a service with a token and one task waiting
    svc = dev_client.create_service("svc-first")
    docker_cleanup.track_service(svc["id"])
    task_id = dev_client.submit_task(svc["id"], "p")["id"]
    term = Terminal("run", "--burst", cwd=tmp_path)
    # When the operator answers the questions (a wrong URL and capacity are asked again)
    term.expect("server URL [http://127.0.0.1:8080]:")
    term.type("ftp://nowhere\r")
    term.expect("scheme must be http or https")
    term.type(f"{dev_server.url}/\r")
    term.expect("data dir [./data]:")
    term.type("\r")
    term.expect("executor image [open-aaas-executor:latest]:")
    term.type(f"{busybox_image}\r")
    term.expect("capacity (tasks at once) [2]:")
    term.type("0\r")
    term.expect("0 is not in the range x>=1")
    path = tmp_path / "config.toml"
    assert not path.exists()  # nothing is written before the last answer
    term.type("1\r")
    term.expect("registration token:")
    # Then the file is written, commented as `init` writes it, and private
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sum(line.lstrip().startswith("#") for line in path.read_text().splitlines()) > 20
    cfg = config.load(path)
    assert (cfg.server.base_url, cfg.paths.data_dir, cfg.executor.image, cfg.executor.capacity) == (
        dev_server.url, tmp_path / "data", busybox_image, 1)
    # And the token, typed unseen, registers the agent, which goes on to run the waiting task
    term.type(svc["registration_token"] + "\r")
    assert term.wait(120) == 0, term.transcript
    assert svc["registration_token"] not in term.transcript
    assert f"registered: service id {svc['id']}" in term.transcript
    cfg = config.load(path)
    assert cfg.agent.service_id == svc["id"] and cfg.agent.registered
    assert dev_client.get_task(task_id)["status"] == "completed"
    assert "Traceback" not in term.transcript


@pytest.mark.parametrize("key, name", [("\x04", "EOF"), ("\x03", "Ctrl+C")])
@pytest.mark.parametrize("answers", [0, 3])  # at the first question, and at the last
def test_eof_or_ctrl_c_at_a_question_leaves_no_file(tmp_path, key, name, answers):
    term = Terminal("run", cwd=tmp_path, env=NO_DOCKER)
    for question in ("server URL", "data dir", "executor image")[:answers]:
        term.expect(question)
        term.type("\r")
    term.expect("capacity" if answers == 3 else "server URL")
    term.type(key)
    code = term.wait()
    assert code == 1, f"{name}: {term.transcript}"
    assert "Aborted" in term.transcript and "Traceback" not in term.transcript
    assert list(tmp_path.iterdir()) == []  # no config, no temp file


# --------------------------------------------------------------------------- registration on a terminal


def test_run_interactive_on_an_unregistered_config_asks_for_the_token(tmp_path, dev_server, dev_client):
    path = make_config(tmp_path, base_url=dev_server.url)
    svc = dev_client.create_service("svc-i")
    term = Terminal("--config", str(path), "run", "--interactive", cwd=tmp_path, env=NO_DOCKER)
    term.expect("registration token:")
    term.type(svc["registration_token"] + "\r")
    code = term.wait()
    # it registered, then went on to start (and stopped at the missing engine, as it should)
    assert f"registered: service id {svc['id']}" in term.transcript
    assert "Docker" in term.transcript and code == 1
    assert svc["registration_token"] not in term.transcript
    assert config.load(path).agent.service_id == svc["id"]
    assert "server URL" not in term.transcript  # the file existed: no first-start questions


def test_a_complete_registered_config_starts_without_questions(tmp_path):
    path = registered_config(tmp_path)
    term = Terminal("--config", str(path), "run", cwd=tmp_path, env=NO_DOCKER)
    assert term.wait() == 1
    assert "Docker" in term.transcript
    assert "token" not in term.transcript and "server URL" not in term.transcript


def test_run_detached_never_asks(tmp_path):
    path = make_config(tmp_path)
    term = Terminal("--config", str(path), "run-detached", cwd=tmp_path)
    assert term.wait() == 2
    assert "agent-core register --token <TOKEN>" in term.transcript and "token:" not in term.transcript


# --------------------------------------------------------------------------- without a terminal


# (an unregistered `run` without one: test_cli.py::test_run_unregistered_is_a_usage_error)


def test_run_interactive_without_a_terminal_is_a_usage_error(tmp_path):
    path = registered_config(tmp_path)
    proc = agent_cli("run", "--interactive", config_path=path)
    assert proc.returncode == 2
    assert "needs a terminal" in one_line(proc.stderr)


def test_without_a_terminal_a_missing_config_asks_nothing(tmp_path):
    proc = agent_cli("run", config_path=tmp_path / "config.toml")
    assert proc.returncode == 2
    assert "agent-core init" in one_line(proc.stderr)
    assert not (tmp_path / "config.toml").exists()


# --------------------------------------------------------------------------- SIGPIPE


SIGPIPE_BIT = 1 << (signal.SIGPIPE - 1)


def ignored_signals(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return int(line.split()[1], 16)
    raise AssertionError("no SigIgn line")


@pytest.mark.docker
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_run_ignores_sigpipe_so_a_closed_upload_is_an_error_not_a_death(make_agent):
    agent = make_agent()
    proc = agent.start()
    wait_until(lambda: getattr(process.read_status(agent.cfg.paths.data_dir), "state", None) is Step.RUNNING, 60,
               "the agent to run")
    assert ignored_signals(proc.pid) & SIGPIPE_BIT
    assert agent.stop() == 0
