"""A client-side request budget under the server's rate limit (protocol.md §1).

The server allows N agent requests per sliding 60 s window per key and then
answers 429 with `Retry-After: 60` - heartbeats included, and 60 s without a
heartbeat costs the node its tasks. So every request takes a slot here first:
heartbeats may use the whole budget, everything else must leave `reserve`
slots free, and when slots are short the waiting calls go in priority order.

A 429 holds everything but heartbeats, budget or not (limit 0 only turns the pacing off).
The server's `Retry-After` is always 60, yet its window counts only the requests it let
through, so a 429 spell can end much sooner: the hold lasts until the oldest request on
our own record leaves the window, when one probe finds out, with Retry-After as the bound.

`Backoff` paces the loops that retry on their own clock (the poll loop, the engine watch).
"""

from __future__ import annotations

import collections
import logging
import random
import threading
import time
from typing import Callable

log = logging.getLogger(__name__)

# Lower goes first. Polls slow down first, heartbeats never wait for work.
PRIORITY = {"heartbeat": 0, "complete": 1, "upload": 2, "accept": 3, "download": 4, "poll": 5, "register": 5}
MIN_PROBE = 1.0  # after a 429, never ask again sooner: a wrong guess costs one refusal a second
MAX_PAUSE = 120.0  # whatever Retry-After a hostile server sends


class Backoff:
    """Exponential backoff with full jitter, for loops that retry on their own (outside tenacity)."""

    def __init__(self, initial: float = 1.0, cap: float = 60.0):
        self.initial, self.cap, self.failures = initial, cap, 0

    def next(self) -> float:
        self.failures += 1
        return random.uniform(self.initial, min(self.cap, self.initial * 2 ** self.failures))

    def reset(self) -> None:
        self.failures = 0


class Aborted(Exception):
    """The caller's abort event was set while waiting for a slot."""


class RequestBudget:
    # a second longer than the server's window: our clock starts before the request
    # arrives there, and a slot freed here a moment too early costs a 429
    def __init__(self, per_minute: int, reserve: int, *, window: float = 61.0,
                 clock: Callable[[], float] = time.monotonic):
        self.limit = per_minute
        self.reserve = reserve if per_minute else 0
        self.window = window
        self._clock = clock
        self._cond = threading.Condition()
        self._sent: collections.deque[float] = collections.deque()  # every request, paced or not
        self._waiting: list[tuple[int, int]] = []  # (priority, ticket) of callers waiting
        self._tickets = 0
        self._paused_until = 0.0  # after a 429: only heartbeats until then
        self.throttled = 0  # 429s seen

    def _cap(self, kind: str) -> int:
        return self.limit if kind == "heartbeat" else self.limit - self.reserve

    def _expire(self, now: float) -> None:
        while self._sent and self._sent[0] <= now - self.window:
            self._sent.popleft()

    def _delay(self, kind: str, ticket: tuple[int, int], now: float) -> float:
        """0 when this caller may send now, else how long until that could change."""
        if kind != "heartbeat" and now < self._paused_until:
            return self._paused_until - now
        if min(self._waiting) != ticket:
            return self.window  # someone ahead of us; we are woken when it goes
        if not self.limit or len(self._sent) < self._cap(kind):
            return 0.0
        return self._sent[0] + self.window - now

    def acquire(self, kind: str, *aborts: threading.Event | None) -> None:
        """Block until `kind` may send one request; raises Aborted if one of `aborts` is set meanwhile."""
        with self._cond:
            self._tickets += 1
            ticket = (PRIORITY[kind], self._tickets)
            self._waiting.append(ticket)
            try:
                while True:
                    if any(a is not None and a.is_set() for a in aborts):
                        raise Aborted()
                    now = self._clock()
                    self._expire(now)
                    delay = self._delay(kind, ticket, now)
                    if delay <= 0:
                        self._sent.append(now)
                        return
                    # abort is checked a few times a second; a leaving caller notifies
                    self._cond.wait(min(delay, 0.25))
            finally:
                self._waiting.remove(ticket)
                self._cond.notify_all()

    def throttle(self, retry_after: float | None) -> None:
        """The server said 429: hold everything but heartbeats until its window should have room."""
        bound = min(MAX_PAUSE, retry_after if retry_after is not None else self.window)
        with self._cond:
            now = self._clock()
            self._expire(now)
            # refusals are not counted there, so the oldest request we sent is the next to leave
            room = self._sent[0] + self.window - now if self._sent else bound
            pause = min(bound, max(MIN_PROBE, room))
            first = now >= self._paused_until
            self._paused_until = max(self._paused_until, now + pause)
            self.throttled += 1
            self._cond.notify_all()
        if first:
            log.warning("server rate limit hit (429): holding requests for %.0f s, heartbeats go on", pause)

    def snapshot(self) -> dict:
        with self._cond:
            now = self._clock()
            self._expire(now)
            return {
                "limit_per_minute": self.limit,
                "heartbeat_reserve": self.reserve,
                "sent_last_window": len(self._sent),
                "available": max(0, self.limit - self.reserve - len(self._sent)) if self.limit else None,
                "waiting": len(self._waiting),
                "paused_for_secs": round(max(0.0, self._paused_until - now), 1),
                "throttled": self.throttled,
            }
