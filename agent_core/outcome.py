"""What a task's end means for `complete`: pure, from what the run left behind.

One place maps a cancel reason, an error, an exit code, an OOM kill and a lost engine to the
status and message the server gets; the runner only gathers the facts (`Ended`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

ERROR_MESSAGE_CHARS = 2000
# 128 + SIGKILL / SIGTERM: how a container ends when its engine stops it
KILLED_CODES = (137, 143)


class CancelReason(enum.Enum):
    SERVER = "server"
    TIMEOUT = "timeout"
    AGENT_STOPPING = "agent_stopping"


def cancel_outcome(reason: CancelReason, timeout_secs: int) -> tuple[str, str]:
    """Why a task was stopped, as `complete` says it."""
    if reason is CancelReason.SERVER:
        return "cancelled", "cancelled on request"
    if reason is CancelReason.TIMEOUT:
        return "failed", f"timed out after {timeout_secs} s"
    return "failed", "agent shutting down"


@dataclass(frozen=True)
class Ended:
    """What a run left: the journal's facts about it."""

    exit_code: int | None
    oom_killed: bool = False
    cancel_reason: CancelReason | None = None
    error: str | None = None  # it failed before its container could give a result
    engine_lost: bool = False  # the engine went away while the container ran


def decide(ended: Ended, *, timeout_secs: int, memory_limit: str | None, log_tail: str = "") -> tuple[str, str | None]:
    """(status, message) for `complete`; `log_tail` is the end of stderr, else of stdout."""
    if ended.cancel_reason is not None:
        return cancel_outcome(ended.cancel_reason, timeout_secs)
    if ended.error:
        return "failed", ended.error
    if ended.exit_code == 0:
        return "completed", None
    message = f"exit code {ended.exit_code}"
    if ended.oom_killed:
        message += f" (out of memory: executor.memory_limit = {memory_limit})"
    elif ended.engine_lost and ended.exit_code in KILLED_CODES:
        message += " (killed: the container engine stopped while the task ran)"
    detail = log_tail.strip()
    return "failed", f"{message}: {detail[-ERROR_MESSAGE_CHARS:]}" if detail else message
