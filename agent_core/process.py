"""The daemon as an OS process: pidfile, live status file, detach, stop with escalation.

One daemon per data dir. The pidfile is also an flock: the kernel drops the
lock when the process dies, even by SIGKILL, so "is the lock held" tells
liveness without trusting a pid that may have been reused.

Windows differs in three places, kept together in "the OS differences" below: the lock
(msvcrt), the detach (process creation flags) and the stop signal (CTRL_BREAK_EVENT, else
terminate).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import psutil

from agent_core.errors import AlreadyRunning, NotRunning, ProcessError
from agent_core.fsutil import write_atomic

log = logging.getLogger(__name__)

PIDFILE = "agent.pid"
LOGFILE = "agent.log"
STATUSFILE = "status.json"

# --- the OS differences (the Windows half cannot be tested on Linux: keep it this small) ---

if os.name == "nt":  # pragma: no cover
    import msvcrt

    _LOCK_OFFSET = 1 << 20  # a byte past the pid text: msvcrt locks block reads of the locked range
    # no console to lose, and a process group of its own for CTRL_BREAK_EVENT
    _DETACH: dict[str, Any] = {
        "creationflags": subprocess.DETACHED_PROCESS | subprocess.CREATE_NEW_PROCESS_GROUP}

    def _try_lock(fd: int, exclusive: bool) -> bool:
        """msvcrt locks are always exclusive: a probe (`exclusive=False`) takes and drops one."""
        os.lseek(fd, _LOCK_OFFSET, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        if not exclusive:
            os.lseek(fd, _LOCK_OFFSET, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        os.lseek(fd, 0, os.SEEK_SET)
        return True

    def _send_stop(proc: psutil.Process) -> str:
        """CTRL_BREAK_EVENT (SIGBREAK in the agent) reaches only a process on our console; otherwise
        terminate it (its tasks are recovered from the journal at the next start)."""
        try:
            proc.send_signal(signal.CTRL_BREAK_EVENT)
            return "CTRL_BREAK_EVENT"
        except (OSError, psutil.AccessDenied):
            proc.terminate()
            return "terminate"
else:
    import fcntl

    _DETACH: dict[str, Any] = {"start_new_session": True}  # the terminal's SIGHUP and Ctrl+C do not reach it

    def _try_lock(fd: int, exclusive: bool) -> bool:
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _send_stop(proc: psutil.Process) -> str:
        proc.send_signal(signal.SIGTERM)
        return "SIGTERM"


def ensure_data_dir(data_dir: Path) -> Path:
    """Create the data dir 0700: it holds task data and the journal."""
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(data_dir, 0o700)
    except OSError as e:
        raise ProcessError(f"cannot use data dir {data_dir}: {e}") from None
    return data_dir


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _lock_held(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        return not _try_lock(fd, exclusive=False)
    finally:
        os.close(fd)


def running_pid(data_dir: Path) -> int | None:
    """The pid of the live daemon that holds this data dir, else None."""
    path = Path(data_dir) / PIDFILE
    if not _lock_held(path):
        return None
    pid = _read_pid(path)
    return pid if pid and psutil.pid_exists(pid) else None


class PidFile:
    """Held for the daemon's lifetime; `acquire` refuses when another live daemon holds it."""

    def __init__(self, data_dir: Path):
        self.path = Path(data_dir) / PIDFILE
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        if not _try_lock(fd, exclusive=True):
            os.close(fd)
            pid = _read_pid(self.path)
            raise AlreadyRunning(f"an agent is already running for data dir {self.path.parent}"
                                 f"{f' (pid {pid})' if pid else ''}")
        stale = os.read(fd, 64).strip()
        if stale:
            log.info("removed stale pidfile %s (%s)", self.path, stale.decode(errors="replace"))
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)  # not pwrite: Windows has none
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except (FileNotFoundError, PermissionError):  # Windows cannot remove an open file; stale is harmless
            pass
        os.close(self._fd)
        self._fd = None


def write_status(data_dir: Path, status: dict[str, Any]) -> None:
    try:
        write_atomic(Path(data_dir) / STATUSFILE, json.dumps(status, indent=1, default=str), durable=False)
    except OSError as e:
        log.debug("cannot write the status file: %s", e)


def read_status(data_dir: Path) -> dict[str, Any] | None:
    """The live status the running daemon writes, or None when no daemon runs."""
    pid = running_pid(data_dir)
    if pid is None:
        return None
    try:
        status = json.loads((Path(data_dir) / STATUSFILE).read_text())
    except (OSError, ValueError):
        status = {}
    if status.get("pid") != pid:
        status = {"pid": pid, "state": "starting"}
    return status


def _wait(check: Callable[[], bool], timeout: float, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(step)


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 8192))
            return "\n".join(f.read().decode(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def detach(config_path: Path, data_dir: Path, run_args: list[str], timeout: float = 60.0) -> int:
    """Start `agent-core run` in its own session, logging to <data_dir>/agent.log; returns its pid once it runs."""
    pid = running_pid(data_dir)
    if pid:
        raise AlreadyRunning(f"an agent is already running for data dir {data_dir} (pid {pid})")
    ensure_data_dir(data_dir)
    log_path = data_dir / LOGFILE
    cmd = [sys.executable, "-m", "agent_core", "--config", str(config_path), "run", *run_args]
    with open(log_path, "ab") as log_file:
        os.chmod(log_path, 0o600)
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                close_fds=True, **_DETACH)

    def up() -> bool:
        status = read_status(data_dir) or {}
        return proc.poll() is not None or (status.get("pid") == proc.pid and status.get("state") == "running")

    if not _wait(up, timeout, 0.2) or proc.poll() is not None:
        if proc.poll() is None:
            proc.terminate()
        raise ProcessError(f"the agent did not start (see {log_path}):\n{_log_tail(log_path)}")
    return proc.pid


def stop(data_dir: Path, *, force: bool, grace: float, say: Callable[[str], None]) -> None:
    """Walk the daemon's signal ladder from outside: SIGTERM (drain; the daemon cancels by itself
    after its grace), a second SIGTERM (cancel) if it is still there, then SIGKILL."""
    pid = running_pid(data_dir)
    if pid is None:
        raise NotRunning(f"no agent is running for data dir {data_dir}")
    proc = psutil.Process(pid)

    def gone() -> bool:
        return running_pid(data_dir) != pid

    def signal_step(step: str) -> None:
        try:
            how = _send_stop(proc)
        except psutil.NoSuchProcess:
            return
        say(f"sent {how} to pid {pid}: {step}")

    signal_step("draining running tasks")
    if force:
        # a second signal must not be merged with the first: wait until the daemon has seen it
        _wait(lambda: gone() or (read_status(data_dir) or {}).get("state") != "running", 5.0)
        if not gone():
            signal_step("cancelling running tasks")
    # the daemon moves to cancelling by itself after `grace`; cancelling takes ~10 s per container
    if _wait(gone, (5.0 if force else grace) + 40.0):
        say(f"agent (pid {pid}) stopped")
        return
    if not force:
        signal_step("cancelling running tasks")
        if _wait(gone, 40.0):
            say(f"agent (pid {pid}) stopped")
            return
    try:
        proc.kill()
        proc.wait(10)
    except psutil.NoSuchProcess:
        pass
    except psutil.TimeoutExpired:
        raise ProcessError(f"pid {pid} survived SIGKILL") from None
    (Path(data_dir) / PIDFILE).unlink(missing_ok=True)
    say(f"agent (pid {pid}) did not stop in time and was killed; its tasks are recovered at the next start")
