"""Durable task state, in three files per task, so a big task costs its size on disk once:

    journal/<id>.json           the stage reached and what it produced: small, rewritten atomically
                                at every stage
    journal/tasks/<id>.json     the task as the server sent it (prompt included): written once
    journal/uploads/<id>.log    one line per uploaded output (path, file_id), appended and fsynced

A 40 MB prompt with 1000 outputs is then written once, not once per upload. The records are
what let a restarted daemon pick a task up where it stopped (scheduler recovery); they never
hold a credential.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

from agent_core.errors import AgentError, JournalError, UnsafePath
from agent_core.fsutil import write_atomic
from agent_core.protocol import Completion, Task
from agent_core.workspace import check_task_id

log = logging.getLogger(__name__)


class Stage(enum.IntEnum):
    ACCEPTED = 0  # the server gave us the task
    STAGED = 1    # workspace, inputs and task.json are on disk
    LAUNCHED = 2  # the container exists (container_id set)
    EXITED = 3    # the container ended; exit recorded, logs saved (in copy mode /workspace copied out), container removed
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
    engine_lost: bool = False  # the engine went away while the container ran
    engine: str | None = None  # the name of the engine it runs on; None: an older agent's record (the first)
    uploads: dict[str, str] = field(default_factory=dict)  # workspace-relative path -> file_id
    completion: Completion | None = None

    @property
    def task_id(self) -> str:
        return self.task.id

    def to_json(self) -> dict:
        """The small part: everything but the task and the uploads, which have files of their own."""
        # field by field, not asdict(): that would deep-copy the task (and its prompt) every time
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("task", "uploads")}
        data["task_id"] = self.task_id
        data["stage"] = self.stage.name
        data["completion"] = self.completion.to_json() if self.completion else None
        return data

    @classmethod
    def from_json(cls, data: dict, task: Task, uploads: dict[str, str]) -> TaskRecord:
        data = dict(data)
        if data.pop("task_id", task.id) != task.id:
            raise ValueError("the record and the task file name different tasks")
        data.pop("task", None)  # a record from before the split held the task itself
        data["uploads"] = {**data.get("uploads", {}), **uploads}
        data["task"] = task
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
        if record.engine is not None and not isinstance(record.engine, str):
            raise ValueError("engine is not a string")
        return record


class Journal:
    """Records under `<data_dir>/journal/`, named by task id (checked safe by the caller, and
    here again: a record must never be written or removed outside the journal folder)."""

    def __init__(self, data_dir: Path):
        self.dir = Path(data_dir) / "journal"
        self.tasks_dir = self.dir / "tasks"
        self.uploads_dir = self.dir / "uploads"
        self.corrupt_dir = self.dir / "corrupt"
        self._task_written: set[str] = set()

    def _name(self, task_id: str) -> str:
        try:
            return check_task_id(task_id)  # the one id rule: it also keeps records in this folder
        except UnsafePath:
            raise JournalError(f"task id {str(task_id)[:40]!r} cannot name a journal record") from None

    def _path(self, task_id: str) -> Path:
        return self.dir / f"{self._name(task_id)}.json"

    def _task_path(self, task_id: str) -> Path:
        return self.tasks_dir / f"{self._name(task_id)}.json"

    def _uploads_path(self, task_id: str) -> Path:
        return self.uploads_dir / f"{self._name(task_id)}.log"

    def _make_dirs(self) -> None:
        for folder in (self.dir, self.tasks_dir, self.uploads_dir):  # parents first: each 0700
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)

    def save(self, record: TaskRecord) -> None:
        """The stage record; the first save of a task also writes the task itself, once."""
        task_id = record.task_id
        try:
            if task_id not in self._task_written:
                self._make_dirs()
                write_atomic(self._task_path(task_id), json.dumps(record.task.to_json()))
                self._task_written.add(task_id)
            write_atomic(self._path(task_id), json.dumps(record.to_json(), indent=1))
        except OSError as e:
            raise JournalError(f"cannot write the journal record of task {task_id}: {e}") from None

    def writable(self) -> bool:
        """Can a record be written now? (After a failed write: is there room again?)"""
        probe = self.dir / "probe.tmp"
        try:
            self._make_dirs()
            write_atomic(probe, "x" * 4096)
            probe.unlink()
            return True
        except OSError:
            return False

    def add_upload(self, task_id: str, rel: str, file_id: str) -> None:
        """One uploaded output, appended durably: a restart will not upload it again."""
        line = json.dumps({"path": rel, "file_id": file_id}) + "\n"
        try:
            self._make_dirs()
            with open(self._uploads_path(task_id), "a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise JournalError(f"cannot journal an upload of task {task_id}: {e}") from None

    def remove(self, task_id: str) -> None:
        # the stage record first: without it, the other two are leftovers that replay removes
        for path in (self._path(task_id), self._task_path(task_id), self._uploads_path(task_id)):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as e:
                raise JournalError(f"cannot remove the journal record of task {task_id}: {e}") from None
        self._task_written.discard(task_id)

    def _read_uploads(self, task_id: str) -> dict[str, str]:
        uploads: dict[str, str] = {}
        try:
            with open(self._uploads_path(task_id), encoding="utf-8") as f:
                for line in f:
                    try:
                        entry = json.loads(line)
                        path, file_id = entry["path"], entry["file_id"]
                    except (ValueError, KeyError, TypeError):
                        continue  # a line torn by a crash: that upload is simply done again
                    if isinstance(path, str) and isinstance(file_id, str):
                        uploads[path] = file_id
        except FileNotFoundError:
            pass
        return uploads

    def _load(self, path: Path) -> TaskRecord:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        task_id = data.get("task_id")
        if "task" in data:  # written before the split
            task = Task.from_json(data["task"])
        else:
            if not isinstance(task_id, str) or self._path(task_id).name != path.name:
                raise ValueError(f"it names task {str(task_id)[:40]!r}")
            task = Task.from_json(json.loads(self._task_path(task_id).read_text(encoding="utf-8")))
        record = TaskRecord.from_json(data, task, self._read_uploads(task.id))
        if self._path(record.task_id).name != path.name:
            raise ValueError(f"it holds task {record.task_id[:40]!r}")
        return record

    def replay(self) -> list[TaskRecord]:
        """Every readable record, oldest first; unreadable ones are set aside with a warning."""
        if not self.dir.is_dir():
            return []
        for folder in (self.dir, self.tasks_dir):
            for tmp in folder.glob(".*.tmp"):  # a write_atomic cut short by a crash
                tmp.unlink(missing_ok=True)
        records = []
        for path in sorted(self.dir.glob("*.json")):
            try:
                record = self._load(path)
                records.append(record)
                self._task_written.add(record.task_id)
            except (OSError, ValueError, KeyError, TypeError, AgentError) as e:
                self._set_aside(path, e)
        known = {f"{r.task_id}.json" for r in records}
        for folder, suffix in ((self.tasks_dir, ".json"), (self.uploads_dir, ".log")):
            for path in folder.glob(f"*{suffix}") if folder.is_dir() else ():
                if path.name[:-len(suffix)] + ".json" not in known:
                    path.unlink(missing_ok=True)  # the record was removed, or set aside
        return sorted(records, key=lambda r: r.accepted_at)

    def _set_aside(self, path: Path, why: Exception) -> None:
        log.warning("journal record %s is unreadable (%s): moved to %s", path.name, why, self.corrupt_dir)
        try:
            self.corrupt_dir.mkdir(mode=0o700, exist_ok=True)
            os.replace(path, self.corrupt_dir / path.name)
        except OSError as e:
            log.error("cannot move the unreadable journal record %s aside: %s", path.name, e)
