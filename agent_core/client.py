"""The OpenAaaS agent protocol over HTTP (protocol.md §2): one method per endpoint.

Each call has its own retry policy (tenacity): `register` a few tries, `poll`
and `heartbeat` none (their loops come round again soon), `accept` a few,
`download`, `upload` and `complete` until acknowledged or finally refused (a
download also until its caller's `cancel` is set: an outage must not fail the task).
httpx errors become agent_core errors in exactly one place, `_request`.
Transfers stream in both directions; only per-phase timeouts apply to them.
An upload can be answered before its body is sent (over the size limit, 429, 408: see
`upload`); some of those answers are final for the file (`UploadRefused`).
The api_key travels in headers only and never appears in a message.
Every reply is hostile until read: JSON replies are read up to `max_reply_bytes`,
error bodies up to a few KiB, and every id in a URL is exactly one path segment.
"""

from __future__ import annotations

import email.utils
import json
import logging
import os
import re
import ssl
import threading
import time
from dataclasses import dataclass
from typing import IO, Any, Callable, NamedTuple
from urllib.parse import quote

import httpx
import tenacity

from agent_core import __version__
from agent_core.budget import Aborted, RequestBudget
from agent_core.config import Config
from agent_core.errors import (AuthRejected, ProtocolViolation, ServerRejected, ServerUnavailable, TaskGone,
                               UploadRefused, WorkspaceError)
from agent_core.lifecycle import Lifecycle
from agent_core.metrics import Metrics
from agent_core.protocol import Completion, Heartbeat, PollResult, Registration, UploadedFile

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024
RETRY_LOG_EVERY_SECS = 60.0  # a retried call's failures are logged at its level once per this
MAX_REPLY_BYTES = 16 * 1024 * 1024  # limits.max_reply_bytes
SNIPPET_BYTES = 4096  # of an error body: enough for any message worth showing
UPLOAD_TIMEOUTS = 2  # 408s per file: a second try may meet a less busy link, a third would not
UPLOAD_CUT_OFFS = 3  # sends of one file cut off in a row, the server up, before giving the file up
# a 400 to an upload that is about the file's size (the reference server's limit answers 400, not 413)
TOO_LARGE = re.compile(r"too (large|big)|larger than|exceed|size|limit", re.IGNORECASE)


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int | None  # None = until acknowledged, a final refusal, or the exit-now step
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
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (ValueError, TypeError):  # neither seconds nor a date: no hint
        return None
    return max(0.0, when.timestamp() - time.time())


def _path(url: str) -> str:
    """A URL's path for a debug line (no query: nothing secret is there, but nothing needed either)."""
    return httpx.URL(url).raw_path.decode("ascii", "replace").split("?", 1)[0]


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    seen: BaseException | None = exc
    for _ in range(10):  # httpx wraps httpcore, which wraps the ssl module's error
        if seen is None:
            return False
        if isinstance(seen, kind):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _no_answer(exc: ServerUnavailable) -> bool:
    """The connection broke (closed, reset) with no answer: no timeout, no refused connect.

    `_request` raises our errors `from None`, which still keeps the httpx one as `__context__`."""
    return isinstance(exc.__context__, (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError))


def path_segment(value: str) -> str:
    """`value` as exactly one URL path segment, whatever it holds.

    Ids come from the server: "../health", "a/b", "x?y#z" or "%2e%2e" must not turn an
    authenticated request into one for another path of the server's origin. quote() leaves
    "." and ".." alone, and URL normalisation would fold them, so they are encoded too.
    """
    if not value:
        raise ProtocolViolation("an empty id cannot be put in a URL path")
    segment = quote(value, safe="")
    return segment.replace(".", "%2E") if segment in (".", "..") else segment


class _Reply(NamedTuple):
    status: int
    body: bytes


def _read_prefix(response: httpx.Response, limit: int) -> tuple[bytearray, bool]:
    """A streamed body, read until it passes `limit` bytes (by at most one chunk; the rest stays
    unread), and whether it did. No copies: a reply at the cap costs its size once."""
    body = bytearray()
    for chunk in response.iter_bytes():
        body += chunk
        if len(body) > limit:
            return body, True
    return body, False


