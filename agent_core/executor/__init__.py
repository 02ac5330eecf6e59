"""The executor: what a task container looks like (`spec`, `gpu`, pure), the engine seam
(`backend`) and its one implementation today (`docker`).

Callers type against `Backend` and get one from `open_backend`, the one place that picks the
engine; they never name an implementation.
"""

from __future__ import annotations

from agent_core.config import Config
from agent_core.executor.backend import Backend, Exit, Found, SavedLogs, State
from agent_core.executor.docker import DockerBackend, create_kwargs
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
    "State",
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
    "gpu_verdict",
    "open_backend",
]


def open_backend(cfg: Config, pool_size: int) -> Backend:
    """The engine backend for `cfg`; `pool_size` engine connections (each blocked `wait` holds one).

    Docker is the only engine today; `cfg` is where the choice will come from.
    """
    return DockerBackend(pool_size=pool_size)

