"""Protocol state: services, tasks and files behind one lock (`_Store`), and the sweeper's rules."""

from __future__ import annotations

import copy
import hashlib
import hmac
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from agent_core.devserver.responses import (
    _bad_request, _error, _forbidden, _HttpError, _not_found, _unauthorized)
from agent_core.protocol import TASK_STATUSES

_TERMINAL = TASK_STATUSES  # what a completion may say, and where a task ends
_HEARTBEAT_STATUSES = ("online", "busy", "offline")


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class _Service:
    id: str
    name: str
    description: str
    usage: str
    is_public: bool
    token: str | None
    created_at: str = field(default_factory=_now_iso)
    key_hash: bytes | None = None   # set by register; None means "never registered" (-> 401)
    revoked: bool = False
    status: str = "pending"         # pending until register, then online/busy/offline
    capacity: int = 1
    current_load: int = 0
    last_heartbeat: float | None = None  # monotonic
    last_heartbeat_at: str | None = None

    def to_json(self) -> dict:
        registration = "revoked" if self.revoked else ("active" if self.key_hash else "pending")
        return {"id": self.id, "name": self.name, "description": self.description, "usage": self.usage,
                "is_public": self.is_public, "status": self.status, "registration_status": registration,
                "capacity": self.capacity, "current_load": self.current_load,
                "last_heartbeat_at": self.last_heartbeat_at, "created_at": self.created_at}


@dataclass
class _Task:
    id: str
    service_id: str
    seq: int                        # creation order: poll offers the oldest pending task
    task_prompt: str = ""
    output_prompt: str | None = None
    session_id: str | None = None
    raw: dict | None = None         # offered verbatim by poll (Faults.offer_raw_task)
    status: str = "pending"
    output: Any = None
    error_message: str | None = None
    retry_count: int = 0
    created_at: str = field(default_factory=_now_iso)
    assigned_at: str | None = None
    started_at: str | None = None
    completed_at: str | None = None

    def to_json(self) -> dict:
        task_input = self.raw if self.raw is not None else {
            "task_prompt": self.task_prompt, "output_prompt": self.output_prompt}
        return {"id": self.id, "service_id": self.service_id, "status": self.status, "input": task_input,
                "output": self.output, "error_message": self.error_message, "session_id": self.session_id,
                "retry_count": self.retry_count, "created_at": self.created_at,
                "assigned_at": self.assigned_at, "started_at": self.started_at,
                "completed_at": self.completed_at}


@dataclass
class _File:
    id: str
    task_id: str
    filename: str
    mime_type: str | None
    size_bytes: int
    created_by: str                 # "client" | "agent"
    path: Path
    created_at: str = field(default_factory=_now_iso)
    granted: set[str] = field(default_factory=set)  # extra services allowed to download it

    def to_json(self) -> dict:
        return {"id": self.id, "task_id": self.task_id, "filename": self.filename,
                "mime_type": self.mime_type, "size_bytes": self.size_bytes,
                "created_by": self.created_by, "created_at": self.created_at}

    def input_json(self) -> dict:
        return {"id": self.id, "filename": self.filename, "mime_type": self.mime_type,
                "size_bytes": self.size_bytes}


def _save_stream(root: Path, chunks: Iterable[bytes], limit: int) -> tuple[Path, int]:
    """Write chunks to a new file under root; 400 (and nothing left behind) past `limit` bytes."""
    path = root / uuid.uuid4().hex
    size = 0
    try:
        with open(path, "wb") as out:
            for chunk in chunks:
                size += len(chunk)
                if size > limit:
                    raise _bad_request(f"file larger than the {limit} byte limit")
                out.write(chunk)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path, size


def _heartbeat_problem(status: str, load: int, capacity: int | None) -> str | None:
    if status not in _HEARTBEAT_STATUSES:
        return f"unknown status {status!r}"
    if load < 0 or (capacity is not None and (capacity <= 0 or load > capacity)):
        return "need capacity > 0 and 0 <= current_load <= capacity"
    return None


