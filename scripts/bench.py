#!/usr/bin/env python3
"""agent-core benchmarks: the daemon against a bare docker-py loop on the same engine, side by side in one run.

    python scripts/bench.py                    # everything, Docker and Podman, ~11 min; rewrites docs/benchmarks.md
    python scripts/bench.py --quick            # tiny sizes, Docker only, ~1-2 min; prints the table only
    python scripts/bench.py --quick --out F    # ... and writes F (the page) and F's .json (the figures)
    python scripts/bench.py --podman URL       # Podman's service already runs at URL (unix://...)

Self-contained: the in-repo dev server runs in this process with its rate limit off,
and so is the agent's client-side budget (the figures are engine overhead, not pacing);
`scripts/docker_env.sh --no-python` makes sure the busybox image exists, and for Podman
`scripts/podman_env.sh` starts `podman system service` with the test images loaded. Each
agent is configured with `agent_core.config`, registered through the CLI and run as a real
`python -m agent_core run` subprocess, with the `custom` executor running `/bin/sh -c ...`
in agent-core-test/busybox:latest, network "none". The multi-engine drain also starts a
private dockerd of its own (tests/private_engine.py; root only) as the second engine.

The machine is shared and noisy, so every figure that has a target is a ratio against a
baseline measured in the same run: bare docker-py calls on the same engine with the very
container spec the daemon uses (`build_spec` / `create_kwargs`), or a plain httpx upload to
the same server. The run's raw figures go to a JSON file; `bench_report.py` renders the page
from it, so every number on the page is that run's. Exit code: 0 when every benchmark ran
(missed targets are reported, not fatal), 1 when one could not run (Podman included, when
asked for: the page then says why), 2 on bad usage.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
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
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import docker
import httpx
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing it
sys.path.insert(0, str(REPO / "scripts"))  # bench_report, also when this file is loaded by path

import bench_report  # noqa: E402
from agent_core import config as configmod  # noqa: E402
from agent_core.devclient import DevClient  # noqa: E402
from agent_core.devserver import Call, DevServer  # noqa: E402
from agent_core.config import WORKSPACE_MODES  # noqa: E402
from agent_core.executor import LABEL_MANAGED, LABEL_SERVICE, LABEL_TASK, Owner, build_spec, create_kwargs  # noqa: E402
from agent_core.executor.docker import engine_info_of  # noqa: E402
from agent_core.fsutil import write_atomic  # noqa: E402

IMAGE = "agent-core-test/busybox:latest"
DOC = REPO / "docs" / "benchmarks.md"
MIB = 1024 ** 2
GIB = 1024 ** 3
DONE = ("completed", "failed", "cancelled")
RSS_SAMPLE_SECS = 0.02
FSYNC_PROBE_BYTES = 2048  # about one journal record
SLOW_FSYNC_SECS = 0.05
SCALING_SCRIPT = "sleep 1"
PODMAN_ENV = REPO / "scripts" / "podman_env.sh"
PODMAN_READY = re.compile(r"^podman_env: ready: (\S+)\s*$")
# What the issues asked of each figure; written into the figures, so the page shows the run's own.
TARGETS = {"overhead_ratio_max": 1.15, "drain_ratio_max": 1.5, "scaling_efficiency_min": 0.85,
           "scaling_target_up_to": 4, "idle_rss_max_bytes": 60 * MIB, "idle_cpu_max_pct": 1,
           "growth_max_bytes": 64 * MIB, "transfer_ratio_min": 0.8}


@dataclass(frozen=True)
class Params:
    overhead_tasks: int  # per engine and side
    overhead_rounds: int
    drain_tasks: int
    drain_capacity: int
    scaling_tasks: int
    capacities: tuple[int, ...]
    scaling_repeats: int
    transfer_bytes: int
    transfer_repeats: int
    idle_secs: float
    copy_tasks: int  # per workspace mode
    copy_rounds: int
    multi_tasks: int
    multi_capacity: int  # per engine
    poll_interval_secs: float = 5.0


FULL = Params(overhead_tasks=24, overhead_rounds=6, drain_tasks=40, drain_capacity=4, scaling_tasks=12,
              capacities=(1, 2, 4, 8), scaling_repeats=2, transfer_bytes=512 * MIB, transfer_repeats=3, idle_secs=60,
              copy_tasks=24, copy_rounds=6, multi_tasks=100, multi_capacity=2)
QUICK = Params(overhead_tasks=3, overhead_rounds=1, drain_tasks=8, drain_capacity=4, scaling_tasks=4,
               capacities=(1, 2), scaling_repeats=1, transfer_bytes=64 * MIB, transfer_repeats=1, idle_secs=5,
               copy_tasks=2, copy_rounds=1, multi_tasks=8, multi_capacity=2)


def metric_keys(p: Params) -> list[str]:
    """Every row the table has for these parameters (tests/test_bench_quick.py checks them)."""
    return bench_report.metric_keys(p.capacities)


# Other test sessions on the same engine may sweep agent-core-managed containers created while
# their test ran (tests/docker_fixtures.Cleanup.sweep_managed), ours included. A task that lost its
# container that way fails with one of these; a few such tasks are tolerated and counted.
DISTURBED = re.compile(r"marked for removal|already in progress|No such container|vanished|is dead", re.IGNORECASE)


class BenchError(Exception):
    """A benchmark could not run (as opposed to: ran and missed its target)."""


def samples(values: Sequence[float], what: str) -> list[float]:
    """The values of one figure, rounded for the JSON; none is an error, not an empty figure."""
    if not values:
        raise BenchError(f"no samples of {what}")
    return [float(f"{v:.6g}") for v in values]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


# --- the pieces: server, engines, agents, bare loops ---------------------------------------


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
    load average and how long one fsync'd write of about a journal record's size takes on the
    filesystem that holds the agents' data dirs."""

    def __init__(self, root: Path, every: float = 1.0):
        super().__init__(every, "host-probe")
        self.path = root / "fsync-probe"
        self.load: list[float] = []
        self.fsync: list[float] = []

    def sample(self) -> None:
        self.load.append(os.getloadavg()[0])
        started = time.monotonic()
        write_atomic(self.path, "x" * FSYNC_PROBE_BYTES)
        self.fsync.append(time.monotonic() - started)

    def figures(self) -> dict[str, list[float]] | None:
        if not self.load:
            return None
        return {"load": samples(self.load, "load"), "fsync": samples(self.fsync, "fsync")}


