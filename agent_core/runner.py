"""One task from accept to `complete`, as explicit stages, each journaled before the next.

    stage inputs -> launch container -> await exit -> collect and upload -> report -> clean up

A runner can start at any stage (crash recovery replays the journal). A cancel,
whether from the server, the task timeout or the shutdown ladder, arrives as
`cancel(reason)` and ends the container with `stop`; the stages that follow still
run, so even a cancelled task has its outputs uploaded and its end reported.

In copy mode (`Deps.workspace_mode`) the container has no bind: the staging goes in between
create and start, and /workspace comes back into the workspace folder after the exit, before
the exit is journaled, so a restart in between copies it out again from the container, which
is removed only then.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from agent_core import archive, logs
from agent_core import workspace as wsmod
from agent_core.client import Client
from agent_core.config import Config
from agent_core.errors import (AgentError, ContainerVanished, DockerUnavailable, ServerError,
                               JournalError, ServerRejected, ServerUnavailable, TaskGone, UploadRefused,
                               WorkspaceError)
from agent_core.executor import Backend, Owner, State, build_spec
from agent_core.janitor import Janitor
from agent_core.journal import Journal, Stage, TaskRecord
from agent_core.lifecycle import Lifecycle
from agent_core.livestatus import TaskEntry
from agent_core.metrics import Metrics
from agent_core.outcome import ERROR_MESSAGE_CHARS, CancelReason, Ended, decide
from agent_core.protocol import Completion

log = logging.getLogger(__name__)

STDOUT_IN_OUTPUT = 64 * 1024
STOP_GRACE_SECS = 10


class Abandoned(Exception):
    """The agent is exiting now: leave the task to the journal and the next start."""


@dataclass
class Deps:
    """What every runner shares."""

    cfg: Config
    client: Client
    executor: Backend
    lifecycle: Lifecycle  # the client's: its exit-now step leaves the task to the next start
    metrics: Metrics
    journal: Journal
    owner: Owner  # whose containers this agent may touch
    janitor: Janitor
    engine_down: Callable[[], None]  # tells the scheduler to stop taking tasks
    engine_wait: Callable[[], bool]  # blocks until the engine answers again; False when exiting
    changed: Callable[[], None]      # live status needs rewriting
    launch_result: Callable[[AgentError | None], None]  # each launch's outcome, for the breaker
    journal_failed: Callable[[AgentError], None]        # a journal write failed (a full disk)
    # How /workspace reaches the container (archive.BIND or archive.COPY); "" takes
    # executor.workspace. The one place a runner learns it: an engine of its own may say otherwise.
    workspace_mode: str = ""

    def __post_init__(self) -> None:
        if not self.workspace_mode:
            self.workspace_mode = self.cfg.executor.workspace


class TaskRunner:
    def __init__(self, deps: Deps, record: TaskRecord, on_done: Callable[[TaskRunner], None]):
        self.deps = deps
        self.record = record
        self.task_id = record.task_id
        self.phase = "accepted"
        self.started = time.time()
        self.stage_since = self.started
        self._progress: dict[str, int] = {}  # bytes and files moved, for status
        self._downloading: Path | None = None  # the input file being written now
        self._on_done = on_done
        self._lock = threading.Lock()
        self._save_lock = threading.Lock()  # the record is journaled from the task thread and by cancel()
        self._cancelled = threading.Event()
        self._resumed = record.stage >= Stage.LAUNCHED  # a container from before a restart
        self._resumed_after_exit = record.stage >= Stage.EXITED  # its container may not be removed yet
        self._refused: list[str] = []  # outputs the server will never take (not journaled: a
        # restart uploads them again and is refused again)
        # a cancel journaled by an earlier run still holds: the new run finishes it
        self._cancel_reason: CancelReason | None = (
            CancelReason(record.cancel_reason) if record.cancel_reason else None)
        if self._cancel_reason is not None:
            self._cancelled.set()
        self.log = logging.LoggerAdapter(log, {"task_id": self.task_id})
        self.thread = threading.Thread(target=self._run, name=f"task-{self.task_id[:16]}", daemon=True)
        self.workspace = wsmod.Workspace.for_task(deps.cfg.paths.data_dir, self.task_id)
        self._copy = deps.workspace_mode == archive.COPY  # the workspace travels through the engine's API

    def start(self) -> None:
        self.thread.start()

    # --- control from other threads ------------------------------------------

    def cancel(self, reason: CancelReason) -> None:
        """Stop the task for `reason`; the first reason wins. Safe to call more than once."""
        with self._lock:
            if self._cancel_reason is not None:
                return
            self._cancel_reason = reason
            container_id = self.record.container_id
        self._cancelled.set()
        self.log.info("task %s: stopping (%s)", self.task_id, reason.value)
        self._journal_cancel(reason)
        if container_id:
            threading.Thread(target=self._stop_container, args=(container_id,), daemon=True).start()

    def _journal_cancel(self, reason: CancelReason) -> None:
        """Record the reason before the container is stopped: if we die now, the next start
        reports why the container ended instead of a bare exit code."""
        with self._save_lock:
            if self.record.stage >= Stage.EXITED:  # the result is known (or the record gone)
                return
            self.record.cancel_reason = reason.value
            try:
                self.deps.journal.save(self.record)
            except AgentError as e:
                self.log.error("task %s: %s", self.task_id, e)

    def _stop_container(self, container_id: str) -> None:
        try:
            self.deps.executor.stop(container_id, STOP_GRACE_SECS)
        except AgentError as e:
            self.log.warning("task %s: cannot stop container: %s", self.task_id, e)

    @property
    def cancel_reason(self) -> CancelReason | None:
        return self._cancel_reason

    # --- the stages --------------------------------------------------------------

    def _save(self, stage: Stage | None = None) -> None:
        """Journal the record. A failed write (a full disk) costs the crash safety of this step,
        not the task: it goes on in memory and is still reported; the scheduler stops intake."""
        with self._save_lock:
            if stage is not None:
                self.record.stage = stage
            self._journaled(lambda: self.deps.journal.save(self.record))
        self.deps.changed()

    def _journaled(self, write: Callable[[], None]) -> None:
        try:
            write()
        except JournalError as e:
            self.log.error("task %s: %s (going on without it)", self.task_id, e)
            self.deps.journal_failed(e)

    def _phase(self, name: str) -> None:
        self.phase, self.stage_since = name, time.time()
        self.deps.changed()

    @property
    def transferring(self) -> bool:
        return self.phase in ("downloading", "uploading")

    def live(self) -> TaskEntry:
        """This task for the status file: timestamps, not ages (`status` computes those)."""
        with self._lock:
            progress, current = dict(self._progress), self._downloading
        if current is not None:  # "down_bytes" counts the finished files; add the one on its way
            try:
                progress["down_bytes"] += os.lstat(current).st_size
            except OSError:
                pass
        return TaskEntry(id=self.task_id, stage=self.phase, started_at=self.started, stage_since=self.stage_since,
                         container=(self.record.container_id or "")[:12] or None, progress=progress,
                         engine=self.record.engine)

    def _run(self) -> None:
        logs.current_task.set(self.task_id)  # every line this thread logs names the task
        rec = self.record
        try:
            try:
                if rec.stage < Stage.STAGED:
                    self._stage_inputs()
                if rec.stage < Stage.LAUNCHED:
                    self._launch()
                if rec.stage < Stage.EXITED:
                    self._await_exit()
            except Abandoned:
                raise
            except AgentError as e:
                self._check_exiting()  # an error caused by exiting is not the task's result
                self._fail_early(str(e))
            except Exception as e:  # a bug must cost one task, not the daemon
                self._check_exiting()
                self.log.exception("task %s: unexpected error", self.task_id)
                self._fail_early(f"internal error in agent-core: {e.__class__.__name__}: {e}")
            if rec.stage < Stage.UPLOADED:
                self._collect()
            self._report()
            self._clean_up()
        except Abandoned:
            self.log.info("task %s: left for the next start (stage %s)", self.task_id, rec.stage.name)
        except Exception:
            self.log.exception("task %s: cannot finish; its journal record is kept for the next start",
                               self.task_id)
        finally:
            self._on_done(self)

    def _check_exiting(self) -> None:
        if self.deps.lifecycle.exiting.is_set():
            raise Abandoned()

    def _stage_inputs(self) -> None:
        self._phase("downloading")
        cfg, task, ws = self.deps.cfg, self.record.task, self.workspace
        for f in task.input_files:  # a hostile size is refused as that, before any disk arithmetic
            if f.size_bytes > cfg.limits.max_input_bytes:
                raise WorkspaceError(
                    f"input file {f.id} declares {f.size_bytes} bytes, over limits.max_input_bytes")
        declared = sum(max(0, f.size_bytes) for f in task.input_files)
        wsmod.check_free_disk(cfg.paths.data_dir, cfg.paths.min_free_disk_mb, declared)
        if ws.exists():  # a crash during an earlier attempt: start the staging again
            self.deps.janitor.dispose(ws.root)
        ws.create()
        self._progress = {"down_bytes": 0, "down_total": declared}
        local_paths = []
        try:
            for index, f in enumerate(task.input_files, start=1):
                if self._cancelled.is_set():
                    return
                rel, path = ws.input_path(index, f.filename, count=len(task.input_files))
                self._downloading = path
                try:
                    # retried through an outage (which must not fail the task) until a cancel
                    size = self.deps.client.download(f.id, functools.partial(wsmod.open_input, path),
                                                     cfg.limits.max_input_bytes, cancel=self._cancelled)
                except BaseException:
                    self._downloading = None
                    raise
                with self._lock:  # one step for status: the file moves from "on its way" to done
                    self._progress["down_bytes"] += size
                    self._downloading = None
                local_paths.append(rel)
        except WorkspaceError:
            self.deps.janitor.dispose(ws.input_dir)  # a partial input must not keep the disk full
            raise
        ws.write_task_json(task, local_paths)
        self._save(Stage.STAGED)

    def _launch(self) -> None:
        if self._cancelled.is_set():
            return
        self._phase("starting")
        deps = self.deps
        try:
            spec = build_spec(deps.cfg, task_id=self.task_id, owner=deps.owner,
                              workspace=None if self._copy else self.workspace.root)
            container_id = self._docker(lambda: deps.executor.create(spec, deps.owner))
            with self._lock:
                self.record.container_id = container_id
                self.record.launched_at = time.time()
            self._save(Stage.LAUNCHED)
            self._docker(lambda: self._start(container_id))
        except AgentError as e:
            deps.launch_result(e)
            raise
        deps.launch_result(None)
        self.log.info("task %s: container %s started (image %s)", self.task_id, container_id[:12], spec.image)
        if self._cancelled.is_set():  # a cancel that came between create and start
            self._stop_container(container_id)

    def _start(self, container_id: str) -> None:
        """Start the created container; in copy mode, its workspace goes in first (again, after a
        crash in between: unpacking the same files once more replaces them)."""
        if self._copy:
            self.deps.executor.put_archive(container_id, wsmod.WORKSPACE_MOUNT,
                                           archive.workspace_tar(self.workspace.root))
        self.deps.executor.start(container_id)

    def _docker(self, call: Callable):
        try:
            return call()
        except DockerUnavailable:
            self.deps.engine_down()
            raise

    def _await_exit(self) -> None:
        rec, deps = self.record, self.deps
        if not rec.container_id:  # cancelled before launch
            return
        self._phase("running")
        if self._resumed:
            found = deps.executor.inspect(rec.container_id)
            if found is None:
                raise ContainerVanished(f"container {rec.container_id[:12]} vanished")
            if not found.owned_by(deps.owner, self.task_id):  # never wait on, or report, another's
                raise ContainerVanished(f"container {rec.container_id[:12]} is no longer this agent's")
            if found.state is State.CREATED:  # we crashed between create and start
                self._start(rec.container_id)
        timeout = deps.cfg.executor.timeout_secs
        timer = None
        if timeout:
            left = max(0.0, (rec.launched_at or time.time()) + timeout - time.time())
            timer = threading.Timer(left, self.cancel, args=(CancelReason.TIMEOUT,))
            timer.daemon = True
            timer.start()
        if self._cancelled.is_set():
            self._stop_container(rec.container_id)
        try:
            exit_ = self._wait(rec.container_id)
        finally:
            if timer:
                timer.cancel()
        ws = self.workspace
        self._riding_out("reading the logs", lambda: deps.executor.save_logs(
            rec.container_id, lambda: ws.create_log(wsmod.STDOUT_LOG), lambda: ws.create_log(wsmod.STDERR_LOG),
            deps.cfg.limits.log_max_bytes))
        if self._copy:  # before EXITED: a restart before the end copies out again, from the container still there
            self._copy_out(rec.container_id)
        with self._lock:
            if self._resumed and exit_.code == 0 and self._cancel_reason is CancelReason.AGENT_STOPPING:
                # an earlier run's shutdown could not stop it (no engine then); it completed: that stands
                self._cancel_reason = None
            rec.exit_code, rec.oom_killed = exit_.code, exit_.oom_killed
            rec.cancel_reason = self._cancel_reason.value if self._cancel_reason else None
        ran = time.time() - (rec.launched_at or time.time())
        self.log.info("task %s: container exited with code %d after %.1f s%s", self.task_id, exit_.code, ran,
                      " (killed: out of memory)" if exit_.oom_killed else "")
        self._save(Stage.EXITED)
        self._remove_container()

    def _wait(self, container_id: str):
        """Wait for the container, riding out an engine restart."""
        return self._riding_out("waiting", lambda: self.deps.executor.wait(container_id))

    def _copy_out(self, container_id: str) -> None:
        """/workspace of the ended container into the workspace folder (what an earlier, interrupted
        copy-out left goes first); what was skipped is kept for `_collect` with the agent's files."""
        self._phase("copying out")
        ws, limits = self.workspace, self.deps.cfg.limits

        def copy() -> list[wsmod.Skipped]:
            archive.clear_outputs(ws.root)
            return archive.extract_outputs(self.deps.executor.get_archive(container_id, archive.COPY_OUT_PATH),
                                           ws.root, limits)

        archive.save_skipped(ws.copy_skipped, self._riding_out("copying out", copy))

    def _riding_out(self, doing: str, call: Callable):
        """`call()`, again after an engine restart: the container outlives the engine's absence."""
        while True:
            try:
                return call()
            except DockerUnavailable as e:
                self.log.warning("task %s: lost the container engine while %s: %s", self.task_id, doing, e)
                with self._lock:
                    self.record.engine_lost = True  # an exit code 137 then says who killed it
                self.deps.engine_down()
                if not self.deps.engine_wait():
                    raise Abandoned() from None

    def _remove_container(self) -> None:
        if not self.record.container_id:
            return
        try:
            self.deps.executor.remove(self.record.container_id)
        except AgentError as e:
            self.log.warning("task %s: cannot remove its container (removed at the next start): %s",
                             self.task_id, e)

    def _fail_early(self, message: str) -> None:
        """The task cannot produce a result: record why and let collect/report say so."""
        self.log.error("task %s: %s", self.task_id, message)
        self.record.error = message
        self._remove_container()
        self._save(Stage.EXITED)

    def _outcome(self) -> tuple[str, str | None]:
        rec, cfg, ws = self.record, self.deps.cfg, self.workspace
        ended = Ended(exit_code=rec.exit_code, oom_killed=rec.oom_killed, error=rec.error,
                      cancel_reason=CancelReason(rec.cancel_reason) if rec.cancel_reason else None,
                      engine_lost=rec.engine_lost)
        tail = ""
        if rec.exit_code not in (0, None) and not rec.cancel_reason and not rec.error:
            tail = (wsmod.read_tail(ws.stderr_log, ERROR_MESSAGE_CHARS).strip()
                    or wsmod.read_tail(ws.stdout_log, ERROR_MESSAGE_CHARS).strip())
        return decide(ended, timeout_secs=cfg.executor.timeout_secs, memory_limit=cfg.executor.memory_limit,
                      log_tail=tail)

    def _collect(self) -> None:
        rec, ws = self.record, self.workspace
        if self._cancel_reason and not rec.cancel_reason:  # cancelled before launch
            rec.cancel_reason = self._cancel_reason.value
        status, message = self._outcome()
        skipped: list[dict] = []
        skipped_count = 0  # the list shows the first entries only; this counts them all
        uploaded: list[str] = []
        if ws.exists():
            self._phase("uploading")
            began = time.monotonic()
            scan = wsmod.scan_outputs(ws.root, self.deps.cfg.limits)
            if self._copy:  # what the copy-out left in the container is listed as a scan lists it
                scan = scan.with_skipped(archive.load_skipped(ws.copy_skipped))
            summary = scan.summary()
            skipped, skipped_count = list(summary["skipped"]), summary["skipped_count"]
            self._progress = {"up_files": 0, "up_files_total": len(scan.files), "up_bytes": 0,
                              "up_bytes_total": scan.total_bytes}
            for out in scan.files:
                if out.rel not in rec.uploads:
                    reason = self._upload(out)
                    if reason:
                        skipped.append({"path": out.rel, "reason": reason})
                        skipped_count += 1
                        continue
                uploaded.append(out.rel)
                self._progress["up_files"] += 1
                self._progress["up_bytes"] += out.size
            self.log.info("task %s: uploaded %d files (%d bytes), skipped %d, in %.1f s", self.task_id,
                          len(uploaded), self._progress["up_bytes"], skipped_count, time.monotonic() - began)
        if self._refused and status != "cancelled":
            lost = "output files refused by the server: " + "; ".join(self._refused)
            message = (f"{message}; {lost}" if status == "failed" and message else lost)[:ERROR_MESSAGE_CHARS]
            status = "failed"
        output: dict = {"files": uploaded, "stdout": wsmod.read_tail(ws.stdout_log, STDOUT_IN_OUTPUT)}
        if skipped:
            output["skipped"] = skipped
            output["skipped_count"] = skipped_count
        rec.completion = Completion(task_id=self.task_id, status=status, output=output,
                                    error_message=message,
                                    file_ids=tuple(rec.uploads[rel] for rel in uploaded))
        self._save(Stage.UPLOADED)

    def _upload(self, out: wsmod.OutputFile) -> str | None:
        """Upload one output and journal its id; returns why it was skipped, or None."""
        try:
            result = self.deps.client.upload(self.task_id, out.rel,
                                             lambda: wsmod.open_output(out.path, out.size))
        except WorkspaceError as e:  # swapped for a link or a FIFO after the scan, unreadable, ...
            return str(e)
        except UploadRefused as e:  # the user loses this file: the task must not say "completed"
            self._refused.append(f"{out.rel} ({out.size} bytes): {e}")
            return f"refused by the server: {e}"
        except ServerRejected as e:
            return f"refused by the server: {e}"
        except ServerUnavailable:
            self._check_exiting()
            raise
        with self._save_lock:
            self.record.uploads[out.rel] = result.file_id
        self._journaled(lambda: self.deps.journal.add_upload(self.task_id, out.rel, result.file_id))
        self.deps.changed()
        return None

    def _report(self) -> None:
        self._phase("reporting")
        completion = self.record.completion
        assert completion is not None
        try:
            self._complete(completion)
            self.log.info("task %s: %s%s", self.task_id, completion.status,
                          f" ({completion.error_message[:200]})" if completion.error_message else "")
            self.deps.metrics.task_finished(completion.status, time.time() - self.started)
        except TaskGone as e:
            self.log.warning("task %s: the server no longer takes its result: %s", self.task_id, e)
        except ServerUnavailable:
            self._check_exiting()
            raise
        self.record.stage = Stage.REPORTED
        try:
            self.deps.journal.remove(self.task_id)
        except JournalError as e:  # the next start finds it REPORTED-less: it reports once more, harmlessly
            self.log.error("task %s: %s", self.task_id, e)

    def _complete(self, completion: Completion) -> None:
        """`complete`; if the server requeued the task meanwhile (400: it is pending again), take it
        back with `accept` and report once more, rather than let it run a second time elsewhere."""
        try:
            self.deps.client.complete(completion)
            return
        except TaskGone as e:
            self.log.warning("task %s: the server refused the result (%s); accepting it again in case "
                             "it was requeued", self.task_id, e)
        try:
            self.deps.client.accept(self.task_id)
        except ServerError as e:
            self.log.warning("task %s: accept failed: %s", self.task_id, e)
        # whoever accepted it (we, or the poll loop that saw it pending), it is running again, or
        # else it is really gone and this raises TaskGone once more
        self.deps.client.complete(completion)

    def _clean_up(self) -> None:
        if self._resumed_after_exit:  # a crash between journaling the exit and removing the container
            self._remove_container()
        keep = self.deps.cfg.paths.keep_workspaces
        status = self.record.completion.status if self.record.completion else "failed"
        if keep == "all" or (keep == "failed" and status != "completed"):
            return
        self.deps.janitor.dispose(self.workspace.root)
        self.deps.janitor.dispose(self.workspace.meta)
