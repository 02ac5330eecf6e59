"""`FakeBackend`: an in-memory `Backend` (agent_core.executor), for runner and scheduler tests.

    backend = FakeBackend()
    backend.script("t-1", Script(code=0, stdout=b"hi", outputs={"output/a.txt": b"a"}))
    backend.script("t-2", Script(hold=True))        # runs until backend.release("t-2") or stop()
    backend.fail("create", ImageMissing("gone"), times=3)
    gate = backend.block("wait")                     # the next wait() blocks ...
    gate.reached.wait(5); gate.release(DockerUnavailable("crash"))   # ... then raises (or goes on)
    backend.go_down(); backend.come_back()           # an engine away: every call (a blocked wait too)
                                                     # raises DockerUnavailable; its containers live on

A container is a record (id, name, labels from the spec, status created/running/exited).
`start` "runs" it: the script's outputs are written into the task's workspace (the spec's first
bind), and unless it holds, it exits at once. Every method is thread-safe, and records its call
in `calls` (method name, first argument).

Without a bind (copy mode), /workspace is the container's `files` (path -> bytes) instead:
`put_archive` unpacks a tar into it, `start` writes the outputs there, and `get_archive` sends
it back (the contents of /workspace/.) as a tar in small chunks, or the script's raw `archive`,
calling "get_archive_chunk" before every chunk after the first: a test can hold or break it half-way.

`bound_file` reads this host's file, as an engine here would; with `host_root` set, the fake engine's
host is that folder instead (an engine elsewhere, or agent-core in a container without the data dir
mounted at its path): a folder missing there is Docker's refusal of the bind.
"""

from __future__ import annotations

import io
import shutil
import tarfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from agent_core.errors import ContainerVanished, DockerUnavailable, ExecutorError
from agent_core.executor import LABEL_SERVICE, LABEL_TASK, ContainerSpec, EngineInfo, Exit, Found, Owner, SavedLogs, State
from agent_core.workspace import WORKSPACE_MOUNT

STOPPED_CODE = 137  # what a container ended by `stop` exits with (SIGKILL)


@dataclass
class Script:
    """What one task's container does when it runs."""

    code: int = 0
    oom_killed: bool = False
    stdout: bytes = b""
    stderr: bytes = b""
    outputs: dict[str, bytes] = field(default_factory=dict)  # workspace-relative path -> bytes
    hold: bool = False  # keep running until the test calls `release` (or the runner `stop`)
    archive: bytes | None = None  # copy mode: what get_archive sends instead of the container's files


@dataclass
class Container:
    id: str
    name: str
    labels: dict[str, str]
    workspace: Path | None  # the bind; None: /workspace is `files`
    status: str = "created"
    files: dict[str, bytes] = field(default_factory=dict)  # copy mode: /workspace, relative path -> bytes
    exit: Exit | None = None
    created: float = field(default_factory=time.time)

    @property
    def task_id(self) -> str:
        return self.labels.get(LABEL_TASK, "")

    def found(self) -> Found:
        return Found(id=self.id, name=self.name, task_id=self.task_id,
                     service_id=self.labels.get(LABEL_SERVICE, ""), state=State(self.status), status=self.status,
                     created=self.created, labels=dict(self.labels))


class Gate:
    """A call held at the gate: `reached` is set when it arrives; `release` lets it go on, or raise."""

    def __init__(self, after: int = 0) -> None:
        self.after = after  # calls that pass before the one held
        self.reached = threading.Event()
        self._go = threading.Event()
        self._error: BaseException | None = None

    def release(self, error: BaseException | None = None) -> None:
        if not self._go.is_set():  # the first release decides
            self._error = error
            self._go.set()

    def _pass(self) -> None:
        self.reached.set()
        self._go.wait()
        if self._error is not None:
            raise self._error


