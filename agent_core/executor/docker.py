"""`DockerBackend`: the `Backend` on one docker-py `DockerClient`, for Docker and for Podman
(whose service speaks Docker's API; `engine.engine_address` picks the socket).

A thin, blocking, thread-safe wrapper: create → start → wait → save_logs → remove, plus stop,
listing our containers and inspecting one. It never pulls an image and never calls
`containers.run()`. `create_kwargs()` (pure) turns a `ContainerSpec` into the keyword arguments of
docker-py's `containers.create`.

Every docker/requests exception is translated in one place, `_translate()`:
connection problems → `DockerUnavailable`, a missing image → `ImageMissing`,
a missing container → `ContainerVanished`, anything else the engine refuses →
`ExecutorError` carrying the engine's explanation. Where Podman answers a conflict with HTTP 500
(a name in use, a container not running), `.status` says 409 as Docker's would.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import platform
import re
import threading
from datetime import datetime, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Mapping

import docker
import docker.errors
import docker.tls
import requests
import urllib3.exceptions
from docker.constants import DEFAULT_TIMEOUT_SECONDS
from docker.constants import MINIMUM_DOCKER_API_VERSION as MIN_API_VERSION
from docker.types import DeviceRequest, LogConfig
from docker.types import Mount as DockerMount

from agent_core.config import GpuConfig
from agent_core.errors import (
    ContainerVanished,
    DiskFull,
    DockerUnavailable,
    ExecutorError,
    ImageMissing,
)
from agent_core.executor.backend import EngineInfo, Exit, Found, SavedLogs, State
from agent_core.executor.engine import DOCKER, PODMAN, Address, engine_address, engine_info_of, engine_of
from agent_core.executor.gpu import gpu_verdict
from agent_core.executor.spec import LABEL_SERVICE, LABEL_TASK, ContainerSpec, Owner, purge_spec

log = logging.getLogger(__name__)

_COPY_CHUNK = 64 * 1024
_PROBE_MOUNT = "/probe"  # where bound_file mounts the folder, in a container never started
# Docker's State.Status words; "dead" (a removal that failed) has ended too. Podman's compat API
# says "created" for its own "configured", but may show its other words: "stopping" is still
# live, "stopped" (ended, not yet cleaned up) has ended.
_STATES = {"created": State.CREATED, "running": State.RUNNING, "paused": State.PAUSED,
           "restarting": State.RESTARTING, "exited": State.EXITED, "dead": State.EXITED,
           "configured": State.CREATED, "stopping": State.RUNNING, "stopped": State.EXITED}
# What Podman says, with HTTP 500, where Docker says 409 Conflict
_PODMAN_CONFLICTS = ("is already in use", "container state improper")


def create_kwargs(spec: ContainerSpec) -> dict[str, Any]:
    """Keyword arguments for docker-py's `client.containers.create(**kwargs)`."""
    kwargs: dict[str, Any] = {
        "image": spec.image,
        "name": spec.name,
        "working_dir": spec.working_dir,
        "environment": dict(spec.environment),
        "labels": dict(spec.labels),
        "mounts": [DockerMount(target=b.container, source=b.host, type="bind", read_only=b.readonly)
                   for b in spec.binds]
                  + [DockerMount(target=target, source=None, type="volume") for target in spec.volumes],
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


def podman_kwargs(kwargs: Mapping[str, Any], spec: ContainerSpec, user: str) -> dict[str, Any]:
    """`create_kwargs(spec)` for Podman, so the container gets what it would get on Docker;
    `user` is the one it runs as (spec.user, else the image's USER; "" = root)."""
    kwargs = dict(kwargs)
    # Podman keeps one log file, emptied when full, where Docker rotates log_max_files of them:
    # one file as large as all of them bounds the disk alike.
    kwargs["log_config"] = LogConfig(type=LogConfig.types.JSON,
                                     config={"max-size": str(spec.log_max_size * spec.log_max_files)})
    if not runs_as_root(user):
        # Podman makes the added capabilities of a user that is not root ambient, so effective;
        # Docker gives that user none (no-new-privileges keeps them out of reach).
        kwargs["cap_add"] = []
    return kwargs


# --- what the engine reports -------------------------------------------------


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
        state=_STATES.get(status, State.OTHER),
        status=status,
        created=_parse_created(attrs.get("Created")),
        labels=MappingProxyType({str(k): str(v) for k, v in labels.items()}),
    )

# --- the one place where docker/requests exceptions become ours -------------


