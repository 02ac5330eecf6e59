#!/usr/bin/env python3
"""agent-core benchmarks (issue 6): the daemon against bare Docker, side by side in one run.

    python scripts/bench.py                  # all six, ~10 min; rewrites docs/benchmarks.md
    python scripts/bench.py --quick          # tiny sizes, ~1-2 min; prints the table only
    python scripts/bench.py --quick --out F  # ... and writes the report to F

Self-contained: the in-repo dev server runs in this process with its rate limit off,
and so is the agent's client-side budget (the figures are Docker overhead, not pacing);
`scripts/docker_env.sh --no-python` makes sure the busybox image exists; each agent is
configured with `agent_core.config`, registered through the CLI and run as a real
`python -m agent_core run` subprocess, with the `custom` executor running
`/bin/sh -c ...` in agent-core-test/busybox:latest, network "none".

The machine is shared and noisy, so every figure that has a target is a ratio
against a baseline measured in the same run: bare Docker SDK calls with the very
container spec the daemon uses (`build_spec` / `create_kwargs`), or a plain httpx
upload to the same server. Exit code: 0 when every benchmark ran (missed targets
are reported, not fatal), 1 when one could not run, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import docker
import httpx
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing it

from agent_core import config as configmod  # noqa: E402
from agent_core.devclient import DevClient  # noqa: E402
from agent_core.devserver import Call, DevServer  # noqa: E402
from agent_core.executor import LABEL_MANAGED, LABEL_SERVICE, Owner, build_spec, create_kwargs  # noqa: E402
from agent_core.fsutil import write_atomic  # noqa: E402

IMAGE = "agent-core-test/busybox:latest"
DOC = REPO / "docs" / "benchmarks.md"
MIB = 1024 ** 2
GIB = 1024 ** 3
DONE = ("completed", "failed", "cancelled")
RSS_SAMPLE_SECS = 0.02


@dataclass(frozen=True)
class Params:
    overhead_tasks: int
    overhead_rounds: int
    drain_tasks: int
    drain_capacity: int
    scaling_tasks: int
    capacities: tuple[int, ...]
    scaling_repeats: int
    transfer_bytes: int
    transfer_repeats: int
    idle_secs: float
    poll_interval: float = 5.0


FULL = Params(overhead_tasks=30, overhead_rounds=6, drain_tasks=100, drain_capacity=4, scaling_tasks=24,
              capacities=(1, 2, 4, 8), scaling_repeats=2, transfer_bytes=GIB, transfer_repeats=3, idle_secs=60)
QUICK = Params(overhead_tasks=3, overhead_rounds=1, drain_tasks=8, drain_capacity=4, scaling_tasks=4,
               capacities=(1, 2), scaling_repeats=1, transfer_bytes=64 * MIB, transfer_repeats=1, idle_secs=5)
SCALING_TARGET_UP_TO = 4  # the issue asks for >= 0.85 x capacity up to 4; beyond that is information


def metric_keys(p: Params) -> list[str]:
    """Every row the table has for these parameters (tests/test_bench_quick.py checks them)."""
    keys = ["overhead.daemon", "overhead.bare", "overhead.ratio",
            "drain.makespan", "drain.bare_parallel", "drain.ratio"]
    keys += [f"scaling.c{c}" for c in p.capacities]
    keys += ["memory.idle_rss", "memory.upload_growth", "memory.download_growth",
             "transfer.daemon_upload", "transfer.plain_upload", "transfer.ratio", "idle.cpu"]
    return keys


# Other test sessions on the same engine sweep every agent-core-managed container created while
# their test ran (tests/docker_fixtures.Cleanup.sweep_managed), ours included. A task that lost its
# container that way fails with one of these; a few such tasks are tolerated and counted.
DISTURBED = re.compile(r"marked for removal|already in progress|No such container|vanished|is dead", re.IGNORECASE)


class BenchError(Exception):
    """A benchmark could not run (as opposed to: ran and missed its target)."""


# --- figures -------------------------------------------------------------------


@dataclass(frozen=True)
class Stat:
    values: tuple[float, ...]

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        if not values:
            raise BenchError("no samples")
        return cls(tuple(values))

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def fmt(self, unit: str = "s", scale: float = 1.0) -> str:
        """"median unit (min–max, n=N)", three significant digits."""
        med = _num(self.median / scale) + (f" {unit}" if unit else "")
        if len(self.values) == 1:
            return med
        lo, hi = _num(min(self.values) / scale), _num(max(self.values) / scale)
        return f"{med} ({lo}–{hi}, n={len(self.values)})"


def _num(x: float) -> str:
    return f"{x:.0f}" if abs(x) >= 1000 else f"{x:.3g}"


@dataclass
class Row:
    key: str
    what: str
    value: str
    target: str = ""
    ok: bool | None = None  # None: information only

    @property
    def verdict(self) -> str:
        return "" if self.ok is None else ("pass" if self.ok else "MISS")


@dataclass
class Results:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)            # measured context, one line each
    breakdowns: dict[str, list[tuple[str, Stat]]] = field(default_factory=dict)
    profile: list[tuple[str, float]] = field(default_factory=list)  # (what, seconds per task)

    def add(self, key: str, what: str, value: str, target: str = "", ok: bool | None = None) -> None:
        row = Row(key, what, value, target, ok)
        self.rows.append(row)
        print(f"  {row.key:<24} {row.value:<44} {row.target:<14} {row.verdict}", flush=True)

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"  note: {text}", flush=True)


# --- the pieces: server, agents, bare Docker ---------------------------------------


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Sampling:
    """A thread that calls `sample()` every `every` seconds while the `with` block runs."""

    def __init__(self, every: float, name: str):
        self.every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def sample(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self.every):
                return

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class RssSampler(Sampling):
    """Samples a process's RSS; `peak` is the highest seen."""

    def __init__(self, pid: int, every: float = RSS_SAMPLE_SECS):
        super().__init__(every, "rss-sampler")
        self.proc = psutil.Process(pid)
        self.samples: list[int] = []

    def sample(self) -> None:
        with contextlib.suppress(psutil.Error):
            self.samples.append(self.proc.memory_info().rss)

    @property
    def peak(self) -> int:
        return max(self.samples)


class HostProbe(Sampling):
    """The shared host's state through the run, to read the figures by: once a second, the 1-minute
    load average and how long one fsync'd 2 KiB write (as the journal does) takes on the
    filesystem that holds the agents' data dirs."""

    def __init__(self, root: Path, every: float = 1.0):
        super().__init__(every, "host-probe")
        self.path = root / "fsync-probe"
        self.load: list[float] = []
        self.fsync: list[float] = []

    def sample(self) -> None:
        self.load.append(os.getloadavg()[0])
        started = time.monotonic()
        write_atomic(self.path, "x" * 2048)
        self.fsync.append(time.monotonic() - started)

    def summary(self) -> str | None:
        if not self.load:
            return None
        slow = sum(1 for t in self.fsync if t > 0.05)
        return (f"host during the run: load average (1 min) {Stat.of(self.load).fmt('')}; one fsync'd 2 KiB "
                f"write {Stat.of(self.fsync).fmt('ms', 1e-3)}, over 50 ms in {slow} of {len(self.fsync)} samples")


