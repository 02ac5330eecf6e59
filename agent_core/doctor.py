"""`agent-core doctor`: is this host ready to run tasks? One line per check, each with a fix hint.

The checks run in order and later ones are skipped when what they need failed (no engine:
no image check). Essential checks decide the exit code; `warn` never does. The credentials
check sends one real heartbeat (`online`, load 0) only when no daemon runs for this data dir:
a running daemon's beat would be overwritten, so its last heartbeat is reported instead. The
task network check sends nothing: it reads the engine's network, the host's routes and its
listening sockets (netreach). A bind engine gets a workspace line: does it see the data dir at
the same path (preflight.bind_problem)? The api_key is masked in every line, whatever a server echoes.
"""

from __future__ import annotations

import contextlib
import json
import platform
import re
import ssl
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterator

import httpx

from agent_core import config as configmod
from agent_core import fsutil, logs, netreach, preflight, process
from agent_core.archive import BIND
from agent_core.client import Client
from agent_core.errors import AgentError, AuthRejected, ExecutorError
from agent_core.executor import Backend, engine_mismatch, gpu_verdict, open_backend
from agent_core.protocol import Heartbeat
from agent_core.workspace import free_disk_mb

OK, WARN, FAIL, SKIP = "ok", "warn", "FAIL", "skip"


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # OK, WARN, FAIL or SKIP
    message: str
    essential: bool = True

    @property
    def failed(self) -> bool:
        return self.status == FAIL and self.essential


def _data_dir(cfg: configmod.Config) -> Check:
    path = cfg.paths.data_dir
    existing = fsutil.nearest_existing(path)
    if not existing.is_dir():
        return Check("data_dir", FAIL, f"data dir {path} is not a folder ({existing} is a file): "
                                       "fix paths.data_dir")
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as e:
        return Check("data_dir", FAIL, f"data dir {path} is not writable ({e.strerror or e}): fix its "
                                       "owner or mode, or paths.data_dir")
    note = "" if existing == path else " (not there yet: the first run creates it)"
    return Check("data_dir", OK, f"data dir {path} writable{note}")


def _engine(cfg: configmod.Config, executor: Backend, engine: str) -> list[Check]:
    """Which engine answers, its version and whether it runs rootless; a warning when it is not
    `engine`, the one configured for it."""
    try:
        seen = executor.engine_info()
    except AgentError as e:
        why = re.sub(rf"^\w+ engine not reachable at {re.escape(executor.where)}: ", "", str(e))
        problem = preflight.check(cfg, executor)  # the fix, in the configured engine's words
        fix = problem.fix if problem is not None and problem.kind == "engine" else "start it"
        return [Check("engine", FAIL, f"{engine} engine not reachable at {executor.where} ({why}): {fix}")]
    checks = [Check("engine", OK, f"{seen.engine} engine reachable ({seen.version}) at {seen.where}, "
                                  f"{'rootless' if seen.rootless else 'not rootless'}")]
    mismatch = engine_mismatch(engine, seen)
    return checks + ([Check("engine", WARN, mismatch, essential=False)] if mismatch else [])


def _executor(cfg: configmod.Config, executor: Backend) -> Check:
    """What `run` checks before its first task, beyond the engine and the image: network and user."""
    problem = preflight.check(cfg, executor)
    if problem is None:
        return Check("executor", OK, f"a task can start (network {cfg.executor.network_mode}, "
                                     f"user {cfg.executor.user or 'of the image'})")
    return Check("executor", FAIL, problem.line())


def _workspace(cfg: configmod.Config, executor: Backend) -> Check:
    problem = preflight.bind_problem(cfg, executor)
    if problem is None:
        return Check("workspace", OK, f"the engine sees the data dir {cfg.paths.data_dir} at the same path "
                                      "(bind workspaces)")
    return Check("workspace", FAIL, problem.line())


def _image(cfg: configmod.Config, executor: Backend) -> Check:
    image = cfg.executor.image
    try:
        present = executor.image_present(image)
    except AgentError as e:
        return Check("image", FAIL, f"cannot check executor image {image}: {e}")
    if present:
        return Check("image", OK, f"executor image {image} present")
    return Check("image", FAIL, f"executor image {image} missing: build it with `docker build -t {image} "
                                "executor-example/` or `docker load` it (agent-core never pulls)")