@contextlib.contextmanager
def _translate(action: str, where: str, *, engine: str = "Docker", image: str | None = None,
               missing: type[ExecutorError] = ContainerVanished) -> Iterator[None]:
    """Map docker/requests/urllib3 exceptions raised while doing `action` on `engine` (its title).

    `missing` is what a plain 404 means here (a vanished container, for most calls).
    An `ExecutorError` for a refused request carries the HTTP status as `.status` (409 for
    Podman's conflicts sent as 500).
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
        raise _refused(ExecutorError, f"{engine} refused to {action} (HTTP {e.status_code}): {_explain(e)}",
                       _conflict_as_409(e.status_code, _explain(e))) from None
    except docker.errors.DockerException as e:
        # from_env() and API version detection raise a bare DockerException when the engine is away.
        raise DockerUnavailable(f"{engine} engine not reachable at {where}: {e}") from None
    except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError, OSError) as e:
        # OSError: streams read the raw socket below requests.
        raise DockerUnavailable(f"{engine} engine not reachable at {where}: cannot {action}: {e}") from None


def _conflict_as_409(status: int | None, explanation: str) -> int | None:
    if status == 500 and any(phrase in explanation for phrase in _PODMAN_CONFLICTS):
        return 409
    return status


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



# --- the backend --------------------------------------------------------------


class DockerBackend:
    """Blocking container lifecycle calls; safe to use from one thread per task.

    The client is made on first use (so an engine that is down at start-up is a
    `DockerUnavailable` from the first call, not from the constructor), at `address`
    (default: Docker's, from the environment). Each blocked `wait` holds one pooled
    connection: size `pool_size` to capacity plus a margin.
    """

    def __init__(self, client: docker.DockerClient | None = None, *, address: Address | None = None,
                 pool_size: int = 10, wait_poll_secs: float = 60.0, tls: docker.tls.TLSConfig | None = None):
        self._client = client
        self._tls = tls  # a tcp:// engine's client certificate and CA
        self._own_client = client is None
        self._address = address or engine_address(DOCKER, "", os.environ, os.geteuid())
        self._pool_size = pool_size
        self._wait_poll_secs = wait_poll_secs
        self._lock = threading.Lock()
        self._closed = False
        self._engine: str | None = None  # the engine that answers, once asked
        self.where = _describe_client(client) if client is not None else self._address.url

    # -- plumbing

    def _api(self) -> docker.DockerClient:
        with self._lock:
            if self._closed:
                raise ExecutorError(f"the {self._address.title} backend was closed")
            if self._client is None:
                with self._do("connect"):
                    self._client = self._connect()
            return self._client

    def _connect(self) -> docker.DockerClient:
        if self._address.from_env:  # DOCKER_HOST keeps the TLS settings the docker CLI reads with it
            return docker.DockerClient.from_env(max_pool_size=self._pool_size)
        if self._tls is not None:
            return self._connect_tls()
        return docker.DockerClient(base_url=self._address.url, max_pool_size=self._pool_size)

    def _connect_tls(self) -> docker.DockerClient:
        """A client that checks the engine against our CA alone. requests lets REQUESTS_CA_BUNDLE
        replace a session's CA (psf/requests#3829), so the environment is off for these sessions; and
        the API version is asked first with one of them, as docker-py's own "auto" would ask with the
        environment on."""
        url = self._address.url
        with contextlib.closing(docker.APIClient(base_url=url, tls=self._tls, version=MIN_API_VERSION,
                                                 timeout=DEFAULT_TIMEOUT_SECONDS)) as probe:
            probe.trust_env = False
            version = probe.version(api_version=False)["ApiVersion"]
        client = docker.DockerClient(base_url=url, tls=self._tls, version=version, max_pool_size=self._pool_size)
        client.api.trust_env = False
        return client

    def _do(self, action: str, **kw: Any) -> contextlib.AbstractContextManager[None]:
        return _translate(action, self.where, engine=self._address.title, **kw)

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
            raise DockerUnavailable(f"{self._address.title} engine not reachable at {self.where}: {e}") from None

    def info(self) -> dict[str, Any]:
        """`docker info`: ServerVersion, Runtimes, OSType, ..."""
        client = self._api()
        with self._do("read the engine info"):
            return client.api.info()

    def engine_info(self) -> EngineInfo:
        """Which engine answers (whatever the config says), its version, and whether it is rootless."""
        client = self._api()
        with self._do("read the engine version"):
            version = client.api.version()
            info = client.api.info()
        return engine_info_of(version, info, self.where)

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

    def image_files(self, image: str, paths: tuple[str, ...], max_bytes: int) -> dict[str, bytes | None]:
        """A tar archive of each path in `image` (None where the image has no such file), read from
        one created, never started, container that is removed at once. Over max_bytes is an error."""
        client = self._api()
        with self._created(client, image) as container_id:
            return {path: self._archive(client, container_id, image, path, max_bytes) for path in paths}

    def bound_file(self, image: str, folder: Path, name: str, max_bytes: int) -> bytes | None:
        """A tar archive of `name` in the host's `folder` as the engine sees it, through `folder`
        bind-mounted read-only into a created, never started, container (an engine copies out of the
        mounts of a created container as well). A folder the engine lacks is its refusal (ExecutorError)."""
        client = self._api()
        mount = DockerMount(target=_PROBE_MOUNT, source=str(folder), type="bind", read_only=True)
        with self._created(client, image, mount) as container_id:
            return self._archive(client, container_id, image, f"{_PROBE_MOUNT}/{name}", max_bytes)

    @contextlib.contextmanager
    def _created(self, client: docker.DockerClient, image: str, *mounts: DockerMount) -> Iterator[str]:
        """A container of `image` that is never started (nothing runs in it), removed afterwards."""
        with self._do(f"create a container of {image}", image=image, missing=ExecutorError):
            container_id = client.api.create_container(image, entrypoint=["/nonexistent"], network_disabled=True,
                                                       host_config=client.api.create_host_config(
                                                           network_mode="none", mounts=list(mounts)))["Id"]
        try:
            yield container_id
        finally:
            self.remove(container_id)

    def _archive(self, client: docker.DockerClient, container_id: str, image: str, path: str,
                 max_bytes: int) -> bytes | None:
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
        kwargs = self._create_kwargs(client, spec)
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
            if existing.state is State.RUNNING:
                log.info("adopting running container %s (%s) for task %s", spec.name, existing.id[:12],
                         spec.task_id)
                return existing.id
            log.warning("removing stale container %s (%s, %s) before creating it again",
                        spec.name, existing.id[:12], existing.status)
            self.remove(existing.id)
        raise AssertionError("unreachable")  # pragma: no cover

    def _create_kwargs(self, client: docker.DockerClient, spec: ContainerSpec) -> dict[str, Any]:
        """`create_kwargs`, made for Podman when Podman answers (see `podman_kwargs`)."""
        kwargs = create_kwargs(spec)
        if self._answering_engine(client) != PODMAN:
            return kwargs
        user = spec.user or ""
        if not user and spec.cap_add:  # whose the capabilities are depends on the image's USER
            with self._do(f"inspect image {spec.image}", image=spec.image, missing=ImageMissing):
                user = (client.api.inspect_image(spec.image).get("Config") or {}).get("User") or ""
        return podman_kwargs(kwargs, spec, user)

    def _answering_engine(self, client: docker.DockerClient) -> str:
        """Which engine answers (asked once): what the container looks like may depend on it."""
        if self._engine is None:
            with self._do("read the engine version"):
                self._engine = engine_of(client.api.version())
        return self._engine

    def start(self, container_id: str) -> None:
        client = self._api()
        with self._do(f"start container {container_id}"):
            client.api.start(container_id)

    def put_archive(self, container_id: str, path: str, stream: Iterable[bytes]) -> None:
        """Unpack the tar `stream` at `path` in the container; the body is sent chunked, as it comes."""
        client = self._api()
        with self._do(f"copy files into {path} of container {container_id}"):
            client.api.put_archive(container_id, path, stream)

    def get_archive(self, container_id: str, path: str) -> Iterator[bytes]:
        """`path` of the container as a tar stream, in the chunks the engine sends."""
        client = self._api()
        action = f"copy {path} out of container {container_id}"
        with self._do(action):
            stream, _ = client.api.get_archive(container_id, path)
        return self._chunks(stream, action)

    def _chunks(self, stream: Iterator[bytes], action: str) -> Iterator[bytes]:
        try:
            with self._do(action):  # a stream fails as it is read: translated as well
                yield from stream
        finally:
            with contextlib.suppress(Exception):
                stream.close()  # type: ignore[attr-defined]

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
        if found is None or not found.state.live:
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
        """Delete `entry`/ws as root in a `purge_spec` container, removed afterwards; ExecutorError on failure."""
        spec = purge_spec(image, entry, owner)
        client = self._api()
        with self._do(f"create container {spec.name}", image=image, missing=ExecutorError):
            container_id = client.containers.create(**self._create_kwargs(client, spec)).id
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

    def __enter__(self) -> DockerBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def runs_as_root(user: str) -> bool:
    """Does the container's `user` ("" = the image's default, root) run as root? By name, as
    Podman decides it: a name the image maps to uid 0 counts as not root, the safe side."""
    return user.partition(":")[0] in ("", "root", "0")


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