class Agent:
    """One registered agent config and its `run` subprocess."""

    def __init__(self, bench: Bench, name: str, script: str, settings: dict[str, Any]):
        self.bench = bench
        self.root = bench.root / name
        self.root.mkdir()
        self.config_path = self.root / "config.toml"
        configmod.init(self.config_path, base_url=bench.server.url)
        service = bench.dev.create_service(f"bench-{name}")
        self.service_id: str = service["id"]
        bench.services.append(self.service_id)
        configmod.update(self.config_path, {
            "paths.data_dir": str(self.root / "data"),
            "server.rate_limit_per_minute": 0,  # measure Docker overhead, not pacing
            "server.poll_interval_secs": bench.params.poll_interval,
            "executor.executor_type": "custom",
            "executor.custom_entrypoint": "/bin/sh",
            "executor.custom_args": ["-c", script],
            "executor.image": IMAGE,
            "executor.network_mode": "none",
            **settings,
        })
        proc = subprocess.run([sys.executable, "-m", "agent_core", "--config", str(self.config_path), "register",
                               "--token", service["registration_token"]],
                              capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
        if proc.returncode != 0:
            raise BenchError(f"agent-core register failed ({proc.returncode}): {proc.stderr.strip()}")
        self.cfg = configmod.load(self.config_path)
        self.log_path = self.root / "agent.log"
        self.proc: subprocess.Popen | None = None
        self.cpu_secs: float | None = None  # user + system of a finished run (from the reaped child)

    def start(self, *, burst: bool, profile: Path | None = None) -> subprocess.Popen:
        """Run the daemon; with `profile`, under py-spy (then the pid is py-spy's, not the daemon's)."""
        cmd = [sys.executable, "-m", "agent_core", "--config", str(self.config_path), "run",
               *(["--burst"] if burst else [])]
        if profile is not None:
            # wall clock (--idle) of every thread: where a task waits matters more than CPU here
            cmd = ["py-spy", "record", "--idle", "--threads", "--rate", str(PROFILE_RATE), "--format", "raw",
                   "--output", str(profile), "--", *cmd]
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.bench.procs.append(self.proc)
        return self.proc

    def wait(self, timeout: float) -> None:
        """Wait for the process to leave (burst mode, or after stop()); it must exit 0."""
        assert self.proc is not None
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise BenchError(f"agent {self.root.name} still running after {timeout:.0f} s; "
                             f"log tail:\n{self.log_tail()}") from None
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        # the only child reaped in between is this one, so the difference is its CPU time
        self.cpu_secs = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        if code != 0:
            raise BenchError(f"agent {self.root.name} exited {code}; log tail:\n{self.log_tail()}")

    def stop(self, timeout: float = 120) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.wait(timeout)

    def submit(self, count: int, prompt: str = "bench") -> list[str]:
        return [self.bench.dev.submit_task(self.service_id, f"{prompt} {n}")["id"] for n in range(count)]

    def calls(self) -> list[Call]:
        marker = f"/agent/{self.service_id}/"
        return [c for c in self.bench.server.calls if marker in c.path]

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def workspace(self, task_id: str) -> Path:
        return self.cfg.paths.data_dir / "workspaces" / task_id


def first(calls: list[Call], suffix: str, status: int = 200) -> dict[str, float]:
    """task_id -> arrival time of its first successful call to `suffix` (accept, complete, upload)."""
    seen: dict[str, float] = {}
    for c in calls:
        if not c.path.endswith(suffix) or c.status != status or not isinstance(c.body, dict):
            continue
        task_id = c.body.get("task_id") or (c.body.get("fields") or {}).get("task_id")
        if task_id and task_id not in seen:
            seen[task_id] = c.time
    return seen


class BareDocker:
    """The daemon's container, run directly with the Docker SDK: create, start, wait, remove."""

    def __init__(self, bench: Bench, cfg: configmod.Config, tag: str):
        self.bench = bench
        self.cfg = cfg
        self.tag = tag
        self.workspace = bench.root / f"bare-{tag}"
        (self.workspace / "output").mkdir(parents=True, exist_ok=True)  # a section run again reuses it
        self.count = 0
        self._lock = threading.Lock()

    def _spec_kwargs(self) -> tuple[str, dict[str, Any]]:
        with self._lock:
            self.count += 1
            task_id = f"bench-{self.bench.run_id}-{self.tag}-{self.count}"
        spec = build_spec(self.cfg, task_id=task_id, workspace=self.workspace,
                          owner=Owner(self.bench.bare_service, "bench"))
        kwargs = create_kwargs(spec)
        # Test sessions running beside us sweep every "managed" container created during their
        # tests; without the label they leave ours alone. It changes nothing Docker does.
        del kwargs["labels"][LABEL_MANAGED]
        return task_id, kwargs

    def run_one(self) -> tuple[str, float, float]:
        """(task id, wall-clock start, seconds) of one container, create to removed.

        A run disturbed by someone else (a concurrent cleanup removing the container) is
        not a sample: it is run again, a few times at most.
        """
        for _ in range(3):
            try:
                return self._run_one()
            except docker.errors.APIError as e:
                log(f"bare container run disturbed ({e.__class__.__name__}: {str(e)[:120]}); again")
        raise BenchError("bare Docker runs keep failing")

    def _run_one(self) -> tuple[str, float, float]:
        api = self.bench.docker.api
        task_id, kwargs = self._spec_kwargs()
        started_wall, started = time.time(), time.monotonic()
        container_id = self.bench.docker.containers.create(**kwargs).id
        api.start(container_id)
        code = api.wait(container_id)["StatusCode"]
        api.remove_container(container_id, force=True, v=True)
        took = time.monotonic() - started
        if code != 0:
            raise BenchError(f"bare container {task_id} exited {code}")
        return task_id, started_wall, took

    def run_many(self, count: int, parallel: int = 1) -> tuple[list[tuple[str, float, float]], float]:
        """`count` containers, `parallel` at a time; (each one, makespan)."""
        started = time.monotonic()
        if parallel == 1:
            runs = [self.run_one() for _ in range(count)]
        else:
            with ThreadPoolExecutor(parallel) as pool:
                runs = list(pool.map(lambda _: self.run_one(), range(count)))
        return runs, time.monotonic() - started


class EventRecorder:
    """Container events (create, start, die, destroy) for one label, streamed while they happen.

    Streamed rather than read back afterwards: the engine keeps only its last 256 events, and
    other sessions' tests produce plenty. `marks[name]` is {action: wall-clock time}.
    """

    def __init__(self, client: docker.DockerClient, label: str):
        self.marks: dict[str, dict[str, float]] = {}
        self._stream = client.events(decode=True, filters={"type": "container", "label": label})
        self._thread = threading.Thread(target=self._run, name="docker-events", daemon=True)

    def _run(self) -> None:
        with contextlib.suppress(Exception):  # closing the stream ends the loop with an error
            for event in self._stream:
                name = ((event.get("Actor") or {}).get("Attributes") or {}).get("name", "")
                self.marks.setdefault(name, {}).setdefault(event.get("Action", ""), event.get("timeNano", 0) / 1e9)

    def __enter__(self) -> EventRecorder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.5)  # the last destroy event may still be on its way
        self._stream.close()
        self._thread.join(5)

    def of(self, task_id: str) -> dict[str, float]:
        return dict(self.marks.get(f"agent-core-{task_id}", {}))


