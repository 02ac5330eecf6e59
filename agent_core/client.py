"""The OpenAaaS agent protocol over HTTP (protocol.md §2): one method per endpoint.

Each call has its own retry policy (tenacity): `register` a few tries, `poll`
and `heartbeat` none (their loops come round again soon), `accept` and
`download` a few, `upload` and `complete` until acknowledged or finally refused.
httpx errors become agent_core errors in exactly one place, `_request`.
Transfers stream in both directions; only per-phase timeouts apply to them.
The api_key travels in headers only and never appears in a message.
"""

from __future__ import annotations

import email.utils
import logging
import os
import random
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable

import httpx
import tenacity

from agent_core import __version__
from agent_core.budget import Aborted, RequestBudget
from agent_core.config import Config
from agent_core.errors import (AuthRejected, ProtocolViolation, ServerRejected,
                               ServerUnavailable, TaskGone, WorkspaceError)
from agent_core.metrics import Metrics
from agent_core.protocol import Completion, Heartbeat, PollResult, Registration, UploadedFile

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int | None  # None = until acknowledged, a final refusal, or abort
    max_wait: float = 30.0
    log_level: int = logging.WARNING  # of each "failed, retrying" line


FEW = RetryPolicy(attempts=4, max_wait=10.0)
# `agent-core register` reports its outcome in one line: retries are not news on its terminal
REGISTER = RetryPolicy(attempts=4, max_wait=10.0, log_level=logging.INFO)
PERSIST = RetryPolicy(attempts=None, max_wait=60.0)

REGISTER_ERRORS = {
    404: "registration token unknown or already used (tokens are single use; ask for a new one)",
    403: "the service was revoked on the server",
    409: "the registration token is already active on the server",
    400: "the server refused the registration request as malformed",
}


def is_retryable(exc: BaseException) -> bool:
    """Worth another try: no usable answer, or the server said 'not now' (408, 429, 5xx)."""
    return isinstance(exc, (ServerUnavailable, ProtocolViolation))


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time()) if when else None


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    seen: BaseException | None = exc
    for _ in range(10):  # httpx wraps httpcore, which wraps the ssl module's error
        if seen is None:
            return False
        if isinstance(seen, kind):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _body_snippet(response: httpx.Response) -> str:
    """The server's message (JSON `message` or plain text), short and on one line."""
    try:
        text = response.text
    except (httpx.HTTPError, UnicodeDecodeError):
        return ""
    try:
        data = response.json()
        if isinstance(data, dict) and isinstance(data.get("message"), str):
            text = data["message"]
    except ValueError:
        pass
    text = " ".join(text.split())
    return text[:200]


def _json(response: httpx.Response, endpoint: str) -> Any:
    try:
        return response.json()
    except ValueError:
        raise ProtocolViolation(f"{endpoint}: the server's reply is not JSON", endpoint=endpoint,
                                status=response.status_code) from None


def _check_reply(response: httpx.Response, endpoint: str) -> None:
    """A 2xx whose body we do not use must still be JSON (or empty): garbage means a broken answer."""
    if response.content:
        _json(response, endpoint)


class Backoff:
    """Exponential backoff with full jitter, for loops that retry on their own (outside tenacity)."""

    def __init__(self, initial: float = 1.0, cap: float = 60.0):
        self.initial, self.cap, self.failures = initial, cap, 0

    def next(self) -> float:
        self.failures += 1
        return random.uniform(self.initial, min(self.cap, self.initial * 2 ** self.failures))

    def reset(self) -> None:
        self.failures = 0


