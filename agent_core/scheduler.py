"""The daemon's supervisor: poll loop, capacity, heartbeats, cancels, recovery, shutdown ladder.

Threads: the supervisor (the caller of `run`), one `TaskRunner` per task, a
heartbeat thread on its own clock, and short-lived threads for reports that
must not hold up polling. Nothing sleeps blindly: waits are on `_wakeup`, which
a finishing task or a signal sets.

Shutdown ladder (lifecycle.Step; `request_stop` moves it one step):
  1 draining   - no new tasks; running ones finish and are reported; heartbeats go on;
                 after `shutdown_grace_secs` step 2 follows by itself
  2 cancelling - containers are stopped and reported failed ("agent shutting down")
  3 exiting    - leave at once; the journal lets the next start recover the tasks
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import threading
import time
from pathlib import Path

from agent_core import preflight, process
from agent_core import workspace as wsmod
from agent_core.budget import Backoff
from agent_core.client import Client
from agent_core.config import Config
from agent_core.engines import Engine, EnginePool
from agent_core.errors import (AgentError, AuthRejected, DockerUnavailable, EngineLost, ServerError,
                               ServerUnavailable, TaskGone, UnsafePath, WorkspaceError)
from agent_core.executor import Backend, Owner, engine_mismatch
from agent_core.janitor import Janitor
from agent_core.journal import Journal, Stage, TaskRecord
from agent_core.lifecycle import Lifecycle, Step
from agent_core.livestatus import EngineSeen, LastError, LiveStatus
from agent_core.metrics import Metrics
from agent_core.protocol import Completion, Heartbeat, Task
from agent_core.outcome import CancelReason
from agent_core.runner import Deps, TaskRunner

log = logging.getLogger(__name__)

STATUS_EVERY_SECS = 0.5
TRANSFER_STATUS_SECS = 0.5    # extra wait between status rewrites while bytes move
LAUNCH_FAILURES_TO_PAUSE = 3  # of one kind in a row (image, network, user): then intake pauses
JOURNAL_ROOM_MB = 16          # free space that ends a pause caused by a failed journal write
ENGINE_WAIT_CHECK_SECS = 1.0  # how soon a task waiting for a lost engine notices the cancel step
RECHECK_SECS = 10.0           # how often a paused agent checks whether the cause is gone


def _clock(when: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))


class ExitNow(SystemExit):
    """Raised in the main thread by the third signal."""


class _Throttled:
    """Log a repeating problem once per `every` seconds, not once per loop, and remember the
    last one of each kind (with its time) for `status`."""

    def __init__(self, every: float = 60.0):
        self.every, self._last = every, {}
        self.errors: dict[str, LastError] = {}  # by kind

    def warning(self, key: str, msg: str, *args: object) -> None:
        self.note(key, msg % args)
        now = time.monotonic()
        if now - self._last.get(key, -self.every) >= self.every:
            self._last[key] = now
            log.warning(msg, *args)

    def note(self, key: str, message: str) -> None:
        """Remember a problem for `status` that was logged elsewhere."""
        self.errors[key] = LastError(at=time.time(), message=message)

    def clear(self, key: str) -> bool:
        return self._last.pop(key, None) is not None


class Scheduler:
    """`lifecycle` is the one the client was built with: the ladder moves it, and its exit-now
    step cuts the client's retries short. `metrics` hears the load and each task's outcome.
    `executor` is the pool of engines (agent_core.engines), or the one engine's backend."""

    def __init__(self, cfg: Config, client: Client, executor: Backend | EnginePool, *, lifecycle: Lifecycle,
                 metrics: Metrics | None = None, burst: bool = False):
        self.cfg = cfg
        self.client = client
        self.pool = executor if isinstance(executor, EnginePool) else EnginePool.of(cfg, [executor])
        self.lifecycle = lifecycle
        self.burst = burst  # leave once the queue is empty and nothing runs (tests, benchmarks)
        self.service_id = client.service_id or ""
        self.owner = Owner.of(self.service_id, cfg.paths.data_dir)
        self.journal = Journal(cfg.paths.data_dir)
        # root removes whatever a container left; anyone else needs a root container for that, on an
        # engine that sees this host's data dir (with none, the agent itself wrote every file)
        local = self.pool.bind_engine()
        purge = None if os.geteuid() == 0 or local is None else (
            lambda entry: local.backend.purge(cfg.executor.image, entry, self.owner))
        self.janitor = Janitor(cfg.paths.data_dir, purge)
        self.exit_code = 0
        self.last_poll: float | None = None
        self.last_heartbeat: float | None = None
        self.started = time.time()
        self._runners: dict[str, TaskRunner] = {}
        self._side_jobs: set[str] = set()  # task ids with a report under way outside a runner
        self._lock = threading.RLock()
        self._wakeup = threading.Event()
        self._hb_stop = threading.Event()
        self._hb_thread = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        self._status_dirty = threading.Event()
        self._status_thread = threading.Thread(target=self._status_loop, name="status", daemon=True)
        self._quiet = _Throttled()
        self._launch_failures: dict[str, int] = {}
        self._paused: tuple[preflight.Problem, float] | None = None  # the breaker, and since when
        self._disk_low: str | None = None
        self._journal_broken = False
        self._server_down: tuple[float, str] | None = None  # since when, and why
        metrics = metrics or Metrics()
        metrics.watch(running=lambda: self.load, capacity=self.pool.capacity, engines=self.pool.status)
        # each engine's runners get its backend, its workspace mode and its outage handling
        self._deps = {e.name: Deps(
            cfg=cfg, client=client, executor=e.backend, workspace_mode=e.workspace, lifecycle=lifecycle,
            metrics=metrics, journal=self.journal, owner=self.owner, janitor=self.janitor,
            engine_down=functools.partial(self._engine_down, e), engine_wait=functools.partial(self._engine_wait, e),
            changed=self._status_dirty.set, launch_result=self._launch_result, journal_failed=self._journal_failed)
            for e in self.pool.engines}
        self._probe = threading.Thread(target=self._probe_loop, name="engine-probe", daemon=True)

    # --- public verbs ----------------------------------------------------------

    @property
    def load(self) -> int:
        with self._lock:
            return len(self._runners)

    @property
    def capacity(self) -> int:
        """What the server is offered: the capacity of the engines that answer (agent_core.engines.offer)."""
        return self.pool.capacity()

    def _runner(self, engine: Engine, record: TaskRecord) -> TaskRunner:
        record.engine = engine.name
        return TaskRunner(self._deps[engine.name], record, self._on_runner_done)

    def run(self) -> int:
        """Serve until stopped (or, in burst mode, until idle); returns the exit code."""
        for engine in self.pool.engines:
            self._describe_engine(engine)
        self._recover()
        self._hb_thread.start()
        self._status_thread.start()
        if self.pool.several:
            self._probe.start()
        self.write_status()
        log.info("agent %s running: service %s, capacity %d, image %s", self.cfg.agent.name, self.service_id,
                 self.capacity, self.cfg.executor.image)
        if self.pool.several:
            for e in self.pool.status():
                log.info("engine %r: %s, capacity %d, workspace %s", e.name,
                         e.seen.line if e.up and e.seen else f"unreachable at {e.where}", e.capacity, e.workspace)
        try:
            self._supervise()
            self._shutdown()
        finally:
            self._hb_stop.set()
            self._status_dirty.set()  # lets the status thread see the stop
            if self._hb_thread.is_alive():
                self._hb_thread.join(5)
        return self.exit_code

    def request_stop(self) -> None:
        """One more step down the ladder (signal handlers call this)."""
        step = self.lifecycle.advance()
        log.info("stop requested: %s", step.state)
        self._wakeup.set()
        if step is Step.EXITING:
            self.exit_now()
        self.write_status()  # `stop` watches the state to know the signal was taken

    def drain(self) -> None:
        self.lifecycle.reach(Step.DRAINING)
        self._wakeup.set()

    def cancel_all(self, reason: CancelReason) -> None:
        with self._lock:
            runners = list(self._runners.values())
        for runner in runners:
            runner.cancel(reason)

    def exit_now(self) -> None:
        self.lifecycle.exit_now()
        for engine in self.pool.engines:
            engine.up.set()  # runners waiting for a lost engine go on, see the exit and leave
        raise ExitNow(1)

    # --- supervisor -------------------------------------------------------------

    def _sleep(self, secs: float) -> None:
        self._wakeup.wait(secs)
        self._wakeup.clear()

    def _supervise(self) -> None:
        backoff = Backoff()
        interval = self.cfg.server.poll_interval_secs
        while self.lifecycle.step is Step.RUNNING:
            self._disk_ok()  # once per poll: decides intake (_can_take_work) and what status says
            try:
                result = self.client.poll(*self.pool.offer(), interrupt=self.lifecycle.stopping)
            except AuthRejected as e:
                log.error("the server refused our credentials, stopping: %s", e)
                self.exit_code = 1
                self.drain()
                return
            except ServerError as e:
                if self.lifecycle.step is not Step.RUNNING:
                    return
                self._server_trouble(e)
                self._quiet.warning("poll", "poll failed (retrying with backoff): %s", e)
                # after a 429 the request budget already holds the next poll for Retry-After
                self._sleep(0 if e.status == 429 else backoff.next())
                continue
            if self._quiet.clear("poll"):
                log.info("poll works again")
            backoff.reset()
            self.last_poll = time.time()
            self._server_down = None
            self._status_dirty.set()  # `last poll` in status is as fresh as the poll
            again = False
            if result.cancel_task_id is not None:
                self._on_cancel(result.cancel_task_id)
            elif result.task is not None:
                again = self._on_offer(result.task)
            elif result.malformed is not None:
                self._refuse(result.malformed[0], f"malformed task refused: {result.malformed[1]}")
            elif result.ignored is not None:
                # no id we could accept or report: nothing to do but poll on (another poll may
                # offer other work; cancels still come first)
                self._quiet.warning("ignored", "poll offered a task that cannot be taken: %s", result.ignored)
            elif self.burst and self.load == 0 and not self._side_jobs:
                log.info("queue empty and nothing running: leaving (burst mode)")
                return
            if not again:
                self._sleep(interval)

    def _on_offer(self, task: Task) -> bool:
        """Take the offered task if we can; True when polling again at once makes sense."""
        try:
            wsmod.check_task_id(task.id)
        except UnsafePath as e:
            self._refuse(task.id, f"task id refused: {e}")
            return False  # the same offer comes until the refusal lands; its end wakes the loop
        with self._lock:
            requeued = task.id in self._runners
            if not requeued:
                engine = self.pool.reserve(task.id) if self._can_take_work() else None
                if engine is None:
                    return False
                runner = self._runner(engine, TaskRecord(task=task))
                self._runners[task.id] = runner  # the slot is taken before accept
        if requeued:
            # the server requeued a task that still runs here: take it back, keep the container
            try:
                if self.client.accept(task.id):
                    log.warning("task %s: requeued by the server while running here; accepted again", task.id,
                                extra={"task_id": task.id})
            except ServerError as e:
                log.warning("task %s: accept failed: %s", task.id, e, extra={"task_id": task.id})
            return False
        accepted = False
        engine = self._answering(runner)
        if engine is not None:
            runner = self._runners[task.id]
            try:
                accepted = self.client.accept(task.id)
            except ServerError as e:
                log.warning("task %s: accept failed: %s", task.id, e, extra={"task_id": task.id})
        if not accepted:
            with self._lock:
                del self._runners[task.id]
            self.pool.release(task.id)
            return self.pool.any_up()
        try:
            self.journal.save(runner.record)
        except AgentError as e:
            log.error("task %s: %s", task.id, e, extra={"task_id": task.id})
        log.info("task %s: accepted (%d input files)%s", task.id, len(task.input_files),
                 f" on engine {engine.name!r}" if self.pool.several else "", extra={"task_id": task.id})
        runner.start()
        return self.pool.has_room()

    def _answering(self, runner: TaskRunner) -> Engine | None:
        """The engine `runner` was placed on if it answers, else the next the pool picks that does
        (the runner made anew for it); None when none does. An idle agent learns of a lost engine
        here, not from a lost task."""
        task_id, engine = runner.task_id, self.pool.get(runner.record.engine)
        tried: list[Engine] = []
        while engine is not None and not self._engine_answers(engine):
            tried.append(engine)
            self.pool.release(task_id)
            engine = self.pool.reserve(task_id, exclude=tried)
            if engine is not None:
                with self._lock:
                    self._runners[task_id] = self._runner(engine, TaskRecord(task=runner.record.task))
        return engine

    def _can_take_work(self) -> bool:
        # the disk was checked before this poll (_supervise); a journal failure since then counts too.
        # Whether an engine answers and has room is the pool's to say.
        return self._paused is None and self._disk_low is None

    def _disk_ok(self) -> bool:
        """Room on the data dir's disk (and for the journal); `status` shows why not."""
        try:
            wsmod.check_free_disk(self.cfg.paths.data_dir, self.cfg.paths.min_free_disk_mb)
        except WorkspaceError as e:  # DiskFull, or the data dir's disk cannot even be read
            self._disk_low = f"paused: disk low ({e})"
            self._quiet.warning("disk", "not taking tasks: %s", e)
            return False
        if self._journal_broken:  # back only with room to spare, not the few bytes a failure frees
            if wsmod.free_disk_mb(self.cfg.paths.data_dir) < JOURNAL_ROOM_MB or not self.journal.writable():
                return False
            self._journal_broken = False
        if self._disk_low:
            log.info("disk space is back: taking tasks again")
            self._disk_low = None
        return True

    # --- the circuit breaker -------------------------------------------------------

    def _launch_result(self, error: AgentError | None) -> None:
        """Each launch's outcome; a few failures of one executor kind in a row pause intake."""
        kind = preflight.kind_of(error) if error is not None else None
        with self._lock:
            if kind is None:
                if error is None:
                    self._launch_failures.clear()
                return
            count = self._launch_failures.get(kind, 0) + 1
            self._launch_failures = {kind: count}
            if count < LAUNCH_FAILURES_TO_PAUSE or self._paused is not None:
                return
            self._paused = (preflight.Problem(kind, str(error), "see `agent-core doctor`"), time.time())
        problem = self._preflight() or self._paused[0]
        self._paused = (problem, self._paused[1])
        self._quiet.warning("launch", "%s", problem.message)
        log.error("not taking tasks after %d launch failures in a row: %s (checking again every %.0f s)",
                  count, problem.line(), RECHECK_SECS)
        self._status_dirty.set()
        threading.Thread(target=self._recheck, name="breaker", daemon=True).start()

    def _recheck(self) -> None:
        while not self.lifecycle.wait(RECHECK_SECS):
            if self._preflight() is None:
                with self._lock:
                    self._paused = None
                    self._launch_failures.clear()
                log.info("the executor works again: taking tasks")
                self._status_dirty.set()
                self._wakeup.set()
                return

    def _preflight(self) -> preflight.Problem | None:
        """The first engine's reason no task could start there; with several engines, one that does
        not answer is left to the outage handling (the others take the tasks)."""
        for engine in self.pool.engines:
            problem = preflight.check(self.cfg, engine.backend)
            if problem is not None and not (self.pool.several and problem.kind == "engine"):
                return dataclasses.replace(problem, message=f"engine {engine.name!r}: {problem.message}") \
                    if self.pool.several else problem
        return None

    def _journal_failed(self, error: AgentError) -> None:
        """A journal write failed (a full disk, mostly): take no work until the disk has room."""
        self._quiet.warning("journal", "%s: taking no new tasks until the disk has room", error)
        self._disk_low = f"paused: the journal cannot be written ({error})"
        self._journal_broken = True
        self._status_dirty.set()

    def _on_cancel(self, task_id: str) -> None:
        with self._lock:
            runner = self._runners.get(task_id)
        if runner is not None:
            runner.cancel(CancelReason.SERVER)
            return
        # not running here (lost, or never ours): say so at once, or the server holds our queue forever
        self._side_report(Completion(task_id=task_id, status="cancelled",
                                     error_message="cancelled: the task was not running on this agent"))

    def _refuse(self, task_id: str, why: str) -> None:
        """A task we must not run: take it off the queue as failed, with the reason."""
        log.error("refusing a task: %s", why)

        def accept_then_fail() -> bool:
            return self.client.accept(task_id)

        self._side_report(Completion(task_id=task_id, status="failed", error_message=why),
                          before=accept_then_fail)

    def _side_report(self, completion: Completion, before=None) -> None:
        with self._lock:
            if completion.task_id in self._side_jobs:
                return
            self._side_jobs.add(completion.task_id)

        def job() -> None:
            try:
                if before is None or before():
                    self.client.complete(completion)
            except TaskGone:
                pass
            except ServerError as e:
                log.warning("cannot report task %.40r as %s: %s", completion.task_id, completion.status, e)
            finally:
                with self._lock:
                    self._side_jobs.discard(completion.task_id)
                self._wakeup.set()

        threading.Thread(target=job, name="report", daemon=True).start()

    def _on_runner_done(self, runner: TaskRunner) -> None:
        with self._lock:
            if self._runners.get(runner.task_id) is runner:
                del self._runners[runner.task_id]
        self.pool.release(runner.task_id)
        self._status_dirty.set()
        self._wakeup.set()

    # --- the engines ------------------------------------------------------------

    def _named(self, engine: Engine) -> str:
        """The engine in a message: "container engine 'gpu-2' at tcp://..." (no name when it is the only one)."""
        return f"container engine{self.pool.label(engine)} at {engine.where}"

    def _describe_engine(self, engine: Engine) -> None:
        """What status says about an engine: read at start and each time it is back."""
        try:
            info = engine.backend.engine_info()
        except DockerUnavailable:
            self._engine_down(engine)
        except AgentError as e:  # an engine that answers but not as expected: status only lacks the line
            log.warning("cannot describe the %s: %s", self._named(engine), e)
        else:
            engine.seen = EngineSeen.of(info)
            mismatch = engine_mismatch(engine.config.engine, info)  # it may come back as another engine
            if mismatch:
                log.warning("%s%s", f"engine {engine.name!r}: " if self.pool.several else "", mismatch)
        self._status_dirty.set()

    def _engine_answers(self, engine: Engine) -> bool:
        try:
            engine.backend.ping()
        except DockerUnavailable:
            self._engine_down(engine)
            return False
        return True

    def _engine_down(self, engine: Engine) -> None:
        if not engine.mark_down():
            return
        if self.pool.several:
            log.error("%s unreachable: no new tasks go there; its running tasks wait up to %.0f s for it "
                      "(executor.engine_grace_secs)", self._named(engine), self.cfg.executor.engine_grace_secs)
            self._quiet.note(f"engine {engine.name}", f"{self._named(engine)} unreachable")
        else:
            log.error("container engine unreachable at %s: not taking tasks until it is back", engine.where)
            self._quiet.note("engine", f"container engine unreachable at {engine.where}")
        self._status_dirty.set()
        threading.Thread(target=self._watch_engine, args=(engine,), name=f"engine-watch-{engine.name}",
                         daemon=True).start()

    def _watch_engine(self, engine: Engine) -> None:
        backoff = Backoff(1.0, 15.0)
        while not engine.up.is_set() and not self.lifecycle.exiting.is_set():
            try:
                engine.backend.ping()
            except DockerUnavailable:
                self.lifecycle.wait(backoff.next())
                continue
            log.info("container engine%s is back at %s", self.pool.label(engine), engine.where)
            engine.mark_up()
            self._describe_engine(engine)  # it may have come back as another version
            self._sweep_engine(engine)  # what tasks that failed past the grace left there
            self._wakeup.set()

    def _probe_loop(self) -> None:
        """With several engines, an idle one that stops answering must leave the offered capacity
        before a task is placed on it: each is pinged once per heartbeat interval."""
        while not self._hb_stop.wait(self.cfg.agent.heartbeat_interval_secs):
            for engine in self.pool.engines:
                if engine.up.is_set():
                    self._engine_answers(engine)

    def _engine_wait(self, engine: Engine) -> bool:
        """Block until `engine` is back; False when the task should be left to the next start
        instead: the agent exits, or is cancelling its tasks (a container it cannot reach cannot
        be stopped; the journal lets the next start finish the task). EngineLost when it stayed
        away past executor.engine_grace_secs."""
        grace = self.cfg.executor.engine_grace_secs
        while not engine.up.wait(min(ENGINE_WAIT_CHECK_SECS, max(0.01, grace - engine.lost_for()))):
            if self.lifecycle.step >= Step.CANCELLING:  # the ladder moves without an event here
                return False
            if engine.lost_for() >= grace:
                raise EngineLost(f"{self._named(engine)} did not answer for {grace:.0f} s "
                                 "(executor.engine_grace_secs): the task's container could not be followed")
        return not self.lifecycle.exiting.is_set()

    # --- heartbeats and live status ---------------------------------------------

    def _heartbeat(self, status: str | None = None) -> None:
        load, capacity = self.pool.offer()
        load = min(load, capacity)
        status = status or ("busy" if load >= capacity else "online")
        self.client.heartbeat(Heartbeat(status=status, current_load=load, capacity=capacity))
        self.last_heartbeat = time.time()

    def _server_trouble(self, error: ServerError) -> None:
        if not isinstance(error, ServerUnavailable):
            return
        since = self._server_down[0] if self._server_down else time.time()
        self._server_down = (since, str(error))

    def _heartbeat_loop(self) -> None:
        interval = self.cfg.agent.heartbeat_interval_secs
        wait = 0.0
        while not self._hb_stop.wait(wait):
            try:
                self._heartbeat()
                wait = interval
                if self._quiet.clear("heartbeat"):
                    log.info("heartbeats work again")
            except ServerError as e:
                self._server_trouble(e)
                ago = f"{time.time() - self.last_heartbeat:.0f} s ago" if self.last_heartbeat else "never"
                self._quiet.warning("heartbeat", "heartbeat failed (last success %s): %s", ago, e)
                wait = min(5.0, interval)
            self._status_dirty.set()

    def _status_loop(self) -> None:
        """Rewrite the live status file after changes, at most every STATUS_EVERY_SECS:
        a drain at full speed changes it several times per task."""
        while True:
            self._status_dirty.wait()
            if self._hb_stop.is_set():
                return
            self._status_dirty.clear()
            self.write_status()
            self._hb_stop.wait(STATUS_EVERY_SECS)
            with self._lock:
                moving = any(r.transferring for r in self._runners.values())
            if moving:  # progress changes without an event: keep it fresh
                self._hb_stop.wait(TRANSFER_STATUS_SECS)
                self._status_dirty.set()

    def reason(self) -> str | None:
        """Why the agent is not simply serving, in one line; None when it is."""
        if self._paused is not None:
            problem, since = self._paused
            return f"paused since {_clock(since)}: {problem.line()}"
        if not self.pool.any_up():
            return "paused: engine unreachable"
        if self._disk_low:
            return self._disk_low
        if self._server_down is not None:
            since, why = self._server_down
            return f"server unreachable since {_clock(since)}: {why}"
        down = [e for e in self.pool.engines if not e.up.is_set()]
        if down:
            names = ", ".join(f"{e.name!r} since {_clock(e.down_since or time.time())}" for e in down)
            return f"engine unreachable: {names}; tasks go to the others"
        return None

    def live_status(self) -> LiveStatus:
        with self._lock:
            tasks = tuple(r.live() for r in self._runners.values())
        engines = self.pool.status()
        shown = next((e for e in engines if e.up), engines[0])  # the single-engine fields: one that answers
        return LiveStatus(
            pid=os.getpid(), state=self.lifecycle.step, reason=self.reason(), name=self.cfg.agent.name,
            started_at=self.started, stop_requested_at=self.lifecycle.stop_requested_at,
            service_id=self.service_id, capacity=self.capacity, engine_ok=shown.up,
            engine=shown.seen, engines=engines if self.pool.several else (), last_poll=self.last_poll, last_heartbeat=self.last_heartbeat,
            errors=dict(self._quiet.errors), tasks=tasks, requests=self.client.budget.snapshot())

    def write_status(self) -> None:
        process.write_status(self.cfg.paths.data_dir, self.live_status().to_json())

    # --- start and stop ---------------------------------------------------------

    def _recover(self) -> None:
        """Pick up every task the journal knows, then remove containers and workspaces nobody owns."""
        for record in self.journal.replay():
            try:
                wsmod.check_task_id(record.task_id)
            except UnsafePath:
                log.error("journal holds an unsafe task id %.40r; dropping it", record.task_id)
                self.journal.remove(record.task_id)
                continue
            log.info("task %s: resuming after restart at stage %s", record.task_id, record.stage.name,
                     extra={"task_id": record.task_id})
            engine = self.pool.get(record.engine)
            if engine is None:
                self._engine_gone(record)
                engine = self.pool.first  # it only reports: no container call is left to make
            else:
                self.pool.place(record.task_id, engine)
            runner = self._runner(engine, record)
            with self._lock:
                self._runners[record.task_id] = runner
            runner.start()
        for engine in self.pool.engines:
            if engine.up.is_set():  # one that is away is swept when it is back
                self._sweep_engine(engine)
        self._sweep_folders(self._known())

    def _known(self) -> set[str]:
        with self._lock:
            return set(self._runners)

    def _engine_gone(self, record: TaskRecord) -> None:
        """A journaled task on an engine no longer configured: it fails with that reason (its
        container there, if any, is not ours to follow any more)."""
        if record.stage >= Stage.EXITED:  # its result is known: it is only reported
            return
        log.error("task %s: its engine %r is no longer configured", record.task_id, record.engine,
                  extra={"task_id": record.task_id})
        record.error = (f"the task ran on container engine {record.engine!r}, which is no longer configured "
                        "([[executor.engines]]): its container could not be followed")
        record.container_id, record.stage = None, Stage.EXITED
        try:
            self.journal.save(record)
        except AgentError as e:
            log.error("task %s: %s", record.task_id, e, extra={"task_id": record.task_id})

    def _sweep_engine(self, engine: Engine) -> None:
        """Remove the containers of `engine` that belong to no task of this agent's."""
        try:
            listed = engine.backend.managed(self.owner)  # ours only: every label checked
            known = self._known()  # after the listing: a task's runner exists before its container
            for found in listed:
                if found.task_id not in known:
                    log.warning("removing leftover container %s of task %s%s", found.name, found.task_id,
                                f" on engine {engine.name!r}" if self.pool.several else "",
                                extra={"task_id": found.task_id})
                    engine.backend.remove(found.id)
        except AgentError as e:  # leftovers must never stop the agent; the next start tries again
            log.error("cannot sweep leftover containers%s: %s", self.pool.label(engine), e)

    def _sweep_folders(self, known: set[str]) -> None:
        """Task folders nobody owns any more, unless finished ones are kept for debugging."""
        data_dir = Path(self.cfg.paths.data_dir)
        if self.cfg.paths.keep_workspaces != "none":
            self.janitor.sweep()
            return
        for folder in (wsmod.WORKSPACES_DIR, wsmod.TASKS_DIR):
            try:
                entries = [e for e in (data_dir / folder).iterdir() if e.name not in known]
            except FileNotFoundError:
                continue
            except OSError as e:
                log.error("cannot read %s: %s", data_dir / folder, e)
                continue
            for entry in entries:
                self.janitor.dispose(entry)
        self.janitor.sweep()

    def _shutdown(self) -> None:
        grace = self.cfg.agent.shutdown_grace_secs
        if self.load:
            log.info("draining: %d task(s) may finish within %.0f s", self.load, grace)
        deadline = time.monotonic() + grace
        while self.load and self.lifecycle.step < Step.CANCELLING and time.monotonic() < deadline:
            self._sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        if self.load:
            self.lifecycle.reach(Step.CANCELLING)
            self.write_status()
            log.info("cancelling %d running task(s)", self.load)
            self.cancel_all(CancelReason.AGENT_STOPPING)
            while self.load:
                self._sleep(1.0)
        deadline = time.monotonic() + 10.0
        while self._side_jobs and time.monotonic() < deadline:
            self._sleep(0.5)
        self._hb_stop.set()
        self._hb_thread.join(5)
        try:
            self._heartbeat("offline")
            log.info("sent offline heartbeat")
        except ServerError as e:
            log.warning("cannot send the offline heartbeat: %s", e)