STAGES_DAEMON = (("accept → container created", "accept", "create"),
                 ("created → started", "create", "start"),
                 ("started → exited", "start", "die"),
                 ("exited → removed", "die", "destroy"),
                 ("removed → complete", "destroy", "complete"))
STAGES_BARE = (("create call → container created", "begin", "create"),
               ("created → started", "create", "start"),
               ("started → exited", "start", "die"),
               ("exited → removed", "die", "destroy"),
               ("removed → remove call returns", "destroy", "end"))


PROFILE_RATE = 200  # samples per second
# The deepest of these frames in a task thread's stack names what that thread was waiting on.
PROFILE_CATEGORIES = {
    "DockerBackend.start": "Docker: start",
    "DockerBackend.create": "Docker: create (and inspect, as docker-py does)",
    "DockerBackend.wait": "Docker: wait (and inspect, for OOMKilled)",
    "DockerBackend.remove": "Docker: remove",
    "DockerBackend._inspect_attrs": "Docker: inspect before wait",
    "DockerBackend.save_logs": "Docker: logs (stdout, then stderr)",
    "Journal.save": "journal writes (fsync'd)",
    "Journal.remove": "journal writes (fsync'd)",
    "write_status": "status file writes",
    "Workspace.create": "workspace: create, task.json, scan, remove",
    "Workspace.write_task_json": "workspace: create, task.json, scan, remove",
    "scan_outputs": "workspace: create, task.json, scan, remove",
    "remove_workspace": "workspace: create, task.json, scan, remove",
    "Client._request": "server calls (accept, complete)",
}


def summarise_profile(path: Path, tasks: int) -> list[tuple[str, float]]:
    """Wall-clock seconds per task that the task threads spent in each kind of work (py-spy --idle)."""
    seconds: dict[str, float] = {}
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if not frames[0].split(": ", 1)[-1].startswith("task-"):
            continue  # the supervisor and heartbeat threads wait on purpose
        what = "other"
        for frame in reversed(frames[1:]):
            if "agent_core/" in frame:
                name = frame.split(" (", 1)[0]
                if name in PROFILE_CATEGORIES:
                    what = PROFILE_CATEGORIES[name]
                    break
        seconds[what] = seconds.get(what, 0.0) + int(count) / PROFILE_RATE / tasks
    return sorted(seconds.items(), key=lambda kv: -kv[1])


def breakdown(marks: list[dict[str, float]], stages) -> list[tuple[str, Stat]]:
    rows = []
    for label, a, b in stages:
        values = [m[b] - m[a] for m in marks if a in m and b in m]
        if values:
            rows.append((label, Stat.of(values)))
    return rows


# --- the bench ---------------------------------------------------------------------


