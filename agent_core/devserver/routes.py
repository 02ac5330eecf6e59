"""The app: each request matched to one `_App` method, after faults, rate limit and auth.

Adding an endpoint: one `_route(...)` line in `_ROUTES` and the `_App` method it names.
"""

from __future__ import annotations

import hmac
import mimetypes
import re
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import unquote

from agent_core.devserver.bodies import _ANY, _json_body, _multipart, _Part, _Request
from agent_core.devserver.downloads import _content_disposition, _endless_stream, _file_response
from agent_core.devserver.faults import Faults
from agent_core.devserver.ratelimit import _RateLimiter
from agent_core.devserver.responses import (
    _bad_request, _error, _forbidden, _HttpError, _json, _not_found, _Response, _text, _unauthorized)
from agent_core.devserver.state import _TERMINAL, _save_stream, _Service, _Store, _Task

_RETRY_AFTER = "60"  # the real server's constant, whatever its window


class Call(NamedTuple):
    method: str
    path: str
    status: int | None   # None: the connection was dropped without an answer
    time: float          # time.monotonic() when the request arrived
    body: Any            # parsed JSON body, a multipart summary, or None


_SEG = r"(?P<{}>[^/]+)"
_AGENT, _REGISTER, _ADMIN, _PUBLIC = "agent", "register", "admin", "public"
_AGENT_PREFIXES = ("/api/v1/agent/", "/api/v1/files/agent/")


@dataclass(frozen=True)
class _Route:
    method: str
    pattern: re.Pattern
    kind: str
    handler: str  # name of an `_App` method


def _route(method: str, template: str, kind: str, handler: str) -> _Route:
    regex = re.sub(r"\{(\w+)\}", lambda m: _SEG.format(m.group(1)), template)
    return _Route(method, re.compile(regex + r"\Z"), kind, handler)


_ROUTES = [
    _route("GET", "/health", _PUBLIC, "health"),
    _route("POST", "/api/v1/agent/register", _REGISTER, "register"),
    _route("POST", "/api/v1/agent/{sid}/poll", _AGENT, "poll"),
    _route("POST", "/api/v1/agent/{sid}/accept", _AGENT, "accept"),
    _route("POST", "/api/v1/agent/{sid}/complete", _AGENT, "complete"),
    _route("POST", "/api/v1/agent/{sid}/heartbeat", _AGENT, "heartbeat"),
    _route("GET", "/api/v1/files/agent/{sid}/files/{file_id}/download", _AGENT, "agent_download"),
    _route("POST", "/api/v1/files/agent/{sid}/files/upload", _AGENT, "agent_upload"),
    _route("POST", "/api/v1/services", _ADMIN, "create_service"),
    _route("DELETE", "/api/v1/services/{id}", _ADMIN, "delete_service"),
    _route("POST", "/api/v1/client/tasks", _ADMIN, "submit_task"),
    _route("GET", "/api/v1/client/tasks/{id}", _ADMIN, "get_task"),
    _route("POST", "/api/v1/client/tasks/{id}/cancel", _ADMIN, "cancel_task"),
    _route("GET", "/api/v1/client/files/list/{task_id}", _ADMIN, "list_files"),
    _route("GET", "/api/v1/client/files/{id}/download", _ADMIN, "client_download"),
]

_STR, _INT, _BOOL = (str,), (int,), (bool,)
_REGISTER_SCHEMA = {"registration_token": (_STR, True), "capacity": (_INT, False)}
_ACCEPT_SCHEMA = {"task_id": (_STR, True)}
_COMPLETE_SCHEMA = {"task_id": (_STR, True), "status": (_STR, True), "output": ((_ANY,), False),
                    "error_message": (_STR, False), "file_ids": ((list,), False)}
_HEARTBEAT_SCHEMA = {"status": (_STR, True), "current_load": (_INT, True), "capacity": (_INT, False),
                     "available_capacity": (_INT, False)}
_SERVICE_SCHEMA = {"name": (_STR, True), "description": (_STR, False), "usage": (_STR, False),
                   "id": (_STR, False), "is_public": (_BOOL, False)}
_TASK_SCHEMA = {"service_id": (_STR, True), "task_prompt": (_STR, True), "output_prompt": (_STR, False),
                "session_id": (_STR, False)}


def _bearer(headers) -> str | None:
    value = headers.get("Authorization") or ""
    return value[7:].strip() if value[:7].lower() == "bearer " else None


def _agent_key(headers) -> str | None:
    # X-API-Key wins even when empty (then it is a 401); the Bearer token is only a fallback
    key = headers.get("X-API-Key")
    return key if key is not None else _bearer(headers)