@dataclass
class Engine:
    """One engine the benchmark talks to: its name in the agent's config, its socket, a docker-py client."""

    name: str  # "docker" or "podman"
    url: str
    client: docker.DockerClient

    def facts(self) -> dict[str, Any]:
        info, version = self.client.info(), self.client.version()
        said = engine_info_of(version, info, self.url)
        return {"measured": True, "url": self.url, "version": said.version,
                "api_version": version.get("ApiVersion", "?"), "rootless": said.rootless,
                "storage_driver": info.get("Driver", "?"), "cgroup_version": info.get("CgroupVersion", "?")}

    def agent_settings(self) -> dict[str, Any]:
        """How an agent is pointed at this engine."""
        return {"executor.engine": self.name, "executor.engine_url": self.url}


def docker_engine() -> Engine:
    # docker-py's own choice (DOCKER_HOST or the usual socket), named as the agent's config would name it
    url = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    return Engine("docker", url, docker.DockerClient(base_url=url, max_pool_size=32))


def podman_url(mode: str) -> str:
    """The Podman service's URL: given, or from scripts/podman_env.sh (which starts it). BenchError says why not."""
    if mode != "env":
        return mode
    if not PODMAN_ENV.exists():
        raise BenchError(f"{PODMAN_ENV.relative_to(REPO)} does not exist")
    log(f"bash {PODMAN_ENV.relative_to(REPO)}")
    try:
        proc = subprocess.run(["bash", str(PODMAN_ENV)], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=900)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{PODMAN_ENV.name} did not finish in 900 s") from None
    lines = proc.stdout.strip().splitlines()
    ready = PODMAN_READY.match(lines[-1]) if lines else None
    if proc.returncode != 0 or ready is None:
        tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:] or ["no output"]
        raise BenchError(f"{PODMAN_ENV.name} exited {proc.returncode}: {tail[0]}")
    return ready.group(1)


def podman_engine(mode: str) -> Engine:
    url = podman_url(mode)
    client = docker.DockerClient(base_url=url, max_pool_size=32)
    try:
        client.ping()
        client.images.get(IMAGE)
    except docker.errors.DockerException as e:
        client.close()
        raise BenchError(f"Podman at {url}: {e}") from None
    return Engine("podman", url, client)


