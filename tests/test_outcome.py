"""The completion a task's end gives (agent_core/outcome.py): pure, no engine, no server."""

from __future__ import annotations

import pytest

from agent_core.outcome import ERROR_MESSAGE_CHARS, CancelReason, Ended, decide


def outcome(ended: Ended, tail: str = "") -> tuple[str, str | None]:
    return decide(ended, timeout_secs=600, memory_limit="512m", log_tail=tail)


def test_exit_zero_completes_and_anything_else_fails_with_the_log_tail():
    assert outcome(Ended(exit_code=0)) == ("completed", None)
    assert outcome(Ended(exit_code=3), "boom\n") == ("failed", "exit code 3: boom")
    assert outcome(Ended(exit_code=3)) == ("failed", "exit code 3")
    status, message = outcome(Ended(exit_code=1), "x" * (ERROR_MESSAGE_CHARS + 500))
    assert status == "failed" and message == "exit code 1: " + "x" * ERROR_MESSAGE_CHARS


@pytest.mark.parametrize("reason, expected", [
    (CancelReason.SERVER, ("cancelled", "cancelled on request")),
    (CancelReason.TIMEOUT, ("failed", "timed out after 600 s")),
    (CancelReason.AGENT_STOPPING, ("failed", "agent shutting down")),
])
def test_a_cancel_reason_wins_over_the_exit_code(reason, expected):
    assert outcome(Ended(exit_code=137, cancel_reason=reason), "killed") == expected


def test_an_error_before_the_container_gave_a_result_is_the_message():
    assert outcome(Ended(exit_code=None, error="image missing")) == ("failed", "image missing")


def test_oom_and_a_lost_engine_say_who_killed_the_container():
    assert outcome(Ended(exit_code=137, oom_killed=True)) == (
        "failed", "exit code 137 (out of memory: executor.memory_limit = 512m)")
    assert outcome(Ended(exit_code=137, engine_lost=True)) == (
        "failed", "exit code 137 (killed: the container engine stopped while the task ran)")
    # a task that failed on its own while the engine was away is not blamed on the engine
    assert outcome(Ended(exit_code=2, engine_lost=True)) == ("failed", "exit code 2")
