"""Prometheus metrics and a health check, served on `[metrics] listen` (off by default).

`Metrics` is what the rest of the agent calls, a handful of one-line verbs; the
base class records nothing, so every call site works the same with metrics off.
`PrometheusMetrics` records into its own CollectorRegistry (never the
process-wide default, so two agents in one test process do not mix), and
`MetricsServer` serves it at /metrics and the health check at /healthz.

The daemon makes one Metrics (`recorder`) and hands it to the client at construction (it
sees every request, so it counts server errors and transferred bytes in one place) and to
the scheduler (whose runners report task outcomes). This module imports none of them.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Callable, Iterator, Mapping, Sequence

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               generate_latest)
from prometheus_client.core import GaugeMetricFamily

from agent_core.config import Config, parse_listen
from agent_core.errors import AgentError, ProcessError
from agent_core.protocol import TASK_STATUSES

if TYPE_CHECKING:
    from agent_core.livestatus import EngineEntry

log = logging.getLogger(__name__)

ERROR_KINDS = ("poll", "heartbeat", "upload")  # exported as 0 before the first error, so alerts see a series
DIRECTIONS = ("up", "down")
# tasks run from seconds to hours
DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)
# the server marks an agent offline after 60 s without a heartbeat; so does /healthz
SERVER_STALE_SECS = 60.0


class Metrics:
    """What the agent reports. This base records nothing: the default when metrics are off."""

    def task_finished(self, status: str, secs: float) -> None:
        """A task's end was reported to the server as `status`, `secs` after it was accepted."""

    def error(self, kind: str) -> None:
        """A request to the server failed (`kind` is the endpoint: poll, heartbeat, upload, ...)."""

    def transferred(self, direction: str, n: int) -> None:
        """`n` file bytes went `up` (outputs) or `down` (inputs)."""

    def watch(self, running: Callable[[], int], capacity: int | Callable[[], int],
              engines: Callable[[], Sequence[EngineEntry]] | None = None) -> None:
        """Read the number of running tasks from `running` at each scrape, the capacity offered from
        `capacity`, and each engine (reachable or not, its running tasks) from `engines`."""

    def render(self) -> bytes:
        return b""


class PrometheusMetrics(Metrics):
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._tasks = Counter("agent_core_tasks", "Tasks reported to the server, by outcome.", ["status"],
                              registry=r)
        self._duration = Histogram("agent_core_task_duration_seconds",
                                   "Time from accepting a task to reporting its end.",
                                   buckets=DURATION_BUCKETS, registry=r)
        self._running = Gauge("agent_core_running_tasks", "Tasks on this agent now, in any stage.",
                              registry=r)
        self._capacity = Gauge("agent_core_capacity", "Tasks this agent runs at once: the capacity of the "
                               "engines that answer (executor.capacity with one engine).", registry=r)
        self._errors = Counter("agent_core_errors",
                               "Failed requests to the server, every attempt, by endpoint.", ["kind"],
                               registry=r)
        self._bytes = Counter("agent_core_transferred_bytes",
                              "File bytes of finished transfers, by direction.", ["direction"], registry=r)
        for status in TASK_STATUSES:
            self._tasks.labels(status)
        for kind in ERROR_KINDS:
            self._errors.labels(kind)
        for direction in DIRECTIONS:
            self._bytes.labels(direction)

    def task_finished(self, status: str, secs: float) -> None:
        self._tasks.labels(status).inc()
        self._duration.observe(max(0.0, secs))

    def error(self, kind: str) -> None:
        self._errors.labels(kind).inc()

    def transferred(self, direction: str, n: int) -> None:
        self._bytes.labels(direction).inc(n)

    def watch(self, running: Callable[[], int], capacity: int | Callable[[], int],
              engines: Callable[[], Sequence[EngineEntry]] | None = None) -> None:
        self._running.set_function(running)
        if callable(capacity):
            self._capacity.set_function(capacity)
        else:
            self._capacity.set(capacity)
        if engines is not None:
            self.registry.register(_EngineCollector(engines))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    """Per-engine gauges, read from the pool at each scrape."""

    def __init__(self, engines: Callable[[], Sequence[EngineEntry]]):
        self._engines = engines

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily("agent_core_engine_up", "1 while the container engine answers, by engine name.",
                               labels=["engine"])
        running = GaugeMetricFamily("agent_core_engine_running_tasks", "Tasks placed on the engine now.",
                                    labels=["engine"])
        for e in self._engines():
            up.add_metric([e.name], 1.0 if e.up else 0.0)
            running.add_metric([e.name], float(e.running))
        yield up
        yield running


class Health:
    """/healthz: an engine answers a ping (with several, at least one); the server answered a poll or
    heartbeat lately.

    The server side asks no new request per check: a scraper must not eat the request budget.
    """

    def __init__(self, ping: Callable[[], None], last_contact: Callable[[], float | None],
                 stale_after: float = SERVER_STALE_SECS):
        self.ping, self.last_contact, self.stale_after = ping, last_contact, stale_after

    def check(self) -> dict[str, bool]:
        try:
            self.ping()
            engine = True
        except AgentError:
            engine = False
        last = self.last_contact()
        server = last is not None and time.time() - last < self.stale_after
        return {"engine": engine, "server": server, "ok": engine and server}


def last_contact(last_success: Mapping[str, float]) -> float | None:
    """When the server last answered a poll or a heartbeat with success (time.time()), or None;
    `last_success` is the client's endpoint -> time of its last 2xx."""
    seen = [t for t in (last_success.get("poll"), last_success.get("heartbeat")) if t]
    return max(seen, default=None)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)


class _Handler(BaseHTTPRequestHandler):
    metrics: Metrics
    health: Callable[[], dict[str, bool]]

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, CONTENT_TYPE_LATEST, self.metrics.render())
        elif path == "/healthz":
            report = self.health()
            self._send(200 if report["ok"] else 503, "application/json", json.dumps(report).encode())
        else:
            self._send(404, "text/plain; charset=utf-8", b"not found: try /metrics or /healthz\n")

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        log.debug("metrics endpoint: " + format, *args)


class MetricsServer:
    """/metrics and /healthz on `address`, served from a background thread until `close`."""

    def __init__(self, address: tuple[str, int], metrics: Metrics, health: Callable[[], dict[str, bool]]):
        handler = type("Handler", (_Handler,), {"metrics": metrics, "health": staticmethod(health)})
        try:
            self._httpd = _Server(address, handler)
        except OSError as e:
            raise ProcessError(f"metrics.listen: cannot listen on {address[0]}:{address[1]}: "
                               f"{e.strerror or e}") from None
        self.host, self.port = self._httpd.server_address[:2]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="metrics", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread.is_alive():
            self._httpd.shutdown()
        self._httpd.server_close()


def recorder(cfg: Config) -> Metrics:
    """What the daemon records into: Prometheus when `[metrics] listen` is set, else nothing."""
    return PrometheusMetrics() if cfg.metrics.listen else Metrics()


def start(cfg: Config, metrics: Metrics, health: Health) -> MetricsServer | None:
    """Serve `metrics` (from `recorder`) and `health` when `[metrics] listen` is set; None when not."""
    if not cfg.metrics.listen:
        return None
    server = MetricsServer(parse_listen(cfg.metrics.listen), metrics, health.check).start()
    log.info("metrics at %s/metrics, health at %s/healthz", server.url, server.url)
    return server