def _loads(body: bytes) -> Any:
    """json.loads; ValueError for anything unreadable (RecursionError: nesting made to exhaust the stack)."""
    try:
        return json.loads(body)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _body_snippet(response: httpx.Response) -> str:
    """The server's message (JSON `message` or plain text), short and on one line; reads a few KiB at most."""
    try:
        raw = _read_prefix(response, SNIPPET_BYTES)[0][:SNIPPET_BYTES]
    except httpx.HTTPError:
        return ""
    text = raw.decode(response.encoding or "utf-8", errors="replace")
    try:
        data = _loads(raw)
        if isinstance(data, dict) and isinstance(data.get("message"), str):
            text = data["message"]
    except ValueError:
        pass
    text = " ".join(text.split())
    return text[:200]


def _json(reply: _Reply, endpoint: str) -> Any:
    try:
        return _loads(reply.body)
    except ValueError:
        raise ProtocolViolation(f"{endpoint}: the server's reply is not JSON", endpoint=endpoint,
                                status=reply.status) from None


def _check_reply(reply: _Reply, endpoint: str) -> None:
    """A 2xx whose body we do not use must still be JSON (or empty): garbage means a broken answer."""
    if reply.body:
        _json(reply, endpoint)


class Client:
    """Talks to one OpenAaaS server as one registered service.

    The daemon's `lifecycle` cuts retries and budget waits short at its exit-now step; calls
    then raise `ServerUnavailable`. `metrics` counts failed requests and transferred bytes:
    the client sees every request. Both default to ones that never exit and record nothing.
    """

    def __init__(self, base_url: str, *, service_id: str | None = None, api_key: str | None = None,
                 http: httpx.Client | None = None, budget: RequestBudget | None = None,
                 connect_timeout: float = 10.0, read_timeout: float = 60.0, trust_env: bool = False,
                 lifecycle: Lifecycle | None = None, metrics: Metrics | None = None,
                 max_reply_bytes: int = MAX_REPLY_BYTES):
        self.base_url = base_url.rstrip("/")
        self.service_id = service_id
        self._api_key = api_key
        self.max_reply_bytes = max_reply_bytes
        self.budget = budget or RequestBudget(0, 0)
        self._lifecycle = lifecycle or Lifecycle()
        self._metrics = metrics or Metrics()
        timeout = httpx.Timeout(connect=connect_timeout, read=read_timeout, write=read_timeout,
                                pool=read_timeout)
        self._http = http or httpx.Client(timeout=timeout, trust_env=trust_env,
                                          headers={"User-Agent": f"agent-core/{__version__}"})
        self.last_success: dict[str, float] = {}  # endpoint -> time.time() of the last 2xx
        self._retry_said: dict[str, float] = {}  # endpoint -> when its failures were last logged loud

    @classmethod
    def from_config(cls, cfg: Config, *, lifecycle: Lifecycle | None = None, metrics: Metrics | None = None,
                    registered: bool = True) -> Client:
        service_id, api_key = cfg.require_registration() if registered else (None, None)
        s = cfg.server
        return cls(cfg.require_server(), service_id=service_id, api_key=api_key,
                   budget=RequestBudget(s.rate_limit_per_minute, s.heartbeat_reserve),
                   connect_timeout=s.connect_timeout_secs, read_timeout=s.read_timeout_secs,
                   trust_env=s.use_system_proxy, lifecycle=lifecycle, metrics=metrics,
                   max_reply_bytes=cfg.limits.max_reply_bytes)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- plumbing -----------------------------------------------------------

    def _credentials(self) -> tuple[str, str]:
        if not (self.service_id and self._api_key):
            raise ServerRejected("not registered: no service_id/api_key in the config")
        return self.service_id, self._api_key

    def _auth(self) -> dict[str, str]:
        service_id, api_key = self._credentials()
        return {"X-Service-ID": service_id, "X-API-Key": api_key, "Authorization": f"Bearer {api_key}"}

    def _agent_url(self, action: str) -> str:
        return f"{self.base_url}/api/v1/agent/{path_segment(self._credentials()[0])}/{action}"

    def _files_url(self, *segments: str) -> str:
        tail = "/".join(path_segment(s) for s in segments)
        return f"{self.base_url}/api/v1/files/agent/{path_segment(self._credentials()[0])}/files/{tail}"

    def _check(self, response: httpx.Response, endpoint: str) -> httpx.Response:
        """Map a status to our errors; returns the response when it is a success."""
        status = response.status_code
        if 200 <= status < 300:
            self.last_success[endpoint] = time.time()
            return response
        self._metrics.error(endpoint)
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
        self._metrics.error(endpoint)
        reason = str(exc) or exc.__class__.__name__
        if isinstance(exc, httpx.TimeoutException):
            reason = f"timed out ({exc.__class__.__name__})"
        elif _caused_by(exc, ssl.SSLError):  # the raw text alone does not say "TLS"
            reason = f"TLS error: {reason}"
        return ServerUnavailable(f"{endpoint}: cannot reach the server at {self.base_url}: {reason}",
                                 endpoint=endpoint)

    def _read_reply(self, response: httpx.Response, endpoint: str) -> bytes:
        """The whole body, unless it is over max_reply_bytes: then nothing more is read."""
        cap = self.max_reply_bytes
        declared = response.headers.get("content-length", "")
        if not (declared.isdigit() and int(declared) > cap):
            body, more = _read_prefix(response, cap)
            if not more:
                return body
        raise ProtocolViolation(f"{endpoint}: reply larger than limits.max_reply_bytes ({cap} bytes)",
                                endpoint=endpoint, status=response.status_code)

    def _take_slot(self, kind: str, interrupt: threading.Event | None) -> None:
        """Wait for a budget slot; `interrupt` (a poll nobody needs any more, a cancelled task's
        download) gives up waiting when set, as the exit-now step does."""
        try:
            self.budget.acquire(kind, self._lifecycle.exiting, interrupt)
        except Aborted:
            why = "the agent is exiting" if self._lifecycle.exiting.is_set() else "no longer wanted"
            raise ServerUnavailable(f"{kind}: abandoned, {why}", endpoint=kind) from None

    def _request(self, kind: str, method: str, url: str, *, interrupt: threading.Event | None = None,
                 **kwargs: Any) -> _Reply:
        """One attempt: take a budget slot, send, read the reply and translate every failure.

        Leaving the stream early (an error, a reply over the cap) closes the connection.
        """
        self._take_slot(kind, interrupt)
        started = time.monotonic()
        try:
            with self._http.stream(method, url, **kwargs) as response:
                log.debug("%s %s %s -> %d in %.0f ms", kind, method, _path(url), response.status_code,
                          (time.monotonic() - started) * 1000)
                self._check(response, kind)
                return _Reply(response.status_code, self._read_reply(response, kind))
        except httpx.HTTPError as e:
            error = self._transport_error(e, kind)
            log.debug("%s %s %s -> no answer after %.0f ms: %s", kind, method, _path(url),
                      (time.monotonic() - started) * 1000, error)
            raise error from None

    def _retrying(self, kind: str, policy: RetryPolicy, cancel: threading.Event | None) -> tenacity.Retrying:
        # not wait_exponential_jitter: its `initial` is deprecated in tenacity 9, its replacement missing in 8
        backoff = tenacity.wait_exponential(multiplier=0.5, max=policy.max_wait) + tenacity.wait_random(0, 1.0)

        def wait(state: tenacity.RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            hinted = getattr(exc, "retry_after", None)
            if getattr(exc, "status", None) == 429:
                return 0.0  # the budget holds the retry until the server's window has room
            return min(hinted, 120.0) if hinted is not None else backoff(state)

        def log_retry(state: tenacity.RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            # a failure that repeats is said once a minute per call; every attempt shows at DEBUG
            now = time.monotonic()
            loud = now - self._retry_said.get(kind, -RETRY_LOG_EVERY_SECS) >= RETRY_LOG_EVERY_SECS
            if loud:
                self._retry_said[kind] = now
            log.log(policy.log_level if loud else logging.DEBUG, "%s failed (attempt %d): %s; retrying in %.1f s",
                    kind, state.attempt_number, exc, state.next_action.sleep if state.next_action else 0)

        def cut_short(state: tenacity.RetryCallState) -> bool:
            return self._lifecycle.exiting.is_set() or (cancel is not None and cancel.is_set())

        stop = tenacity.stop_never if policy.attempts is None else tenacity.stop_after_attempt(policy.attempts)
        return tenacity.Retrying(
            retry=tenacity.retry_if_exception(is_retryable),
            stop=stop | cut_short,
            wait=wait,
            sleep=lambda secs: self._lifecycle.wait(secs, cancel),
            before_sleep=log_retry,
            reraise=True,
        )

    def _call(self, kind: str, policy: RetryPolicy, fn: Callable[[], Any],
              cancel: threading.Event | None = None) -> Any:
        """`fn` retried per `policy`, until the exit-now step or `cancel` cuts it short."""
        return self._retrying(kind, policy, cancel)(fn)

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
        if r.status == 204 or not r.body:
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

    def download(self, file_id: str, open_dest: Callable[[], IO[bytes]], max_bytes: int, *,
                 cancel: threading.Event | None = None) -> int:
        """Stream one input file into what `open_dest` opens (called once per attempt, each writes
        from the start); returns its size. More than `max_bytes` is an error, final for the file.
        Retried until it arrives or is finally refused; a set `cancel` ends the retries and waits
        (ServerUnavailable), as the exit-now step does."""
        url = self._files_url(file_id, "download")  # an id no URL can carry fails here, not retried

        def attempt() -> int:
            self._take_slot("download", cancel)
            size = 0
            try:
                # identity: the stored bytes, not a copy the server gzips on the fly and we undo
                # (docs/download-encoding.md), and max_bytes counts what lands on disk
                with self._http.stream("GET", url, headers={**self._auth(), "Accept-Encoding": "identity"}) as r:
                    log.debug("download %s -> %d", _path(url), r.status_code)
                    self._check(r, "download")
                    with open_dest() as out:
                        for chunk in r.iter_bytes(CHUNK):
                            size += len(chunk)
                            if size > max_bytes:
                                raise WorkspaceError(
                                    f"input file {file_id} is larger than limits.max_input_bytes ({max_bytes} bytes)")
                            out.write(chunk)
            except httpx.HTTPError as e:
                raise self._transport_error(e, "download") from None
            except OSError as e:  # a write; `open_dest` translates its own errors
                raise WorkspaceError(f"cannot write input file {file_id}: {e.strerror or e}") from None
            self._metrics.transferred("down", size)
            return size

        return self._call("download", PERSIST, attempt, cancel)

    def upload(self, task_id: str, rel_path: str, open_file: Callable[[], IO[bytes]]) -> UploadedFile:
        """Stream one output file; `open_file` is called once per attempt (each re-reads from the start).

        The server may answer while the body is still going out, then close the connection
        (protocol.md §1); httpcore reads that answer after the failed write. UploadRefused,
        final for the file: a 413 or a 400 about its size; a second 408 (the file takes
        longer to send than the server's request timeout); the send cut off with no answer
        UPLOAD_CUT_OFFS times in a row while /health answers. A 429 waits for the budget.
        """
        timeouts: list[float] = []  # how long each attempt answered 408 took
        cut_offs = 0

        def attempt() -> UploadedFile:
            nonlocal cut_offs
            started = [time.monotonic()]  # moved on when the request goes out, after any budget wait

            def trace(event: str, info: dict) -> None:
                if event == "http11.send_request_headers.started":
                    started[0] = time.monotonic()

            with open_file() as f:
                size = f.seek(0, os.SEEK_END)
                f.seek(0)
                try:
                    # httpx sends data fields before files: task_id precedes the file part, as the server insists
                    r = self._request("upload", "POST", self._files_url("upload"), headers=self._auth(),
                                      data={"task_id": task_id},
                                      files={"file": (rel_path, f, "application/octet-stream")},
                                      extensions={"trace": trace})
                except ServerUnavailable as e:
                    cut_offs = cut_offs + 1 if _no_answer(e) else 0
                    if e.status == 408:
                        timeouts.append(time.monotonic() - started[0])
                        if len(timeouts) >= UPLOAD_TIMEOUTS:
                            raise UploadRefused(
                                f"upload: the upload ran past the server's request timeout {len(timeouts)} "
                                f"times (408 after {', '.join(f'{t:.1f}' for t in timeouts)} s)",
                                endpoint="upload", status=408) from None
                    elif cut_offs >= UPLOAD_CUT_OFFS and self.health():
                        raise UploadRefused(
                            f"upload: the server closed the connection during the upload {cut_offs} times "
                            f"(the last time after up to {f.tell()} of {size} bytes)", endpoint="upload") from None
                    raise
                except ServerRejected as e:
                    if e.status == 413 or (e.status == 400 and TOO_LARGE.search(str(e))):
                        raise UploadRefused(str(e), endpoint="upload", status=e.status) from None
                    raise
                except OSError as e:  # httpx reads the file itself: a read error comes raw
                    raise WorkspaceError(f"cannot read output {rel_path}: {e.strerror or e}") from None
                cut_offs = 0
                self._metrics.transferred("up", f.tell())  # sent from the start to the end of the file
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

