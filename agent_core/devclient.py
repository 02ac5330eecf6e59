"""An admin/client helper for the OpenAaaS server (protocol.md §4), for tests and the demo.

    with DevClient(server.url, server.admin_key) as dev:
        svc = dev.create_service("echo")               # svc["registration_token"] for the agent
        task = dev.submit_task(svc["id"], "hello", files=[("in.txt", b"data")])
        done = dev.wait_for_status(task["id"], "completed", timeout=30)

Files given as a `Path` are streamed from disk, and downloads are streamed to disk,
so large files never sit in memory.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Iterable
from urllib.parse import quote

import httpx

from agent_core.protocol import TASK_STATUSES

__all__ = ["DevClient", "DevClientError"]


class DevClientError(httpx.HTTPStatusError):
    """The server answered with an error status; `.status_code` and `.body` (text) say which."""

    def __init__(self, response: httpx.Response):
        self.status_code = response.status_code
        self.body = response.text
        super().__init__(f"{response.request.method} {response.request.url.path} -> {self.status_code}: "
                         f"{self.body[:500]}", request=response.request, response=response)


def _seg(value: str) -> str:
    return quote(value, safe="")


class DevClient:
    def __init__(self, base_url: str, admin_key: str, *, timeout: float = 30.0,
                 transport: httpx.BaseTransport | None = None):
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {admin_key}"},
            timeout=httpx.Timeout(timeout, connect=5.0),
            transport=transport,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> DevClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- plumbing

    def _call(self, method: str, path: str, **kwargs) -> httpx.Response:
        resp = self._http.request(method, path, **kwargs)
        self._check(resp)
        return resp

    @staticmethod
    def _check(resp: httpx.Response) -> None:
        if resp.is_success:
            return
        resp.read()
        raise DevClientError(resp)

    # ---- services

    def create_service(self, name: str, id: str | None = None, *, description: str = "", usage: str = "",
                       is_public: bool = False) -> dict:
        """Create a service; the answer holds the one-time `registration_token`."""
        body: dict = {"name": name, "description": description, "usage": usage, "is_public": is_public}
        if id is not None:
            body["id"] = id
        return self._call("POST", "/api/v1/services", json=body).json()

    def delete_service(self, id: str) -> None:
        self._call("DELETE", f"/api/v1/services/{_seg(id)}", params={"force": "true"})

    # ---- tasks

    def submit_task(self, service_id: str, prompt: str, output_prompt: str | None = None,
                    files: Iterable[tuple[str, bytes | Path]] = (), session_id: str | None = None) -> dict:
        """Submit a task: JSON without files, multipart (streamed from disk for Paths) with them."""
        fields = {"service_id": service_id, "task_prompt": prompt, "output_prompt": output_prompt,
                  "session_id": session_id}
        fields = {k: v for k, v in fields.items() if v is not None}
        files = list(files)
        if not files:
            return self._call("POST", "/api/v1/client/tasks", json=fields).json()
        with contextlib.ExitStack() as stack:
            parts = []
            for filename, content in files:
                if isinstance(content, Path):
                    content = stack.enter_context(open(content, "rb"))
                parts.append(("files", (filename, content, "application/octet-stream")))
            return self._call("POST", "/api/v1/client/tasks", data=fields, files=parts).json()

    def get_task(self, id: str) -> dict:
        return self._call("GET", f"/api/v1/client/tasks/{_seg(id)}").json()

    def cancel_task(self, id: str) -> dict:
        return self._call("POST", f"/api/v1/client/tasks/{_seg(id)}/cancel").json()

    def wait_for_status(self, task_id: str, statuses: str | Iterable[str] = TASK_STATUSES, timeout: float = 30.0,
                        interval: float = 0.05) -> dict:
        """Poll the task until its status is one of `statuses`; TimeoutError names the last one seen."""
        wanted = {statuses} if isinstance(statuses, str) else set(statuses)
        deadline = time.monotonic() + timeout
        while True:
            task = self.get_task(task_id)
            if task["status"] in wanted:
                return task
            if time.monotonic() >= deadline:
                raise TimeoutError(f"task {task_id} is still {task['status']!r} after {timeout} s "
                                   f"(wanted one of {sorted(wanted)})")
            time.sleep(interval)

    # ---- files

    def list_files(self, task_id: str) -> list[dict]:
        return self._call("GET", f"/api/v1/client/files/list/{_seg(task_id)}").json()["files"]

    def download_file(self, file_id: str, dest: Path) -> Path:
        """Stream a file to `dest` (parent directories created); returns `dest`."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with self._http.stream("GET", f"/api/v1/client/files/{_seg(file_id)}/download") as resp:
            self._check(resp)
            with open(dest, "wb") as out:
                for chunk in resp.iter_bytes(1024 * 1024):
                    out.write(chunk)
        return dest

    def health(self) -> dict:
        return self._call("GET", "/health").json()
