"""`agent-core run`: wire config, pidfile, engine, lifecycle, metrics, client and scheduler, and own the signals."""

from __future__ import annotations

import functools
import logging
import signal

from agent_core import metrics, netreach, preflight, process
from agent_core.client import Client
from agent_core.config import Config
from agent_core.engines import EnginePool
from agent_core.errors import EXIT_FAILURE, ExecutorError
from agent_core.executor import check_mounts
from agent_core.lifecycle import Lifecycle
from agent_core.scheduler import ExitNow, Scheduler

log = logging.getLogger(__name__)

# each blocked `wait` holds one connection; the rest serve create/stop/logs calls
DOCKER_POOL_MARGIN = 6


def check_engines(cfg: Config, pool: EnginePool) -> None:
    """Refuse now rather than accept and fail every task in the queue. With several engines, one
    that does not answer is a warning (it takes tasks once it does), unless none answers."""
    away = []
    for engine in pool.engines:
        named = f"engine {engine.name!r}: " if pool.several else ""
        problem = preflight.check(cfg, engine.backend, engine.workspace)
        if problem is not None and pool.several and problem.kind == "engine":
            log.warning("%s%s (it takes tasks once it answers)", named, problem.line())
            away.append(f"{named}{problem.line()}")
            continue
        if problem is not None:
            raise ExecutorError(f"cannot run tasks: {named}{problem.line()}")
        engine.backend.check_gpu(cfg.executor.gpu)
    if len(away) == len(pool.engines):
        raise ExecutorError(f"cannot run tasks: no engine answers: {'; '.join(away)}")


def serve(cfg: Config, *, burst: bool = False) -> int:
    cfg.require_registration()
    check_mounts(cfg)  # a config error (exit 2) at start, not a failure of every task
    exposure = netreach.metrics_exposure_warning(cfg.metrics.listen)
    if exposure:
        log.warning("%s", exposure)
    data_dir = process.ensure_data_dir(cfg.paths.data_dir)
    pidfile = process.PidFile(data_dir)
    pidfile.acquire()
    lifecycle = Lifecycle()
    executor = client = metrics_server = None
    try:
        executor = EnginePool.open(cfg, DOCKER_POOL_MARGIN)
        check_engines(cfg, executor)
        recorded = metrics.recorder(cfg)
        client = Client.from_config(cfg, lifecycle=lifecycle, metrics=recorded)
        scheduler = Scheduler(cfg, client, executor, lifecycle=lifecycle, metrics=recorded, burst=burst)
        health = metrics.Health(executor.ping_any, functools.partial(metrics.last_contact, client.last_success))
        metrics_server = metrics.start(cfg, recorded, health)  # None unless [metrics] listen

        def on_signal(signum: int, _frame: object) -> None:
            scheduler.request_stop()

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            return scheduler.run()
        except ExitNow:
            log.warning("exiting at once; running tasks are recovered at the next start")
            return EXIT_FAILURE
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
    finally:
        lifecycle.exit_now()  # whatever still waits or retries (a breaker recheck, an engine watch) stops
        if metrics_server is not None:
            metrics_server.close()
        if client is not None:
            client.close()
        if executor is not None:
            executor.close()
        (data_dir / process.STATUSFILE).unlink(missing_ok=True)
        pidfile.release()
