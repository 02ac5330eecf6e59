"""Prometheus metrics and /healthz: the Metrics object, the endpoint, the client's hooks, and a real run."""

from __future__ import annotations

import io
import socket
import time
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent_core import config
from agent_core.client import Client
from agent_core.errors import ConfigError, DockerUnavailable, ProcessError, ServerUnavailable
from agent_core.metrics import Health, Metrics, MetricsServer, PrometheusMetrics, last_contact
from agent_core.protocol import Heartbeat
from agent_core.workspace import open_input
from tests.agent_fixtures import wait_until
from tests.test_run import finish, sh


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} from the exposition text."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(text: str, name: str, **labels: str) -> float | None:
    return samples(text).get((name, tuple(sorted(labels.items()))))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def serve():
    """serve(metrics, health) -> a started MetricsServer on 127.0.0.1:<free port>, closed in teardown."""
    servers: list[MetricsServer] = []

    def start(metrics: Metrics, health=lambda: {"engine": True, "server": True, "ok": True}) -> MetricsServer:
        server = MetricsServer(("127.0.0.1", 0), metrics, health).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


# --- the Metrics object ----------------------------------------------------------


def test_the_default_metrics_accept_every_call_and_record_nothing():
    m = Metrics()
    m.task_finished("completed", 1.0)
    m.error("poll")
    m.transferred("up", 10)
    m.watch(lambda: 1, 2)
    assert m.render() == b""


def test_prometheus_metrics_count_outcomes_durations_errors_bytes_and_load():
    m = PrometheusMetrics()
    fresh = m.render().decode()
    # the usual series exist at 0 before anything happened, so rate() and alerts see them
    assert value(fresh, "agent_core_tasks_total", status="completed") == 0
    assert value(fresh, "agent_core_errors_total", kind="upload") == 0
    assert value(fresh, "agent_core_transferred_bytes_total", direction="down") == 0
    running = [0]
    m.watch(lambda: running[0], 4)
    m.task_finished("completed", 2.5)
    m.task_finished("completed", 700)
    m.task_finished("failed", 0.2)
    m.error("poll")
    m.error("poll")
    m.error("heartbeat")
    m.transferred("up", 1000)
    m.transferred("down", 5)
    running[0] = 3
    text = m.render().decode()
    assert value(text, "agent_core_tasks_total", status="completed") == 2
    assert value(text, "agent_core_tasks_total", status="failed") == 1
    assert value(text, "agent_core_tasks_total", status="cancelled") == 0
    assert value(text, "agent_core_task_duration_seconds_count") == 3
    assert value(text, "agent_core_task_duration_seconds_sum") == pytest.approx(702.7)
    assert value(text, "agent_core_task_duration_seconds_bucket", le="5.0") == 2
    assert value(text, "agent_core_errors_total", kind="poll") == 2
    assert value(text, "agent_core_errors_total", kind="heartbeat") == 1
    assert value(text, "agent_core_transferred_bytes_total", direction="up") == 1000
    assert value(text, "agent_core_transferred_bytes_total", direction="down") == 5
    assert value(text, "agent_core_running_tasks") == 3  # read at scrape time
    assert value(text, "agent_core_capacity") == 4


def test_two_metrics_objects_do_not_share_counts():
    a, b = PrometheusMetrics(), PrometheusMetrics()
    a.error("poll")
    assert value(b.render().decode(), "agent_core_errors_total", kind="poll") == 0


# --- health ----------------------------------------------------------------------


def test_health_needs_an_answering_engine_and_a_recent_server_contact():
    def down():
        raise DockerUnavailable("no engine")

    now = time.time()
    assert Health(lambda: None, lambda: now - 5).check() == {"engine": True, "server": True, "ok": True}
    assert Health(down, lambda: now - 5).check() == {"engine": False, "server": True, "ok": False}
    assert Health(lambda: None, lambda: None).check()["server"] is False  # never reached it
    assert Health(lambda: None, lambda: now - 120).check()["server"] is False  # lost it a while ago


def test_last_contact_is_the_newer_of_the_last_poll_and_heartbeat():
    client = Client("http://127.0.0.1:9", service_id="s", api_key="k" * 16)
    assert last_contact(client.last_success) is None
    client.last_success.update({"poll": 100.0, "heartbeat": 250.0, "upload": 999.0})
    assert last_contact(client.last_success) == 250.0
    client.close()


# --- the endpoint ------------------------------------------------------------------


def test_the_endpoint_serves_metrics_healthz_and_404(serve):
    m = PrometheusMetrics()
    m.task_finished("completed", 1)
    report = {"engine": True, "server": True, "ok": True}
    server = serve(m, lambda: dict(report))
    with httpx.Client(base_url=server.url) as http:
        r = http.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        assert value(r.text, "agent_core_tasks_total", status="completed") == 1
        r = http.get("/healthz")
        assert (r.status_code, r.json()) == (200, report)
        report.update(server=False, ok=False)
        r = http.get("/healthz")
        assert (r.status_code, r.json()) == (503, {"engine": True, "server": False, "ok": False})
        assert http.get("/").status_code == 404


