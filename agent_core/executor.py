"""The Docker edge: what a task container looks like, and its lifecycle.

Two halves, as in docker-py itself:

* Pure logic, no Docker calls: `build_spec()` turns the config and one task into a
  frozen `ContainerSpec` (executor types exactly as protocol.md §5), and
  `create_kwargs()` turns a spec into the keyword arguments of docker-py's
  `containers.create`. Both are unit-tested without an engine.
* `DockerExecutor`, a thin, blocking, thread-safe wrapper over one
  `docker.DockerClient`: create → start → wait → save_logs → remove, plus stop,
  listing our containers and inspecting one. It never pulls an image and never
  calls `containers.run()`.

Every docker/requests exception is translated in one place, `_translate()`:
connection problems → `DockerUnavailable`, a missing image → `ImageMissing`,
a missing container → `ContainerVanished`, anything else the engine refuses →
`ExecutorError` carrying the engine's explanation.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import platform
import re
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Any, BinaryIO, Callable, Iterator, Mapping

import docker
import docker.errors
import requests
import urllib3.exceptions
from docker.types import DeviceRequest, LogConfig
from docker.types import Mount as DockerMount

from agent_core import hostpaths
from agent_core.config import Config, GpuConfig
from agent_core.errors import (
    ConfigError,
    ContainerVanished,
    DiskFull,
    DockerUnavailable,
    ExecutorError,
    ImageMissing,
    WorkspaceError,
)
from agent_core.workspace import WORKSPACE_MOUNT, check_task_id

log = logging.getLogger(__name__)

__all__ = [
    "LABEL_MANAGED",
    "LABEL_SERVICE",
    "LABEL_AGENT",
    "LABEL_TASK",
    "CONTAINER_PREFIX",
    "Owner",
    "Bind",
    "ContainerSpec",
    "Exit",
    "Found",
    "GpuVerdict",
    "SavedLogs",
    "DockerExecutor",
    "build_spec",
    "container_name",
    "create_kwargs",
    "gpu_verdict",
]

LABEL_MANAGED = "agent-core.managed"
LABEL_SERVICE = "agent-core.service_id"
LABEL_AGENT = "agent-core.agent_id"
LABEL_TASK = "agent-core.task_id"
CONTAINER_PREFIX = "agent-core-"
PURGE_TASK = "purge"  # the task label of a clean-up container (see purge)
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
_DEFAULT_SOCKET = "unix:///var/run/docker.sock"
_COPY_CHUNK = 64 * 1024


# --- pure: names and specs --------------------------------------------------


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
        for name in ("binds", "cap_drop", "cap_add", "security_opt", "gpu_device_ids"):
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


def build_spec(cfg: Config, *, task_id: str, workspace: Path, owner: Owner,
               extra_labels: Mapping[str, str] | None = None) -> ContainerSpec:
    """The container for one task, following the executor contract (protocol.md §5)."""
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

    workspace = Path(workspace).absolute()
    if not workspace.is_dir():
        raise WorkspaceError(f"workspace {workspace} does not exist or is not a directory")
    check_mounts(cfg)
    binds = [Bind(hostpaths.bind_source(workspace), WORKSPACE_MOUNT, readonly=False)]
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


def create_kwargs(spec: ContainerSpec) -> dict[str, Any]:
    """Keyword arguments for docker-py's `client.containers.create(**kwargs)`."""
    kwargs: dict[str, Any] = {
        "image": spec.image,
        "name": spec.name,
        "working_dir": spec.working_dir,
        "environment": dict(spec.environment),
        "labels": dict(spec.labels),
        "mounts": [DockerMount(target=b.container, source=b.host, type="bind", read_only=b.readonly)
                   for b in spec.binds],
        "network_mode": spec.network_mode,
        "read_only": spec.read_only,
        "cap_drop": list(spec.cap_drop),
        "cap_add": list(spec.cap_add),
        "security_opt": list(spec.security_opt),
        "log_config": LogConfig(type=LogConfig.types.JSON, config={
            "max-size": str(spec.log_max_size),
            "max-file": str(spec.log_max_files),
        }),
        "detach": True,
        "tty": False,
        "stdin_open": False,
        "auto_remove": False,  # the exit code and the logs are read after exit
    }
    if spec.entrypoint is not None:
        kwargs["entrypoint"] = list(spec.entrypoint)
    if spec.command is not None:
        kwargs["command"] = list(spec.command)
    if spec.mem_limit:
        kwargs["mem_limit"] = spec.mem_limit
        kwargs["memswap_limit"] = spec.mem_limit  # no swap on top of the limit
    if spec.nano_cpus:
        kwargs["nano_cpus"] = spec.nano_cpus
    if spec.pids_limit:
        kwargs["pids_limit"] = spec.pids_limit
    if spec.user:
        kwargs["user"] = spec.user
    if spec.tmpfs:
        kwargs["tmpfs"] = dict(spec.tmpfs)
    if spec.gpu_driver:
        ids = list(spec.gpu_device_ids)
        kwargs["device_requests"] = [DeviceRequest(driver=spec.gpu_driver, count=0 if ids else -1,
                                                   device_ids=ids or None, capabilities=[["gpu"]])]
    if spec.extra_hosts:
        kwargs["extra_hosts"] = dict(spec.extra_hosts)
    return kwargs