class FakeBackend:
    where = "fake://engine"

    def __init__(self, where: str | None = None) -> None:
        if where is not None:
            self.where = where
        self.down = False  # the engine does not answer
        self._cond = threading.Condition()
        self.containers: dict[str, Container] = {}  # by id; removed ones are gone
        self.calls: list[tuple[str, object]] = []
        self.image_ok = True  # what image_present answers
        self.host_root: Path | None = None  # bind sources are looked up under it; None: this host's /
        self._scripts: dict[str, Script] = {}
        self._released: set[str] = set()  # tasks whose held containers may exit
        self._gates: list[Gate] = []  # every gate made, for close()
        self._faults: dict[str, list[Gate | list]] = {}  # method -> [Gate | [error, times left]]
        self.put_names: dict[str, list[str]] = {}  # container id -> the files each put_archive brought

    # --- what a test sets up and looks at ----------------------------------------------

    def script(self, task_id: str, script: Script) -> None:
        with self._cond:
            self._scripts[task_id] = script

    def fail(self, method: str, error: BaseException, times: int = 1) -> None:
        """The next `times` calls of `method` raise `error`."""
        with self._cond:
            self._faults.setdefault(method, []).append([error, times])

    def block(self, method: str, after: int = 0) -> Gate:
        """The next call of `method` (after `after` more) waits at the returned gate."""
        gate = Gate(after)
        with self._cond:
            self._faults.setdefault(method, []).append(gate)
            self._gates.append(gate)
        return gate

    def release(self, task_id: str) -> None:
        """The task's held container exits now (or, not started yet, as soon as it starts)."""
        with self._cond:
            self._released.add(task_id)
            script = self._script(task_id)
            for c in self.containers.values():
                if c.task_id == task_id and c.status == "running":
                    self._exit(c, Exit(script.code, script.oom_killed))

    def close(self) -> None:
        """End the test: every held call fails and every running container exits."""
        with self._cond:
            gates = list(self._gates)
            self._faults.clear()
            for c in self.containers.values():
                if c.status == "running":
                    self._exit(c, Exit(STOPPED_CODE, False))
        for gate in gates:
            gate.release(DockerUnavailable("the fake backend was closed"))

    def go_down(self) -> None:
        with self._cond:
            self.down = True
            self._cond.notify_all()  # a blocked wait loses its connection

    def come_back(self) -> None:
        with self._cond:
            self.down = False

    def running(self) -> list[Container]:
        with self._cond:
            return [c for c in self.containers.values() if c.status == "running"]

    def count(self, method: str) -> int:
        with self._cond:
            return sum(1 for name, _ in self.calls if name == method)

    def of_task(self, task_id: str) -> list[Container]:
        with self._cond:
            return [c for c in self.containers.values() if c.task_id == task_id]

    # --- plumbing ------------------------------------------------------------------------

    def _call(self, method: str, arg: object = None) -> None:
        """Record the call and apply the first fault queued for it (outside the lock)."""
        with self._cond:
            self.calls.append((method, arg))
            if self.down:
                raise DockerUnavailable(f"engine not reachable at {self.where}: it is down")
            queue = self._faults.get(method) or []
            fault = queue[0] if queue else None
            if isinstance(fault, Gate) and fault.after:
                fault.after -= 1
                fault = None
            elif isinstance(fault, Gate):
                queue.pop(0)
            elif fault is not None:
                fault[1] -= 1
                if fault[1] <= 0:
                    queue.pop(0)
        if isinstance(fault, Gate):
            fault._pass()
        elif fault is not None:
            raise fault[0]

    def _script(self, task_id: str) -> Script:
        return self._scripts.get(task_id) or Script()

    def _get(self, container_id: str) -> Container:
        c = self.containers.get(container_id)
        if c is None:
            raise ContainerVanished(f"no such container: {container_id[:12]}")
        return c

    def _exit(self, c: Container, exit_: Exit) -> None:
        c.status, c.exit = "exited", exit_
        self._cond.notify_all()

    # --- the Backend surface ----------------------------------------------------------------

    def ping(self) -> None:
        self._call("ping")

    def engine_info(self) -> EngineInfo:
        self._call("engine_info")
        return EngineInfo(engine="fake", version="0", rootless=False, where=self.where)

    def image_present(self, image: str) -> bool:
        self._call("image_present", image)
        return self.image_ok

    def network(self, name: str) -> dict | None:
        self._call("network", name)
        return {"Name": name}

    def image_files(self, image: str, paths: tuple[str, ...], max_bytes: int) -> dict[str, bytes | None]:
        self._call("image_files", image)
        return dict.fromkeys(paths)

    def bound_file(self, image: str, folder: Path, name: str, max_bytes: int) -> bytes | None:
        self._call("bound_file", folder / name)
        seen = folder if self.host_root is None else self.host_root / folder.relative_to("/")
        if not seen.is_dir():
            raise ExecutorError(f"invalid mount config for type \"bind\": bind source path does not exist: {folder}")
        if not (seen / name).is_file():
            return None
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            tar.add(seen / name, arcname=Path(name).name)
        return buf.getvalue()

    def create(self, spec: ContainerSpec, owner: Owner) -> str:
        self._call("create", spec.task_id)
        with self._cond:
            if any(c.name == spec.name for c in self.containers.values()):
                raise ExecutorError(f"container name {spec.name} is in use")  # Docker's 409
            bind = next((b for b in spec.binds if b.container == WORKSPACE_MOUNT), None)
            c = Container(id=uuid.uuid4().hex * 2, name=spec.name, labels=dict(spec.labels),
                          workspace=Path(bind.host) if bind else None)
            self.containers[c.id] = c
            return c.id

    def start(self, container_id: str) -> None:
        self._call("start", container_id)
        with self._cond:
            c = self._get(container_id)
            if c.status != "created":
                return
            script = self._script(c.task_id)
            for rel, data in script.outputs.items():
                if c.workspace is None:
                    c.files[rel] = data
                    continue
                path = c.workspace / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
            c.status = "running"
            if not script.hold or c.task_id in self._released:
                self._exit(c, Exit(script.code, script.oom_killed))

    def put_archive(self, container_id: str, path: str, stream: Iterable[bytes]) -> None:
        self._call("put_archive", container_id)
        data = b"".join(stream)
        assert path == WORKSPACE_MOUNT
        with self._cond:
            c = self._get(container_id)
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                for member in tar:
                    if member.isfile():
                        c.files[member.name] = tar.extractfile(member).read()
            self.put_names[container_id] = sorted(c.files)

    def get_archive(self, container_id: str, path: str) -> Iterator[bytes]:
        self._call("get_archive", container_id)
        with self._cond:
            c = self._get(container_id)
            data = self._script(c.task_id).archive
            if data is None:
                buf = io.BytesIO()
                with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
                    for rel, content in sorted(c.files.items()):
                        info = tarfile.TarInfo(f"./{rel}")  # as Docker names the contents of a "dir/."
                        info.size = len(content)
                        tar.addfile(info, io.BytesIO(content))
                data = buf.getvalue()
        return self._chunks(data)

    def _chunks(self, data: bytes, size: int = 1000) -> Iterator[bytes]:
        for start in range(0, len(data), size):
            if start:
                self._call("get_archive_chunk")
            yield data[start:start + size]

    def inspect(self, id_or_name: str) -> Found | None:
        self._call("inspect", id_or_name)
        with self._cond:
            c = self.containers.get(id_or_name) or next(
                (c for c in self.containers.values() if c.name == id_or_name), None)
            return c.found() if c else None

    def wait(self, container_id: str) -> Exit:
        self._call("wait", container_id)
        with self._cond:
            while True:
                c = self._get(container_id)
                if c.exit is not None:
                    return c.exit
                self._cond.wait()
                if self.down:
                    raise DockerUnavailable(f"engine not reachable at {self.where}: lost while waiting")

    def stop(self, container_id: str, grace: float = 10) -> None:
        self._call("stop", container_id)
        with self._cond:
            c = self.containers.get(container_id)
            if c is not None and c.status != "exited":
                self._exit(c, Exit(STOPPED_CODE, False))

    def remove(self, container_id: str) -> None:
        self._call("remove", container_id)
        with self._cond:
            self.containers.pop(container_id, None)
            self._cond.notify_all()  # a wait on it ends (ContainerVanished)

    def save_logs(self, container_id: str, open_stdout: Callable, open_stderr: Callable,
                  max_bytes: int) -> SavedLogs:
        self._call("save_logs", container_id)
        with self._cond:
            script = self._script(self._get(container_id).task_id)
        for opener, data in ((open_stdout, script.stdout), (open_stderr, script.stderr)):
            with opener() as f:
                f.write(data[-max_bytes:] if max_bytes else data)
        return SavedLogs(len(script.stdout), len(script.stderr), max_bytes)

    def managed(self, owner: Owner) -> list[Found]:
        self._call("managed")
        with self._cond:
            return [c.found() for c in self.containers.values() if owner.owns(c.labels)]

    def purge(self, image: str, entry: Path, owner: Owner) -> None:
        self._call("purge", entry)
        shutil.rmtree(Path(entry) / "ws", ignore_errors=True)