def test_a_taken_port_is_one_clear_error_naming_the_key(serve):
    taken = serve(Metrics())
    with pytest.raises(ProcessError, match=r"^metrics.listen: cannot listen on 127.0.0.1:\d+"):
        MetricsServer(("127.0.0.1", taken.port), Metrics(), lambda: {"ok": True})


def test_metrics_listen_is_validated_and_off_by_default(tmp_path):
    path = tmp_path / "config.toml"
    assert config.parse("", path).metrics.listen == ""
    assert config.parse('[metrics]\nlisten = "127.0.0.1:9464"\n', path).metrics.listen == "127.0.0.1:9464"
    assert config.parse_listen("[::1]:9464") == ("::1", 9464)
    for bad in ('"9464"', '"127.0.0.1:http"', '"127.0.0.1:70000"', '":9464"', "9464"):
        with pytest.raises(ConfigError, match=r"metrics\.listen"):
            config.parse(f"[metrics]\nlisten = {bad}\n", path)


# --- the client's hooks -------------------------------------------------------------


def test_the_client_counts_failed_requests_and_transferred_bytes(tmp_path):
    payload = b"x" * 3000

    def server(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path.endswith("/poll"):
            return httpx.Response(503, json={"message": "busy"})
        if path.endswith("/heartbeat"):
            raise httpx.ConnectError("refused", request=request)
        if path.endswith("/download"):
            return httpx.Response(200, content=payload)
        if path.endswith("/upload"):
            request.read()
            return httpx.Response(200, json={"file_id": "f1"})
        return httpx.Response(404)

    m = PrometheusMetrics()
    client = Client("http://127.0.0.1:9", service_id="svc", api_key="k" * 16,
                    http=httpx.Client(transport=httpx.MockTransport(server)), metrics=m)
    with pytest.raises(ServerUnavailable):
        client.poll(0, 1)
    with pytest.raises(ServerUnavailable):
        client.heartbeat(Heartbeat(status="online", current_load=0, capacity=1))
    assert client.download("f0", lambda: open_input(tmp_path / "in.bin"), 10_000) == len(payload)
    client.upload("t1", "out.txt", lambda: io.BytesIO(b"y" * 1234))
    client.close()
    text = m.render().decode()
    assert value(text, "agent_core_errors_total", kind="poll") == 1
    assert value(text, "agent_core_errors_total", kind="heartbeat") == 1
    assert value(text, "agent_core_transferred_bytes_total", direction="down") == len(payload)
    assert value(text, "agent_core_transferred_bytes_total", direction="up") == 1234


# --- a real run ----------------------------------------------------------------------


@pytest.mark.docker
def test_a_scrape_during_and_after_a_run_shows_the_tasks(make_agent, dev_client):
    port = free_port()
    agent = make_agent({**sh("sleep 2; cp /workspace/input/* /workspace/output/"),
                        "metrics.listen": f"127.0.0.1:{port}"})
    inputs = [(f"in-{n}.bin", bytes([n]) * (10_000 + n)) for n in range(3)]
    ids = [dev_client.submit_task(agent.service_id, f"t{n}", files=[inputs[n]])["id"] for n in range(3)]
    agent.start()
    url = f"http://127.0.0.1:{port}"

    def scrape() -> str | None:
        try:
            return httpx.get(f"{url}/metrics", timeout=5).text
        except httpx.TransportError:
            return None  # not listening yet

    # during the run: the tasks show as running
    during = wait_until(lambda: (t := scrape()) and value(t, "agent_core_running_tasks") >= 1 and t, 60,
                        "a scrape showing a running task")
    assert value(during, "agent_core_capacity") == 2
    assert [r["status"] for r in finish(dev_client, ids)] == ["completed"] * 3
    # the counter moves right after `complete` is acknowledged, a moment after the server shows it
    after = wait_until(lambda: (t := scrape()) and value(t, "agent_core_tasks_total", status="completed") == 3
                       and t, 30, "3 completed tasks in the metrics")
    assert value(after, "agent_core_tasks_total", status="failed") == 0
    assert value(after, "agent_core_task_duration_seconds_count") == 3
    assert value(after, "agent_core_task_duration_seconds_sum") >= 3 * 2  # each slept 2 s
    size = sum(len(data) for _, data in inputs)
    assert value(after, "agent_core_transferred_bytes_total", direction="down") == size
    assert value(after, "agent_core_transferred_bytes_total", direction="up") == size  # the copies
    health = httpx.get(f"{url}/healthz", timeout=10)
    assert (health.status_code, health.json()) == (200, {"engine": True, "server": True, "ok": True})
    assert agent.stop() == 0
    with pytest.raises(httpx.TransportError):  # the port is closed with the daemon
        httpx.get(f"{url}/metrics", timeout=5)
    assert f"metrics at {url}/metrics" in agent.log()
