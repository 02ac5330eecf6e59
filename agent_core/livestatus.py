"""The live status file's schema: what the scheduler writes and `status`, `stop` and `doctor` read.

The file holds timestamps, never ages: a reader computes those when it reads (`age`), so a
file written a while ago is still true. Reading is tolerant: a field that is missing or of
the wrong type (an older daemon's file, a half-garbled one) reads as absent, never as an error.
Importing this module costs no engine client (docker-py): `status` starts fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from agent_core.lifecycle import Step

if TYPE_CHECKING:
    from agent_core.executor import EngineInfo

STARTING = "starting"  # the state shown before the daemon's first write (or of an unreadable file)


def age(ts: float | None, now: float) -> float | None:
    """Seconds from `ts` to `now`, rounded for showing; None for no time."""
    return round(max(0.0, now - ts), 1) if ts is not None and ts > 0 else None


def _num(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


@dataclass(frozen=True)
class EngineSeen:
    """The engine as last reached: `EngineInfo`'s facts with its `line()`, so a reader shows it
    without importing the executor."""

    engine: str
    version: str
    rootless: bool
    where: str
    line: str

    @classmethod
    def of(cls, info: EngineInfo) -> EngineSeen:
        return cls(engine=info.engine, version=info.version, rootless=info.rootless, where=info.where,
                   line=info.line())

    @classmethod
    def from_json(cls, data: object) -> EngineSeen | None:
        d = _dict(data)
        line = _str(d.get("line"))
        if line is None:
            return None
        return cls(engine=_str(d.get("engine")) or "?", version=_str(d.get("version")) or "?",
                   rootless=d.get("rootless") is True, where=_str(d.get("where")) or "?", line=line)


@dataclass(frozen=True)
class EngineEntry:
    """One engine of the pool (agent_core.engines): reachable or not (since when), as last
    described, its tasks and its room."""

    name: str
    where: str
    up: bool
    down_since: float | None = None
    seen: EngineSeen | None = None
    running: int = 0
    capacity: int | None = None
    workspace: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "where": self.where, "up": self.up, "down_since": self.down_since,
                "engine": _seen_json(self.seen), "running": self.running, "capacity": self.capacity,
                "workspace": self.workspace}

    @classmethod
    def from_json(cls, data: object) -> EngineEntry:
        d = _dict(data)
        return cls(name=_str(d.get("name")) or "?", where=_str(d.get("where")) or "?", up=d.get("up") is True,
                   down_since=_num(d.get("down_since")), seen=EngineSeen.from_json(d.get("engine")),
                   running=_int(d.get("running")) or 0, capacity=_int(d.get("capacity")),
                   workspace=_str(d.get("workspace")))


def _seen_json(seen: EngineSeen | None) -> dict[str, Any] | None:
    if seen is None:
        return None
    return {"engine": seen.engine, "version": seen.version, "rootless": seen.rootless, "where": seen.where,
            "line": seen.line}


@dataclass(frozen=True)
class LastError:
    """The last problem of one kind (poll, heartbeat, engine, disk, ...), for `status`."""

    at: float | None
    message: str


@dataclass(frozen=True)
class TaskEntry:
    id: str
    stage: str
    started_at: float | None = None   # accepted (time.time())
    stage_since: float | None = None  # entered its stage
    container: str | None = None      # short id, once launched
    progress: dict[str, int] = field(default_factory=dict)  # bytes and files moved (see TaskRunner.live)
    stored_age: float | None = None   # "age_secs" of a daemon that wrote ages, not started_at
    engine: str | None = None         # the engine it runs on (by name)

    def age(self, now: float) -> float | None:
        return age(self.started_at, now) if self.started_at is not None else self.stored_age

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "stage": self.stage, "started_at": self.started_at, "stage_since": self.stage_since,
                "container": self.container, "progress": dict(self.progress), "engine": self.engine}

    @classmethod
    def from_json(cls, data: object) -> TaskEntry:
        d = _dict(data)
        progress = {k: v for k, v in _dict(d.get("progress")).items() if _num(v) is not None}
        return cls(id=_str(d.get("id")) or "?", stage=_str(d.get("stage")) or "?",
                   started_at=_num(d.get("started_at")), stage_since=_num(d.get("stage_since")),
                   container=_str(d.get("container")), progress=progress, stored_age=_num(d.get("age_secs")),
                   engine=_str(d.get("engine")))


@dataclass(frozen=True)
class LiveStatus:
    pid: int | None
    state: Step | None = None  # None: starting
    reason: str | None = None  # why the agent is not simply serving
    name: str | None = None
    started_at: float | None = None
    stop_requested_at: float | None = None
    service_id: str | None = None
    capacity: int | None = None
    engine_ok: bool | None = None  # None: a file that does not say
    engine: EngineSeen | None = None  # None until the engine first answered
    engines: tuple[EngineEntry, ...] = ()  # every engine of the pool
    last_poll: float | None = None
    last_heartbeat: float | None = None
    errors: dict[str, LastError] = field(default_factory=dict)
    tasks: tuple[TaskEntry, ...] = ()
    requests: dict[str, Any] = field(default_factory=dict)  # RequestBudget.snapshot()

    @property
    def state_name(self) -> str:
        return self.state.state if self.state is not None else STARTING

    def to_json(self) -> dict[str, Any]:
        return {
            "pid": self.pid, "state": self.state_name, "reason": self.reason, "name": self.name,
            "started_at": self.started_at, "stop_requested_at": self.stop_requested_at,
            "service_id": self.service_id, "capacity": self.capacity, "engine_ok": self.engine_ok,
            "engine": _seen_json(self.engine),
            **({"engines": [e.to_json() for e in self.engines]} if self.engines else {}),
            "last_poll": self.last_poll, "last_heartbeat": self.last_heartbeat,
            "errors": {kind: {"at": e.at, "message": e.message} for kind, e in self.errors.items()},
            "tasks": [t.to_json() for t in self.tasks],
            "requests": dict(self.requests),
        }

    def with_ages(self, now: float) -> dict[str, Any]:
        """`to_json` and each age computed at `now` (`status --json`)."""
        out = self.to_json()
        for key in ("started_at", "last_poll", "last_heartbeat", "stop_requested_at"):
            if age(getattr(self, key), now) is not None:
                out[f"{key.removesuffix('_at')}_age_secs"] = age(getattr(self, key), now)
        for shown, task in zip(out["tasks"], self.tasks):
            if task.age(now) is not None:
                shown["age_secs"] = task.age(now)
            if age(task.stage_since, now) is not None:
                shown["stage_age_secs"] = age(task.stage_since, now)
        for kind, e in self.errors.items():
            out["errors"][kind]["age_secs"] = age(e.at, now)
        return out

    @classmethod
    def from_json(cls, data: object) -> LiveStatus:
        """The status a file holds; every unreadable field is absent (no pid: not a daemon's file)."""
        d = _dict(data)
        engine_ok = d.get("engine_ok")
        errors = {kind: LastError(_num(e.get("at")), _str(e.get("message")) or "")
                  for kind, e in _dict(d.get("errors")).items() if isinstance(e, dict)}
        tasks = d.get("tasks")
        return cls(
            pid=_int(d.get("pid")), state=Step.of(d.get("state")), reason=_str(d.get("reason")),
            name=_str(d.get("name")), started_at=_num(d.get("started_at")),
            stop_requested_at=_num(d.get("stop_requested_at")), service_id=_str(d.get("service_id")),
            capacity=_int(d.get("capacity")), engine_ok=engine_ok if isinstance(engine_ok, bool) else None,
            engine=EngineSeen.from_json(d.get("engine")),
            engines=tuple(EngineEntry.from_json(e) for e in d["engines"]) if isinstance(d.get("engines"), list) else (),
            last_poll=_num(d.get("last_poll")),
            last_heartbeat=_num(d.get("last_heartbeat")), errors=errors,
            tasks=tuple(TaskEntry.from_json(t) for t in tasks) if isinstance(tasks, list) else (),
            requests=_dict(d.get("requests")),
        )