class _Store:
    """Services, tasks, files and events behind one lock; the protocol's semantics live here."""

    def __init__(self, files_dir: Path, heartbeat_timeout: float, max_retries: int):
        self.lock = threading.RLock()
        self.files_dir = files_dir
        self.heartbeat_timeout = heartbeat_timeout
        self.max_retries = max_retries
        self.services: dict[str, _Service] = {}
        self.tokens: dict[str, str] = {}   # unused registration token -> service id
        self.tasks: dict[str, _Task] = {}
        self.files: dict[str, _File] = {}
        self.uploading: dict[str, object] = {}  # task id -> ticket of its latest upload still running
        self.events: list[dict] = []
        self._seq = 0
        self._secret = secrets.token_bytes(32)  # keys are kept as an HMAC, like the real server

    def _hash(self, key: str) -> bytes:
        return hmac.new(self._secret, key.encode("utf-8", errors="replace"), hashlib.sha256).digest()

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _event(self, kind: str, **details: Any) -> None:
        self.events.append({"type": kind, "time": time.monotonic(), **details})

    # ---- services

    def create_service(self, name: str, description: str = "", usage: str = "", id: str | None = None,
                       is_public: bool = False) -> dict:
        with self.lock:
            sid = id or str(uuid.uuid4())
            if sid in self.services:
                raise _HttpError(_error(409, "Conflict", "service id already exists"))
            token = "rt_" + secrets.token_hex(16)
            svc = _Service(sid, name, description, usage, is_public, token)
            self.services[sid] = svc
            self.tokens[token] = sid
            return {**svc.to_json(), "registration_token": token}

    def delete_service(self, sid: str, force: bool) -> None:
        with self.lock:
            svc = self.services.get(sid)
            if svc is None:
                raise _not_found("service")
            if not force and any(t.service_id == sid and t.status not in _TERMINAL for t in self.tasks.values()):
                raise _HttpError(_error(409, "Conflict", "service has active tasks; use force=true"))
            del self.services[sid]
            if svc.token:
                self.tokens.pop(svc.token, None)

    def revoke_service(self, sid: str) -> None:
        with self.lock:
            self.services[sid].revoked = True

    def register(self, token: str, capacity: int) -> dict:
        with self.lock:
            sid = self.tokens.get(token)
            if sid is None or sid not in self.services:
                raise _not_found("registration token")  # unknown and already used look the same
            svc = self.services[sid]
            if svc.revoked:
                raise _forbidden("service revoked")
            del self.tokens[token]
            svc.token = None
            api_key = "ak_agent_" + secrets.token_hex(16)
            svc.key_hash = self._hash(api_key)
            svc.capacity = capacity
            self._touch(svc, "online")
            return {"service_id": svc.id, "name": svc.name, "api_key": api_key, "status": "online",
                    "created_at": svc.created_at}

    def authenticate(self, header_sid: str | None, key: str | None) -> _Service:
        if not key:
            raise _unauthorized("missing or empty API key")
        with self.lock:
            svc = self.services.get(header_sid or "")
            if svc is None or svc.revoked:
                raise _unauthorized("unknown service")
            if svc.key_hash is None:  # observed: 401 (older servers answered 500)
                raise _unauthorized("service not registered")
            if not hmac.compare_digest(svc.key_hash, self._hash(key)):
                raise _unauthorized("invalid API key")
            return svc

    def _touch(self, svc: _Service, status: str) -> None:
        svc.status = status
        svc.last_heartbeat = time.monotonic()
        svc.last_heartbeat_at = _now_iso()

    def heartbeat(self, svc: _Service, status: str, load: int, capacity: int | None) -> dict:
        problem = _heartbeat_problem(status, load, capacity)
        with self.lock:
            if problem:  # observed: refused, yet still a sign of life
                self._touch(svc, "online" if svc.status == "offline" else svc.status)
                raise _bad_request(problem)
            svc.current_load = load  # observed: without a capacity, not checked against the stored one
            if capacity is not None:
                svc.capacity = capacity
            self._touch(svc, status)
        return {"acknowledged": True, "service_id": svc.id, "timestamp": _now_iso()}

    # ---- tasks, agent side

    def _service_tasks(self, sid: str, status: str) -> list[_Task]:
        return sorted((t for t in self.tasks.values() if t.service_id == sid and t.status == status),
                      key=lambda t: t.seq)

    def poll(self, svc: _Service) -> dict:
        with self.lock:
            cancelling = self._service_tasks(svc.id, "cancelling")
            if cancelling:  # a pending cancel blocks all new work until completed
                return {"has_task": False, "task": None, "should_cancel": True,
                        "cancel_task_id": cancelling[0].id}
            pending = self._service_tasks(svc.id, "pending")
            task = self._offer(pending[0]) if pending else None
            return {"has_task": task is not None, "task": task, "should_cancel": False, "cancel_task_id": None}

    def _offer(self, task: _Task) -> dict:
        if task.raw is not None:
            return copy.deepcopy(task.raw)
        inputs = [f.input_json() for f in self.files.values() if f.task_id == task.id and f.created_by == "client"]
        return {"id": task.id, "task_prompt": task.task_prompt, "output_prompt": task.output_prompt,
                "session_id": task.session_id, "input_files": inputs}

    def accept(self, svc: _Service, task_id: str) -> dict:
        with self.lock:
            task = self.tasks.get(task_id)
            if task is None or task.service_id != svc.id or task.status != "pending":
                raise _bad_request("task not available")  # 400, not 409: the server's quirk
            task.status = "running"
            task.assigned_at = task.started_at = _now_iso()
            return {"success": True, "task_id": task.id, "message": "task accepted"}

    def complete(self, svc: _Service, task_id: str, status: str, output: Any, error_message: str | None,
                 file_ids: list[str]) -> dict:
        with self.lock:
            task = self.tasks.get(task_id)
            if task is None or task.service_id != svc.id or task.status not in ("running", "cancelling"):
                raise _bad_request("Task not found or invalid status transition")
            if file_ids:
                if isinstance(output, dict):
                    output = {**output, "file_ids": list(file_ids)}
                elif output is None:
                    output = {"file_ids": list(file_ids)}
            task.status, task.output, task.error_message = status, output, error_message
            task.completed_at = _now_iso()
            return {"success": True, "task_id": task.id, "status": status}

    def _task(self, task_id: str) -> _Task:
        """The task, or 404; the caller holds the lock."""
        task = self.tasks.get(task_id)
        if task is None:
            raise _not_found("task")
        return task

    def task_for_upload(self, svc: _Service, task_id: str) -> _Task:
        with self.lock:
            task = self._task(task_id)
            if task.service_id != svc.id:
                raise _forbidden("task belongs to another service")
            return task  # status deliberately not checked (uploads after a requeue succeed)

    def begin_upload(self, task_id: str) -> object:
        """Empty the task's temporary upload folder (as each real upload does); returns a ticket.

        An upload of the same task still running then loses its file: `end_upload` says so.
        """
        with self.lock:
            ticket = object()
            self.uploading[task_id] = ticket
            return ticket

    def end_upload(self, task_id: str, ticket: object) -> bool:
        """False when a later upload to the task started meanwhile. Safe to call twice."""
        with self.lock:
            if self.uploading.get(task_id) is not ticket:
                return False
            del self.uploading[task_id]
            return True

    def file_for_agent(self, svc: _Service, file_id: str) -> _File:
        with self.lock:
            rec = self.files.get(file_id)
            if rec is None:
                raise _not_found("file")
            task = self.tasks.get(rec.task_id)
            if svc.id not in rec.granted and (task is None or task.service_id != svc.id):
                raise _forbidden("file belongs to another service")
            return rec

    # ---- tasks and files, client side

    def add_file(self, task_id: str, filename: str, mime_type: str | None, size: int, created_by: str,
                 path: Path, file_id: str | None = None) -> _File:
        with self.lock:
            rec = _File(file_id or str(uuid.uuid4()), task_id, filename, mime_type, size, created_by, path)
            self.files[rec.id] = rec
            return rec

    def submit_task(self, service_id: str, prompt: str, output_prompt: str | None, session_id: str | None,
                    uploads: list[tuple[str, str | None, int, Path]]) -> dict:
        with self.lock:
            if service_id not in self.services:
                raise _not_found("service")
            task = _Task(str(uuid.uuid4()), service_id, self._next_seq(), prompt, output_prompt, session_id)
            self.tasks[task.id] = task
            for filename, mime, size, path in uploads:
                self.add_file(task.id, filename, mime, size, "client", path)
            return task.to_json()

    def get_task(self, task_id: str) -> dict:
        with self.lock:
            task = self._task(task_id)
            return task.to_json()

    def cancel_task(self, task_id: str) -> dict:
        with self.lock:
            task = self._task(task_id)
            if task.status in _TERMINAL:
                raise _bad_request(f"task already {task.status}")
            if task.status == "pending":
                task.status, task.completed_at = "cancelled", _now_iso()
            elif task.status == "running":
                task.status = "cancelling"  # the agent learns it through poll
            return task.to_json()

    def list_files(self, task_id: str) -> list[dict]:
        with self.lock:
            self._task(task_id)
            return [f.to_json() for f in self.files.values() if f.task_id == task_id]

    def get_file(self, file_id: str) -> _File:
        with self.lock:
            rec = self.files.get(file_id)
            if rec is None:
                raise _not_found("file")
            return rec

    # ---- test hooks

    def put_task(self, task: _Task) -> None:
        with self.lock:
            task.seq = self._next_seq()
            self.tasks[task.id] = task

    def set_cancelling(self, service_id: str, task_id: str) -> None:
        with self.lock:
            task = self.tasks.get(task_id)
            if task is None:
                task = _Task(task_id, service_id, self._next_seq())
                self.tasks[task_id] = task
            task.service_id, task.status = service_id, "cancelling"

    # ---- sweeper

    def sweep(self, now: float | None = None) -> None:
        """Mark silent services offline; requeue (or fail) their running tasks, cancel the cancelling."""
        now = time.monotonic() if now is None else now
        with self.lock:
            for svc in self.services.values():
                silent = svc.last_heartbeat is not None and now - svc.last_heartbeat > self.heartbeat_timeout
                if svc.status not in ("online", "busy") or not silent:
                    continue
                svc.status = "offline"
                self._event("offline", service_id=svc.id)
                for task in self.tasks.values():
                    if task.service_id == svc.id:
                        self._release(task)

    def _release(self, task: _Task) -> None:
        if task.status == "running" and task.retry_count < self.max_retries:
            task.status = "pending"
            task.retry_count += 1
            self._event("requeue", task_id=task.id, service_id=task.service_id, retry_count=task.retry_count)
        elif task.status == "running":
            task.status, task.completed_at = "failed", _now_iso()
            task.error_message = "agent went offline too many times"
            self._event("retries_exhausted", task_id=task.id, service_id=task.service_id)
        elif task.status == "cancelling":
            task.status, task.completed_at = "cancelled", _now_iso()
            self._event("cancelled", task_id=task.id, service_id=task.service_id)
