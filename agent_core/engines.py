"""Several engines for one service: each engine's backend, capacity, workspace mode and state, and
which one takes the next task.

The OpenAaaS server pairs a service with one agent, so a service that outgrows one host spreads
its containers over engines (`[[executor.engines]]`); without the table the pool holds the one
engine of executor.engine / engine_url / capacity / workspace. The pool answers two questions,
both pure over `Slots`: which reachable engine takes the next task (`pick`: the most free slots),
and what the server is told (`offer`: load and capacity over the engines that answer). The
scheduler marks an engine down when it stops answering and up when it is back; a task records
its engine's name in the journal, so a restart finds it on the right one.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Sequence

from agent_core.archive import BIND
from agent_core.config import Config, EngineConfig
from agent_core.errors import DockerUnavailable
from agent_core.executor import Backend, open_backend
from agent_core.livestatus import EngineEntry, EngineSeen


@dataclass(frozen=True)
class Slots:
    """One engine as the choice sees it."""

    name: str
    up: bool
    capacity: int
    running: int

    @property
    def free(self) -> int:
        return max(0, self.capacity - self.running)


def pick(engines: Sequence[Slots]) -> str | None:
    """The reachable engine with the most free slots (the first listed among equals), or None
    when no reachable engine has room."""
    best = max((e for e in engines if e.up and e.free), key=lambda e: e.free, default=None)
    return best.name if best else None


def offer(engines: Sequence[Slots]) -> tuple[int, int]:
    """(load, capacity) for heartbeats and polls: over the engines that answer. When none answers,
    over all of them: intake is paused anyway, and a capacity of 0 is no heartbeat a server takes."""
    counted = [e for e in engines if e.up] or list(engines)
    return sum(e.running for e in counted), sum(e.capacity for e in counted)


class Engine:
    """One engine of the pool: its config, its backend, whether it answers, and its tasks."""

    def __init__(self, config: EngineConfig, backend: Backend):
        self.config, self.backend = config, backend
        self.up = threading.Event()
        self.up.set()  # until a call says otherwise
        self.down_since: float | None = None
        self.seen: EngineSeen | None = None  # as last described, for status and logs
        self.running: set[str] = set()  # task ids placed here (the pool's lock guards it)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def workspace(self) -> str:
        return self.config.workspace

    @property
    def where(self) -> str:
        return self.backend.where

    def mark_down(self) -> bool:
        """True when this is the news (it was up)."""
        if not self.up.is_set():
            return False
        self.down_since = time.time()
        self.up.clear()
        return True

    def mark_up(self) -> None:
        self.down_since = None
        self.up.set()

    def lost_for(self) -> float:
        """Seconds since it stopped answering; 0 while it answers."""
        since = self.down_since
        return 0.0 if since is None or self.up.is_set() else max(0.0, time.time() - since)


class EnginePool:
    def __init__(self, engines: Sequence[Engine]):
        assert engines, "a pool of no engine"
        self.engines = tuple(engines)
        self._lock = threading.Lock()

    @classmethod
    def open(cls, cfg: Config, pool_margin: int) -> EnginePool:
        """A backend for every configured engine, each with room for its capacity plus `pool_margin`
        connections. Connects on first use."""
        engines: list[Engine] = []
        try:
            for e in cfg.executor.engine_list:
                engines.append(Engine(e, open_backend(cfg, e.capacity + pool_margin, e)))
        except BaseException:
            for made in engines:
                made.backend.close()
            raise
        return cls(engines)

    @classmethod
    def of(cls, cfg: Config, backends: Sequence[Backend]) -> EnginePool:
        """The configured engines on the given backends, in order (tests, and a caller with its own)."""
        configs = cfg.executor.engine_list
        assert len(configs) == len(backends), f"{len(configs)} engines configured, {len(backends)} backends given"
        return cls([Engine(c, b) for c, b in zip(configs, backends)])

    @property
    def first(self) -> Engine:
        return self.engines[0]

    @property
    def several(self) -> bool:
        return len(self.engines) > 1

    def get(self, name: str | None) -> Engine | None:
        """The engine of that name; None names the first (a journal record of an older agent)."""
        if name is None:
            return self.first
        return next((e for e in self.engines if e.name == name), None)

    def label(self, engine: Engine) -> str:
        """How messages name an engine: by name when there are several, else not at all."""
        return f" {engine.name!r}" if self.several else ""

    def _slots(self) -> list[Slots]:
        return [Slots(e.name, e.up.is_set(), e.config.capacity, len(e.running)) for e in self.engines]

    def reserve(self, task_id: str, exclude: Sequence[Engine] = ()) -> Engine | None:
        """Place `task_id` on the engine `pick` chooses (none of `exclude`), or None when none has room."""
        with self._lock:
            name = pick([s for s in self._slots() if s.name not in {e.name for e in exclude}])
            engine = self.get(name) if name else None
            if engine is not None:
                engine.running.add(task_id)
            return engine

    def place(self, task_id: str, engine: Engine) -> None:
        """Count `task_id` on `engine` (a task recovered from the journal), whatever its room."""
        with self._lock:
            engine.running.add(task_id)

    def release(self, task_id: str) -> None:
        with self._lock:
            for e in self.engines:
                e.running.discard(task_id)

    def offer(self) -> tuple[int, int]:
        with self._lock:
            return offer(self._slots())

    def capacity(self) -> int:
        return self.offer()[1]

    def has_room(self) -> bool:
        """Whether a reachable engine has a free slot."""
        with self._lock:
            return pick(self._slots()) is not None

    def running(self, engine: Engine) -> int:
        with self._lock:
            return len(engine.running)

    def any_up(self) -> bool:
        return any(e.up.is_set() for e in self.engines)

    def ping_any(self) -> None:
        """/healthz: raise DockerUnavailable unless at least one engine answers a ping."""
        errors = []
        for e in self.engines:
            try:
                e.backend.ping()
                return
            except DockerUnavailable as error:
                errors.append(str(error))
        raise DockerUnavailable("; ".join(errors))

    def bind_engine(self) -> Engine | None:
        """An engine that sees this host's data dir (a bind one), for the janitor's root purge."""
        return next((e for e in self.engines if e.workspace == BIND), None)

    def status(self) -> tuple[EngineEntry, ...]:
        with self._lock:
            counts = {e.name: len(e.running) for e in self.engines}
        return tuple(EngineEntry(name=e.name, where=e.where, up=e.up.is_set(), down_since=e.down_since,
                                 seen=e.seen, running=counts[e.name], capacity=e.config.capacity,
                                 workspace=e.workspace) for e in self.engines)

    def close(self) -> None:
        for e in self.engines:
            e.backend.close()
