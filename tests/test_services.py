"""Several services on one host (issue 15): four agents, each with its own service and key, against one
in-repo server. Every task completes with its own output, the server's record of each service (status,
load, capacity, last heartbeat) stays right, and one service's 429s do not slow the other three."""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

import pytest

from tests.agent_fixtures import wait_until
from tests.test_reliability import read_output
from tests.test_run import DONE, sh

pytestmark = pytest.mark.docker

CAPACITIES = (1, 2, 1, 2)  # one agent each; the last one is the throttled service
TASKS = 5  # per service and per round
TASK = sh('echo "$TASK_ID" > /workspace/output/o.txt && sleep 1')  # long enough for heartbeats to see it
HEARTBEAT_SECS = 0.5
RETRY_AFTER = 3  # seconds each injected 429 asks for; the agent holds its requests that long
# 429s for the throttled service only, by the path that carries its id; polls are the ones that keep
# it from new work (each holds it RETRY_AFTER s), the others show every kind of call copes
INJECTED_429S = {"poll": 3, "accept": 2, "complete": 2, "heartbeat": 2}


@pytest.fixture
def dev_server(make_dev_server):
    # no rate limit on the server: the only 429s are the injected ones, for one service
    return make_dev_server(rate_limit_per_minute=0)


@dataclass(frozen=True)
class Seen:
    """One look at the server's record of a service."""
    at: float  # time.monotonic()
    status: str
    load: int
    capacity: int
    heartbeat_at: str | None


class ServerView:
    """Samples the server's record of each service in a thread, as an admin dashboard would."""

    def __init__(self, dev_server, service_ids: list[str], every: float = 0.05):
        self._server, self._ids, self._every = dev_server, service_ids, every
        self._seen: dict[str, list[Seen]] = {sid: [] for sid in service_ids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="server-view", daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self._every):
            for sid in self._ids:
                svc = self._server.get_service(sid)
                self._seen[sid].append(Seen(time.monotonic(), svc["status"], svc["current_load"],
                                            svc["capacity"], svc["last_heartbeat_at"]))

    def __enter__(self) -> ServerView:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def latest(self, sid: str) -> Seen | None:
        seen = self._seen[sid]
        return seen[-1] if seen else None

    def of(self, sid: str, since: float = 0.0, until: float = math.inf) -> list[Seen]:
        return [s for s in list(self._seen[sid]) if since <= s.at <= until]


@dataclass(frozen=True)
class Round:
    started: float
    ended: float
    tasks: dict[str, list[str]]  # service id -> its task ids
    took: dict[str, float]       # service id -> seconds from submission to its last task done


def drain_round(dev_client, service_ids: list[str], name: str) -> Round:
    """Submit TASKS tasks to every service at once and wait until all are done."""
    started = time.monotonic()
    tasks = {sid: [dev_client.submit_task(sid, f"{name} {n}")["id"] for n in range(TASKS)] for sid in service_ids}
    took: dict[str, float] = {}
    deadline = started + 90
    while len(took) < len(tasks):
        for sid, ids in tasks.items():
            if sid not in took and all(dev_client.get_task(t)["status"] in DONE for t in ids):
                took[sid] = time.monotonic() - started
        assert time.monotonic() < deadline, f"round {name}: services {set(tasks) - set(took)} did not finish"
        time.sleep(0.1)
    return Round(started, time.monotonic(), tasks, took)


def wait_up(agent, dev_server) -> None:
    """Until the agent's `run` has heartbeated and polled; fails at once, with its log, if it died."""
    def up() -> bool:
        assert agent.alive(), f"agent {agent.service_id} exited:\n{agent.log()[-3000:]}"
        sid = agent.service_id
        return bool(dev_server.calls_to(f"/{sid}/heartbeat") and dev_server.calls_to(f"/{sid}/poll"))
    wait_until(up, 60, f"agent {agent.service_id} to heartbeat and poll")


