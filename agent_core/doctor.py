"""`agent-core doctor`: is this host ready to run tasks? One line per check, each with a fix hint.

The checks run in order and later ones are skipped when what they need failed (no engine:
no image check). Essential checks decide the exit code; `warn` never does. The credentials
check sends one real heartbeat (with the running daemon's load, else 0), which the server
counts like any other.
"""

from __future__ import annotations

import json
import platform
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

from agent_core import config as configmod
from agent_core import process
from agent_core.client import Client
from agent_core.errors import AgentError, AuthRejected
from agent_core.executor import DockerExecutor, gpu_verdict
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
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
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


def _engine(executor: DockerExecutor) -> tuple[Check, dict[str, Any] | None]:
    try:
        info = executor.info()
    except AgentError as e:
        why = str(e).removeprefix(f"Docker engine not reachable at {executor.where}: ")
        return Check("engine", FAIL, f"docker engine not reachable at {executor.where} ({why}): start it "
                                     "(`systemctl start docker`) or point DOCKER_HOST at it"), None
    return Check("engine", OK, f"docker engine reachable ({info.get('ServerVersion', '?')}) "
                               f"at {executor.where}"), info


def _image(cfg: configmod.Config, executor: DockerExecutor) -> Check:
    image = cfg.executor.image
    try:
        present = executor.image_present(image)
    except AgentError as e:
        return Check("image", FAIL, f"cannot check executor image {image}: {e}")
    if present:
        return Check("image", OK, f"executor image {image} present")
    return Check("image", FAIL, f"executor image {image} missing: build it with `docker build -t {image} "
                                "executor-example/` or `docker load` it (agent-core never pulls)")


def _gpu(cfg: configmod.Config, info: dict[str, Any]) -> Check:
    verdict = gpu_verdict(cfg.executor.gpu, info, platform.system())
    status = {"ok": OK, "warn": WARN}.get(verdict.level, FAIL)  # a refusal stops `run`, so it is essential
    return Check("gpu", status, f"GPU: {verdict.message}")


def _server(cfg: configmod.Config, client: Client) -> Check:
    if client.health():
        return Check("server", OK, f"server {client.base_url} reachable (/health)")
    return Check("server", FAIL, f"server {client.base_url} not reachable (GET /health failed): check "
                                 "server.base_url, the network and server.use_system_proxy")


def _credentials(cfg: configmod.Config, client: Client) -> Check:
    live = process.read_status(cfg.paths.data_dir) or {}
    load = len(live.get("tasks") or [])  # a running daemon's load, so this beat tells the truth
    try:
        client.heartbeat(Heartbeat("online", load, cfg.executor.capacity))
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
        yield (server := _server(cfg, client))
        if not cfg.agent.registered:
            yield Check("credentials", FAIL, "not registered: `agent-core register --token ...`")
        elif server.status == OK:
            yield _credentials(cfg, client)
        else:
            yield Check("credentials", SKIP, "credentials not checked: the server is not reachable")


def _engine_checks(cfg: configmod.Config) -> Iterator[Check]:
    with DockerExecutor(pool_size=2) as executor:
        engine, info = _engine(executor)
        yield engine
        if info is None:
            yield Check("image", SKIP, f"executor image {cfg.executor.image} not checked: no engine")
            return
        yield _image(cfg, executor)
        if cfg.executor.gpu is not None:
            yield _gpu(cfg, info)


def run(config_path: Path) -> list[Check]:
    try:
        cfg = configmod.load(config_path)
    except AgentError as e:
        return [Check("config", FAIL, f"config invalid: {e}"),
                Check("other", SKIP, "other checks need a valid config")]
    return [Check("config", OK, f"config {cfg.path} valid"), _data_dir(cfg), *_engine_checks(cfg),
            *_server_checks(cfg), _disk(cfg)]


def render(checks: list[Check]) -> str:
    return "\n".join(f"{c.status:<6}{c.message}" for c in checks)


def to_json(checks: list[Check]) -> str:
    return json.dumps({"ok": exit_code(checks) == 0,
                       "checks": [{**asdict(c), "status": c.status.lower()} for c in checks]}, indent=2)


def exit_code(checks: list[Check]) -> int:
    return 1 if any(c.failed for c in checks) else 0