@dataclass(frozen=True)
class GpuVerdict:
    """The start-up GPU precheck's decision: level is "ok", "warn" or "refuse"."""

    level: str
    message: str


def gpu_verdict(gpu: GpuConfig | None, engine_info: Mapping[str, Any], os_name: str) -> GpuVerdict:
    """Decide from `docker info` and `platform.system()` whether configured GPUs can work.

    Linux may still get GPUs without a registered "nvidia" runtime (the toolkit's hook serves
    `--gpus` too), so there it is a warning; Docker Desktop on macOS or Windows has nothing
    else to offer, so there the agent refuses to start rather than fail every task.
    """
    if gpu is None:
        return GpuVerdict("ok", "no GPUs configured")
    runtimes = sorted((engine_info.get("Runtimes") or {}).keys())
    wanted = f"GPUs {gpu.devices}"
    if gpu.vendor in runtimes:
        return GpuVerdict("ok", f"{gpu.vendor} runtime present ({wanted})")
    missing = (f"executor.gpu: the Docker engine has no {gpu.vendor} runtime "
               f"(runtimes: {', '.join(runtimes) or 'none'})")
    if os_name == "Linux":
        return GpuVerdict("warn", f"{missing}; GPU tasks may fail: install the NVIDIA Container Toolkit, "
                                  "run `nvidia-ctk runtime configure --runtime=docker` and restart dockerd")
    return GpuVerdict("refuse", f"{missing} and none can be added on {os_name}: run the agent on a Linux "
                                "host with the NVIDIA Container Toolkit (or in WSL 2 with Docker's GPU "
                                "support), or remove executor.gpu")


# --- results ----------------------------------------------------------------


@dataclass(frozen=True)
class Exit:
    code: int
    oom_killed: bool


@dataclass(frozen=True)
class Found:
    """One container as the engine reports it; status is Docker's (created, running, exited, ...)."""

    id: str
    name: str
    task_id: str
    service_id: str
    status: str
    created: float
    labels: Mapping[str, str] = field(default_factory=dict)

    def owned_by(self, owner: Owner, task_id: str | None = None) -> bool:
        return owner.owns(self.labels, task_id)


@dataclass(frozen=True)
class SavedLogs:
    """Bytes the engine gave for each stream; a file holds at most the last max_bytes of them."""

    stdout_bytes: int
    stderr_bytes: int
    max_bytes: int

    @property
    def truncated(self) -> bool:
        return self.stdout_bytes > self.max_bytes or self.stderr_bytes > self.max_bytes