class Agent:
    """One registered agent config, on one engine, and its `run` subprocess."""

    def __init__(self, bench: Bench, name: str, script: str, settings: dict[str, Any], engine: Engine):
        self.bench = bench
        self.engine = engine
        self.root = bench.root / name
        self.root.mkdir()
        self.config_path = self.root / "config.toml"
        configmod.init(self.config_path, base_url=bench.server.url)
        service = bench.dev.create_service(f"bench-{name}")
        self.service_id: str = service["id"]
        bench.services.append(self.service_id)
        configmod.update(self.config_path, {
            "paths.data_dir": str(self.root / "data"),
            "server.rate_limit_per_minute": 0,  # measure engine overhead, not pacing
            "server.poll_interval_secs": bench.params.poll_interval_secs,
            "executor.executor_type": "custom",
            "executor.custom_entrypoint": "/bin/sh",
            "executor.custom_args": ["-c", script],
            "executor.image": IMAGE,
            "executor.network_mode": "none",
            **engine.agent_settings(),
            **settings,
        })
        # DOCKER_HOST as well: docker-py's own way to a socket, for a daemon that would not read engine_url
        self.env = {**os.environ, "DOCKER_HOST": engine.url}
        proc = subprocess.run([sys.executable, "-m", "agent_core", "--config", str(self.config_path), "register",
                               "--token", service["registration_token"]], env=self.env,
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
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=self.env)
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


def task_times(b: Bench, agent: Agent, ids: list[str], what: str) -> list[float]:
    """Accept → complete acknowledged of each task not disturbed from outside, from the server's call log."""
    calls = agent.calls()
    accepted, completed = first(calls, "/accept"), first(calls, "/complete")
    return samples([completed[t] - accepted[t] for t in ids if t not in b.disturbed], what)


class BareLoop:
    """The daemon's container, run directly with docker-py on the agent's engine: create, start, wait, remove."""

    def __init__(self, bench: Bench, agent: Agent, tag: str):
        self.bench = bench
        self.cfg = agent.cfg
        self.client = agent.engine.client
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
        # Test sessions running beside us may sweep every "managed" container created during their
        # tests; without the label they leave ours alone. It changes nothing the engine does.
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
        raise BenchError("bare container runs keep failing")

    def _run_one(self) -> tuple[str, float, float]:
        api = self.client.api
        task_id, kwargs = self._spec_kwargs()
        started_wall, started = time.time(), time.monotonic()
        container_id = self.client.containers.create(**kwargs).id
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
    """Container events (create, start, die, destroy) of some services, streamed while they happen.

    Streamed rather than read back afterwards: Docker keeps only its last 256 events, and other
    sessions' tests produce plenty. Filtered here, not by the engine: Podman's Docker-compatible
    endpoint ignores label filters. `marks[task id]` is {action: wall-clock time}.
    """

    def __init__(self, client: docker.DockerClient, services: set[str]):
        self.services = services
        self.marks: dict[str, dict[str, float]] = {}
        self._stream = client.events(decode=True, filters={"type": "container"})
        self._thread = threading.Thread(target=self._run, name="engine-events", daemon=True)

    def _run(self) -> None:
        with contextlib.suppress(Exception):  # closing the stream ends the loop with an error
            for event in self._stream:
                attrs = (event.get("Actor") or {}).get("Attributes") or {}
                if attrs.get(LABEL_SERVICE) not in self.services:
                    continue
                action = event.get("Action", "")
                action = "destroy" if action == "remove" else action  # Podman's name for it
                self.marks.setdefault(attrs.get(LABEL_TASK, ""), {}).setdefault(action, event.get("timeNano", 0) / 1e9)

    def __enter__(self) -> EventRecorder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.5)  # the last destroy event may still be on its way
        self._stream.close()
        self._thread.join(5)

    def of(self, task_id: str) -> dict[str, float]:
        return dict(self.marks.get(task_id, {}))

    def on_engine(self, task_ids: list[str]) -> dict[str, int]:
        """How many of the tasks ran on this engine, and the most of them running at once (start → die)."""
        spans = [(m["start"], m["die"]) for t in task_ids if "start" in (m := self.marks.get(t, {})) and "die" in m]
        edges = sorted([(a, 1) for a, _ in spans] + [(z, -1) for _, z in spans])  # a die before a start at a tie
        running = peak = 0
        for _, step in edges:
            running += step
            peak = max(peak, running)
        return {"tasks": len(spans), "peak_running": peak}


