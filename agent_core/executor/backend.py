"""The engine seam: what the agent asks of a container engine, and the neutral answers it gets.

`Backend` is the whole surface the runner, scheduler, preflight, doctor and metrics use; an
implementation (today only `DockerBackend`) translates it to its engine and raises the errors of
agent_core.errors: `DockerUnavailable` when the engine is away, `ImageMissing`, `ContainerVanished`,
or `ExecutorError` carrying the engine's explanation.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Mapping, Protocol

from agent_core.config import GpuConfig
from agent_core.executor.spec import ContainerSpec, Owner


class State(enum.Enum):
    """Where a container is in its life, whatever the engine calls it."""

    CREATED = "created"  # made, never started
    RUNNING = "running"
    PAUSED = "paused"
    RESTARTING = "restarting"
    EXITED = "exited"  # ended: its exit code and logs can be read
    OTHER = "other"  # anything else (being removed, or a state this agent does not know)

    @property
    def live(self) -> bool:
        """Its process may still run: stopping it is not done yet."""
        return self in (State.RUNNING, State.PAUSED, State.RESTARTING)


@dataclass(frozen=True)
class Exit:
    code: int
    oom_killed: bool


@dataclass(frozen=True)
class Found:
    """One container as the engine reports it: `state` to decide on, `status` the engine's own word."""

    id: str
    name: str
    task_id: str
    service_id: str
    state: State
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


@dataclass(frozen=True)
class EngineInfo:
    """What `status` and `doctor` say about the engine: which one, its version, rootless or not."""

    engine: str  # "docker" or "podman"
    version: str
    rootless: bool
    where: str  # the address, never with credentials

    def line(self) -> str:
        return f"{self.engine} {self.version}{' (rootless)' if self.rootless else ''} at {self.where}"


class Backend(Protocol):
    """Blocking container lifecycle calls, safe to use from one thread per task. Never pulls an image."""

    where: str  # the engine's address, for messages

    def ping(self) -> None:
        """Raise DockerUnavailable unless the engine answers."""

    def info(self) -> dict[str, Any]:
        """The engine's description of itself (`docker info`: ServerVersion, Runtimes, OSType, ...)."""

    def engine_info(self) -> EngineInfo:
        """Which engine answers at `where`, its version and whether it runs rootless; DockerUnavailable if none."""

    def check_gpu(self, gpu: GpuConfig | None) -> None:
        """Log a warning, or raise ExecutorError when tasks could never get the configured GPUs."""

    def image_present(self, image: str) -> bool: ...

    def image_files(self, image: str, paths: tuple[str, ...], max_bytes: int) -> dict[str, bytes | None]:
        """A tar archive of each path in `image` (None where it has no such file); over max_bytes is an error."""

    def bound_file(self, image: str, folder: Path, name: str, max_bytes: int) -> bytes | None:
        """A tar archive of the file `name` (a relative path) in this host's `folder` as the engine sees
        it: through a created, never started, container of `image` with `folder` bind-mounted read-only
        (None where the engine's folder has no such file). ExecutorError when the engine refuses the
        bind (a folder it does not have); over max_bytes is an error."""

    def network(self, name: str) -> dict[str, Any] | None:
        """The engine's description of network `name`; None when it has none."""

    def create(self, spec: ContainerSpec, owner: Owner) -> str:
        """Create the task's container and return its id; adopt `owner`'s running one of the same task."""

    def start(self, container_id: str) -> None: ...

    def put_archive(self, container_id: str, path: str, stream: Iterable[bytes]) -> None:
        """Unpack the tar `stream` at `path` (a directory that exists) in the container, streaming.
        Errors the stream raises pass through."""

    def get_archive(self, container_id: str, path: str) -> Iterator[bytes]:
        """`path` of the container as a tar stream, in chunks: entries named `<basename of path>/...`."""

    def wait(self, container_id: str) -> Exit:
        """Block until the container is not running; then its exit code and OOM flag."""

    def stop(self, container_id: str, grace: float = 10) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds. Fine if already stopped or gone."""

    def remove(self, container_id: str) -> None:
        """Force-remove the container. Fine if already gone."""

    def save_logs(self, container_id: str, open_stdout: Callable[[], BinaryIO],
                  open_stderr: Callable[[], BinaryIO], max_bytes: int) -> SavedLogs:
        """Stream stdout and stderr into the files the callables open (w+b), each keeping the last max_bytes."""

    def managed(self, owner: Owner) -> list[Found]:
        """Every container of `owner`, any state."""

    def inspect(self, id_or_name: str) -> Found | None: ...

    def purge(self, image: str, entry: Path, owner: Owner) -> None:
        """Delete `entry`/ws as root through the engine (see `purge_spec`); ExecutorError on failure."""

    def close(self) -> None: ...