def check_every_look(seen: list[Seen], capacity: int) -> None:
    """While its agent runs, the server has the service up, with its capacity and a load within it."""
    assert seen
    for s in seen:
        assert s.capacity == capacity, s
        assert 0 <= s.load <= capacity, s
        assert s.status in ("online", "busy"), s
        assert (s.status == "busy") == (s.load == capacity), s  # busy means full, as the agent reports it
    beats = [s.heartbeat_at for s in seen]
    assert beats == sorted(beats) and None not in beats, "last_heartbeat_at went back or vanished"
    changes = [s.at for prev, s in zip(seen, seen[1:]) if s.heartbeat_at != prev.heartbeat_at]
    gaps = [b - a for a, b in zip(changes, changes[1:])]
    assert len(changes) >= 10 and max(gaps) < 5, f"heartbeats stalled: {len(changes)} seen, gaps {gaps}"


def test_four_services_on_one_host_keep_apart(make_agent, dev_server, dev_client, tmp_path):
    # Given four services on one host, each with its own agent, key and capacity
    agents = [make_agent({**TASK, "executor.capacity": cap, "agent.heartbeat_interval_secs": HEARTBEAT_SECS,
                          "server.rate_limit_per_minute": 0}) for cap in CAPACITIES]
    assert len({a.cfg.agent.api_key for a in agents}) == len(agents)
    ids = [a.service_id for a in agents]
    throttled, others = ids[-1], ids[:-1]
    capacity = dict(zip(ids, CAPACITIES))
    with ServerView(dev_server, ids) as view:
        for agent in agents:
            agent.start()
        for agent in agents:
            wait_up(agent, dev_server)
        up = time.monotonic()
        # When all four drain a queue undisturbed (the baseline), then again with 429s for one service
        baseline = drain_round(dev_client, ids, "baseline")
        for kind, n in INJECTED_429S.items():
            dev_server.faults.fail_next(n, status=429, retry_after=RETRY_AFTER, path_contains=f"/{throttled}/{kind}")
        throttling = drain_round(dev_client, ids, "throttled")
        # Then at the end every service is back to idle in the server's view
        for sid in ids:
            wait_until(lambda: (s := view.latest(sid)) and (s.load, s.status) == (0, "online"), 10,
                       f"service {sid} to show load 0 and online")
        running = time.monotonic()
        assert all(a.alive() for a in agents)
        # and, stopped, each says so itself (the offline heartbeat)
        assert [a.stop() for a in agents] == [0] * len(agents)
        for sid in ids:
            final = dev_server.get_service(sid)
            assert (final["status"], final["current_load"]) == ("offline", 0), final

    for n, sid in enumerate(ids):
        print(f"service {n} (capacity {capacity[sid]}{', throttled' if sid == throttled else ''}): "
              f"{baseline.took[sid]:.1f} s, then {throttling.took[sid]:.1f} s")
    # every task completed once, with its own output
    for rnd in (baseline, throttling):
        for sid, task_ids in rnd.tasks.items():
            for task_id in task_ids:
                task = dev_client.get_task(task_id)
                assert (task["status"], task["retry_count"]) == ("completed", 0), task
                assert read_output(dev_client, task_id, "output/o.txt", tmp_path / "o.txt") == f"{task_id}\n".encode()
    assert not [e for e in dev_server.events if e["type"] in ("offline", "requeue")], dev_server.events
    assert dev_server.errors == []
    # the server's view of each was right throughout, and it was seen working in both rounds
    for sid in ids:
        check_every_look(view.of(sid, up, running), capacity[sid])
        for rnd in (baseline, throttling):
            loads = [s.load for s in view.of(sid, rnd.started, rnd.ended)]
            assert max(loads) >= 1, f"service {sid} never showed load in a round"
        assert capacity[sid] in [s.load for s in view.of(sid, baseline.started, baseline.ended)], \
            f"service {sid} never showed busy while draining"
    # the 429s went to the throttled service only, every injected one was sent, and they held it up
    refused = [c for c in dev_server.calls if c.status == 429]
    assert all(f"/{throttled}/" in c.path for c in refused), [c.path for c in refused]
    assert len(refused) == sum(INJECTED_429S.values()), [c.path for c in refused]
    assert throttling.took[throttled] > baseline.took[throttled] + INJECTED_429S["poll"] * RETRY_AFTER / 2
    said = ["rate limit hit (429)" in a.log() for a in agents]
    assert said == [False] * len(others) + [True], said
    # while the other three finished about as fast as without them (a generous margin: no tight timing)
    for sid in others:
        assert throttling.took[sid] <= 1.5 * baseline.took[sid] + 5, (sid, baseline.took, throttling.took)
