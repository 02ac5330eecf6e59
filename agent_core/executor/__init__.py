"""The executor: what a task container looks like (`spec`, `gpu`, pure), the engine seam
(`backend`), which engine at which address (`engine`, pure) and the one implementation
(`docker`), which speaks to Docker and to Podman alike.

Callers type against `Backend` and get one from `open_backend`, the one place that picks the
engine; they never name an implementation.
"""

from __future__ import annotations

import os

from agent_core.config import Config
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


def open_backend(cfg: Config, pool_size: int) -> Backend:
    """The engine backend for `cfg` (executor.engine at executor.engine_url, or that engine's usual
    address: see `engine`); `pool_size` engine connections (each blocked `wait` holds one).
    Connects on first use."""
    address = engine_address(cfg.executor.engine, cfg.executor.engine_url, os.environ, os.geteuid())
    return DockerBackend(address=address, pool_size=pool_size)

