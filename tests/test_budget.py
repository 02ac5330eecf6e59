"""The client-side request budget: heartbeat reserve, priorities, reaction to 429 (how long it holds work)."""

from __future__ import annotations

import threading
import time

import pytest

from agent_core.budget import MAX_PAUSE, MIN_PROBE, Aborted, Backoff, RequestBudget


def take(budget: RequestBudget, kind: str, timeout: float = 0.05) -> bool:
    """Whether `kind` gets a slot within `timeout`."""
    abort = threading.Event()
    threading.Timer(timeout, abort.set).start()
    try:
        budget.acquire(kind, abort)
        return True
    except Aborted:
        return False


def test_work_leaves_the_reserve_to_heartbeats():
    budget = RequestBudget(5, 2, window=30)
    assert all(take(budget, "poll") for _ in range(3))
    assert not take(budget, "poll")
    assert not take(budget, "complete")
    assert take(budget, "heartbeat") and take(budget, "heartbeat")
    assert not take(budget, "heartbeat")
    snap = budget.snapshot()
    assert snap["sent_last_window"] == 5 and snap["available"] == 0


def test_slots_come_back_after_the_window():
    budget = RequestBudget(2, 0, window=0.3)
    assert take(budget, "poll") and take(budget, "poll")
    assert not take(budget, "poll")
    assert take(budget, "poll", timeout=2.0)


def test_waiting_calls_go_in_priority_order():
    budget = RequestBudget(2, 0, window=0.5)
    budget.acquire("poll")
    budget.acquire("poll")
    order: list[str] = []
    threads = []
    for kind in ("poll", "download", "accept", "upload", "complete"):
        t = threading.Thread(target=lambda k=kind: (budget.acquire(k), order.append(k)))
        t.start()
        threads.append(t)
        time.sleep(0.02)  # queue them in the worst order: lowest priority first
    for t in threads:
        t.join(10)
    assert order == ["complete", "upload", "accept", "download", "poll"]


def test_a_429_holds_work_but_not_heartbeats(caplog):
    budget = RequestBudget(100, 10, window=60)
    started = time.monotonic()
    budget.throttle(0.5)
    budget.throttle(0.5)
    assert take(budget, "heartbeat")
    assert take(budget, "poll", timeout=3.0)
    assert time.monotonic() - started >= 0.45
    assert budget.snapshot()["throttled"] == 2
    assert caplog.text.count("rate limit") == 1  # logged once per episode


def test_no_limit_means_no_waiting():
    budget = RequestBudget(0, 10)
    for _ in range(1000):
        budget.acquire("poll")
    assert budget.snapshot()["available"] is None


def test_abort_while_waiting():
    budget = RequestBudget(1, 0, window=60)
    budget.acquire("poll")
    abort = threading.Event()
    abort.set()
    with pytest.raises(Aborted):
        budget.acquire("poll", abort)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def paused(budget: RequestBudget) -> float:
    return budget.snapshot()["paused_for_secs"]


def test_a_429_holds_work_until_the_oldest_request_leaves_the_window_not_a_blind_minute():
    # The server counts only what it let through, so its window frees when our oldest request leaves it
    clock = Clock()
    budget = RequestBudget(150, 10, window=61, clock=clock)
    for _ in range(3):
        budget.acquire("poll")
        clock.now += 1
    clock.now += 17  # 20 s after the first request: it leaves the window in 41 s
    budget.throttle(60)
    assert paused(budget) == 41.0
    # the probe then is refused again: the next oldest leaves a moment later, so probe again in MIN_PROBE
    clock.now += 41.5
    budget.throttle(60)
    assert paused(budget) == MIN_PROBE


def test_retry_after_bounds_the_pause_and_stands_alone_without_a_record():
    clock = Clock()
    budget = RequestBudget(150, 10, window=61, clock=clock)
    budget.throttle(60)  # nothing sent by us in the window (another process with our key?): its word
    assert paused(budget) == 60.0
    clock.now += 100
    budget.acquire("poll")
    budget.throttle(5)  # the record says 61 s, the server 5: the sooner wins
    assert paused(budget) == 5.0
    clock.now += 100
    budget.throttle(None)
    assert paused(budget) == 61.0
    clock.now += 100
    budget.throttle(10 ** 9)  # a hostile Retry-After cannot stop work for long
    assert paused(budget) == MAX_PAUSE


def test_without_a_budget_a_429_still_holds_work_but_not_heartbeats():
    budget = RequestBudget(0, 10, window=0.5)
    budget.acquire("upload")
    budget.throttle(60)  # our record says the window frees in 0.5 s: probe after MIN_PROBE
    assert budget.snapshot()["heartbeat_reserve"] == 0
    assert take(budget, "heartbeat")
    assert not take(budget, "upload", timeout=0.5)
    assert take(budget, "upload", timeout=3.0)
    assert budget.snapshot()["sent_last_window"] == 1  # counted without a limit too (the others left the window)


def test_backoff_grows_with_jitter_up_to_its_cap_and_starts_over_after_reset():
    backoff = Backoff(1.0, 8.0)
    waits = [backoff.next() for _ in range(6)]
    assert all(1.0 <= w <= bound for w, bound in zip(waits, (2, 4, 8, 8, 8, 8))), waits
    backoff.reset()
    assert 1.0 <= backoff.next() <= 2.0