def _gpu(cfg: configmod.Config, executor: Backend) -> Check:
    try:
        info = executor.info()
    except AgentError as e:
        return Check("gpu", FAIL, f"GPU not checked: {e}")
    verdict = gpu_verdict(cfg.executor.gpu, info, platform.system())
    status = {"ok": OK, "warn": WARN}.get(verdict.level, FAIL)  # a refusal stops `run`, so it is essential
    return Check("gpu", status, f"GPU: {verdict.message}")


def _task_network(cfg: configmod.Config, executor: Backend) -> Check:
    try:
        reach = netreach.assess(cfg.executor.network_mode, executor.network)
    except ExecutorError as e:
        return Check("task_network", WARN, f"task network not checked: {e}", essential=False)
    return Check("task_network", OK if reach.level == "ok" else WARN, f"task {reach.message}", essential=False)


def _metrics(cfg: configmod.Config) -> Check:
    warning = netreach.metrics_exposure_warning(cfg.metrics.listen)
    if warning:
        return Check("metrics", WARN, warning, essential=False)
    return Check("metrics", OK, f"metrics.listen = {cfg.metrics.listen!r} is loopback only: tasks cannot reach it",
                 essential=False)


HEALTH_REPLY_CAP = 64 * 1024  # an OpenAaaS /health says {"status": "healthy"}; a web page needs no more


def _caused_by(e: BaseException, kind: type[BaseException]) -> bool:
    while e is not None:
        if isinstance(e, kind):
            return True
        e = e.__cause__ or e.__context__
    return False


def _health_reply(cfg: configmod.Config, url: str) -> tuple[int, str, bytes]:
    s = cfg.server
    timeout = httpx.Timeout(connect=s.connect_timeout_secs, read=s.read_timeout_secs, write=s.read_timeout_secs,
                            pool=s.read_timeout_secs)
    with httpx.Client(timeout=timeout, trust_env=s.use_system_proxy) as http, http.stream("GET", url) as r:
        body = b""
        for chunk in r.iter_bytes():
            body += chunk
            if len(body) > HEALTH_REPLY_CAP:
                break
        return r.status_code, r.headers.get("content-type", "?"), body


def _server(cfg: configmod.Config) -> Check:
    """GET /health, telling apart nothing listening, a TLS failure and an answer that is not OpenAaaS."""
    base = cfg.require_server()
    where = f"server {base}"
    try:
        status, content_type, body = _health_reply(cfg, f"{base}/health")
    except httpx.TimeoutException:
        return Check("server", FAIL, f"{where} not reachable: no answer in time: check the network, a firewall, "
                                     "server.use_system_proxy and server.connect_timeout_secs")
    except httpx.HTTPError as e:
        if _caused_by(e, ssl.SSLError):
            return Check("server", FAIL, f"{where}: TLS failed ({e}): check the host name in server.base_url, "
                                         "install the server's CA (SSL_CERT_FILE), or the port may speak plain "
                                         "http (use http://)")
        if _caused_by(e, ConnectionRefusedError) or "refused" in str(e).lower():
            return Check("server", FAIL, f"{where} not reachable: connection refused (nothing listens there): "
                                         "check that the server runs and the host and port in server.base_url")
        return Check("server", FAIL, f"{where} not reachable ({e}): check server.base_url, DNS, the network "
                                     "and server.use_system_proxy")
    try:
        healthy = json.loads(body).get("status") == "healthy"
    except (ValueError, AttributeError):
        healthy = False
    if status == 200 and healthy:
        return Check("server", OK, f"{where} reachable (/health)")
    return Check("server", FAIL, f"{where} answers, but not as an OpenAaaS server (GET /health: HTTP {status}, "
                                 f"{content_type.split(';')[0]}): server.base_url must be the API root, "
                                 "not a web page or another service")


def _credentials(cfg: configmod.Config, client: Client) -> Check:
    live = process.read_status(cfg.paths.data_dir)
    if live is not None:  # our heartbeat would overwrite the load the daemon reports
        last = live.last_heartbeat
        error = live.errors.get("heartbeat")
        if error is not None and error.at is not None and (last is None or error.at > last):
            return Check("credentials", WARN, f"the running daemon (pid {live.pid}) has heartbeat "
                                              f"trouble: {error.message or '?'}")
        said = f"{max(0.0, time.time() - last):.0f} s ago" if last is not None else "none yet"
        return Check("credentials", OK, f"credentials in use by the running daemon (pid {live.pid}); "
                                        f"its last heartbeat: {said} (none sent by doctor)")
    try:
        client.heartbeat(Heartbeat("online", 0, cfg.executor.total_capacity))
    except AuthRejected as e:
        return Check("credentials", FAIL, f"credentials refused ({e}): the service was revoked or the key is "
                                          "wrong; with a new token: `agent-core register --force --token ...`")
    except AgentError as e:
        return Check("credentials", FAIL, f"credentials not checked: {e}")
    return Check("credentials", OK, f"credentials accepted (a heartbeat as service {cfg.agent.service_id})")