def _parse_created(value: Any) -> float:
    """Docker's `Created`: an epoch int (list) or RFC 3339 with nanoseconds (inspect)."""
    if isinstance(value, (int, float)):
        return float(value)
    if not isinstance(value, str) or not value:
        return 0.0
    m = re.match(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)?$", value)
    if not m:
        return 0.0
    base = datetime.fromisoformat(m.group(1) + (m.group(3) or "Z").replace("Z", "+00:00"))
    if base.tzinfo is None:
        base = base.replace(tzinfo=timezone.utc)
    frac = float("0." + m.group(2)) if m.group(2) else 0.0
    return base.timestamp() + frac


def _found(attrs: Mapping[str, Any]) -> Found:
    labels = (attrs.get("Config") or {}).get("Labels") or attrs.get("Labels") or {}
    state = attrs.get("State")
    status = state.get("Status", "") if isinstance(state, dict) else str(state or "")
    name = attrs.get("Name") or ((attrs.get("Names") or [""])[0])
    return Found(
        id=attrs.get("Id", ""),
        name=name.lstrip("/"),
        task_id=labels.get(LABEL_TASK, ""),
        service_id=labels.get(LABEL_SERVICE, ""),
        status=status,
        created=_parse_created(attrs.get("Created")),
        labels=MappingProxyType({str(k): str(v) for k, v in labels.items()}),
    )


# --- the one place where docker/requests exceptions become ours -------------


@contextlib.contextmanager
def _translate(action: str, where: str, *, image: str | None = None,
               missing: type[ExecutorError] = ContainerVanished) -> Iterator[None]:
    """Map docker/requests/urllib3 exceptions raised while doing `action`.

    `missing` is what a plain 404 means here (a vanished container, for most calls).
    An `ExecutorError` for a refused request carries the HTTP status as `.status`.
    """
    try:
        yield
    except docker.errors.ImageNotFound as e:
        raise ImageMissing(
            f"image {image or '(unknown)'} is not on this host: it must be built or loaded here "
            f"(agent-core never pulls) [{_explain(e)}]") from None
    except docker.errors.NotFound as e:
        raise _refused(missing, f"{action}: {_explain(e)}", 404) from None
    except docker.errors.APIError as e:
        raise _refused(ExecutorError, f"Docker refused to {action} (HTTP {e.status_code}): {_explain(e)}",
                       e.status_code) from None
    except docker.errors.DockerException as e:
        # from_env() and API version detection raise a bare DockerException when the engine is away.
        raise DockerUnavailable(f"Docker engine not reachable at {where}: {e}") from None
    except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError, OSError) as e:
        # OSError: streams read the raw socket below requests.
        raise DockerUnavailable(f"Docker engine not reachable at {where}: cannot {action}: {e}") from None


def _refused(cls: type[ExecutorError], message: str, status: int | None) -> ExecutorError:
    err = cls(message)
    err.status = status  # type: ignore[attr-defined]
    return err


def _status(e: BaseException) -> int | None:
    return getattr(e, "status", None)


def _explain(e: docker.errors.APIError) -> str:
    return str(e.explanation or e).strip()


# --- logs into capped files -------------------------------------------------


