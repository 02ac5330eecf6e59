"""Fault injection (`Faults`): failures, garbage, drops, delays and slow bodies, all off by default."""

from __future__ import annotations

import copy
import json
import math
import random
import threading
from typing import Callable

from agent_core.devserver.responses import _error, _Response
from agent_core.devserver.state import _save_stream, _Store, _Task


class _Rule:
    def __init__(self, remaining: int, path_contains: str | None, response: Callable[[], _Response] | None,
                 delay: float = 0.0, rate: float = 0.0):
        self.remaining = remaining
        self.path_contains = path_contains
        self.response = response
        self.delay = delay
        self.rate = rate  # bytes per second a request body is read at

    def matches(self, path: str, is_agent: bool) -> bool:
        if self.remaining <= 0:
            return False
        return is_agent if self.path_contains is None else self.path_contains in path


class Faults:
    """Fault injection, all off by default and thread-safe.

    Counted rules (`fail_next`, `garbage_next`, `drop_next`, `delay_next`) apply to
    agent routes (register, /api/v1/agent/..., /api/v1/files/agent/...) or, with
    `path_contains`, to any request whose path contains that string; `slow_upload_next`
    to uploads by default. Rules fire in the order they were added. Faulted requests
    do not count towards the rate limit.
    """

    def __init__(self, store: _Store):
        self._store = store
        self._lock = threading.Lock()
        self._rules: list[_Rule] = []
        self._delays: list[_Rule] = []
        self._slow: list[_Rule] = []
        self._slow_downloads: list[_Rule] = []
        self._ratio = 0.0
        self._ratio_statuses: tuple[int, ...] = ()
        self._ratio_delay = 0.0
        self._random = random.Random()
        self._endless: set[str] = set()

    def fail_next(self, n: int, status: int = 503, retry_after: float | None = None,
                  path_contains: str | None = None) -> None:
        headers = {} if retry_after is None else {"Retry-After": _retry_after_value(retry_after)}
        self._add(self._rules, _Rule(n, path_contains, lambda: _error(status, "Injected", "injected fault",
                                                                        dict(headers))))

    def fail_ratio(self, p: float, statuses: tuple[int, ...] = (500, 429), delay_secs: float = 0.0,
                   seed: int | None = None) -> None:
        """Fail a random share `p` of agent requests (0 turns it off); 429s carry Retry-After: 1."""
        with self._lock:
            self._ratio, self._ratio_statuses, self._ratio_delay = p, tuple(statuses), delay_secs
            self._random = random.Random(seed)

    def delay_next(self, n: int, secs: float, path_contains: str | None = None) -> None:
        """Hold the next n requests for `secs` before handling them normally."""
        self._add(self._delays, _Rule(n, path_contains, None, delay=secs))

    def slow_upload_next(self, n: int, bytes_per_sec: float, path_contains: str | None = "/files/upload") -> None:
        """Read the bodies of the next n matching requests (default: agent uploads) at about
        `bytes_per_sec`, so they can run past the request timeout."""
        if bytes_per_sec <= 0:
            raise ValueError("bytes_per_sec must be positive")
        self._add(self._slow, _Rule(n, path_contains, None, rate=bytes_per_sec))

    def slow_download_next(self, n: int, bytes_per_sec: float) -> None:
        """Send the next n agent downloads at about `bytes_per_sec` (a slow link)."""
        if bytes_per_sec <= 0:
            raise ValueError("bytes_per_sec must be positive")
        self._add(self._slow_downloads, _Rule(n, "/download", None, rate=bytes_per_sec))

    def garbage_next(self, n: int, path_contains: str | None = None) -> None:
        """Answer 200 with a body that is not JSON (but claims to be)."""
        self._add(self._rules, _Rule(n, path_contains, lambda: _Response(200, b'{"has_task": tru<html>oops')))

    def drop_next(self, n: int, path_contains: str | None = None) -> None:
        """Read the request, then close the connection without an answer."""
        self._add(self._rules, _Rule(n, path_contains, lambda: _Response(0, drop=True)))

    def offer_raw_task(self, service_id: str, task: dict, files: dict[str, bytes] | None = None) -> str:
        """Make poll offer `task` verbatim (hostile ids, names, lying sizes). Returns the store key.

        Accept/complete then work on it like on any task. `files` maps input file ids
        to bytes to store under exactly those ids; input ids that name already stored
        files become downloadable by this service. Offering an id again resets it to pending.
        """
        raw_id = task.get("id")
        key = raw_id if isinstance(raw_id, str) else json.dumps(raw_id)
        names = {f.get("id"): f.get("filename") for f in task.get("input_files") or []
                 if isinstance(f, dict) and isinstance(f.get("id"), str)}
        for file_id, data in (files or {}).items():
            path, size = _save_stream(self._store.files_dir, [data], len(data))
            name = names.get(file_id)
            self._store.add_file(key, name if isinstance(name, str) else "raw", None, size, "client", path,
                                 file_id=file_id)
        with self._store.lock:
            for file_id in names:
                if file_id in self._store.files:
                    self._store.files[file_id].granted.add(service_id)
            self._store.put_task(_Task(key, service_id, 0, raw=copy.deepcopy(task),
                                       task_prompt=str(task.get("task_prompt", ""))))
        return key

    def endless_download(self, file_id: str) -> None:
        """Downloads of `file_id` (agent route) stream bytes until the client hangs up."""
        with self._lock:
            self._endless.add(file_id)

    def cancel_unknown(self, service_id: str, task_id: str) -> None:
        """Poll answers should_cancel for `task_id` (never offered) until complete is sent for it."""
        self._store.set_cancelling(service_id, task_id)

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()
            self._delays.clear()
            self._slow.clear()
            self._slow_downloads.clear()
            self._ratio = 0.0
            self._endless.clear()

    # ---- used by the app

    def _add(self, rules: list[_Rule], rule: _Rule) -> None:
        with self._lock:
            rules.append(rule)

    def _is_endless(self, file_id: str) -> bool:
        with self._lock:
            return file_id in self._endless

    def _body_rate(self, path: str, is_agent: bool, rules: list[_Rule] | None = None) -> float | None:
        """The bytes per second to read this request's body (or send a download) at, if slowed."""
        with self._lock:
            for rule in self._slow if rules is None else rules:
                if rule.matches(path, is_agent):
                    rule.remaining -= 1
                    return rule.rate
            return None

    def _pick(self, path: str, is_agent: bool) -> tuple[float, _Response | None]:
        """The delay to apply and the fault response to send instead of handling, if any."""
        with self._lock:
            delay = 0.0
            for rule in self._delays:
                if rule.matches(path, is_agent):
                    rule.remaining -= 1
                    delay = rule.delay
                    break
            for rule in self._rules:
                if rule.matches(path, is_agent):
                    rule.remaining -= 1
                    return delay, rule.response()
            if is_agent and self._ratio > 0 and self._random.random() < self._ratio:
                status = self._random.choice(self._ratio_statuses)
                headers = {"Retry-After": "1"} if status == 429 else {}
                return delay + self._ratio_delay, _error(status, "Injected", "injected random fault", headers)
            return delay, None


def _retry_after_value(secs: float) -> str:
    return str(max(1, math.ceil(secs)))