def _disk(cfg: configmod.Config) -> Check:
    want = cfg.paths.min_free_disk_mb
    try:
        free = free_disk_mb(cfg.paths.data_dir)
    except AgentError as e:
        return Check("disk", WARN, str(e), essential=False)
    if free < want:
        return Check("disk", WARN, f"only {free} MiB free for the data dir, below paths.min_free_disk_mb "
                                   f"({want}): no task is taken until space is freed", essential=False)
    return Check("disk", OK, f"{free} MiB free for the data dir (paths.min_free_disk_mb = {want})",
                 essential=False)


def _server_checks(cfg: configmod.Config) -> Iterator[Check]:
    if not cfg.server.base_url:
        yield Check("server", FAIL, "server.base_url not set: `agent-core init --force --server URL` or edit it")
        return
    with Client.from_config(cfg, registered=cfg.agent.registered) as client:
        yield (server := _server(cfg))
        if not cfg.agent.registered:
            yield Check("credentials", FAIL, "not registered: `agent-core register --token ...`")
        elif server.status == OK:
            yield _credentials(cfg, client)
        else:
            yield Check("credentials", SKIP, "credentials not checked: the server is not reachable")


def _engine_checks(cfg: configmod.Config) -> Iterator[Check]:
    """The checks for each engine; with several ([[executor.engines]]), each line names its engine."""
    engines = cfg.executor.engine_list
    for engine in engines:
        named = f"engine {engine.name!r}: " if len(engines) > 1 else ""
        for check in _checks_of_engine(cfg, engine):
            yield replace(check, message=named + check.message)


def _checks_of_engine(cfg: configmod.Config, engine: configmod.EngineConfig) -> Iterator[Check]:
    try:
        executor = open_backend(cfg, 2, engine)
    except AgentError as e:  # paramiko missing for ssh://, a TLS file that is not there
        yield Check("engine", FAIL, str(e))
        return
    with contextlib.closing(executor):
        found = _engine(cfg, executor, engine.engine)
        yield from found
        if found[0].status != OK:
            yield Check("image", SKIP, f"executor image {cfg.executor.image} not checked: no engine")
            yield Check("task_network", SKIP, "task network not checked: no engine", essential=False)
            return
        image = _image(cfg, executor)
        yield image
        if image.status == OK:
            yield _executor(cfg, executor)
        if engine.workspace == BIND:  # the probe is a container of the image
            yield _workspace(cfg, executor) if image.status == OK else \
                Check("workspace", SKIP, "bind workspaces not checked: no executor image")
        if cfg.executor.gpu is not None:
            yield _gpu(cfg, executor)
        yield _task_network(cfg, executor)


def run(config_path: Path) -> list[Check]:
    try:
        cfg = configmod.load(config_path)
    except AgentError as e:
        return [Check("config", FAIL, f"config invalid: {e}"),
                Check("other", SKIP, "other checks need a valid config")]
    checks = [Check("config", OK, f"config {cfg.path} valid"),
              *(Check("config", WARN, line, essential=False) for line in configmod.warnings(cfg)),
              *(Check("other_agent", WARN, line, essential=False) for line in process.same_service_elsewhere(cfg)),
              _data_dir(cfg), *_engine_checks(cfg), *_server_checks(cfg), _disk(cfg),
              *([_metrics(cfg)] if cfg.metrics.listen else [])]
    return [replace(c, message=logs.mask(c.message, cfg.agent.api_key)) for c in checks]


def render(checks: list[Check]) -> str:
    return "\n".join(f"{c.status:<6}{c.message}" for c in checks)


def to_json(checks: list[Check]) -> str:
    return json.dumps({"ok": exit_code(checks) == 0,
                       "checks": [{**asdict(c), "status": c.status.lower()} for c in checks]}, indent=2)


def exit_code(checks: list[Check]) -> int:
    return 1 if any(c.failed for c in checks) else 0