class Bench:
    def __init__(self, params: Params):
        self.params = params
        self.run_id = os.urandom(4).hex()
        self.bare_service = f"bench-bare-{self.run_id}"
        self.results = Results()
        self.services: list[str] = []
        self.agents = 0
        self.disturbed: set[str] = set()  # tasks whose container someone else removed
        self.procs: list[subprocess.Popen] = []
        self.mono_to_wall = time.time() - time.monotonic()
        self.bare_per_task: float | None = None  # set by the overhead benchmark
        self.profile_dir: Path | None = None

    def __enter__(self) -> Bench:
        self._stack = contextlib.ExitStack()
        self.root = Path(tempfile.mkdtemp(prefix="agent-core-bench-"))
        self._stack.callback(shutil.rmtree, self.root, True)
        self.server = DevServer(data_dir=self.root / "server", rate_limit_per_minute=0,
                                max_file_bytes=2 * self.params.transfer_bytes + 64 * MIB)
        self.server.start()
        self._stack.callback(self.server.stop)
        self.dev = self._stack.enter_context(DevClient(self.server.url, self.server.admin_key, timeout=600))
        self.docker = docker.DockerClient.from_env(max_pool_size=32)
        self._stack.callback(self.docker.close)
        self._stack.callback(self._clean_up)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def stop_agents(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def _clean_up(self) -> None:
        self.stop_agents()
        for label in [f"{LABEL_SERVICE}={s}" for s in self.services + [self.bare_service]]:
            with contextlib.suppress(docker.errors.DockerException):
                for c in self.docker.api.containers(all=True, filters={"label": label}):
                    with contextlib.suppress(docker.errors.DockerException):
                        self.docker.api.remove_container(c["Id"], force=True, v=True)

    def wall(self, mono: float) -> float:
        return mono + self.mono_to_wall

    def agent(self, name: str, script: str, **settings: Any) -> Agent:
        self.agents += 1  # a section that is run again gets fresh agents
        return Agent(self, f"{name}-{self.agents}", script, settings)

    def wait_done(self, task_ids: list[str], timeout: float) -> list[dict]:
        """Wait for the tasks to end; all must complete, except a few disturbed from outside (see DISTURBED)."""
        tasks = [self.dev.wait_for_status(t, DONE, timeout=timeout, interval=0.2) for t in task_ids]
        disturbed = {t["id"] for t in tasks
                     if t["status"] == "failed" and DISTURBED.search(t.get("error_message") or "")}
        bad = [t for t in tasks if t["status"] != "completed" and t["id"] not in disturbed]
        if bad or len(disturbed) > max(1, len(tasks) // 5):
            example = bad[0] if bad else next(t for t in tasks if t["id"] in disturbed)
            raise BenchError(f"{len(bad) + len(disturbed)} of {len(tasks)} task(s) did not complete, e.g. "
                             f"{example['status']}: {example.get('error_message')}")
        if disturbed:
            log(f"{len(disturbed)} task(s) lost their container to someone else's cleanup; "
                "left out of per-task figures")
        self.disturbed |= disturbed
        return tasks

    def run_burst(self, agent: Agent, task_ids: list[str], timeout: float, profile: Path | None = None) -> None:
        agent.start(burst=True, profile=profile)
        agent.wait(timeout)
        self.wait_done(task_ids, timeout=10)


# --- 1. per-task overhead ---------------------------------------------------------------


def bench_overhead(b: Bench) -> None:
    """Also sets `b.bare_per_task`, the bare median the drain's ideal is built from."""
    p, r = b.params, b.results
    rounds = max(1, min(p.overhead_rounds, p.overhead_tasks))
    per_round = p.overhead_tasks // rounds
    log(f"1. per-task overhead: {per_round * rounds} `true` tasks at capacity 1, daemon vs bare Docker, "
        f"in {rounds} alternating round(s)")
    agent = b.agent("overhead", "true", **{"executor.capacity": 1})
    bare = BareDocker(b, agent.cfg, "overhead")
    bare.run_one()  # warm the engine's caches for this image and spec; not counted
    batches: list[list[str]] = []
    runs: list[tuple[str, float, float]] = []
    cpu = 0.0

    def daemon_round(n: int) -> None:
        nonlocal cpu
        ids = agent.submit(per_round)
        b.run_burst(agent, ids, timeout=60 + 10 * per_round)
        batches.append(ids)
        cpu += agent.cpu_secs or 0.0

    def bare_round(n: int) -> None:
        runs.extend(bare.run_many(per_round)[0])

    with EventRecorder(b.docker, f"{LABEL_SERVICE}={agent.service_id}") as daemon_events, \
            EventRecorder(b.docker, f"{LABEL_SERVICE}={b.bare_service}") as bare_events:
        # Alternating rounds (bare, daemon, daemon, bare, ...): a noisy spell hits both sides alike.
        for n in range(rounds):
            for step in ((bare_round, daemon_round) if n % 2 == 0 else (daemon_round, bare_round)):
                step(n)

    ids = [t for batch in batches for t in batch if t not in b.disturbed]
    calls = agent.calls()
    accepted, completed = first(calls, "/accept"), first(calls, "/complete")
    daemon = Stat.of([completed[t] - accepted[t] for t in ids])
    bare_stat = Stat.of([took for _, _, took in runs])
    ratio = daemon.median / bare_stat.median
    r.add("overhead.daemon", "per task through the daemon, accept → complete acknowledged", daemon.fmt())
    r.add("overhead.bare", "per task, bare Docker SDK (create, start, wait, remove)", bare_stat.fmt())
    extra_ms = 1000 * (daemon.median - bare_stat.median)
    r.add("overhead.ratio", "daemon / bare (medians)", f"{ratio:.2f} ({extra_ms:+.0f} ms)", "≤ 1.15", ratio <= 1.15)
    b.run_burst(agent, [], timeout=60)  # an empty run: what start-up, one poll and exit cost
    startup = agent.cpu_secs or 0.0
    r.note(f"overhead: the daemon's CPU time (user + system) is {1000 * (cpu - rounds * startup) / len(ids):.0f} ms "
           f"per task, plus {1000 * startup:.0f} ms to start, poll once and leave")
    gaps = []
    for batch in batches:
        order = sorted((t for t in batch if t in accepted), key=accepted.__getitem__)
        gaps += [accepted[nxt] - completed[t] for t, nxt in zip(order, order[1:]) if t in completed]
    if gaps:
        r.note(f"overhead: complete → next accept at capacity 1 (the next poll round trip, not counted above): "
               f"{Stat.of(gaps).fmt('ms', 1e-3)}")

    # Where the time goes: the engine's own event times against the server's call log.
    marks = [{**daemon_events.of(t), "accept": b.wall(accepted[t]), "complete": b.wall(completed[t])} for t in ids]
    b.results.breakdowns["daemon"] = breakdown(marks, STAGES_DAEMON)
    marks = [{**bare_events.of(t), "begin": began, "end": began + took} for t, began, took in runs]
    b.results.breakdowns["bare"] = breakdown(marks, STAGES_BARE)
    b.bare_per_task = bare_stat.median
    if b.profile_dir:
        # one more round under py-spy, not counted above: sampling slows the daemon down
        out = b.profile_dir / "overhead.pyspy.txt"
        b.run_burst(agent, agent.submit(per_round), timeout=120 + 20 * per_round, profile=out)
        b.results.profile = summarise_profile(out, per_round)


# --- 2. queue drain ------------------------------------------------------------------------


def makespan(agent: Agent, ids: list[str], since: float) -> float:
    """First poll after `since` (monotonic) → last complete acknowledged, from the server's call log."""
    calls = agent.calls()
    polls = [c.time for c in calls if c.path.endswith("/poll") and c.time >= since]
    completed = first(calls, "/complete")
    return max(completed[t] for t in ids) - min(polls)


def bench_drain(b: Bench) -> None:
    p, r = b.params, b.results
    cap = p.drain_capacity
    log(f"2. queue drain: {p.drain_tasks} queued `true` tasks, capacity {cap}, poll interval {p.poll_interval:g} s")
    agent = b.agent("drain", "true", **{"executor.capacity": cap})
    bare_per_task = b.bare_per_task
    if bare_per_task is None:  # --only drain: a serial baseline of its own
        runs, _ = BareDocker(b, agent.cfg, "drain-serial").run_many(max(3, p.overhead_tasks // 2))
        bare_per_task = Stat.of([took for _, _, took in runs]).median
    ids = agent.submit(p.drain_tasks)
    since = time.monotonic()
    b.run_burst(agent, ids, timeout=120 + 5 * p.drain_tasks)
    took = makespan(agent, ids, since)
    ideal = p.drain_tasks / cap * bare_per_task
    _, bare_took = BareDocker(b, agent.cfg, "drain").run_many(p.drain_tasks, parallel=cap)
    ratio = took / ideal
    r.add("drain.makespan", f"{p.drain_tasks} tasks at capacity {cap}: first poll → last complete",
          f"{took:.1f} s (ideal {p.drain_tasks}/{cap} × {bare_per_task:.3f} s = {ideal:.1f} s)")
    r.add("drain.bare_parallel", f"the same containers, bare Docker SDK, {cap} threads", f"{bare_took:.1f} s")
    r.add("drain.ratio", "makespan / ideal", f"{ratio:.2f} (vs bare {cap}-parallel: {took / bare_took:.2f})",
          "≤ 1.5", ratio <= 1.5)
    naive = p.drain_tasks * p.poll_interval
    r.note(f"drain: one task per poll interval would take {naive:.0f} s")


# --- 3. scaling -----------------------------------------------------------------------------


def bench_scaling(b: Bench) -> None:
    p, r = b.params, b.results
    caps = p.capacities
    log(f"3. scaling: {p.scaling_tasks} `sleep 1` tasks at capacity {', '.join(map(str, caps))}, daemon and "
        f"bare Docker; capacity > {caps[0]} run {p.scaling_repeats}×")
    spans: dict[int, list[float]] = {cap: [] for cap in caps}
    bare_spans: dict[int, list[float]] = {cap: [] for cap in caps}
    agents: dict[int, Agent] = {}
    for rep in range(p.scaling_repeats):
        # the base run is long enough to smooth noise itself; the short ones are repeated
        for cap in caps if rep == 0 else caps[1:]:
            if cap not in agents:
                agents[cap] = b.agent(f"scale-c{cap}", "sleep 1", **{"executor.capacity": cap})
            agent = agents[cap]

            def daemon() -> None:
                ids = agent.submit(p.scaling_tasks)
                since = time.monotonic()  # the agent is reused: its earlier runs' polls do not count
                b.run_burst(agent, ids, timeout=120 + 3 * p.scaling_tasks)
                spans[cap].append(makespan(agent, ids, since))

            def bare() -> None:
                runs = BareDocker(b, agent.cfg, f"scale{cap}-{rep}")
                bare_spans[cap].append(runs.run_many(p.scaling_tasks, parallel=cap)[1])

            for step in ((daemon, bare) if rep % 2 == 0 else (bare, daemon)):
                step()
    base = Stat.of(spans[caps[0]]).median
    bare_base = Stat.of(bare_spans[caps[0]]).median
    for cap in caps:
        span, bare_span = Stat.of(spans[cap]), Stat.of(bare_spans[cap])
        speedup, bare_speedup = base / span.median, bare_base / bare_span.median
        has_target = caps[0] < cap <= SCALING_TARGET_UP_TO
        r.add(f"scaling.c{cap}", f"capacity {cap}: makespan; speedup vs capacity {caps[0]}",
              f"{span.fmt()}, ×{speedup:.2f} (bare Docker: {bare_span.fmt()}, ×{bare_speedup:.2f})",
              f"≥ ×{0.85 * cap:.2f}" if has_target else "", speedup >= 0.85 * cap if has_target else None)


# --- 4, 5, 6. memory, transfer throughput, idle cost -------------------------------------------


# With an input file the task reports its size on stdout (a download task); without one it
# writes as many zero bytes to output/big as its prompt says (an upload task).
RESIDENT_SCRIPT = (
    'set -- /workspace/input/*; '
    'if [ -f "$1" ]; then stat -c %s "$1"; '
    'else head -c "$(sed -n \'s/.*"task_prompt": *"\\([0-9]*\\).*/\\1/p\' /workspace/task.json)" /dev/zero '
    '> /workspace/output/big; fi'
)


def plain_upload(b: Bench, agent: Agent, task_id: str, path: Path, filename: str) -> None:
    """The same file, the same endpoint and credentials, in one streaming httpx multipart POST."""
    sid, key = agent.cfg.require_registration()
    headers = {"X-Service-ID": sid, "X-API-Key": key, "Authorization": f"Bearer {key}"}
    with httpx.Client(timeout=httpx.Timeout(600, connect=10), trust_env=False) as http, open(path, "rb") as f:
        resp = http.post(f"{b.server.url}/api/v1/files/agent/{sid}/files/upload", headers=headers,
                         data={"task_id": task_id}, files={"file": (filename, f, "application/octet-stream")})
    if resp.status_code != 200 or resp.json().get("size_bytes") != path.stat().st_size:
        raise BenchError(f"plain upload failed: {resp.status_code} {resp.text[:200]}")


class StoredUpload:
    """How long the server took to receive one upload: its arrival (call log) to the mtime of the
    file it stored (the last byte written), the same measure for the daemon and the plain client."""

    def __init__(self, b: Bench, agent: Agent, filename: str):
        self.b, self.agent, self.filename = b, agent, filename
        self.files_dir = b.server.data_dir / "files"  # where the dev server keeps uploaded bytes

    def __enter__(self) -> StoredUpload:
        self.before = set(self.files_dir.iterdir())
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None:
            return
        arrivals = [c.time for c in self.agent.calls()
                    if c.path.endswith("/files/upload") and c.status == 200 and isinstance(c.body, dict)
                    and any(f.get("filename") == self.filename for f in c.body.get("files", []))]
        stored = [f for f in self.files_dir.iterdir() if f not in self.before]
        if not arrivals or len(stored) != 1:
            raise BenchError(f"cannot find the upload of {self.filename} ({len(stored)} new files)")
        self.arrived = self.b.wall(arrivals[-1])
        self.done = stored[0].stat().st_mtime
        self.size = stored[0].stat().st_size
        self.secs = self.done - self.arrived


def run_watched(b: Bench, agent: Agent, submit: Callable[[], str]) -> tuple[str, int, int]:
    """Submit one task and wait for it while sampling the daemon's RSS: (task id, RSS before, peak)."""
    assert agent.proc is not None
    before = psutil.Process(agent.proc.pid).memory_info().rss
    with RssSampler(agent.proc.pid) as rss:
        task_id = submit()
        b.wait_done([task_id], timeout=900)
    return task_id, before, max(rss.peak, before)


def bench_resident(b: Bench) -> None:
    p, r = b.params, b.results
    size = p.transfer_bytes
    log(f"4-6. a resident daemon: idle {p.idle_secs:g} s, then {size // MIB} MiB uploads and downloads "
        f"(×{p.transfer_repeats})")
    limit = f"{(2 * size + 64 * MIB) // MIB}m"
    agent = b.agent("resident", RESIDENT_SCRIPT, **{
        "executor.capacity": 1, "paths.keep_workspaces": "all",  # the plain upload re-sends the same file
        "limits.max_output_file_bytes": limit, "limits.max_output_bytes": limit})
    proc = agent.start(burst=False)
    ps = psutil.Process(proc.pid)

    def alive_and_polled() -> bool:
        if proc.poll() is not None:
            raise BenchError(f"the resident agent exited {proc.returncode}: {agent.log_tail()}")
        calls = agent.calls()
        return any(c.path.endswith("/poll") for c in calls) and any(c.path.endswith("/heartbeat") for c in calls)

    wait_for(alive_and_polled, 60, "the resident agent's first poll and heartbeat")
    time.sleep(2)  # let start-up settle (first status writes, Docker client pool)

    # 6 and the idle part of 4: CPU time and RSS over an idle window.
    cpu0, t0, rss_idle = ps.cpu_times(), time.monotonic(), []
    calls0 = len(agent.calls())
    deadline = t0 + p.idle_secs
    while (now := time.monotonic()) < deadline:
        rss_idle.append(ps.memory_info().rss)
        time.sleep(min(0.5, deadline - now))
    cpu1, elapsed = ps.cpu_times(), time.monotonic() - t0
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    idle_calls = len(agent.calls()) - calls0
    idle_rss = Stat.of(rss_idle)
    r.add("memory.idle_rss", "daemon RSS while idle", idle_rss.fmt("MiB", MIB), "≤ 60 MiB",
          idle_rss.median <= 60 * MIB)
    pct = 100 * cpu / elapsed
    r.add("idle.cpu", f"daemon CPU over {elapsed:.0f} s idle (poll every {p.poll_interval:g} s)",
          f"{pct:.3f} % of one core ({cpu * 1000:.0f} ms, {idle_calls} requests)", "< 1 %", pct < 1)

    # Warm-up: one small task of each kind, so lazily built state (threads, pools, imports)
    # is in the baseline and the growth below is the transfers' own.
    small = b.root / "small.bin"
    small.write_bytes(b"\0" * MIB)
    for submit in (lambda: agent.submit(1, str(MIB))[0],
                   lambda: b.dev.submit_task(agent.service_id, "0", files=[("small.bin", small)])["id"]):
        task_id, _, _ = run_watched(b, agent, submit)
        shutil.rmtree(agent.workspace(task_id), ignore_errors=True)

    # 4 (upload) and 5: the daemon's upload against a plain httpx upload of the same file.
    up_growth, daemon_rates, plain_rates, after_upload = [], [], [], []
    for _ in range(p.transfer_repeats):
        with StoredUpload(b, agent, "output/big") as daemon_up:
            task_id, before, peak = run_watched(b, agent, lambda: agent.submit(1, str(size))[0])
        up_growth.append(peak - before)
        if daemon_up.size != size:
            raise BenchError(f"the upload task stored {daemon_up.size} bytes, not {size}")
        daemon_rates.append(size / daemon_up.secs)
        after_upload.append(b.wall(first(agent.calls(), "/complete")[task_id]) - daemon_up.done)
        with StoredUpload(b, agent, "output/plain") as plain_up:
            plain_upload(b, agent, task_id, agent.workspace(task_id) / "output" / "big", "output/plain")
        plain_rates.append(size / plain_up.secs)
        shutil.rmtree(agent.workspace(task_id), ignore_errors=True)
    growth = Stat.of(up_growth)
    r.add("memory.upload_growth", f"daemon RSS growth while uploading a {size // MIB} MiB output",
          growth.fmt("MiB", MIB), "≤ 64 MiB", growth.median <= 64 * MIB)
    daemon_rate, plain_rate = Stat.of(daemon_rates), Stat.of(plain_rates)
    r.add("transfer.daemon_upload", f"{size // MIB} MiB upload through the daemon (arrival → last byte stored)",
          daemon_rate.fmt("MiB/s", MIB))
    r.add("transfer.plain_upload", "the same file, plain streaming httpx upload (same measure)",
          plain_rate.fmt("MiB/s", MIB))
    ratio = daemon_rate.median / plain_rate.median
    r.add("transfer.ratio", "daemon / plain (medians)", f"{ratio:.2f}", "≥ 0.8", ratio >= 0.8)
    r.note(f"transfer: from the upload's last byte stored to the daemon's `complete`: "
           f"{Stat.of(after_upload).fmt('ms', 1e-3)} (journal writes, then the report)")

    # 4 (download): a large input, streamed from disk by the client and to disk by the daemon.
    big_in = b.root / "big-input.bin"
    with open(big_in, "wb") as f:
        f.truncate(size)  # sparse: reading it costs no disk time on this side
    down_growth = []
    for _ in range(p.transfer_repeats):
        task_id = b.dev.submit_task(agent.service_id, "0", files=[("big-input.bin", big_in)])["id"]
        # the task was queued with its file already stored: only the daemon's download is watched
        before = ps.memory_info().rss
        with RssSampler(proc.pid) as rss:
            task = b.wait_done([task_id], timeout=900)[0]
        down_growth.append(max(rss.peak, before) - before)
        if str(size) not in (task.get("output") or {}).get("stdout", ""):
            raise BenchError(f"the download task saw the wrong size: {task.get('output')}")
        shutil.rmtree(agent.workspace(task_id), ignore_errors=True)
    growth = Stat.of(down_growth)
    r.add("memory.download_growth", f"daemon RSS growth while downloading a {size // MIB} MiB input",
          growth.fmt("MiB", MIB), "≤ 64 MiB", growth.median <= 64 * MIB)
    agent.stop()


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


# --- the report ------------------------------------------------------------------------------


def machine(client: docker.DockerClient) -> dict[str, str]:
    info, version = client.info(), client.version()
    return {
        "CPU cores": str(os.cpu_count()),
        "memory": f"{psutil.virtual_memory().total / GIB:.1f} GiB",
        "kernel": platform.release(),
        "Docker": f"{version.get('Version', '?')} (API {version.get('ApiVersion', '?')}), "
                  f"storage driver {info.get('Driver', '?')}, cgroup {info.get('CgroupVersion', '?')}",
        "Python": platform.python_version(),
    }


def print_table(results: Results) -> None:
    print()
    print(f"{'metric':<24} {'measured':<60} {'target':<10} result")
    for row in results.rows:
        print(f"{row.key:<24} {row.value:<60} {row.target:<10} {row.verdict}")
    for name, stages in results.breakdowns.items():
        print(f"\nwhere a task's time goes ({name}, medians):")
        for label, stat in stages:
            print(f"  {label:<34} {stat.fmt('ms', 1e-3)}")
    if results.profile:
        print("\nthe daemon's task threads, wall clock per task (py-spy):")
        for what, secs in results.profile:
            print(f"  {what:<50} {1000 * secs:7.1f} ms")
    print()


def render(results: Results, mach: dict[str, str], params: Params, command: str, started: datetime,
           took: float) -> str:
    lines = [
        "# Benchmarks",
        "",
        f"Written by `{command}` on {started:%Y-%m-%d %H:%M} UTC (took {took / 60:.1f} min). "
        "Do not edit by hand: rerun the script (the lead commits the result).",
        "",
        "## Machine",
        "",
        *[f"- **{k}**: {v}" for k, v in mach.items()],
        "",
        "## How",
        "",
        "```sh",
        "bash scripts/docker_env.sh --no-python   # the script runs this itself",
        command,
        "```",
        "",
        "- The dev server (`agent_core.devserver.DevServer`) runs inside the benchmark process on 127.0.0.1 "
        "with `rate_limit_per_minute=0`, and every agent has `server.rate_limit_per_minute = 0`: the figures "
        "measure what Docker and the daemon cost, not the request pacing a real server's 150/min limit imposes.",
        "- Each agent is configured with `agent_core.config`, registered with `python -m agent_core register` "
        "and run as `python -m agent_core --config C run --burst` (leaves once the queue is empty), or "
        "without `--burst` and stopped with SIGTERM for the resident measurements. Executor `custom`, "
        f"`/bin/sh -c SCRIPT` in `{IMAGE}`, network `none`, poll interval {params.poll_interval:g} s, "
        "heartbeat interval 15 s (the default).",
        "- Daemon per-task times come from the dev server's call log (`server.calls`): arrival of `accept` to "
        "arrival of the acknowledged `complete`, matched by `task_id`. Makespans run from the first `poll` to the "
        "last `complete`.",
        "- Bare Docker runs the very same container (`agent_core.executor.build_spec` + `create_kwargs` on the "
        "agent's own config) with the Docker SDK: `containers.create`, `start`, `wait`, `remove_container"
        "(force=True, v=True)`. For the per-task figures, serial bare runs and daemon runs alternate in rounds "
        f"of {params.overhead_tasks // max(1, params.overhead_rounds)} tasks (bare, daemon, daemon, bare, ...), "
        "so a noisy spell hits both sides.",
        "- Memory is the daemon's RSS (psutil, sampled every 20 ms). Growth is the peak while one transfer task "
        "runs minus the RSS just before it, after one small warm-up task of each kind. The upload task's "
        "container writes the file with `head -c N /dev/zero > /workspace/output/big`; the download task's "
        "input is submitted with `DevClient.submit_task(..., files=[(name, Path)])` (streamed).",
        "- Upload throughput, the same measure for both sides, is file size / (the upload's arrival in the call "
        "log → the mtime of the file the server stored, i.e. its last byte). The baseline POSTs the same file "
        "(kept with `paths.keep_workspaces = \"all\"`) in one streaming httpx multipart request to the same "
        "endpoint, with the same credentials. What the daemon does between the last byte and `complete` is a "
        "separate note.",
        "- Idle cost is the daemon's user + system CPU time (psutil `cpu_times`) over the idle window, "
        "after start-up settled.",
        "- Other test sessions' cleanup (`tests/docker_fixtures.py`, `Cleanup.sweep_managed`) may remove a "
        "daemon's container while its task runs; such tasks are counted in a note and left out of per-task "
        "figures, and a benchmark that loses more than a fifth of its tasks is run again once.",
        "- **Caveat**: the machine is shared; other engineers run Docker tests on the same engine at the same "
        "time (see the host note under the results). Absolute figures are noisy; the ratios, whose two sides "
        "ran seconds to minutes apart in the same run, are what to read.",
        "",
        "## Results",
        "",
        "| metric | what | measured: median (min–max, n) | target | result |",
        "|---|---|---|---|---|",
        *[f"| `{row.key}` | {row.what} | {row.value} | {row.target} | {row.verdict and f'**{row.verdict}**'} |"
          for row in results.rows],
        "",
    ]
    if results.notes:
        lines += ["Measured alongside:", "", *[f"- {n}" for n in results.notes], ""]
    if results.breakdowns:
        lines += ["## Where a trivial task's time goes", "",
                  "From the Docker engine's event log (`create`, `start`, `die`, `destroy` event times) "
                  "against the server's call log, per task, medians (min–max):", ""]
        for name, stages in results.breakdowns.items():
            title = "through the daemon" if name == "daemon" else "bare Docker SDK"
            lines += [f"**{title}**", "", "| stage | time |", "|---|---|",
                      *[f"| {label} | {stat.fmt('ms', 1e-3)} |" for label, stat in stages], ""]
    if results.profile:
        lines += ["**the daemon's task threads, by what they wait on** (one extra round of "
                  f"{params.overhead_tasks // max(1, params.overhead_rounds)} tasks under `py-spy record --idle "
                  f"--threads --rate {PROFILE_RATE}`, not counted above; sampling slows the daemon a little)", "",
                  "| work | wall clock per task |", "|---|---|",
                  *[f"| {what} | {1000 * secs:.1f} ms |" for what, secs in results.profile], ""]
    lines += ANALYSIS.splitlines()
    return "\n".join(lines) + "\n"


# What the profiles taken while building this benchmark showed (2026-11-23, this machine).
# Kept here so that every rewrite of the doc keeps the explanation; the figures above it are
# the run's own. `--profile DIR` adds a fresh py-spy table to the doc.
ANALYSIS = """\
## Analysis

**Per-task overhead.** Docker's `start` is most of a trivial task on both sides: on this engine
(storage driver fuse-overlayfs, 2 cores) *created → started* alone is 60–70 % of it (see the breakdown).
The daemon adds its own work in three places: before `create` (the accept reply, the journal record,
the runner thread, the workspace and `task.json`, the STAGED record), after the container exits (the
EXITED record, log reads, then `remove`) and after `remove` (output scan, the UPLOADED record,
`complete`). That is 20–90 ms a task, so the ratio landed between 0.96 and 1.3 in interleaved runs
(observed while building this benchmark), depending mostly on two things the host decides:

- *fsync latency.* A trivial task costs the daemon 12 fsyncs: five journal records (the accept, STAGED,
  LAUNCHED, EXITED, UPLOADED), each fsync'd with its directory, and `task.json`. On a quiet disk one is
  ~1 ms; while other sessions ran tests, a probe doing the same fsync'd 2 KiB write measured 100–850
  ms (see the host note above for this run's figure). Bare Docker does none.
- *CPU.* The daemon makes ten Docker API calls per task where the bare loop makes five: an inspect
  before `wait`, an inspect after it (for OOMKilled), and two log reads, each of which docker-py
  precedes with its own inspect (`logs()` checks whether the container has a TTY). Each call is
  CPU time in the daemon (requests/urllib3, ~2 ms) and in dockerd, on two cores that `start` already
  saturates. A py-spy `--gil` profile of 20 tasks put the daemon's Python time at ~45 ms a task after
  start-up: 10 ms reading logs, 4 ms waiting (with its inspect), 4 ms the pre-wait inspect, ~7 ms
  launching, ~5 ms polling, the rest small.

An A/B run with proposals 1–3 below monkeypatched into the daemon (`sitecustomize` on `PYTHONPATH`)
stayed within the noise on a quiet host (+50 and −13 ms against +20 and +34 ms unpatched): each item is
a few ms; together they matter on a busy host, where every fsync and every Docker call gets slower.

**Queue drain.** The ideal (100 / 4 × the serial bare time) assumes the engine starts four containers in
the time of one. It does not here: bare Docker SDK calls with four threads drain the same 100
containers only ×1.4–1.6 faster than one after the other, because creating, starting and removing a
container is CPU work in dockerd, containerd, runc and fuse-overlayfs, and this machine has two cores
that other sessions share. No agent can meet 1.5 × ideal on this host; the figure to read is the daemon
against bare Docker with the same parallelism (`drain.ratio`, in brackets: 0.9–1.3 while building
this; the naive one-task-per-poll agent needs 500 s). What makes up the difference is the per-task
work above, now competing with dockerd for the CPU. A CPU profile of the drain daemon (py-spy without
`--idle`, which also counts time blocked in file system calls; 100 tasks at capacity 4 on a busy host)
spent per task: ~50 ms writing the status file (about ten create-and-rename writes a task, stalled
behind other writers' journal commits), ~39 ms in fsync'd journal writes, ~33 ms reading logs, ~14 ms
in `accept`/`complete` and ~8 ms polling, ~10 ms removing the workspace.

**Scaling.** `sleep 1` tasks scale like bare Docker with the same parallelism: both lose to the same
per-container CPU work once several containers start and stop at once on two cores. Read the daemon's
speedup against the bare speedup on the same row: the difference between the two is the daemon's, the
rest is the host's.

**Memory, transfers, idle.** Uploads and downloads stream: the RSS hardly moves while 1 GiB goes either
way (the download's few MiB are httpx's buffers and the 1 MiB write chunks). The upload rate is the
dev server's (its multipart parser is pure Python, in the benchmark process), and the daemon gets the
same rate as a plain httpx upload. After the last byte the daemon needs two fsync'd journal writes
before `complete` (the upload's id, then the UPLOADED record); on a busy disk that took up to 1.5 s in
one run while building this, which is why the transfer is timed to the last byte stored and this gap is
a separate note. Idle, the daemon polls every 5 s and heartbeats every 15 s, well under 1 % of a core.

## Proposals from the profiles, and what became of them

1. *Applied.* `Scheduler.write_status` ran on every runner phase change and journal save (about ten
   create-and-rename writes a task). The scheduler now marks the status dirty and one thread rewrites
   `status.json` at most every 0.5 s (`STATUS_EVERY_SECS`); a stop step still writes at once.
2. *Applied.* `TaskRunner._await_exit` inspects the container before `wait` only when resuming a
   journaled task (a crash between create and start), and `DockerBackend.wait` inspects for
   OOMKilled only when the exit code is not 0 (an OOM kill never exits 0): two Docker calls fewer a task.
3. *Not applied.* `DockerBackend.save_logs` makes two `logs()` calls, each preceded by docker-py's
   TTY inspect: four API calls. One `GET /containers/{id}/logs?stdout=1&stderr=1` split by the 8-byte
   frame headers would do it in one, but needs docker-py's private socket helpers; a few ms a task.
4. *Not applied.* `Journal.save` could fsync the directory only when a record is new, and `_collect`
   skip the UPLOADED save when nothing was uploaded (12 fsyncs per trivial task → 7). A lost rename
   would then replay an older stage, and re-upload a file whose id was in the lost record; we keep
   every stage durable instead. On a quiet disk each fsync is ~1 ms.
5. *Applied.* The test fixture `Cleanup.sweep_managed` used to remove every agent-core container
   created while a test ran, including other sessions' and this benchmark's (their tasks failed with
   "can not get logs from container which is dead or marked for removal"). It is now off by default;
   tests find their agents' containers by service id.
"""


SECTIONS: dict[str, Callable[[Bench], None]] = {
    "overhead": bench_overhead, "drain": bench_drain, "scaling": bench_scaling, "resident": bench_resident}


def run_section(b: Bench, name: str, attempts: int = 2) -> None:
    """Run one benchmark; a failed attempt (e.g. a concurrent test session's cleanup removed one of
    our containers) leaves no figures behind and is tried again once."""
    for attempt in range(1, attempts + 1):
        rows, notes = len(b.results.rows), len(b.results.notes)
        try:
            SECTIONS[name](b)
            return
        except (BenchError, docker.errors.APIError) as e:
            del b.results.rows[rows:], b.results.notes[notes:]
            b.stop_agents()
            if attempt == attempts:
                raise BenchError(f"{name}: {e}") from None
            log(f"{name} failed ({e}); running it again")


# --- main ------------------------------------------------------------------------------------


def ensure_image() -> None:
    log("bash scripts/docker_env.sh --no-python")
    proc = subprocess.run(["bash", str(REPO / "scripts" / "docker_env.sh"), "--no-python"], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        raise BenchError(f"docker_env.sh failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (~1-2 min); the doc is not rewritten")
    parser.add_argument("--only", metavar="NAMES",
                        help=f"comma-separated subset of {','.join(SECTIONS)} (to work on one; the table is partial)")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="run the overhead benchmark's daemon under py-spy (wall clock, all threads) and "
                             "write DIR/overhead.pyspy.txt (collapsed stacks); needs `pip install py-spy`")
    parser.add_argument("--out", type=Path, help=f"write the report here (default without --quick: {DOC})")
    args = parser.parse_args(argv)
    params = QUICK if args.quick else FULL
    only = args.only.split(",") if args.only else list(SECTIONS)
    if unknown := set(only) - set(SECTIONS):
        parser.error(f"--only: unknown {', '.join(sorted(unknown))} (choose from {', '.join(SECTIONS)})")
    # the doc is rewritten only by a full run of everything, unless --out says where
    out = args.out or (None if args.quick or args.only else DOC)
    command = " ".join(["python scripts/bench.py", *(argv if argv is not None else sys.argv[1:])])
    started, t0 = datetime.now(timezone.utc), time.monotonic()
    try:
        ensure_image()
        if args.profile and not shutil.which("py-spy"):
            raise BenchError("--profile needs py-spy on PATH (pip install py-spy)")
        with Bench(params) as b:
            if args.profile:
                args.profile.mkdir(parents=True, exist_ok=True)
                b.profile_dir = args.profile
            mach = machine(b.docker)
            with HostProbe(b.root) as host:
                for name in only:
                    run_section(b, name)
            if summary := host.summary():
                b.results.note(summary)
            if b.disturbed:
                b.results.note(f"{len(b.disturbed)} daemon task(s) failed because a concurrent test session's "
                               "cleanup removed their container; they are left out of per-task figures")
            results = b.results
    except BenchError as e:
        print(f"bench: ERROR: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 1
    print_table(results)
    missing = set(metric_keys(params)) - {row.key for row in results.rows}
    if missing and not args.only:
        print(f"bench: ERROR: no figure for {', '.join(sorted(missing))}", file=sys.stderr)
        return 1
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(render(results, mach, params, command, started, time.monotonic() - t0), encoding="utf-8")
        log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
