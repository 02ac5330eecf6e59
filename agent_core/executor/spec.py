"""What a task container looks like, engine-neutral and pure: its names, labels and `ContainerSpec`.

`build_spec()` turns the config and one task into a frozen `ContainerSpec` (executor types exactly
as protocol.md §5); a backend turns the spec into its engine's calls. Unit-tested without an engine.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

from agent_core import hostpaths
from agent_core.config import Config
from agent_core.errors import ConfigError, WorkspaceError
from agent_core.workspace import WORKSPACE_MOUNT, check_task_id

LABEL_MANAGED = "agent-core.managed"
LABEL_SERVICE = "agent-core.service_id"
LABEL_AGENT = "agent-core.agent_id"
LABEL_TASK = "agent-core.task_id"
CONTAINER_PREFIX = "agent-core-"
PURGE_TASK = "purge"  # the task label of a clean-up container (see purge_spec)
PURGE_MOUNT = "/purge"
NO_NEW_PRIVILEGES = "no-new-privileges"
HOST_ALIAS = "host.docker.internal"  # what Docker Desktop calls the host; `host-gateway` gives it on Linux
# The engine's json-file log holds stdout and stderr together, JSON-wrapped line by line
# (about 1.8x for 100-byte lines). Files of 2 * log_max_bytes, three of them, keep the last
# 4-6 * log_max_bytes of JSON per container: enough, usually, for log_max_bytes of each stream,
# and a bound on the disk a flooding task can use.
LOG_MAX_FILES = 3
LOG_FILE_FACTOR = 2
MIN_LOG_FILE_BYTES = 1024 * 1024

_RESERVED_LABELS = frozenset({LABEL_MANAGED, LABEL_SERVICE, LABEL_AGENT, LABEL_TASK})


@dataclass(frozen=True)
class Owner:
    """Whose a container is: one service, and one agent of it (named by its data dir).

    Several agents may share an engine: agents of other services, and two agents of one
    service with two data dirs. A container is ours only when every label says so (`owns`);
    anything else on the engine is never adopted, stopped or removed.
    """

    service_id: str
    agent_id: str

    @classmethod
    def of(cls, service_id: str, data_dir: Path | str) -> Owner:
        real = os.path.realpath(os.fspath(data_dir))
        return cls(str(service_id), hashlib.sha256(real.encode("utf-8", "surrogateescape")).hexdigest()[:16])

    @property
    def key(self) -> str:
        """12 hex digits that make a container name unique per service and agent."""
        return hashlib.sha256(f"{self.service_id}\0{self.agent_id}".encode()).hexdigest()[:12]

    def labels(self, task_id: str) -> dict[str, str]:
        return {LABEL_MANAGED: "true", LABEL_SERVICE: self.service_id, LABEL_AGENT: self.agent_id,
                LABEL_TASK: task_id}

    def owns(self, labels: Mapping[str, str] | None, task_id: str | None = None) -> bool:
        """Every label ours (and the task's, when given)."""
        labels = labels or {}
        return (labels.get(LABEL_MANAGED) == "true" and labels.get(LABEL_SERVICE) == self.service_id
                and labels.get(LABEL_AGENT) == self.agent_id
                and (task_id is None or labels.get(LABEL_TASK) == task_id))

    def filters(self) -> list[str]:
        """The engine-side label filter for `owns` (re-checked here: never trust one side alone)."""
        return [f"{LABEL_MANAGED}=true", f"{LABEL_SERVICE}={self.service_id}", f"{LABEL_AGENT}={self.agent_id}"]


def container_name(owner: Owner, task_id: str) -> str:
    """`agent-core-<owner key>-<task id>`; raises UnsafePath for an id that could not be a name."""
    return f"{CONTAINER_PREFIX}{owner.key}-{check_task_id(task_id)}"


@dataclass(frozen=True)
class Bind:
    """A host path bind-mounted into the container (never created if missing)."""

    host: str
    container: str
    readonly: bool


@dataclass(frozen=True)
class ContainerSpec:
    """Everything needed to create one task container. Unknown options are a TypeError."""

    name: str
    image: str
    entrypoint: tuple[str, ...] | None
    command: tuple[str, ...] | None
    working_dir: str
    environment: Mapping[str, str]
    labels: Mapping[str, str]
    binds: tuple[Bind, ...]
    volumes: tuple[str, ...] = ()  # where an anonymous volume of its own is mounted (removed with it)
    mem_limit: int | None = None
    nano_cpus: int | None = None
    pids_limit: int | None = None
    network_mode: str = "none"
    user: str | None = None
    read_only: bool = False
    tmpfs: Mapping[str, str] = field(default_factory=dict)
    cap_drop: tuple[str, ...] = ("ALL",)
    cap_add: tuple[str, ...] = ()
    security_opt: tuple[str, ...] = (NO_NEW_PRIVILEGES,)
    log_max_size: int = 10 * 1024 * 1024
    log_max_files: int = LOG_MAX_FILES
    gpu_driver: str | None = None  # set: request GPUs through this device driver
    gpu_device_ids: tuple[str, ...] = ()  # with gpu_driver: () = every GPU
    extra_hosts: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Read-only views, so a spec cannot change after it was built.
        for name in ("environment", "labels", "tmpfs", "extra_hosts"):
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))
        for name in ("entrypoint", "command"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(value))
        for name in ("binds", "volumes", "cap_drop", "cap_add", "security_opt", "gpu_device_ids"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if NO_NEW_PRIVILEGES not in self.security_opt:
            object.__setattr__(self, "security_opt", self.security_opt + (NO_NEW_PRIVILEGES,))

    @property
    def task_id(self) -> str:
        return self.labels.get(LABEL_TASK, "")


def check_mounts(cfg: Config) -> None:
    """Every `[[paths.mounts]]` host path must exist (Docker would make a missing one, empty and root-owned)."""
    for i, mount in enumerate(cfg.paths.mounts):
        if not Path(mount.host).exists():
            raise ConfigError(f"{cfg.path}: paths.mounts[{i}].host: {mount.host} does not exist")


def build_spec(cfg: Config, *, task_id: str, workspace: Path | None, owner: Owner,
               extra_labels: Mapping[str, str] | None = None) -> ContainerSpec:
    """The container for one task, following the executor contract (protocol.md §5).

    `workspace` is the folder bind-mounted at /workspace; None when the workspace travels through
    the engine's API (executor.workspace = "copy"): then /workspace is an anonymous volume of the
    container's own, which put_archive can fill before the start even with a read-only root
    filesystem, which the container cannot swap for a link, and which goes when it is removed.
    """
    ex = cfg.executor
    name = container_name(owner, task_id)

    entrypoint: tuple[str, ...] | None = None
    command: tuple[str, ...] | None = None
    if ex.executor_type == "bash":
        entrypoint = ("bash", ex.effective_script_path)
    elif ex.executor_type == "python":
        entrypoint = ("python", ex.effective_script_path)
    elif ex.executor_type == "custom":
        # no custom_entrypoint: the image's own ENTRYPOINT, with custom_args as its CMD
        entrypoint = ex.custom_entrypoint or None
        command = ex.custom_args
    elif ex.executor_type != "standard":
        raise ConfigError(f"{cfg.path}: executor.executor_type: unknown type {ex.executor_type!r}")

    binds: list[Bind] = []
    if workspace is not None:
        workspace = Path(workspace).absolute()
        if not workspace.is_dir():
            raise WorkspaceError(f"workspace {workspace} does not exist or is not a directory")
        binds.append(Bind(hostpaths.bind_source(workspace), WORKSPACE_MOUNT, readonly=False))
    check_mounts(cfg)
    binds += [Bind(hostpaths.bind_source(Path(m.host)), m.container, readonly=m.readonly) for m in cfg.paths.mounts]

    labels: dict[str, str] = {}
    for key, value in (extra_labels or {}).items():
        if key in _RESERVED_LABELS:
            raise ValueError(f"label {key} is set by agent-core itself")
        labels[str(key)] = str(value)
    labels.update(owner.labels(task_id))

    return ContainerSpec(
        name=name,
        image=ex.image,
        entrypoint=entrypoint,
        command=command,
        working_dir=ex.working_dir,
        environment={"TASK_ID": task_id, "TIMEOUT": str(ex.timeout_secs)},
        labels=labels,
        binds=tuple(binds),
        volumes=(WORKSPACE_MOUNT,) if workspace is None else (),
        mem_limit=ex.memory_bytes or None,
        nano_cpus=int(round(ex.cpus * 1e9)) or None,
        pids_limit=ex.pids_limit or None,
        network_mode=ex.network_mode,
        user=ex.user or None,
        read_only=ex.read_only,
        tmpfs={"/tmp": "rw,nosuid,nodev,mode=1777"} if ex.read_only else {},
        cap_drop=tuple(ex.cap_drop),
        cap_add=tuple(ex.cap_add),
        security_opt=(NO_NEW_PRIVILEGES,),
        log_max_size=max(LOG_FILE_FACTOR * cfg.limits.log_max_bytes, MIN_LOG_FILE_BYTES),
        log_max_files=LOG_MAX_FILES,
        gpu_driver=ex.gpu.vendor if ex.gpu else None,
        gpu_device_ids=(ex.gpu.device_ids or ()) if ex.gpu else (),
        extra_hosts={HOST_ALIAS: "host-gateway"} if ex.enable_host_access else {},
    )



def purge_spec(image: str, entry: Path, owner: Owner) -> ContainerSpec:
    """A throw-away container of `image` that deletes `entry`/ws as root and sees only `entry`.

    For an agent that is not root: a task container (root inside) can leave files that only
    root may delete. No network, every capability dropped but the two that let root ignore
    file modes.
    """
    return ContainerSpec(
        name=container_name(owner, f"purge-{os.urandom(6).hex()}"), image=image,
        entrypoint=("rm", "-rf", f"{PURGE_MOUNT}/ws"), command=(), working_dir="/", environment={},
        labels=owner.labels(PURGE_TASK), binds=(Bind(hostpaths.bind_source(entry), PURGE_MOUNT, False),),
        pids_limit=64, network_mode="none", user="0:0", cap_drop=("ALL",),
        cap_add=("DAC_OVERRIDE", "FOWNER"), log_max_size=MIN_LOG_FILE_BYTES)