def _client_filename_ok(name: str | None) -> bool:
    return bool(name) and not any(bad in name for bad in ("..", "/", "\\", "\0"))


class _App:
    """Maps requests to store operations: faults, rate limit, auth, body shapes, call log."""

    def __init__(self, store: _Store, faults: Faults, limiter: _RateLimiter, admin_key: str, max_file_bytes: int,
                 request_timeout: float):
        self.store = store
        self.faults = faults
        self.limiter = limiter
        self.admin_key = admin_key
        self.max_file_bytes = max_file_bytes
        self.request_timeout = request_timeout  # seconds a request body may take; 0 = no limit
        self.log_lock = threading.Lock()
        self.calls: list[Call] = []
        self.stats: Counter[str] = Counter()
        self.errors: list[str] = []

    def record_call(self, call: Call) -> None:
        with self.log_lock:
            self.calls.append(call)
            if call.status == 429:
                self.stats["429"] += 1

    def record_error(self, text: str) -> None:
        with self.log_lock:
            self.errors.append(text)

    def count(self, stat: str) -> None:
        with self.log_lock:
            self.stats[stat] += 1

    def handle(self, req: _Request) -> _Response:
        is_agent = req.path.startswith(_AGENT_PREFIXES)
        delay, fault = self.faults._pick(req.path, is_agent)
        if delay:
            self.count("delayed")
            if req.closing.wait(delay):  # went down meanwhile: a real server would not answer
                return _Response(0, drop=True)
        if fault is not None:
            self.count("faults")
            return fault
        if rate := self.faults._body_rate(req.path, is_agent):
            req.body.throttle(rate)
        route, params = self._match(req)
        if route.kind == _AGENT:
            key = _agent_key(req.headers)
            if not self.limiter.allow(key or ""):  # before auth: bad keys fill a window too
                self.count("rate_limited")
                return _error(429, "RateLimited", "too many requests", {"Retry-After": _RETRY_AFTER})
            svc = self.store.authenticate(req.headers.get("X-Service-ID"), key)
            if params.pop("sid") != svc.id:
                raise _forbidden("service id in path does not match X-Service-ID")
            return getattr(self, route.handler)(req, svc, **params)
        if route.kind == _ADMIN:
            key = _bearer(req.headers)
            if not key or not hmac.compare_digest(key.encode(), self.admin_key.encode()):
                raise _unauthorized("admin key required")
        return getattr(self, route.handler)(req, **params)

    def _match(self, req: _Request) -> tuple[_Route, dict[str, str]]:
        allowed = False
        for route in _ROUTES:
            match = route.pattern.match(req.path)
            if match:
                if route.method == req.method:
                    return route, {k: unquote(v) for k, v in match.groupdict().items()}
                allowed = True
        if allowed:
            raise _HttpError(_error(405, "MethodNotAllowed", "method not allowed"))
        raise _not_found("route")

    # ---- public and agent routes

    def health(self, req: _Request) -> _Response:
        return _json(200, {"status": "healthy"})

    def register(self, req: _Request) -> _Response:
        try:
            body = _json_body(req, _REGISTER_SCHEMA)
        except _HttpError as exc:  # any malformed register body is a 400
            raise _HttpError(_text(400, exc.response.body.decode())) from None
        return _json(200, self.store.register(body["registration_token"], body.get("capacity") or 1))

    def poll(self, req: _Request, svc: _Service) -> _Response:
        return _json(200, self.store.poll(svc))  # the body is ignored, as on the real server

    def accept(self, req: _Request, svc: _Service) -> _Response:
        body = _json_body(req, _ACCEPT_SCHEMA)
        return _json(200, self.store.accept(svc, body["task_id"]))

    def complete(self, req: _Request, svc: _Service) -> _Response:
        body = _json_body(req, _COMPLETE_SCHEMA)
        file_ids = body.get("file_ids") or []
        if body["status"] not in _TERMINAL or not all(isinstance(f, str) for f in file_ids):
            raise _HttpError(_text(422, "Failed to deserialize the JSON body into the target type: "
                                       "bad status or file_ids"))
        return _json(200, self.store.complete(svc, body["task_id"], body["status"], body.get("output"),
                                              body.get("error_message"), file_ids))

    def heartbeat(self, req: _Request, svc: _Service) -> _Response:
        body = _json_body(req, _HEARTBEAT_SCHEMA)
        return _json(200, self.store.heartbeat(svc, body["status"], body["current_load"], body.get("capacity")))

    def agent_download(self, req: _Request, svc: _Service, file_id: str) -> _Response:
        if self.faults._is_endless(file_id):
            return _Response(200, content_type="application/octet-stream", stream=_endless_stream(req.closing),
                             headers={"Content-Disposition": _content_disposition("endless.bin")}, chunked=False)
        rate = self.faults._body_rate(req.path, True, self.faults._slow_downloads)
        return _file_response(self.store.file_for_agent(svc, file_id), req.headers, rate)

    def agent_upload(self, req: _Request, svc: _Service) -> _Response:
        task: _Task | None = None
        ticket: object = None
        saved: tuple[str, str | None, int, Path] | None = None
        summary: dict[str, Any] = {"fields": {}, "files": []}
        req.record = summary
        try:
            for part in _multipart(req):
                if part.name == "task_id":
                    summary["fields"]["task_id"] = task_id = part.text()
                    task = self.store.task_for_upload(svc, task_id)
                    ticket = self.store.begin_upload(task.id)
                    self.count("uploads")
                elif part.name == "file":
                    if task is None:
                        raise _bad_request("the task_id part must precede the file part")
                    if saved is not None:
                        raise _bad_request("one file per request")
                    saved = self._save_part(part, summary)
                else:
                    part.text()  # unknown fields are skipped
            if task is None or saved is None:
                raise _bad_request("need a task_id part and a file part")
            if not self.store.end_upload(task.id, ticket):
                raise _HttpError(_error(500, "Internal", "temporary upload file vanished (overlapping upload)"))
        except BaseException:
            if task is not None:
                self.store.end_upload(task.id, ticket)
            if saved is not None:
                saved[3].unlink(missing_ok=True)
            raise
        filename, mime, size, path = saved
        rec = self.store.add_file(task.id, filename, mime, size, "agent", path)
        return _json(200, {"file_id": rec.id, "filename": rec.filename, "mime_type": rec.mime_type,
                           "size_bytes": rec.size_bytes, "created_at": rec.created_at})

    def _save_part(self, part: _Part, summary: dict) -> tuple[str, str | None, int, Path]:
        filename = part.filename
        if not filename or "\0" in filename:
            raise _bad_request("the file part needs a filename")
        mime = part.content_type if part.content_type and part.content_type != "application/octet-stream" \
            else mimetypes.guess_type(filename)[0]
        path, size = _save_stream(self.store.files_dir, part.chunks(), self.max_file_bytes)
        summary["files"].append({"name": part.name, "filename": filename, "size_bytes": size})
        return filename, mime, size, path

    # ---- admin and client routes

    def create_service(self, req: _Request) -> _Response:
        body = _json_body(req, _SERVICE_SCHEMA)
        return _json(201, self.store.create_service(body["name"], body.get("description") or "",
                                                    body.get("usage") or "", body.get("id"),
                                                    bool(body.get("is_public"))))

    def delete_service(self, req: _Request, id: str) -> _Response:
        self.store.delete_service(id, force=req.query.get("force", ["false"])[0].lower() == "true")
        return _json(200, {"success": True, "id": id})

    def submit_task(self, req: _Request) -> _Response:
        if not req.is_multipart:
            body = _json_body(req, _TASK_SCHEMA)
            return _json(201, self.store.submit_task(body["service_id"], body["task_prompt"],
                                                     body.get("output_prompt"), body.get("session_id"), []))
        fields: dict[str, str] = {}
        uploads: list[tuple[str, str | None, int, Path]] = []
        summary = {"fields": fields, "files": []}
        req.record = summary
        try:
            for part in _multipart(req):
                if part.name == "files":
                    if not _client_filename_ok(part.filename):
                        raise _bad_request("invalid filename")
                    uploads.append(self._save_part(part, summary))
                else:
                    fields[part.name or ""] = part.text()
            if not fields.get("service_id") or "task_prompt" not in fields:
                raise _bad_request("service_id and task_prompt are required")
            return _json(201, self.store.submit_task(fields["service_id"], fields["task_prompt"],
                                                     fields.get("output_prompt"), fields.get("session_id"),
                                                     uploads))
        except BaseException:
            for upload in uploads:
                upload[3].unlink(missing_ok=True)
            raise

    def get_task(self, req: _Request, id: str) -> _Response:
        return _json(200, self.store.get_task(id))

    def cancel_task(self, req: _Request, id: str) -> _Response:
        return _json(200, self.store.cancel_task(id))

    def list_files(self, req: _Request, task_id: str) -> _Response:
        return _json(200, {"files": self.store.list_files(task_id)})

    def client_download(self, req: _Request, id: str) -> _Response:
        return _file_response(self.store.get_file(id), req.headers)
