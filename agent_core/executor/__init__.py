"""The executor: what a task container looks like (`spec`, `gpu`, pure), the engine seam
(`backend`), which engine at which address (`engine`, pure) and the one implementation
(`docker`), which speaks to Docker and to Podman alike.

Callers type against `Backend` and get one from `open_backend`, the one place that picks the
engine; they never name an implementation.
"""

from __future__ import annotations

import importlib.util
import os
from urllib.parse import urlsplit

from docker.errors import TLSParameterError
from docker.tls import TLSConfig  # not `import docker`: the submodule .docker takes that name here

from agent_core.config import Config, EngineConfig
from agent_core.errors import ConfigError
from agent_core.executor.backend import Backend, EngineInfo, Exit, Found, SavedLogs, State
from agent_core.executor.docker import DockerBackend, create_kwargs
from agent_core.executor.engine import Address, engine_address, engine_mismatch
from agent_core.executor.gpu import GpuVerdict, gpu_verdict
from agent_core.executor.spec import (
    CONTAINER_PREFIX,
    LABEL_AGENT,
    LABEL_MANAGED,
    LABEL_SERVICE,
    LABEL_TASK,
    Bind,
    ContainerSpec,
    Owner,
    build_spec,
    check_mounts,
    container_name,
)

DockerExecutor = DockerBackend  # the name before the seam

__all__ = [
    "LABEL_MANAGED",
    "LABEL_SERVICE",
    "LABEL_AGENT",
    "LABEL_TASK",
    "CONTAINER_PREFIX",
    "Owner",
    "Bind",
    "ContainerSpec",
    "Backend",
    "Address",
    "State",
    "EngineInfo",
    "Exit",
    "Found",
    "GpuVerdict",
    "SavedLogs",
    "DockerBackend",
    "DockerExecutor",
    "build_spec",
    "check_mounts",
    "container_name",
    "create_kwargs",
    "engine_address",
    "engine_mismatch",
    "gpu_verdict",
    "open_backend",
]


def open_backend(cfg: Config, pool_size: int, engine: EngineConfig | None = None) -> Backend:
    """The engine backend for `engine` (default: the config's first, which without
    [[executor.engines]] is executor.engine at executor.engine_url, or that engine's usual
    address: see `engine`); `pool_size` engine connections (each blocked `wait` holds one).
    Connects on first use."""
    engine = engine or cfg.executor.engine_list[0]
    address = engine_address(engine.engine, engine.url, os.environ, os.geteuid())
    if urlsplit(address.url).scheme == "ssh" and importlib.util.find_spec("paramiko") is None:
        # docker-py speaks ssh:// through paramiko, which agent-core does not depend on
        raise ConfigError(f"{cfg.path}: engine {engine.name!r} at {address.url.split('@')[-1]}: an ssh:// engine "
                          "needs the paramiko package (`pip install paramiko` beside agent-core), or reach it "
                          "over tcp:// with TLS")
    tls = None
    if engine.tls:
        try:
            tls = TLSConfig(ca_cert=str(engine.tls_ca) if engine.tls_ca else None, verify=True,
                            client_cert=(str(engine.tls_cert), str(engine.tls_key))
                            if engine.tls_cert and engine.tls_key else None)
        except TLSParameterError as e:  # a file that is not there
            raise ConfigError(f"{cfg.path}: engine {engine.name!r}: {e}") from None
    return DockerBackend(address=address, pool_size=pool_size, tls=tls)
