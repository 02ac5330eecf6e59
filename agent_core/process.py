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

from agent_core import config as configmod
from agent_core.errors import AgentError, AlreadyRunning, NotRunning, ProcessError
from agent_core.fsutil import write_atomic
from agent_core.lifecycle import Step
from agent_core.livestatus import LiveStatus

log = logging.getLogger(__name__)

PIDFILE = "agent.pid"
LOGFILE = "agent.log"
STATUSFILE = "status.json"
PROGRESS_EVERY_SECS = 5.0

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
    """Replace the live status file with `status` (LiveStatus.to_json()); a failure costs only `status`."""
    try:
        write_atomic(Path(data_dir) / STATUSFILE, json.dumps(status, indent=1, default=str), durable=False)
    except OSError as e:
        log.debug("cannot write the status file: %s", e)


def read_status(data_dir: Path) -> LiveStatus | None:
    """The live status the running daemon writes, or None when no daemon runs. A file that is
    missing, unreadable or another process's reads as the daemon starting."""
    pid = running_pid(data_dir)
    if pid is None:
        return None
    try:
        status = LiveStatus.from_json(json.loads((Path(data_dir) / STATUSFILE).read_text()))
    except (OSError, ValueError, RecursionError):
        status = None
    return status if status is not None and status.pid == pid else LiveStatus(pid=pid)


def _wait(check: Callable[[], bool], timeout: float, step: float = 0.1,
          tick: Callable[[], None] | None = None, every: float = PROGRESS_EVERY_SECS) -> bool:
    """Poll `check` until true or `timeout`; `tick` is called every `every` seconds while waiting."""
    now = time.monotonic()
    deadline, next_tick = now + timeout, now + every
    while True:
        if check():
            return True
        now = time.monotonic()
        if now >= deadline:
            return False
        if tick is not None and now >= next_tick:
            tick()
            next_tick = now + every
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
    # the child logs through a size-rotated handler; its raw stdout/stderr (a crash before logging is set
    # up) go to the same file
    cmd = [sys.executable, "-m", "agent_core", "--config", str(config_path), "run", "--log-file", str(log_path),
           *run_args]
    with open(log_path, "ab") as log_file:
        os.chmod(log_path, 0o600)
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                close_fds=True, **_DETACH)

    def up() -> bool:
        status = read_status(data_dir)
        return proc.poll() is not None or (status is not None and status.pid == proc.pid
                                           and status.state is Step.RUNNING)

    if not _wait(up, timeout, 0.2) or proc.poll() is not None:
        if proc.poll() is None:
            proc.terminate()
        raise ProcessError(f"the agent did not start (see {log_path}):\n{_log_tail(log_path)}")
    return proc.pid


def stop_progress(status: LiveStatus, grace: float, since: float | None, now: float) -> str:
    """ "draining, 2 tasks left, 250 s of grace left": where a stop stands, from the status file.

    The grace runs from the daemon's "stop_requested_at" when it writes one, else from `since`.
    """
    tasks = len(status.tasks)
    parts = [status.state_name, f"{tasks} task{'' if tasks == 1 else 's'} left"]
    began = status.stop_requested_at or since
    if status.state is Step.DRAINING and began is not None:
        parts.append(f"{max(0.0, began + grace - now):.0f} s of grace left")
    return ", ".join(parts)


def _step(status: LiveStatus) -> Step:
    return status.state or Step.RUNNING  # starting: not stopping yet


