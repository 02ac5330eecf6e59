"""Pacing under the server's rate limit (protocol.md §1): drain fast without losing the node."""

from __future__ import annotations

import json
import time

import pytest

from tests.agent_fixtures import agent_cli, wait_until
from tests.test_run import DONE, sh

pytestmark = pytest.mark.docker

REQUESTS_PER_TASK = 3  # the poll that brings it, accept, complete (no files here)


@pytest.fixture
def dev_server(make_dev_server, request):
    """The local server with its rate limit at `request.param` per minute and a quick sweeper."""
    return make_dev_server(rate_limit_per_minute=request.param, sweep_interval_secs=2)


@pytest.mark.parametrize("dev_server, limit, tasks", [(150, 150, 60), (30, 30, 10)], indirect=["dev_server"],
                         ids=["150-per-min", "30-per-min"])
def test_a_paced_drain_loses_nothing(dev_server, dev_client, make_agent, limit, tasks):
    # Given a server that allows `limit` requests a minute and an agent told the same
    agent = make_agent({**sh("true"), "executor.capacity": 4, "server.poll_interval_secs": 5,
                        "server.rate_limit_per_minute": limit, "agent.heartbeat_interval_secs": 15})
    ids = [dev_client.submit_task(agent.service_id, f"t{n}")["id"] for n in range(tasks)]
    # When it drains the queue
    started = time.monotonic()
    agent.start()
    # (status shows the request rate and the budget while it works)
    status = wait_until(lambda: json.loads(agent_cli("status", "--json", config_path=agent.config_path,
                                                     check=True).stdout)["daemon"].get("requests"),
                        30, "status to show the request budget")
    assert status["limit_per_minute"] == limit and status["heartbeat_reserve"] == 10
    assert 0 <= status["sent_last_window"] <= limit
    results = [dev_client.wait_for_status(t, DONE, timeout=600) for t in ids]
    took = time.monotonic() - started
    # Then every task completed, none was requeued, the node never went offline, and at most one 429 was seen
    assert [r["status"] for r in results] == ["completed"] * tasks
    assert [r["retry_count"] for r in results] == [0] * tasks
    assert not [e for e in dev_server.events if e["type"] in ("offline", "requeue")]
    assert dev_server.stats["429"] <= 1
    per_minute = tasks / took * 60
    allowed = (limit - agent.cfg.server.heartbeat_reserve) / REQUESTS_PER_TASK
    print(f"limit {limit}/min: {tasks} tasks in {took:.0f} s = {per_minute:.1f} tasks/min "
          f"(budget after the heartbeat reserve allows {allowed:.1f}/min)")
    assert per_minute >= 0.8 * allowed