class Client:
    """Talks to one OpenAaaS server as one registered service.

    `abort` cuts retries and budget waits short (the daemon's exit-now step);
    calls then raise `ServerUnavailable`.
    """

    def __init__(self, base_url: str, *, service_id: str | None = None, api_key: str | None = None,
                 http: httpx.Client | None = None, budget: RequestBudget | None = None,
                 connect_timeout: float = 10.0, read_timeout: float = 60.0, trust_env: bool = False,
                 abort: threading.Event | None = None):
        self.base_url = base_url.rstrip("/")
        self.service_id = service_id
        self._api_key = api_key
        self.budget = budget or RequestBudget(0, 0)
        self.abort = abort or threading.Event()
        timeout = httpx.Timeout(connect=connect_timeout, read=read_timeout, write=read_timeout,
                                pool=read_timeout)
        self._http = http or httpx.Client(timeout=timeout, trust_env=trust_env,
                                          headers={"User-Agent": f"agent-core/{__version__}"})
        self.last_success: dict[str, float] = {}  # endpoint -> time.time() of the last 2xx
        self.metrics = Metrics()  # records nothing; the daemon installs a real one (metrics.start)

    @classmethod
    def from_config(cls, cfg: Config, *, abort: threading.Event | None = None,
                    registered: bool = True) -> Client:
        service_id, api_key = cfg.require_registration() if registered else (None, None)
        s = cfg.server
        return cls(cfg.require_server(), service_id=service_id, api_key=api_key,
                   budget=RequestBudget(s.rate_limit_per_minute, s.heartbeat_reserve),
                   connect_timeout=s.connect_timeout_secs, read_timeout=s.read_timeout_secs,
                   trust_env=s.use_system_proxy, abort=abort)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- plumbing -----------------------------------------------------------

    def _auth(self) -> dict[str, str]:
        if not (self.service_id and self._api_key):
            raise ServerRejected("not registered: no service_id/api_key in the config")
        return {"X-Service-ID": self.service_id, "X-API-Key": self._api_key,
                "Authorization": f"Bearer {self._api_key}"}

    def _agent_url(self, action: str) -> str:
        return f"{self.base_url}/api/v1/agent/{self.service_id}/{action}"

    def _files_url(self, tail: str) -> str:
        return f"{self.base_url}/api/v1/files/agent/{self.service_id}/files/{tail}"

    def _check(self, response: httpx.Response, endpoint: str) -> httpx.Response:
        """Map a status to our errors; returns the response when it is a success."""
        status = response.status_code
        if 200 <= status < 300:
            self.last_success[endpoint] = time.time()
            return response
        self.metrics.error(endpoint)
        if status in (408, 429) or status >= 500:
            retry_after = _retry_after(response)
            if status == 429:
                self.budget.throttle(retry_after)
            raise ServerUnavailable(f"{endpoint}: server answered {status} {_body_snippet(response)}".rstrip(),
                                    endpoint=endpoint, status=status, retry_after=retry_after)
        cls = AuthRejected if status in (401, 403) else ServerRejected
        raise cls(f"{endpoint}: server refused ({status}) {_body_snippet(response)}".rstrip(),
                  endpoint=endpoint, status=status)

    def _transport_error(self, exc: httpx.HTTPError, endpoint: str) -> ServerUnavailable:
        self.metrics.error(endpoint)
        reason = str(exc) or exc.__class__.__name__
        if isinstance(exc, httpx.TimeoutException):
            reason = f"timed out ({exc.__class__.__name__})"
        elif _caused_by(exc, ssl.SSLError):  # the raw text alone does not say "TLS"
            reason = f"TLS error: {reason}"
        return ServerUnavailable(f"{endpoint}: cannot reach the server at {self.base_url}: {reason}",
                                 endpoint=endpoint)

    def _request(self, kind: str, method: str, url: str, *, interrupt: threading.Event | None = None,
                 **kwargs: Any) -> httpx.Response:
        """One attempt: take a budget slot, send, and translate every failure.

        `interrupt` gives up waiting for a budget slot when set (a poll nobody needs any more).
        """
        try:
            self.budget.acquire(kind, self.abort, interrupt)
        except Aborted:
            raise ServerUnavailable(f"{kind}: abandoned, the agent is exiting", endpoint=kind) from None
        try:
            response = self._http.request(method, url, **kwargs)
        except httpx.HTTPError as e:
            raise self._transport_error(e, kind) from None
        return self._check(response, kind)

    def _retrying(self, kind: str, policy: RetryPolicy) -> tenacity.Retrying:
        # not wait_exponential_jitter: its `initial` is deprecated in tenacity 9, its replacement missing in 8
        backoff = tenacity.wait_exponential(multiplier=0.5, max=policy.max_wait) + tenacity.wait_random(0, 1.0)

        def wait(state: tenacity.RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            hinted = getattr(exc, "retry_after", None)
            return min(hinted, 120.0) if hinted is not None else backoff(state)

        def log_retry(state: tenacity.RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            log.log(policy.log_level, "%s failed (attempt %d): %s; retrying in %.1f s", kind,
                    state.attempt_number, exc, state.next_action.sleep if state.next_action else 0)

        stop = tenacity.stop_never if policy.attempts is None else tenacity.stop_after_attempt(policy.attempts)
        return tenacity.Retrying(
            retry=tenacity.retry_if_exception(is_retryable),
            stop=stop | (lambda state: self.abort.is_set()),
            wait=wait,
            sleep=self.abort.wait,
            before_sleep=log_retry,
            reraise=True,
        )

    def _call(self, kind: str, policy: RetryPolicy, fn: Callable[[], Any]) -> Any:
        return self._retrying(kind, policy)(fn)

    # --- endpoints ----------------------------------------------------------

    def register(self, token: str, capacity: int) -> Registration:
        def attempt() -> Registration:
            try:
                r = self._request("register", "POST", f"{self.base_url}/api/v1/agent/register",
                                  json={"registration_token": token, "capacity": capacity})
            except ServerRejected as e:
                reason = REGISTER_ERRORS.get(e.status or 0)
                if reason:
                    raise ServerRejected(f"register: {reason} ({e.status})", endpoint="register",
                                         status=e.status) from None
                raise
            return Registration.from_json(_json(r, "register"))

        return self._call("register", REGISTER, attempt)

    def poll(self, current_load: int, capacity: int, *, interrupt: threading.Event | None = None) -> PollResult:
        r = self._request("poll", "POST", self._agent_url("poll"), headers=self._auth(), interrupt=interrupt,
                          json={"current_load": current_load,
                                "available_capacity": max(0, capacity - current_load)})
        if r.status_code == 204 or not r.content:
            return PollResult()
        return PollResult.from_json(_json(r, "poll"))

    def _effect_once(self, kind: str, policy: RetryPolicy, payload: dict) -> ServerRejected | None:
        """POST to a call that changes the task's state (accept, complete), with retries.

        Returns None when it took effect, else the server's 400/409 refusal. A refusal that
        follows an attempt whose reply was lost counts as taking effect: that attempt most
        likely went through, and the retry met its result.
        """
        unsure = False

        def attempt() -> ServerRejected | None:
            nonlocal unsure
            try:
                r = self._request(kind, "POST", self._agent_url(kind), headers=self._auth(), json=payload)
                _check_reply(r, kind)
                return None
            except ServerRejected as e:
                if e.status in (400, 409) and not isinstance(e, AuthRejected):
                    return None if unsure else e
                raise
            except ServerUnavailable as e:
                unsure = unsure or e.status is None or e.status >= 500
                raise
            except ProtocolViolation:
                unsure = True  # a 200 we cannot read: the server may well have acted
                raise

        return self._call(kind, policy, attempt)

    def accept(self, task_id: str) -> bool:
        """True when the task is ours now; False when it is not ours to run (400/409)."""
        return self._effect_once("accept", FEW, {"task_id": task_id}) is None

    def download(self, file_id: str, dest: Path, max_bytes: int) -> int:
        """Stream one input file into `dest`; returns its size. More than `max_bytes` is an error."""
        def attempt() -> int:
            try:
                self.budget.acquire("download", self.abort)
            except Aborted:
                raise ServerUnavailable("download: abandoned, the agent is exiting", endpoint="download") from None
            size = 0
            try:
                with self._http.stream("GET", self._files_url(f"{file_id}/download"),
                                       headers=self._auth()) as r:
                    if r.status_code >= 300:
                        r.read()
                    self._check(r, "download")
                    # 0644 whatever the umask: the container may run as another user
                    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
                    os.fchmod(fd, 0o644)
                    with os.fdopen(fd, "wb") as out:
                        for chunk in r.iter_bytes(CHUNK):
                            size += len(chunk)
                            if size > max_bytes:
                                raise WorkspaceError(
                                    f"input file {file_id} is larger than limits.max_input_bytes ({max_bytes} bytes)")
                            out.write(chunk)
            except httpx.HTTPError as e:
                raise self._transport_error(e, "download") from None
            except OSError as e:
                raise WorkspaceError(f"cannot write input file {dest.name}: {e.strerror}") from None
            self.metrics.transferred("down", size)
            return size

        return self._call("download", FEW, attempt)

    def upload(self, task_id: str, rel_path: str, open_file: Callable[[], IO[bytes]]) -> UploadedFile:
        """Stream one output file; `open_file` is called once per attempt (each re-reads from the start)."""
        def attempt() -> UploadedFile:
            with open_file() as f:
                # httpx sends data fields before files: task_id precedes the file part, as the server insists
                r = self._request("upload", "POST", self._files_url("upload"), headers=self._auth(),
                                  data={"task_id": task_id},
                                  files={"file": (rel_path, f, "application/octet-stream")})
                self.metrics.transferred("up", f.tell())  # sent from the start to the end of the file
            return UploadedFile.from_json(_json(r, "upload"))

        return self._call("upload", PERSIST, attempt)

    def complete(self, completion: Completion) -> None:
        """Report a task's end. Raises TaskGone when the server finally refuses it (400)."""
        refused = self._effect_once("complete", PERSIST, completion.to_json())
        if refused is not None:
            raise TaskGone(str(refused), endpoint="complete", status=refused.status)

    def heartbeat(self, beat: Heartbeat) -> None:
        self._request("heartbeat", "POST", self._agent_url("heartbeat"), headers=self._auth(),
                      json=beat.to_json())

    def health(self) -> bool:
        try:
            return self._http.get(f"{self.base_url}/health").status_code == 200
        except httpx.HTTPError:
            return False

