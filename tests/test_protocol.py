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


@pytest.mark.parametrize("task, reason", [
    ({"id": 7, "task_prompt": "p"}, "task id is a number, not a string: skipped"),
    ({"id": 7.5}, "task id is a number, not a string: skipped"),
    ({"id": None}, "task id is null, not a string: skipped"),
    ({"id": True}, "task id is a boolean, not a string: skipped"),
    ({"id": {"uuid": "t1"}}, "task id is an object, not a string: skipped"),
    ({"id": ["t1"]}, "task id is an array, not a string: skipped"),
    ({"task_prompt": "p"}, "task has no id: skipped"),
    ("junk", "task is a string, not an object: skipped"),
    ([{"id": "t1"}], "task is an array, not an object: skipped"),
])
def test_a_task_without_a_string_id_is_ignored_with_a_reason_not_raised(task, reason):
    # raising would fail every poll for as long as a broken server offers it
    result = PollResult.from_json({"has_task": True, "task": task})
    assert result == PollResult(ignored=reason)


def test_a_cancel_next_to_an_ignored_task_is_still_honoured():
    result = PollResult.from_json({"has_task": True, "task": {"id": 7}, "should_cancel": True,
                                   "cancel_task_id": "t9"})
    assert result == PollResult(cancel_task_id="t9", ignored="task id is a number, not a string: skipped")


def test_a_malformed_task_next_to_a_cancel_keeps_both():
    result = PollResult.from_json({"has_task": True, "task": {"id": "t1", "input_files": [{"id": 3}]},
                                   "should_cancel": True, "cancel_task_id": "t9"})
    assert result == PollResult(cancel_task_id="t9",
                                malformed=("t1", "input file: id is missing or has the wrong type"))


@pytest.mark.parametrize("reply", [[], "junk", {"should_cancel": True, "cancel_task_id": 9}])
def test_a_poll_reply_that_is_no_answer_at_all_is_a_protocol_violation(reply):
    with pytest.raises(ProtocolViolation):
        PollResult.from_json(reply)