# The marks that bound each stage of bench_report.STAGES, through the daemon and in the bare loop.
DAEMON_MARKS = {"pre": ("accept", "create"), "start": ("create", "start"), "run": ("start", "die"),
                "remove": ("die", "destroy"), "post": ("destroy", "complete")}
BARE_MARKS = {**DAEMON_MARKS, "pre": ("begin", "create"), "post": ("destroy", "end")}


PROFILE_RATE = 200  # samples per second
# The deepest of these frames in a task thread's stack names what that thread was waiting on.
PROFILE_CATEGORIES = {
    "DockerBackend.start": "Docker: start",
    "DockerBackend.create": "Docker: create (and inspect, as docker-py does)",
    "DockerBackend.wait": "Docker: wait (inspect only after a non-zero exit)",
    "DockerBackend.remove": "Docker: remove",
    "DockerBackend.inspect": "Docker: inspect",
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


def breakdown(marks: list[dict[str, float]], bounds: dict[str, tuple[str, str]]) -> dict[str, list[float]]:
    """Seconds per stage, for every task whose events bound it."""
    return {stage: [float(f"{m[b] - m[a]:.6g}") for m in marks if a in m and b in m]
            for stage, (a, b) in bounds.items()}


# --- the bench ---------------------------------------------------------------------


class Bench:
    def __init__(self, params: Params, podman: str):
        self.params = params
        self.podman_mode = podman
        self.run_id = os.urandom(4).hex()
        self.bare_service = f"bench-bare-{self.run_id}"
        self.figures: dict[str, Any] = {}
        self.engines: dict[str, Engine] = {}
        self.engine_facts: dict[str, dict[str, Any]] = {}
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
        self._add_engine(docker_engine())
        if self.podman_mode == "off":
            self.engine_facts["podman"] = {"measured": False, "reason": "not asked for (`--podman off`)"}
        else:
            try:
                self._add_engine(podman_engine(self.podman_mode))
            except BenchError as e:
                log(f"Podman unavailable: {e}")
                self.engine_facts["podman"] = {"measured": False, "reason": str(e)}
        self._stack.callback(self._clean_up)
        return self

    def _add_engine(self, engine: Engine) -> None:
        self.engines[engine.name] = engine
        self._stack.callback(engine.client.close)
        self.engine_facts[engine.name] = engine.facts()

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    @property
    def docker(self) -> Engine:
        return self.engines["docker"]

    def stop_agents(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def _clean_up(self) -> None:
        self.stop_agents()
        ours = {*self.services, self.bare_service}
        for engine in self.engines.values():
            api = engine.client.api
            with contextlib.suppress(docker.errors.DockerException):
                for c in api.containers(all=True):  # filtered here: Podman ignores label filters
                    if (c.get("Labels") or {}).get(LABEL_SERVICE) in ours:
                        with contextlib.suppress(docker.errors.DockerException):
                            api.remove_container(c["Id"], force=True, v=True)

    def wall(self, mono: float) -> float:
        return mono + self.mono_to_wall

    def agent(self, name: str, script: str, engine: Engine | None = None, **settings: Any) -> Agent:
        self.agents += 1  # a section that is run again gets fresh agents
        return Agent(self, f"{name}-{self.agents}", script, settings, engine or self.docker)

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


# --- 1. per-task overhead, on every engine ---------------------------------------------------


class OverheadSide:
    """One engine's half of the overhead benchmark: an agent, its bare loop, what both measured."""

    def __init__(self, b: Bench, engine: Engine, per_round: int):
        self.b, self.per_round = b, per_round
        self.agent = b.agent(f"overhead-{engine.name}", "true", engine, **{"executor.capacity": 1})
        self.bare = BareLoop(b, self.agent, f"overhead-{engine.name}")
        self.bare.run_one()  # warm the engine's caches for this image and spec; not counted
        self.batches: list[list[str]] = []
        self.runs: list[tuple[str, float, float]] = []
        self.cpu = 0.0
        self.events = EventRecorder(engine.client, {self.agent.service_id, b.bare_service})

    def daemon_round(self) -> None:
        ids = self.agent.submit(self.per_round)
        self.b.run_burst(self.agent, ids, timeout=60 + 10 * self.per_round)
        self.batches.append(ids)
        self.cpu += self.agent.cpu_secs or 0.0

    def bare_round(self) -> None:
        self.runs.extend(self.bare.run_many(self.per_round)[0])

    def figures(self, rounds: int) -> dict[str, Any]:
        b, engine = self.b, self.agent.engine.name
        ids = [t for batch in self.batches for t in batch if t not in b.disturbed]
        calls = self.agent.calls()
        accepted, completed = first(calls, "/accept"), first(calls, "/complete")
        b.run_burst(self.agent, [], timeout=60)  # an empty run: what start-up, one poll and exit cost
        startup = self.agent.cpu_secs or 0.0
        gaps = []
        for batch in self.batches:
            order = sorted((t for t in batch if t in accepted), key=accepted.__getitem__)
            gaps += [accepted[nxt] - completed[t] for t, nxt in zip(order, order[1:]) if t in completed]
        # Where the time goes: the engine's own event times against the server's call log.
        daemon_marks = [{**self.events.of(t), "accept": b.wall(accepted[t]), "complete": b.wall(completed[t])}
                        for t in ids]
        bare_marks = [{**self.events.of(t), "begin": began, "end": began + took} for t, began, took in self.runs]
        return {
            "daemon": task_times(b, self.agent, ids, f"{engine} daemon tasks"),
            "bare": samples([took for _, _, took in self.runs], f"{engine} bare runs"),
            "cpu_per_task_secs": (self.cpu - rounds * startup) / max(1, len(ids)),
            "startup_cpu_secs": startup,
            "gaps": samples(gaps, "gaps") if gaps else [],
            "stages": {"daemon": breakdown(daemon_marks, DAEMON_MARKS), "bare": breakdown(bare_marks, BARE_MARKS)},
        }


def bench_overhead(b: Bench) -> dict[str, Any]:
    """Also sets `b.bare_per_task`, Docker's bare median, which the drain's ideal is built from."""
    p = b.params
    rounds = max(1, min(p.overhead_rounds, p.overhead_tasks))
    per_round = p.overhead_tasks // rounds
    log(f"1. per-task overhead: {per_round * rounds} `true` tasks at capacity 1 on {', '.join(b.engines)}, "
        f"daemon vs bare loop, in {rounds} alternating round(s)")
    sides = [OverheadSide(b, engine, per_round) for engine in b.engines.values()]
    with contextlib.ExitStack() as stack:
        for side in sides:
            stack.enter_context(side.events)
        # Alternating rounds (bare, daemon, daemon, bare, ...), the engines taking turns:
        # a noisy spell hits every side alike.
        for n in range(rounds):
            for side in sides[n % len(sides):] + sides[:n % len(sides)]:
                for step in ((side.bare_round, side.daemon_round) if n % 2 == 0 else
                             (side.daemon_round, side.bare_round)):
                    step()
    figures = {side.agent.engine.name: side.figures(rounds) for side in sides}
    b.bare_per_task = median(figures["docker"]["bare"])
    for engine, f in figures.items():
        log(f"   {engine}: daemon {median(f['daemon']):.3f} s, bare {median(f['bare']):.3f} s a task")
    if b.profile_dir:
        # one more round under py-spy, not counted above: sampling slows the daemon down
        agent = sides[0].agent
        out = b.profile_dir / "overhead.pyspy.txt"
        b.run_burst(agent, agent.submit(per_round), timeout=120 + 20 * per_round, profile=out)
        b.figures["profile"] = summarise_profile(out, per_round)
    return figures


# --- 2. queue drain ------------------------------------------------------------------------


def makespan(agent: Agent, ids: list[str], since: float) -> float:
    """First poll after `since` (monotonic) → last complete acknowledged, from the server's call log."""
    calls = agent.calls()
    polls = [c.time for c in calls if c.path.endswith("/poll") and c.time >= since]
    completed = first(calls, "/complete")
    return max(completed[t] for t in ids) - min(polls)


def bench_drain(b: Bench) -> dict[str, Any]:
    p = b.params
    cap = p.drain_capacity
    log(f"2. queue drain: {p.drain_tasks} queued `true` tasks, capacity {cap}, poll interval "
        f"{p.poll_interval_secs:g} s")
    agent = b.agent("drain", "true", **{"executor.capacity": cap})
    bare_per_task = b.bare_per_task
    if bare_per_task is None:  # --only drain: a serial baseline of its own
        runs, _ = BareLoop(b, agent, "drain-serial").run_many(max(3, p.overhead_tasks // 2))
        bare_per_task = median([took for _, _, took in runs])
    ids = agent.submit(p.drain_tasks)
    since = time.monotonic()
    b.run_burst(agent, ids, timeout=120 + 5 * p.drain_tasks)
    took = makespan(agent, ids, since)
    _, bare_took = BareLoop(b, agent, "drain").run_many(p.drain_tasks, parallel=cap)
    return {"tasks": p.drain_tasks, "capacity": cap, "makespan": took, "bare_parallel": bare_took,
            "bare_per_task": bare_per_task}


# --- 3. scaling -----------------------------------------------------------------------------


def bench_scaling(b: Bench) -> list[dict[str, Any]]:
    p = b.params
    caps = p.capacities
    log(f"3. scaling: {p.scaling_tasks} `{SCALING_SCRIPT}` tasks at capacity {', '.join(map(str, caps))}, daemon "
        f"and bare loop; capacity > {caps[0]} run {p.scaling_repeats}×")
    spans: dict[int, list[float]] = {cap: [] for cap in caps}
    bare_spans: dict[int, list[float]] = {cap: [] for cap in caps}
    agents: dict[int, Agent] = {}
    for rep in range(p.scaling_repeats):
        # the base run is long enough to smooth noise itself; the short ones are repeated
        for cap in caps if rep == 0 else caps[1:]:
            if cap not in agents:
                agents[cap] = b.agent(f"scale-c{cap}", SCALING_SCRIPT, **{"executor.capacity": cap})
            agent = agents[cap]

            def daemon() -> None:
                ids = agent.submit(p.scaling_tasks)
                since = time.monotonic()  # the agent is reused: its earlier runs' polls do not count
                b.run_burst(agent, ids, timeout=120 + 3 * p.scaling_tasks)
                spans[cap].append(makespan(agent, ids, since))

            def bare() -> None:
                loop = BareLoop(b, agent, f"scale{cap}-{rep}")
                bare_spans[cap].append(loop.run_many(p.scaling_tasks, parallel=cap)[1])

            for step in ((daemon, bare) if rep % 2 == 0 else (bare, daemon)):
                step()
    return [{"capacity": cap, "daemon": samples(spans[cap], f"capacity {cap}"),
             "bare": samples(bare_spans[cap], f"bare capacity {cap}")} for cap in caps]


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


def bench_resident(b: Bench) -> dict[str, Any]:
    p = b.params
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
    time.sleep(2)  # let start-up settle (first status writes, engine client pool)

    # 6 and the idle part of 4: CPU time and RSS over an idle window.
    cpu0, t0, rss_idle = ps.cpu_times(), time.monotonic(), []
    calls0 = len(agent.calls())
    deadline = t0 + p.idle_secs
    while (now := time.monotonic()) < deadline:
        rss_idle.append(ps.memory_info().rss)
        time.sleep(min(0.5, deadline - now))
    cpu1, elapsed = ps.cpu_times(), time.monotonic() - t0
    idle = {"idle_rss": samples(rss_idle, "idle RSS"), "idle_secs": elapsed,
            "idle_cpu_secs": (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system),
            "idle_requests": len(agent.calls()) - calls0}

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
    agent.stop()
    return {**idle, "transfer_bytes": size, "upload_growth": samples(up_growth, "upload growth"),
            "daemon_rates": samples(daemon_rates, "daemon uploads"), "plain_rates": samples(plain_rates, "plain uploads"),
            "after_upload": samples(after_upload, "after upload"), "download_growth": samples(down_growth, "downloads")}


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


# --- 7. copy mode against bind mode ------------------------------------------------------------


def bench_copy(b: Bench) -> dict[str, Any]:
    """The same trivial task with /workspace bind-mounted and copied through the engine's API
    (put_archive before start, get_archive after exit), in alternating rounds on Docker."""
    p = b.params
    rounds = max(1, min(p.copy_rounds, p.copy_tasks))
    per_round = p.copy_tasks // rounds
    log(f"7. workspace modes: {per_round * rounds} `true` tasks at capacity 1 per mode ({', '.join(WORKSPACE_MODES)}) "
        f"on Docker, in {rounds} alternating round(s)")
    agents = {mode: b.agent(f"ws-{mode}", "true", **{"executor.capacity": 1, "executor.workspace": mode})
              for mode in WORKSPACE_MODES}
    ids: dict[str, list[str]] = {mode: [] for mode in WORKSPACE_MODES}
    for n in range(rounds):
        for mode in WORKSPACE_MODES if n % 2 == 0 else WORKSPACE_MODES[::-1]:
            batch = agents[mode].submit(per_round)
            b.run_burst(agents[mode], batch, timeout=60 + 10 * per_round)
            ids[mode] += batch
    figures = {mode: task_times(b, agents[mode], ids[mode], f"{mode} mode tasks") for mode in WORKSPACE_MODES}
    log("   " + ", ".join(f"{mode} {median(v):.3f} s" for mode, v in figures.items()) + " a task")
    return figures


# --- 8. one service over two engines -----------------------------------------------------------


@contextlib.contextmanager
def private_engine(b: Bench):
    """A second dockerd on this machine (its own socket, data root and bridge), with the test image."""
    if os.geteuid() != 0 or shutil.which("dockerd") is None:
        raise BenchError("the second engine is a private dockerd: it needs root and dockerd on PATH")
    from tests.private_engine import PrivateEngine, PrivateEngineError  # here: it brings pytest and the test fixtures

    # a short root under /tmp: its exec root holds unix sockets (108 bytes at most)
    engine = PrivateEngine(Path(tempfile.mkdtemp(prefix="pe-bench-", dir="/tmp")))
    client: docker.DockerClient | None = None
    try:
        engine.start()
        engine.load_image(b.docker.client, IMAGE)
        client = docker.DockerClient(base_url=engine.url, max_pool_size=32)
        yield Engine("docker", engine.url, client)
    except (PrivateEngineError, docker.errors.DockerException) as e:
        raise BenchError(f"the private dockerd: {e}") from None
    finally:
        if client is not None:
            client.close()
        for problem in engine.close():
            log(f"private dockerd teardown: {problem}")


def bench_multi(b: Bench) -> dict[str, Any]:
    """A drain of `multi_tasks` over one engine at capacity C, over two engines at C + C (the system
    engine and a private dockerd on the same machine), and over one engine at 2C: the same slots."""
    p = b.params
    cap = p.multi_capacity
    log(f"8. multi-engine drain: {p.multi_tasks} `true` tasks on one engine at capacity {cap}, two at {cap} + {cap}, "
        f"one at {2 * cap}")
    with private_engine(b) as second:
        facts = second.facts()
        layouts = {"one": [("system", b.docker, cap)], "two": [("system", b.docker, cap), ("private", second, cap)],
                   "one_same_slots": [("system", b.docker, 2 * cap)]}
        out: dict[str, Any] = {}
        for key, engines in layouts.items():
            agent = b.agent(f"multi-{key}", "true", **{"executor.engines": [
                {"name": name, "url": e.url, "capacity": c, "workspace": "bind"} for name, e, c in engines]})
            recorders = [EventRecorder(e.client, {agent.service_id}) for _, e, _ in engines]
            with contextlib.ExitStack() as stack:
                for rec in recorders:
                    stack.enter_context(rec)
                ids = agent.submit(p.multi_tasks)
                since = time.monotonic()
                b.run_burst(agent, ids, timeout=120 + 5 * p.multi_tasks)
            took = makespan(agent, ids, since)
            out[key] = {"makespan": took, "engines": [
                {"name": name, "capacity": c, **rec.on_engine(ids)} for (name, _, c), rec in zip(engines, recorders)]}
            log(f"   {key}: {took:.1f} s, " + ", ".join(f"{e['name']} ran {e['tasks']} (at most {e['peak_running']} at "
                                                       "once)" for e in out[key]["engines"]))
    return {"tasks": p.multi_tasks, "capacity": cap, "workspace": "bind", "second_engine": facts, **out}


# --- the figures and the report --------------------------------------------------------------


SECTIONS: dict[str, Callable[[Bench], Any]] = {
    "overhead": bench_overhead, "drain": bench_drain, "scaling": bench_scaling, "resident": bench_resident,
    "copy": bench_copy, "multi": bench_multi}


def run_section(b: Bench, name: str, attempts: int = 2) -> None:
    """Run one benchmark; its figures are kept only when it finished. A failed attempt (e.g. a
    concurrent test session's cleanup removed one of our containers) is tried again once."""
    for attempt in range(1, attempts + 1):
        try:
            b.figures[name] = SECTIONS[name](b)
            return
        except (BenchError, docker.errors.APIError) as e:
            b.stop_agents()
            if attempt == attempts:
                raise BenchError(f"{name}: {e}") from None
            log(f"{name} failed ({e}); running it again")


def machine() -> dict[str, Any]:
    return {"cpu_cores": os.cpu_count(), "memory_bytes": psutil.virtual_memory().total, "kernel": platform.release(),
            "python": platform.python_version()}


def parameters(b: Bench) -> dict[str, Any]:
    """What the run was asked to do and the constants its page quotes, each from where it is defined."""
    return {**dataclasses.asdict(b.params), "image": IMAGE, "scaling_script": SCALING_SCRIPT,
            "podman_mode": "env" if b.podman_mode == "env" else ("off" if b.podman_mode == "off" else "url"),
            "heartbeat_interval_secs": configmod.AgentConfig().heartbeat_interval_secs,
            "default_rate_limit_per_minute": configmod.ServerConfig().rate_limit_per_minute,
            "rss_sample_secs": RSS_SAMPLE_SECS, "fsync_probe_bytes": FSYNC_PROBE_BYTES,
            "slow_fsync_secs": SLOW_FSYNC_SECS, "profile_rate": PROFILE_RATE}


def figures_json(figures: dict[str, Any]) -> str:
    """Indented, with each list of numbers on one line (hundreds of samples stay readable)."""
    text = json.dumps(figures, indent=1, ensure_ascii=False)
    return re.sub(r"\[\s*(-?[\d.e+-]+(?:,\s*-?[\d.e+-]+)*)\s*\]",
                  lambda m: "[" + ", ".join(m.group(1).replace(",", " ").split()) + "]", text) + "\n"


def print_table(figures: dict[str, Any]) -> None:
    print()
    print(f"{'metric':<28} {'measured':<64} {'target':<10} result")
    for row in bench_report.rows(figures):
        print(f"{row.key:<28} {row.value:<64} {row.target:<10} {row.verdict}")
    print()


def ensure_image() -> None:
    log("bash scripts/docker_env.sh --no-python")
    proc = subprocess.run(["bash", str(REPO / "scripts" / "docker_env.sh"), "--no-python"], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        raise BenchError(f"docker_env.sh failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes (~1-2 min), Podman off unless --podman says otherwise; the doc is not rewritten")
    parser.add_argument("--podman", metavar="MODE",
                        help="`env`: start Podman with scripts/podman_env.sh (the default of a full run); a unix:// "
                             "or tcp:// URL: a Podman service already there; `off` (the default with --quick)")
    parser.add_argument("--only", metavar="NAMES",
                        help=f"comma-separated subset of {','.join(SECTIONS)} (to work on one; the table is partial)")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="run one extra overhead round of the daemon on Docker under py-spy (wall clock, all "
                             "threads) and write DIR/overhead.pyspy.txt (collapsed stacks); needs py-spy on PATH")
    parser.add_argument("--out", type=Path,
                        help=f"write the page here and its figures beside it as .json (default without --quick: {DOC})")
    args = parser.parse_args(argv)
    params = QUICK if args.quick else FULL
    podman = args.podman or ("off" if args.quick else "env")
    if podman not in ("env", "off") and not re.match(r"^(unix|tcp|ssh)://", podman):
        parser.error(f"--podman: expected env, off or a unix:// or tcp:// URL, not {podman!r}")
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
        with Bench(params, podman) as b:
            if args.profile:
                args.profile.mkdir(parents=True, exist_ok=True)
                b.profile_dir = args.profile
            with HostProbe(b.root) as host:
                for name in only:
                    run_section(b, name)
            figures = {
                "run": {"command": command, "started": started.isoformat(timespec="seconds"),
                        "took_secs": round(time.monotonic() - t0, 1)},
                "machine": machine(), "engines": b.engine_facts, "params": parameters(b), "targets": TARGETS,
                **b.figures, "host": host.figures(), "disturbed": len(b.disturbed),
            }
    except BenchError as e:
        print(f"bench: ERROR: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 1
    # the page is rendered from the figures as written, so it can always be rendered again from the file
    text = figures_json(figures)
    figures = json.loads(text)
    print_table(figures)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(text, encoding="utf-8")
        out.write_text(bench_report.render(figures), encoding="utf-8")
        log(f"wrote {out} and {out.with_suffix('.json').name}")
    rows = {row.key for row in bench_report.rows(figures)}
    if (missing := set(metric_keys(params)) - rows) and not args.only:
        print(f"bench: ERROR: no figure for {', '.join(sorted(missing))}", file=sys.stderr)
        return 1
    if podman != "off" and not figures["engines"]["podman"]["measured"]:
        print(f"bench: ERROR: Podman was asked for but not measured: {figures['engines']['podman']['reason']}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
