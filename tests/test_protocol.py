"""Parsing the server's messages: strict about types, lenient about extra fields."""

from __future__ import annotations

import pytest

from agent_core.errors import ProtocolViolation
from agent_core.protocol import PollResult, Task


def test_a_task_with_nulls_and_no_input_files():
    task = Task.from_json({"id": "t1", "task_prompt": "p", "output_prompt": None, "session_id": None,
                           "extra": 1})
    assert task == Task(id="t1", task_prompt="p")


def test_poll_shapes():
    assert PollResult.from_json({"has_task": False, "task": None, "should_cancel": False}) == PollResult()
    assert PollResult.from_json({"has_task": False, "should_cancel": True,
                                 "cancel_task_id": "t9"}).cancel_task_id == "t9"


def test_a_malformed_task_with_a_string_id_is_reported_not_raised():
    # poll offers the oldest pending task every time: raising would block the queue for good
    result = PollResult.from_json({"has_task": True, "task": {"id": "t1", "input_files": "junk"}})
    assert result.task is None and result.malformed == ("t1", "task: input_files is not a list")


@pytest.mark.parametrize("task", [{"id": 7, "task_prompt": "p"}, "junk", {"task_prompt": "p"}])
def test_a_task_without_a_usable_id_is_a_protocol_violation(task):
    with pytest.raises(ProtocolViolation):
        PollResult.from_json({"has_task": True, "task": task})
