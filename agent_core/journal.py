"""Durable task state: one JSON record per task, rewritten atomically at every stage.

The record is what lets a restarted daemon pick a task up where it stopped
(scheduler recovery). It holds the task as the server sent it, the stage
reached and what that stage produced; never a credential.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from agent_core.errors import AgentError, JournalError
from agent_core.fsutil import write_atomic
from agent_core.protocol import Completion, Task

log = logging.getLogger(__name__)


class Stage(enum.IntEnum):
    ACCEPTED = 0  # the server gave us the task
    STAGED = 1    # workspace, inputs and task.json are on disk
    LAUNCHED = 2  # the container exists (container_id set)
    EXITED = 3    # the container ended; exit recorded, logs saved, container removed
    UPLOADED = 4  # every output uploaded; `completion` is final
    REPORTED = 5  # the server acknowledged `complete`


@dataclass
class TaskRecord:
    task: Task
    stage: Stage = Stage.ACCEPTED
    accepted_at: float = field(default_factory=time.time)
    container_id: str | None = None
    launched_at: float | None = None
    exit_code: int | None = None
    oom_killed: bool = False
    cancel_reason: str | None = None
    error: str | None = None  # why the task failed before its container could give a result
    uploads: dict[str, str] = field(default_factory=dict)  # workspace-relative path -> file_id
    completion: Completion | None = None

    @property
    def task_id(self) -> str:
        return self.task.id

    def to_json(self) -> dict:
        data = asdict(self)
        data["task"] = self.task.to_json()
        data["stage"] = self.stage.name
        data["completion"] = self.completion.to_json() if self.completion else None
        return data

    @classmethod
    def from_json(cls, data: dict) -> TaskRecord:
        data = dict(data)
        data["task"] = Task.from_json(data["task"])
        data["stage"] = Stage[data["stage"]]
        data["completion"] = Completion.from_json(data["completion"]) if data.get("completion") else None
        record = cls(**data)
        # the fields later code relies on without checking (replay sorts by accepted_at)
        if isinstance(record.accepted_at, bool) or not isinstance(record.accepted_at, (int, float)):
            raise ValueError("accepted_at is not a number")
        if not (isinstance(record.uploads, dict)
                and all(isinstance(k, str) and isinstance(v, str) for k, v in record.uploads.items())):
            raise ValueError("uploads is not a map of paths to file ids")
        if record.container_id is not None and not isinstance(record.container_id, str):
            raise ValueError("container_id is not a string")
        return record


class Journal:
    """Records under `<data_dir>/journal/`, named by task id (checked safe by the caller, and
    here again: a record must never be written or removed outside the journal folder)."""

    def __init__(self, data_dir: Path):
        self.dir = Path(data_dir) / "journal"
        self.corrupt_dir = self.dir / "corrupt"

    def _path(self, task_id: str) -> Path:
        if not task_id or task_id.startswith(".") or any(c in task_id for c in "/\\\0"):
            raise JournalError(f"task id {task_id[:40]!r} cannot name a journal record")
        return self.dir / f"{task_id}.json"

    def save(self, record: TaskRecord) -> None:
        try:
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_atomic(self._path(record.task_id), json.dumps(record.to_json(), indent=1))
        except OSError as e:
            raise JournalError(f"cannot write the journal record of task {record.task_id}: {e}") from None

    def remove(self, task_id: str) -> None:
        try:
            os.unlink(self._path(task_id))
        except FileNotFoundError:
            pass
        except OSError as e:
            raise JournalError(f"cannot remove the journal record of task {task_id}: {e}") from None

    def replay(self) -> list[TaskRecord]:
        """Every readable record, oldest first; unreadable ones are set aside with a warning."""
        if not self.dir.is_dir():
            return []
        for tmp in self.dir.glob(".*.tmp"):  # a write_atomic cut short by a crash
            tmp.unlink(missing_ok=True)
        records = []
        for path in sorted(self.dir.glob("*.json")):
            try:
                record = TaskRecord.from_json(json.loads(path.read_text(encoding="utf-8")))
                if self._path(record.task_id).name != path.name:
                    raise ValueError(f"it holds task {record.task_id[:40]!r}")
                records.append(record)
            except (OSError, ValueError, KeyError, TypeError, AgentError) as e:
                self._set_aside(path, e)
        return sorted(records, key=lambda r: r.accepted_at)

    def _set_aside(self, path: Path, why: Exception) -> None:
        log.warning("journal record %s is unreadable (%s): moved to %s", path.name, why, self.corrupt_dir)
        try:
            self.corrupt_dir.mkdir(mode=0o700, exist_ok=True)
            os.replace(path, self.corrupt_dir / path.name)
        except OSError as e:
            log.error("cannot move the unreadable journal record %s aside: %s", path.name, e)