class _TailFile:
    """Keeps the last `limit` bytes written to the file `f` (opened w+b by the caller), with
    bounded memory. The file grows to at most 2 * limit before its tail is moved to the front.
    """

    def __init__(self, f: BinaryIO, limit: int, what: str):
        self.f, self.limit, self.size, self.seen = f, max(0, limit), 0, 0
        self.path = what  # for messages

    def _io(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise DiskFull(f"no space left to write {self.path}") from None
            raise ExecutorError(f"cannot write {self.path}: {e.strerror or e}") from None

    def write(self, data: bytes) -> None:
        self.seen += len(data)
        if self.limit == 0:
            return
        if len(data) >= self.limit:
            data = data[-self.limit:]
            self._io(self.f.seek, 0)
            self._io(self.f.truncate)
            self.size = 0
        self._io(self.f.write, data)
        self.size += len(data)
        if self.size >= 2 * self.limit:
            self._io(self._keep_tail)

    def close(self) -> None:
        try:
            if self.size > self.limit:
                self._io(self._keep_tail)
            self._io(self.f.flush)
        finally:
            self.f.close()

    def _keep_tail(self) -> None:
        src, dst = self.size - self.limit, 0
        while src < self.size:
            self.f.seek(src)
            chunk = self.f.read(min(_COPY_CHUNK, self.size - src))
            self.f.seek(dst)
            self.f.write(chunk)
            src += len(chunk)
            dst += len(chunk)
        self.f.truncate(self.limit)
        self.f.seek(self.limit)
        self.size = self.limit


# --- the executor -----------------------------------------------------------


class DockerExecutor:
    """Blocking container lifecycle calls; safe to use from one thread per task.

    The client is made on first use (so an engine that is down at start-up is a
    `DockerUnavailable` from the first call, not from the constructor). Each blocked
    `wait` holds one pooled connection: size `pool_size` to capacity plus a margin.
    """

    def __init__(self, client: docker.DockerClient | None = None, *, pool_size: int = 10,
                 wait_poll_secs: float = 60.0):
        self._client = client
        self._own_client = client is None
        self._pool_size = pool_size
        self._wait_poll_secs = wait_poll_secs
        self._lock = threading.Lock()
        self._closed = False
        self.where = _describe_client(client) if client is not None else os.environ.get("DOCKER_HOST") or _DEFAULT_SOCKET

    # -- plumbing

    def _api(self) -> docker.DockerClient:
        with self._lock:
            if self._closed:
                raise ExecutorError("the Docker executor was closed")
            if self._client is None:
                with _translate("connect", self.where):
                    self._client = docker.DockerClient.from_env(max_pool_size=self._pool_size)
            return self._client

    def _do(self, action: str, **kw: Any) -> contextlib.AbstractContextManager[None]:
        return _translate(action, self.where, **kw)

    # -- engine and images

    def ping(self) -> None:
        """Raise DockerUnavailable unless the engine answers."""
        try:
            client = self._api()
            with self._do("ping"):
                client.api.ping()
        except ExecutorError as e:
            if isinstance(e, DockerUnavailable):
                raise
            raise DockerUnavailable(f"Docker engine not reachable at {self.where}: {e}") from None

    def info(self) -> dict[str, Any]:
        """`docker info`: ServerVersion, Runtimes, OSType, ..."""
        client = self._api()
        with self._do("read the engine info"):
            return client.api.info()

    def check_gpu(self, gpu: GpuConfig | None) -> None:
        """The start-up precheck: log a warning, or raise ExecutorError when tasks could never get GPUs."""
        if gpu is None:
            return
        verdict = gpu_verdict(gpu, self.info(), platform.system())
        if verdict.level == "refuse":
            raise ExecutorError(verdict.message)
        if verdict.level == "warn":
            log.warning("%s", verdict.message)

    def network(self, name: str) -> dict[str, Any] | None:
        """The engine's description of network `name` (docker network inspect); None when it has none."""
        client = self._api()
        try:
            with self._do(f"inspect network {name}", missing=ExecutorError):
                return client.api.inspect_network(name)
        except ExecutorError as e:
            if _status(e) == 404:
                return None
            raise

    def image_file(self, image: str, path: str, max_bytes: int) -> bytes | None:
        """A tar archive of `path` in `image` (None when the image has no such file), read from a
        created, never started, container that is removed at once. More than max_bytes is an error."""
        client = self._api()
        with self._do(f"create a container of {image}", image=image, missing=ExecutorError):
            container_id = client.api.create_container(image, entrypoint=["/nonexistent"], network_disabled=True,
                                                       host_config=client.api.create_host_config(
                                                           network_mode="none"))["Id"]
        try:
            try:
                with self._do(f"read {path} from {image}"):
                    stream, _ = client.api.get_archive(container_id, path)
                    data = bytearray()
                    for chunk in stream:
                        data += chunk
                        if len(data) > max_bytes:
                            raise ExecutorError(f"{path} in {image} is larger than {max_bytes} bytes")
                    return bytes(data)
            except ContainerVanished:  # the 404 of a missing path
                return None
        finally:
            self.remove(container_id)

    def image_present(self, image: str) -> bool:
        client = self._api()
        try:
            with self._do(f"inspect image {image}", image=image, missing=ImageMissing):
                client.api.inspect_image(image)
        except ImageMissing:
            return False
        return True

    # -- lifecycle

    def create(self, spec: ContainerSpec, owner: Owner) -> str:
        """Create the task's container and return its id. Never pulls.

        On a name conflict the existing container is adopted when it is `owner`'s, for the
        same task, and running; when it is `owner`'s but not running it is force-removed and
        created again once. A foreign container with the name is an error: never adopted,
        never removed.
        """
        client = self._api()
        kwargs = create_kwargs(spec)
        for attempt in (1, 2):
            try:
                with self._do(f"create container {spec.name}", image=spec.image, missing=ExecutorError):
                    return client.containers.create(**kwargs).id
            except ExecutorError as e:
                if not _is_conflict(e) or attempt == 2:
                    raise
            attrs = self._inspect_attrs(spec.name)
            if attrs is None:
                log.info("container %s vanished after a name conflict; creating it again", spec.name)
                continue
            existing = _found(attrs)
            if not existing.owned_by(owner, spec.task_id):
                raise ExecutorError(f"container name {spec.name} is taken by a container that is not this "
                                    f"agent's ({existing.id[:12]}): left alone; remove it if it is stale")
            if existing.status == "running":
                log.info("adopting running container %s (%s) for task %s", spec.name, existing.id[:12],
                         spec.task_id)
                return existing.id
            log.warning("removing stale container %s (%s, %s) before creating it again",
                        spec.name, existing.id[:12], existing.status)
            self.remove(existing.id)
        raise AssertionError("unreachable")  # pragma: no cover

    def start(self, container_id: str) -> None:
        client = self._api()
        with self._do(f"start container {container_id}"):
            client.api.start(container_id)

    def wait(self, container_id: str) -> Exit:
        """Block until the container is not running; then its exit code and OOM flag.

        Waits in rounds of `wait_poll_secs`: docker-py's wait timeout is an HTTP read
        timeout (issues #1966, #2964), so each round that times out checks the container
        and waits again. The task timeout is the caller's (it calls `stop`).
        """
        client = self._api()
        with self._do(f"wait for container {container_id}"):
            while True:
                try:
                    result = client.api.wait(container_id, timeout=self._wait_poll_secs)
                    break
                except docker.errors.DockerException:
                    raise
                except (requests.exceptions.Timeout, requests.exceptions.ConnectionError) as e:
                    # A read timeout (or a dropped connection): is the engine there, and the container?
                    log.debug("wait for %s: %s; checking the container", container_id[:12], e)
                state = client.api.inspect_container(container_id).get("State") or {}
                if not state.get("Running", False):
                    result = {"StatusCode": state.get("ExitCode", -1)}
                    break
            code = result.get("StatusCode")
            code = int(code) if code is not None else -1
            # an OOM kill never exits 0: spare the common case an inspect
            state = client.api.inspect_container(container_id).get("State") or {} if code else {}
        return Exit(code=code, oom_killed=bool(state.get("OOMKilled", False)))

    def stop(self, container_id: str, grace: float = 10) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds. Fine if already stopped or gone."""
        client = self._api()
        try:
            with self._do(f"stop container {container_id}"):
                client.api.stop(container_id, timeout=max(0, int(round(grace))))
        except ContainerVanished:
            return
        except ExecutorError as e:
            log.warning("stop %s failed (%s); killing it", container_id[:12], e)
        found = self.inspect(container_id)
        if found is None or found.status not in ("running", "paused", "restarting"):
            return
        try:
            with self._do(f"kill container {container_id}"):
                client.api.kill(container_id)
        except ContainerVanished:
            return
        except ExecutorError as e:
            if _status(e) != 409:  # 409: not running any more
                raise

    def remove(self, container_id: str) -> None:
        """Force-remove the container and its anonymous volumes. Fine if already gone."""
        client = self._api()
        try:
            with self._do(f"remove container {container_id}"):
                client.api.remove_container(container_id, force=True, v=True)
        except ContainerVanished:
            return
        except ExecutorError as e:
            if _status(e) == 409 and self._inspect_attrs(container_id) is None:
                return  # a removal already in progress finished
            raise

    def save_logs(self, container_id: str, open_stdout: Callable[[], BinaryIO],
                  open_stderr: Callable[[], BinaryIO], max_bytes: int) -> SavedLogs:
        """Stream stdout and stderr into the files the callables open (w+b), each keeping at most
        the last max_bytes. Opening them is the caller's: it knows where they may safely be."""
        client = self._api()
        seen = []
        for opener, is_stdout in ((open_stdout, True), (open_stderr, False)):
            tail = _TailFile(opener(), max_bytes, f"the {'stdout' if is_stdout else 'stderr'} log")
            try:
                with self._do(f"read the logs of container {container_id}"):
                    stream = client.api.logs(container_id, stdout=is_stdout, stderr=not is_stdout,
                                             stream=True, follow=False)
                    try:
                        for chunk in stream:
                            tail.write(chunk)
                    finally:
                        with contextlib.suppress(Exception):
                            stream.close()
            finally:
                tail.close()
            seen.append(tail.seen)
        return SavedLogs(stdout_bytes=seen[0], stderr_bytes=seen[1], max_bytes=max_bytes)

    def purge(self, image: str, entry: Path, owner: Owner) -> None:
        """Delete `entry`/ws as root inside a throw-away container of `image` that sees only `entry`.

        For an agent that is not root: a task container (root inside) can leave files that only
        root may delete. The container has no network, every capability dropped but the two that
        let root ignore file modes, and is removed afterwards. Raises ExecutorError on failure.
        """
        spec = ContainerSpec(
            name=container_name(owner, f"purge-{os.urandom(6).hex()}"), image=image,
            entrypoint=("rm", "-rf", f"{PURGE_MOUNT}/ws"), command=(), working_dir="/", environment={},
            labels=owner.labels(PURGE_TASK), binds=(Bind(hostpaths.bind_source(entry), PURGE_MOUNT, False),),
            pids_limit=64, network_mode="none", user="0:0", cap_drop=("ALL",),
            cap_add=("DAC_OVERRIDE", "FOWNER"), log_max_size=MIN_LOG_FILE_BYTES)
        client = self._api()
        with self._do(f"create container {spec.name}", image=image, missing=ExecutorError):
            container_id = client.containers.create(**create_kwargs(spec)).id
        try:
            self.start(container_id)
            code = self.wait(container_id).code
        finally:
            self.remove(container_id)
        if code != 0:
            raise ExecutorError(f"the clean-up container ({image}, `rm -rf`) exited {code}")

    # -- listing

    def managed(self, owner: Owner) -> list[Found]:
        """Every container of `owner`, any state (the engine filters; each is checked again here)."""
        client = self._api()
        with self._do("list containers"):
            containers = client.api.containers(all=True, filters={"label": owner.filters()})
        return [f for f in map(_found, containers) if f.owned_by(owner)]

    def inspect(self, id_or_name: str) -> Found | None:
        attrs = self._inspect_attrs(id_or_name)
        return _found(attrs) if attrs is not None else None

    def _inspect_attrs(self, id_or_name: str) -> dict[str, Any] | None:
        client = self._api()
        try:
            with self._do(f"inspect container {id_or_name}"):
                return client.api.inspect_container(id_or_name)
        except ContainerVanished:
            return None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            client, self._client = self._client, None
        if client is not None and self._own_client:
            with contextlib.suppress(Exception):
                client.close()

    def __enter__(self) -> DockerExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_conflict(e: ExecutorError) -> bool:
    return type(e) is ExecutorError and _status(e) == 409


def _describe_client(client: docker.DockerClient) -> str:
    api = getattr(client, "api", None)
    base = getattr(api, "base_url", "") or ""
    if base.startswith("http+docker://"):
        adapter = getattr(api, "_custom_adapter", None)
        socket_path = getattr(adapter, "socket_path", None)
        if socket_path:
            return "unix://" + socket_path
    return base or "the Docker engine"

