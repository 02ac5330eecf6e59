"""The agent routes' rate limit: a sliding window per API key."""

from __future__ import annotations

import threading
import time
from collections import deque


class _RateLimiter:
    """Sliding window per key: at most `limit` requests let through in any `window` seconds.

    Only requests let through are counted (observed): refusals do not extend the window.
    """

    def __init__(self, limit: int, window: float):
        self.limit, self.window = limit, window
        self._lock = threading.Lock()
        self._hits: dict[str, deque[float]] = {}

    def allow(self, key: str) -> bool:
        if self.limit <= 0:
            return True
        now = time.monotonic()
        with self._lock:
            hits = self._hits.setdefault(key, deque())
            while hits and hits[0] <= now - self.window:
                hits.popleft()
            if len(hits) >= self.limit:
                return False
            hits.append(now)
            return True