def stop(data_dir: Path, *, force: bool, grace: float, say: Callable[[str], None],
         every: float = PROGRESS_EVERY_SECS) -> None:
    """Walk the daemon's signal ladder from outside: SIGTERM (drain; the daemon cancels by itself
    after its grace), a second SIGTERM (cancel) if it is still there, then SIGKILL. Says where the
    stop stands every `every` seconds. A plain stop while one is under way only says so: sending
    another signal would cancel the tasks the first one lets finish."""
    pid = running_pid(data_dir)
    if pid is None:
        raise NotRunning(f"no agent is running for data dir {data_dir}")
    proc = psutil.Process(pid)
    since = time.time()

    def status() -> LiveStatus:
        return read_status(data_dir) or LiveStatus(pid=None)

    if _step(status()) >= Step.DRAINING and not force:
        say(f"a stop is already under way for pid {pid} ({stop_progress(status(), grace, None, time.time())}); "
            "to cancel the running tasks now: `agent-core stop --force`")
        return

    def gone() -> bool:
        return running_pid(data_dir) != pid

    def tick() -> None:
        say(f"waiting for pid {pid}: {stop_progress(status(), grace, since, time.time())}")

    def signal_step(step: str) -> None:
        try:
            how = _send_stop(proc)
        except psutil.NoSuchProcess:
            return
        say(f"sent {how} to pid {pid}: {step}")

    def step_to(target: Step) -> None:
        for _ in range(target - _step(status())):
            before = _step(status())
            signal_step(f"{Step(before + 1).state} running tasks")
            # a next signal must not be merged with this one: wait until the daemon has taken it
            _wait(lambda: gone() or _step(status()) > before, 5.0)
            if gone():
                return

    def stopped(timeout: float) -> bool:
        if _wait(gone, timeout, tick=tick, every=every):
            say(f"agent (pid {pid}) stopped")
            return True
        return False

    step_to(Step.CANCELLING if force else Step.DRAINING)
    # the daemon moves to cancelling by itself after `grace`; cancelling takes ~10 s per container
    if stopped((5.0 if force else grace) + 40.0):
        return
    if not force:
        step_to(Step.CANCELLING)
        if stopped(40.0):
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


# --- another daemon of the same service --------------------------------------


def _agent_args(cmdline: list[str]) -> list[str] | None:
    """The arguments after the program when `cmdline` is an `agent-core ... run`, else None."""
    for i, arg in enumerate(cmdline):
        if Path(arg).name in ("agent-core", "agent-core.exe"):
            args = cmdline[i + 1:]
            break
        if arg == "-m" and cmdline[i + 1:i + 2] == ["agent_core"]:
            args = cmdline[i + 2:]
            break
    else:
        return None
    return args if "run" in args else None


def config_of(cmdline: list[str], cwd: str | None, env: dict[str, str]) -> Path | None:
    """Which config file an `agent-core run` command line uses (as the CLI finds it), else None."""
    args = _agent_args(cmdline)
    if args is None:
        return None
    found: str | None = None
    for i, arg in enumerate(args):
        if arg == "--config" and i + 1 < len(args):
            found = args[i + 1]
        elif arg.startswith("--config="):
            found = arg.partition("=")[2]
    found = found or env.get("AGENT_CORE_CONFIG") or configmod.DEFAULT_CONFIG_NAME
    path = Path(found).expanduser()
    if not path.is_absolute():
        if cwd is None:
            return None
        path = Path(cwd) / path
    return path


def same_service_elsewhere(cfg: configmod.Config) -> list[str]:
    """A warning per other agent-core daemon on this host serving our service_id from another data dir:
    two daemons on one api_key take each other's tasks and overwrite each other's heartbeats."""
    if not cfg.agent.service_id:
        return []
    ours = cfg.paths.data_dir.resolve()
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid == os.getpid():
                continue
            cmdline = proc.cmdline()
            if _agent_args(cmdline) is None:
                continue
            try:
                env = proc.environ()
            except (psutil.AccessDenied, OSError):
                env = {}
            path = config_of(cmdline, proc.cwd(), env)
            if path is None:
                continue
            other = configmod.parse(path.read_text(encoding="utf-8"), path.absolute())
        except (psutil.Error, OSError, UnicodeDecodeError, AgentError):
            continue  # gone, not ours to read, or not a config: nothing to say about it
        if other.agent.service_id == cfg.agent.service_id and other.paths.data_dir.resolve() != ours:
            found.append(f"another agent-core (pid {proc.pid}, data dir {other.paths.data_dir}) runs as service "
                         f"{cfg.agent.service_id}: two daemons on one api_key take each other's tasks; "
                         "stop one, or register each with its own token")
    return found
