"""Where the daemon stands on its shutdown ladder, and the exit-now flag every blocking wait watches.

The daemon makes one `Lifecycle` and hands it to the client, the scheduler and the runners:
signals move it down the ladder, and from `EXITING` on every retry, budget wait and
backoff sleep gives up at once (the journal lets the next start recover the tasks).
"""

from __future__ import annotations

import enum
import threading
import time

CANCEL_CHECK_SECS = 0.1  # how soon a wait watching a per-call cancel as well notices it


class Step(enum.IntEnum):
    """The ladder, in order: each stop signal moves the daemon one step."""

    RUNNING = 0     # serving
    DRAINING = 1    # no new tasks; running ones finish and are reported
    CANCELLING = 2  # running containers are stopped and reported failed
    EXITING = 3     # leave at once

    @property
    def state(self) -> str:
        """The name in the status file, read back by `stop` and `status`."""
        return self.name.lower()

    @classmethod
    def of(cls, state: object) -> Step | None:
        """The step a status file names, or None (a daemon still starting, or a garbled file)."""
        return next((step for step in cls if step.state == state), None)


class Lifecycle:
    """The ladder's current step and the flags derived from it. `stopping` and `exiting` are
    read by others (a poll's interrupt, the budget's abort) and set only by the methods here."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._step = Step.RUNNING
        self.stop_requested_at: float | None = None  # time.time() of the first stop signal
        self.stopping = threading.Event()  # from DRAINING on: a poll waiting for the budget gives up
        self.exiting = threading.Event()   # EXITING: every request, retry and wait is cut short

    @property
    def step(self) -> Step:
        return self._step

    def advance(self) -> Step:
        """One step down the ladder (a stop signal); returns the new step."""
        with self._lock:
            self.stop_requested_at = self.stop_requested_at or time.time()
            return self._reach(Step(min(self._step + 1, Step.EXITING)))

    def reach(self, step: Step) -> Step:
        """At least `step` (the drain after a refused key, the cancel after the grace)."""
        with self._lock:
            return self._reach(step)

    def exit_now(self) -> None:
        self.reach(Step.EXITING)

    def _reach(self, step: Step) -> Step:
        self._step = max(self._step, step)
        if self._step >= Step.DRAINING:
            self.stopping.set()
        if self._step is Step.EXITING:
            self.exiting.set()
        return self._step

    def wait(self, secs: float, cancel: threading.Event | None = None) -> bool:
        """Sleep `secs`, cut short by the exit-now step or by `cancel`; True when cut short."""
        if cancel is None:
            return self.exiting.wait(secs)
        # two events cannot be waited on at once: watch the second one a few times a second
        deadline = time.monotonic() + secs
        while not (self.exiting.is_set() or cancel.is_set()):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            cancel.wait(min(left, CANCEL_CHECK_SECS))
        return True
