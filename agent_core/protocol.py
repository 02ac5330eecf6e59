"""Typed messages of the OpenAaaS agent protocol (../shared/protocol.md §2).

Parsing is strict about types and lenient about extra fields: a reply that does
not fit raises `ProtocolViolation`, except a polled task, which is reported in the
PollResult (`malformed`, `ignored`) so that the polls after it still work. Values
from the server are not trusted here beyond their types; names and ids are checked
again before they touch a path (workspace) or a container name (executor).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from agent_core.errors import ProtocolViolation

TASK_STATUSES = ("completed", "failed", "cancelled")


def _field(obj: dict, key: str, kinds: type | tuple[type, ...], what: str, *, optional: bool = False) -> Any:
    value = obj.get(key)
    if value is None and optional:
        return None
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise ProtocolViolation(f"{what}: {key} has the wrong type")
    if not isinstance(value, kinds):
        raise ProtocolViolation(f"{what}: {key} is missing or has the wrong type")
    return value


def _object(data: Any, what: str) -> dict:
    if not isinstance(data, dict):
        raise ProtocolViolation(f"{what}: expected a JSON object")
    return data


@dataclass(frozen=True)
class InputFile:
    id: str
    filename: str
    mime_type: str | None
    size_bytes: int

    @classmethod
    def from_json(cls, data: Any) -> InputFile:
        obj = _object(data, "input file")
        size = obj.get("size_bytes", 0)
        if isinstance(size, bool) or not isinstance(size, int):
            raise ProtocolViolation("input file: size_bytes is not an integer")
        return cls(
            id=_field(obj, "id", str, "input file"),
            filename=_field(obj, "filename", str, "input file"),
            mime_type=_field(obj, "mime_type", str, "input file", optional=True),
            size_bytes=size,
        )

    def to_json(self) -> dict:
        return {"id": self.id, "filename": self.filename, "mime_type": self.mime_type,
                "size_bytes": self.size_bytes}


@dataclass(frozen=True)
class Task:
    id: str
    task_prompt: str
    output_prompt: str | None = None
    session_id: str | None = None
    input_files: tuple[InputFile, ...] = ()

    @classmethod
    def from_json(cls, data: Any) -> Task:
        obj = _object(data, "task")
        files = obj.get("input_files") or []
        if not isinstance(files, list):
            raise ProtocolViolation("task: input_files is not a list")
        return cls(
            id=_field(obj, "id", str, "task"),
            task_prompt=_field(obj, "task_prompt", str, "task", optional=True) or "",
            output_prompt=_field(obj, "output_prompt", str, "task", optional=True),
            session_id=_field(obj, "session_id", str, "task", optional=True),
            input_files=tuple(InputFile.from_json(f) for f in files),
        )

    def to_json(self) -> dict:
        return {"id": self.id, "task_prompt": self.task_prompt, "output_prompt": self.output_prompt,
                "session_id": self.session_id, "input_files": [f.to_json() for f in self.input_files]}


def _json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def _unusable_id(raw: Any) -> str | None:
    """Why an offered task has no id we could ever answer about, or None when it has one."""
    if not isinstance(raw, dict):
        return f"task is {_json_type(raw)}, not an object: skipped"
    if "id" not in raw:
        return "task has no id: skipped"
    if not isinstance(raw["id"], str):
        return f"task id is {_json_type(raw['id'])}, not a string: skipped"
    return None


@dataclass(frozen=True)
class PollResult:
    task: Task | None = None
    cancel_task_id: str | None = None
    # (id, why): a task we cannot parse; it still has to leave the queue, which poll offers oldest first
    malformed: tuple[str, str] | None = None
    # why an offered task was skipped: without a string id it can be neither accepted nor refused.
    # The real server's ids are UUID strings, so only a broken or hostile server or proxy sends
    # one; raising instead would fail every poll for as long as that task is offered.
    ignored: str | None = None

    @classmethod
    def from_json(cls, data: Any) -> PollResult:
        obj = _object(data, "poll")
        cancel_id = None
        if obj.get("should_cancel"):
            cancel_id = _field(obj, "cancel_task_id", str, "poll")
        task = None
        raw = obj.get("task")
        if obj.get("has_task") and raw is not None:
            ignored = _unusable_id(raw)
            if ignored is not None:
                return cls(cancel_task_id=cancel_id, ignored=ignored)
            try:
                task = Task.from_json(raw)
            except ProtocolViolation as e:
                return cls(cancel_task_id=cancel_id, malformed=(raw["id"], str(e)))
        return cls(task=task, cancel_task_id=cancel_id)


@dataclass(frozen=True)
class Registration:
    service_id: str
    api_key: str = field(repr=False)
    name: str = ""

    @classmethod
    def from_json(cls, data: Any) -> Registration:
        obj = _object(data, "register")
        return cls(
            service_id=_field(obj, "service_id", str, "register"),
            api_key=_field(obj, "api_key", str, "register"),
            name=_field(obj, "name", str, "register", optional=True) or "",
        )


@dataclass(frozen=True)
class UploadedFile:
    file_id: str
    filename: str
    size_bytes: int

    @classmethod
    def from_json(cls, data: Any) -> UploadedFile:
        obj = _object(data, "upload")
        return cls(
            file_id=_field(obj, "file_id", str, "upload"),
            filename=_field(obj, "filename", str, "upload", optional=True) or "",
            size_bytes=_field(obj, "size_bytes", int, "upload", optional=True) or 0,
        )


@dataclass(frozen=True)
class Completion:
    """What `complete` sends: the task's final word."""

    task_id: str
    status: str
    output: dict | None = None
    error_message: str | None = None
    file_ids: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.status not in TASK_STATUSES:
            raise ValueError(f"unknown completion status {self.status!r}")

    def to_json(self) -> dict:
        return {"task_id": self.task_id, "status": self.status, "output": self.output,
                "error_message": self.error_message, "file_ids": list(self.file_ids)}

    @classmethod
    def from_json(cls, data: dict) -> Completion:
        return cls(task_id=data["task_id"], status=data["status"], output=data.get("output"),
                   error_message=data.get("error_message"), file_ids=tuple(data.get("file_ids") or ()))


@dataclass(frozen=True)
class Heartbeat:
    status: str
    current_load: int
    capacity: int

    def to_json(self) -> dict:
        return {"status": self.status, "current_load": self.current_load, "capacity": self.capacity,
                "available_capacity": max(0, self.capacity - self.current_load)}
