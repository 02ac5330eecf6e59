#!/usr/bin/env python3
"""docs/benchmarks.md from one run's figures (the JSON `scripts/bench.py` writes beside it).

    python scripts/bench_report.py docs/benchmarks.json              # re-render docs/benchmarks.md
    python scripts/bench_report.py RESULTS.json --out F               # ... somewhere else

Every number on the page is computed here from the figures; the prose itself holds none
(tests/test_bench_quick.py reads this file's string literals to keep it so). Pure: no Docker,
no clock, no machine reads, so the same figures always give the same page.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

MIB = 1024 * 1024
GIB = 1024 * MIB
ENGINES = {"docker": "Docker", "podman": "Podman"}  # key in the figures -> name on the page

# The stages of a trivial task, from the engine's event log and the server's call log.
# (id, through the daemon, in the bare loop); bench.py knows which marks bound each one.
STAGES = (("pre", "accept → container created", "create call → container created"),
          ("start", "created → started", "created → started"),
          ("run", "started → exited", "started → exited"),
          ("remove", "exited → removed", "exited → removed"),
          ("post", "removed → complete acknowledged", "removed → remove call returns"))
# What the daemon does in the stages where it does more than the bare loop (from the runner's code).
DAEMON_WORK = {"pre": "before the container exists (the accept reply, journal records, the workspace and "
                      "`task.json`)",
               "remove": "between exit and removal (the exit record, the log reads)",
               "post": "after removal (the output scan, the last journal record, `complete`)"}

# The multi-engine drain's layouts: key in the figures -> what the row says (the sizes come from the figures).
LAYOUTS = {"one": "one engine (the system Docker)", "two": "two engines (the system Docker + a private dockerd)",
           "one_same_slots": "one engine (the system Docker), as many slots as the two,"}

Figures = dict[str, Any]


# --- numbers --------------------------------------------------------------------


def num(x: float) -> str:
    """Three significant digits; whole numbers from a thousand up."""
    return f"{x:.0f}" if abs(x) >= 1000 else f"{x:.3g}"


def med(values: Sequence[float]) -> float:
    return statistics.median(values)


def spread(values: Sequence[float], unit: str = "s", scale: float = 1.0) -> str:
    """"median unit (min–max, n=N)"; a single value alone."""
    shown = num(med(values) / scale) + (f" {unit}" if unit else "")
    if len(values) == 1:
        return shown
    return f"{shown} ({num(min(values) / scale)}–{num(max(values) / scale)}, n={len(values)})"


def ms(secs: float) -> str:
    return f"{num(1000 * secs)} ms"


def signed_ms(secs: float) -> str:
    return f"{1000 * secs:+.0f} ms"


def times(ratio: float) -> str:
    return f"×{ratio:.2f}"


def pct(part: float, whole: float) -> str:
    return f"{num(100 * part / whole)} %"


def secs(x: float) -> str:
    return f"{num(x)} s"


def mib(n: float) -> str:
    return f"{num(n / MIB)} MiB"


# --- the table ------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    key: str
    what: str
    value: str
    target: str = ""
    ok: bool | None = None  # None: information only

    @property
    def verdict(self) -> str:
        return "" if self.ok is None else ("pass" if self.ok else "MISS")


def metric_keys(capacities: Sequence[int]) -> list[str]:
    """Every row a complete run has (an engine that was not measured still has its rows)."""
    keys = [f"overhead.{e}.{k}" for e in ENGINES for k in ("daemon", "bare", "ratio")]
    keys += ["overhead.podman_vs_docker", "copy.bind", "copy.copy", "copy.ratio", "drain.makespan",
             "drain.bare_parallel", "drain.ratio", *(f"multi.{k}" for k in LAYOUTS), "multi.ratio"]
    keys += [f"scaling.c{c}" for c in capacities]
    keys += ["memory.idle_rss", "idle.cpu", "memory.upload_growth", "transfer.daemon_upload",
             "transfer.plain_upload", "transfer.ratio", "memory.download_growth"]
    return keys


def engine_rows(r: Figures, engine: str) -> list[Row]:
    name, t = ENGINES[engine], r["targets"]
    facts, o = r["engines"][engine], r.get("overhead", {}).get(engine)
    if o is None:
        why = facts.get("reason") if not facts.get("measured") else "the overhead benchmark did not run"
        return [Row(f"overhead.{engine}.{k}", f"{name}: not measured", why or "") for k in ("daemon", "bare", "ratio")]
    daemon, bare = med(o["daemon"]), med(o["bare"])
    limit = t["overhead_ratio_max"]
    return [
        Row(f"overhead.{engine}.daemon", f"{name}: per task through the daemon, accept → complete acknowledged",
            spread(o["daemon"])),
        Row(f"overhead.{engine}.bare", f"{name}: per task, bare docker-py loop (create, start, wait, remove)",
            spread(o["bare"])),
        Row(f"overhead.{engine}.ratio", f"{name}: daemon / bare (medians)",
            f"{times(daemon / bare)} ({signed_ms(daemon - bare)})", f"≤ {times(limit)}", daemon / bare <= limit),
    ]


def rows(r: Figures) -> list[Row]:
    """The results table, in the page's order; sections that did not run have no rows."""
    t, out = r["targets"], []
    if "overhead" in r:
        for engine in ENGINES:
            out += engine_rows(r, engine)
        o = r["overhead"]
        if all(e in o for e in ENGINES):
            d, p = o["docker"], o["podman"]
            out.append(Row("overhead.podman_vs_docker", "Podman / Docker (medians)",
                           f"bare {times(med(p['bare']) / med(d['bare']))}, "
                           f"through the daemon {times(med(p['daemon']) / med(d['daemon']))}"))
        else:
            out.append(Row("overhead.podman_vs_docker", "Podman / Docker (medians)", "not measured"))
    if c := r.get("copy"):
        copy, bind = med(c["copy"]), med(c["bind"])
        out += [
            Row("copy.bind", "Docker, `workspace = \"bind\"`: per task through the daemon, accept → complete "
                "acknowledged", spread(c["bind"])),
            Row("copy.copy", "Docker, `workspace = \"copy\"` (`put_archive` before start, `get_archive` after "
                "exit): the same", spread(c["copy"])),
            Row("copy.ratio", "copy / bind (medians)", f"{times(copy / bind)} ({signed_ms(copy - bind)})"),
        ]
    if d := r.get("drain"):
        ideal = d["tasks"] / d["capacity"] * d["bare_per_task"]
        ratio = d["makespan"] / ideal
        out += [
            Row("drain.makespan", f"Docker: {d['tasks']} tasks at capacity {d['capacity']}: first poll → last "
                "complete", f"{secs(d['makespan'])} (ideal {d['tasks']}/{d['capacity']} × "
                f"{secs(d['bare_per_task'])} = {secs(ideal)})"),
            Row("drain.bare_parallel", f"the same containers, bare docker-py loop, {d['capacity']} threads",
                secs(d["bare_parallel"])),
            Row("drain.ratio", "makespan / ideal", f"{ratio:.2f} (vs bare {d['capacity']}-parallel: "
                f"{d['makespan'] / d['bare_parallel']:.2f})", f"≤ {t['drain_ratio_max']:g}",
                ratio <= t["drain_ratio_max"]),
        ]
    if m := r.get("multi"):
        out += multi_rows(m)
    if s := r.get("scaling"):
        base, bare_base = med(s[0]["daemon"]), med(s[0]["bare"])
        for c in s:
            cap, speedup, bare_speedup = c["capacity"], base / med(c["daemon"]), bare_base / med(c["bare"])
            goal = t["scaling_efficiency_min"] * cap
            has_target = s[0]["capacity"] < cap <= t["scaling_target_up_to"]
            out.append(Row(f"scaling.c{cap}", f"Docker, capacity {cap}: makespan; speedup vs capacity "
                           f"{s[0]['capacity']}", f"{spread(c['daemon'])}, {times(speedup)} (bare: "
                           f"{spread(c['bare'])}, {times(bare_speedup)})",
                           f"≥ {times(goal)}" if has_target else "", speedup >= goal if has_target else None))
    if m := r.get("resident"):
        size, cpu_pct = m["transfer_bytes"], 100 * m["idle_cpu_secs"] / m["idle_secs"]
        up, plain = med(m["daemon_rates"]), med(m["plain_rates"])
        growth_max = t["growth_max_bytes"]
        out += [
            Row("memory.idle_rss", "daemon RSS while idle", spread(m["idle_rss"], "MiB", MIB),
                f"≤ {mib(t['idle_rss_max_bytes'])}", med(m["idle_rss"]) <= t["idle_rss_max_bytes"]),
            Row("idle.cpu", f"daemon CPU over {secs(m['idle_secs'])} idle (poll every "
                f"{secs(r['params']['poll_interval_secs'])})", f"{cpu_pct:.3f} % of one core "
                f"({ms(m['idle_cpu_secs'])}, {m['idle_requests']} requests)", f"< {t['idle_cpu_max_pct']:g} %",
                cpu_pct < t["idle_cpu_max_pct"]),
            Row("memory.upload_growth", f"daemon RSS growth while uploading a {mib(size)} output",
                spread(m["upload_growth"], "MiB", MIB), f"≤ {mib(growth_max)}", med(m["upload_growth"]) <= growth_max),
            Row("transfer.daemon_upload", f"{mib(size)} upload through the daemon (arrival → last byte stored)",
                spread(m["daemon_rates"], "MiB/s", MIB)),
            Row("transfer.plain_upload", "the same file, plain streaming httpx upload (same measure)",
                spread(m["plain_rates"], "MiB/s", MIB)),
            Row("transfer.ratio", "daemon / plain (medians)", f"{up / plain:.2f}", f"≥ {t['transfer_ratio_min']:g}",
                up / plain >= t["transfer_ratio_min"]),
            Row("memory.download_growth", f"daemon RSS growth while downloading a {mib(size)} input",
                spread(m["download_growth"], "MiB", MIB), f"≤ {mib(growth_max)}",
                med(m["download_growth"]) <= growth_max),
        ]
    return out


def slots(layout: Figures) -> str:
    return " + ".join(str(e["capacity"]) for e in layout["engines"])


def per_engine(layout: Figures) -> str:
    return ", ".join(f"{e['name']} ran {e['tasks']} (at most {e['peak_running']} at once, capacity {e['capacity']})"
                     for e in layout["engines"])


def multi_rows(m: Figures) -> list[Row]:
    n, out = m["tasks"], []
    for key, what in LAYOUTS.items():
        layout = m[key]
        value = f"{secs(layout['makespan'])} ({num(n / layout['makespan'])} tasks/s)"
        target, ok = "", None
        if len(layout["engines"]) > 1:  # the dispatch itself: every engine used, none over its capacity
            value += f"; {per_engine(layout)}"
            target = "each engine used, none over its capacity"
            ok = all(e["tasks"] > 0 and e["peak_running"] <= e["capacity"] for e in layout["engines"])
        out.append(Row(f"multi.{key}", f"{n} tasks over {what} at capacity {slots(layout)}: first poll → last "
                       "complete", value, target, ok))
    one, two, same = (m[k]["makespan"] for k in ("one", "two", "one_same_slots"))
    out.append(Row("multi.ratio", "two engines against one (makespans, one / two)",
                   f"{times(one / two)} against capacity {slots(m['one'])}; {times(same / two)} against capacity "
                   f"{slots(m['one_same_slots'])}"))
    return out


# --- the page -------------------------------------------------------------------


def render(r: Figures) -> str:
    started = datetime.fromisoformat(r["run"]["started"])
    parts = [
        "# Benchmarks",
        f"Written by `{r['run']['command']}` on {started:%Y-%m-%d %H:%M} UTC (took "
        f"{num(r['run']['took_secs'] / 60)} min). Do not edit by hand: rerun the script, or re-render the page "
        "from its figures with `python scripts/bench_report.py docs/benchmarks.json`. Every number on it comes "
        "from that file, i.e. from that one run.",
        "## Machine",
        machine(r),
        "## How",
        how(r),
        "## Results",
        table(rows(r)),
    ]
    parts += [p for p in (alongside(r), stages_section(r), profile_section(r)) if p]
    parts += ["## Analysis", *[p for p in analysis(r) if p], "## Design notes from earlier profiles", DESIGN_NOTES]
    return "\n\n".join(parts) + "\n"


def engine_line(facts: Figures) -> str:
    if not facts.get("measured"):
        return f"not measured in this run: {facts.get('reason', '')}"
    mode = "rootless" if facts["rootless"] else "rootful"
    return (f"{facts['version']} (API {facts['api_version']}), {mode}, storage driver {facts['storage_driver']}, "
            f"cgroup {facts['cgroup_version']}, at `{facts['url']}`")


def machine(r: Figures) -> str:
    m = r["machine"]
    lines = [f"- **CPU cores**: {m['cpu_cores']}", f"- **memory**: {num(m['memory_bytes'] / GIB)} GiB",
             f"- **kernel**: {m['kernel']}", f"- **Python**: {m['python']}"]
    lines += [f"- **{name}**: {engine_line(r['engines'][e])}" for e, name in ENGINES.items()]
    return "\n".join(lines)


def how(r: Figures) -> str:
    p = r["params"]
    per_round = p["overhead_tasks"] // p["overhead_rounds"]
    podman = r["engines"]["podman"]
    setup = ["bash scripts/docker_env.sh --no-python   # the script runs this itself"]
    if p["podman_mode"] == "env":
        setup.append("bash scripts/podman_env.sh              # likewise, for the Podman side")
    return "\n".join([
        "```sh", *setup, r["run"]["command"], "```", "",
        "- The dev server (`agent_core.devserver.DevServer`) runs inside the benchmark process on loopback with "
        "its rate limit off, and every agent has its own request budget (`server.rate_limit_per_minute`) off: the figures measure what the "
        "engine and the daemon cost, not the pacing a real server's limit imposes (the agent's default is "
        f"{p['default_rate_limit_per_minute']} requests a minute).",
        "- Each agent is configured with `agent_core.config`, registered with `python -m agent_core register` and "
        "run as `python -m agent_core --config C run --burst` (leaves once the queue is empty), or without "
        "`--burst` and stopped with SIGTERM for the resident measurements. Executor `custom`, `/bin/sh -c SCRIPT` "
        f"in `{p['image']}`, network `none`, poll interval {secs(p['poll_interval_secs'])}, heartbeat interval "
        f"{secs(p['heartbeat_interval_secs'])} (the default).",
        "- The per-task overhead runs on every engine measured: the agent on Podman has `[executor] engine = "
        "\"podman\"` and `engine_url` set to Podman's socket"
        + (f" (`{podman['url']}`)" if podman.get("measured") else "")
        + ", and `DOCKER_HOST` set to it as well. The drain, scaling and resident measurements run on Docker.",
        "- Daemon per-task times come from the dev server's call log: arrival of `accept` to arrival of the "
        "acknowledged `complete`, matched by `task_id`. Makespans run from the first `poll` to the last `complete`.",
        "- The bare loop runs the very same container (`agent_core.executor.build_spec` + `create_kwargs` on the "
        "agent's own config) with docker-py on the same engine's socket: `containers.create`, `start`, `wait`, "
        "`remove_container(force=True, v=True)`. For the per-task figures, bare and daemon rounds of "
        f"{per_round} tasks alternate (bare, daemon, daemon, bare, ...), in {p['overhead_rounds']} round(s) per "
        "engine, "
        "and the engines take turns round by round, so a noisy spell hits every side.",
        f"- Memory is the daemon's RSS (psutil, sampled every {ms(p['rss_sample_secs'])}). Growth is the peak while "
        "one transfer task runs minus the RSS just before it, after one small warm-up task of each kind. The "
        "upload task's container writes the file with `head -c N /dev/zero`; the download task's input is "
        "submitted with `DevClient.submit_task(..., files=[(name, Path)])` (streamed).",
        "- Upload throughput, the same measure for both sides, is file size / (the upload's arrival in the call "
        "log → the mtime of the file the server stored, i.e. its last byte). The baseline POSTs the same file in "
        "one streaming httpx multipart request to the same endpoint, with the same credentials.",
        *how_more(r),
        "- Idle cost is the daemon's user + system CPU time (psutil `cpu_times`) over the idle window, after "
        "start-up settled.",
        "- Other test sessions on the same engine may remove a daemon's container while its task runs; such tasks "
        "are counted in a note and left out of per-task figures, and a benchmark that loses too many is run again "
        "once.",
        f"- A probe writes {num(p['fsync_probe_bytes'] / 1024)} KiB with fsync (as the journal does) and reads the "
        "load average every second of the run, on the file system that holds the agents' data; see the host note "
        "under the results.",
    ])


def how_more(r: Figures) -> list[str]:
    """The bullets of the workspace-mode and multi-engine measurements, when they ran."""
    p, out = r["params"], []
    if "copy" in r:
        rounds = max(1, min(p["copy_rounds"], p["copy_tasks"]))
        out.append(
            "- Workspace modes: two agents on Docker at capacity one, one with `[executor] workspace = \"bind\"` "
            "(the task's workspace bind-mounted at `/workspace`), one with `\"copy\"` (`task.json` and `input/` put "
            "into the container with `put_archive` before it starts, `/workspace` read back with `get_archive` after "
            f"it exits), take turns with rounds of {p['copy_tasks'] // rounds} `true` tasks ({rounds} round(s) each, "
            "the order swapped every round). Per-task times as for the overhead: accept → complete acknowledged.")
    if m := r.get("multi"):
        out.append(
            "- Two engines: the second is a private `dockerd` the benchmark starts on this same machine "
            "(`tests/private_engine.py`: its own socket, data root and bridge; "
            f"{engine_line(m['second_engine'])}), with the busybox image copied over. Three agents, each "
            "configured with `[[executor.engines]]` tables "
            f"(`workspace = \"{m['workspace']}\"`: the data dir is on this host), drain {m['tasks']} queued `true` "
            "tasks, one agent after the other: "
            + "; ".join(f"{LAYOUTS[k]} at capacity {slots(m[k])}" for k in LAYOUTS)
            + ". Makespans as for the drain; which engine ran a task, and how many ran at once on it, come from each "
            "engine's event log (start → die).")
    return out


def table(out: list[Row]) -> str:
    lines = ["| metric | what | measured: median (min–max, n) | target | result |", "|---|---|---|---|---|"]
    lines += [f"| `{row.key}` | {row.what} | {row.value} | {row.target} | {row.verdict and f'**{row.verdict}**'} |"
              for row in out]
    return "\n".join(lines)


def host_note(r: Figures) -> str | None:
    h = r.get("host")
    if not h or not h["load"]:
        return None
    slow = sum(1 for t in h["fsync"] if t > r["params"]["slow_fsync_secs"])
    return (f"host during the run: load average (one minute) {spread(h['load'], '')}; one fsync'd "
            f"{num(r['params']['fsync_probe_bytes'] / 1024)} KiB write {spread(h['fsync'], 'ms', 1 / 1000)}, "
            f"over {ms(r['params']['slow_fsync_secs'])} in {slow} of {len(h['fsync'])} samples")


def alongside(r: Figures) -> str | None:
    notes = []
    for engine, o in r.get("overhead", {}).items():
        name = ENGINES[engine]
        notes.append(f"{name}: {cpu_sentence(o, med(o['daemon']))}; start-up, one poll and leaving cost "
                     f"{ms(o['startup_cpu_secs'])} of CPU time (user + system) a run")
        if o["gaps"]:
            notes.append(f"{name}: complete → next accept at capacity one (the next poll round trip, not counted "
                         f"above): {spread(o['gaps'], 'ms', 1 / 1000)}")
    if d := r.get("drain"):
        notes.append(f"drain: one task per poll interval would take {secs(d['tasks'] * r['params']['poll_interval_secs'])}")
    if m := r.get("resident"):
        notes.append(f"transfer: from the upload's last byte stored to the daemon's `complete`: "
                     f"{spread(m['after_upload'], 'ms', 1 / 1000)} (journal writes, then the report)")
    if note := host_note(r):
        notes.append(note)
    if r.get("disturbed"):
        notes.append(f"{r['disturbed']} daemon task(s) failed because a concurrent test session removed their "
                     "container; they are left out of per-task figures")
    return "Measured alongside:\n\n" + "\n".join(f"- {n}" for n in notes) if notes else None


def stage_medians(o: Figures, side: str) -> dict[str, float]:
    return {k: med(v) for k, v in o["stages"][side].items() if v}


def stages_section(r: Figures) -> str | None:
    o = r.get("overhead")
    if not o:
        return None
    cols = [(ENGINES[e], side, stage_medians(o[e], side)) for e in ENGINES if e in o for side in ("daemon", "bare")]
    counts = ", ".join(f"{ENGINES[e]} {len(o[e]['daemon'])} + {len(o[e]['bare'])}" for e in ENGINES if e in o)
    head = "| stage (daemon / bare loop) | " + " | ".join(f"{n}, {'daemon' if s == 'daemon' else 'bare'}"
                                                         for n, s, _ in cols) + " |"
    lines = ["## Where a trivial task's time goes", "",
             "From each engine's event log (`create`, `start`, `die`, and `destroy` on Docker or `remove` on Podman) "
             f"against the server's call log, medians per task (tasks: {counts}):", "", head,
             "|---|" + "---|" * len(cols)]
    for key, daemon_label, bare_label in STAGES:
        label = daemon_label if daemon_label == bare_label else f"{daemon_label} / {bare_label}"
        lines.append(f"| {label} | " + " | ".join(ms(m[key]) if key in m else "" for _, _, m in cols) + " |")
    return "\n".join(lines)


def profile_section(r: Figures) -> str | None:
    if not r.get("profile"):
        return None
    p = r["params"]
    lines = [f"**The daemon's task threads on Docker, by what they wait on** (one extra round of "
             f"{p['overhead_tasks'] // p['overhead_rounds']} tasks under `py-spy record --idle --threads --rate "
             f"{p['profile_rate']}`, not counted above; sampling slows the daemon a little)", "",
             "| work | wall clock per task |", "|---|---|"]
    lines += [f"| {what} | {ms(s)} |" for what, s in r["profile"]]
    return "\n".join(lines)


# --- the analysis: each paragraph from the figures it speaks of ------------------------


def analysis(r: Figures) -> list[str | None]:
    return [overhead_analysis(r), engines_analysis(r), host_analysis(r), copy_analysis(r), drain_analysis(r),
            multi_analysis(r), scaling_analysis(r), resident_analysis(r)]


def overhead_analysis(r: Figures) -> str | None:
    o = r.get("overhead")
    if not o:
        return None
    limit = r["targets"]["overhead_ratio_max"]
    sentences = []
    for engine, name in ENGINES.items():
        if engine not in o:
            sentences.append(f"{name} was not measured in this run ({r['engines'][engine].get('reason', '')}).")
            continue
        e = o[engine]
        daemon, bare = med(e["daemon"]), med(e["bare"])
        daemon_st, bare_st = stage_medians(e, "daemon"), stage_medians(e, "bare")
        verdict = "within" if daemon / bare <= limit else "over"
        sentence = (f"On {name}, a trivial task took {ms(daemon)} through the daemon and {ms(bare)} in the bare "
                    f"loop: {times(daemon / bare)}, {signed_ms(daemon - bare)} a task, {verdict} the "
                    f"{times(limit)} target.")
        if "start" in bare_st:
            sentence += f" Created → started alone is {pct(bare_st['start'], bare)} of the bare loop's median."
        added = [f"{signed_ms(daemon_st[k] - bare_st[k])} {DAEMON_WORK[k]}" for k in DAEMON_WORK
                 if k in daemon_st and k in bare_st]
        if added:
            sentence += " Stage by stage, daemon minus bare (medians): " + "; ".join(added) + "."
        cpu = cpu_sentence(e, daemon)
        sentence += f" {cpu[0].upper()}{cpu[1:]}."
        sentences.append(sentence)
    return "**Per-task overhead.** " + " ".join(sentences)


def cpu_sentence(e: Figures, per_task: float) -> str:
    """Lower case, no full stop: it is used inside a note and as a sentence."""
    cpu = e["cpu_per_task_secs"]
    if cpu <= 0:  # the rounds' CPU less the empty runs' is within the start-up's own variation
        return (f"the daemon's own CPU time per task is too small to tell from its start-up cost "
                f"({ms(e['startup_cpu_secs'])} a run) in this run")
    return f"the daemon's own CPU time is {ms(cpu)} a task, {pct(cpu, per_task)} of its per-task wall time"


def engines_analysis(r: Figures) -> str | None:
    o = r.get("overhead", {})
    if not all(e in o for e in ENGINES):
        return None
    d, p = o["docker"], o["podman"]
    d_st, p_st = stage_medians(d, "bare"), stage_medians(p, "bare")
    text = (f"**Podman beside Docker.** In the same run, Podman's bare loop took {times(med(p['bare']) / med(d['bare']))} "
            f"Docker's ({ms(med(p['bare']))} against {ms(med(d['bare']))}) and the daemon on Podman "
            f"{times(med(p['daemon']) / med(d['daemon']))} the daemon on Docker; the daemon's extra per task is "
            f"{signed_ms(med(p['daemon']) - med(p['bare']))} on Podman and {signed_ms(med(d['daemon']) - med(d['bare']))} "
            "on Docker.")
    common = [k for k, _, _ in STAGES if k in d_st and k in p_st]
    if common:
        widest = max(common, key=lambda k: abs(p_st[k] - d_st[k]))
        label = next(bare for k, _, bare in STAGES if k == widest)
        text += (f" The engines differ most in *{label}* of the bare loop: {ms(p_st[widest])} on Podman, "
                 f"{ms(d_st[widest])} on Docker.")
    return text


def host_analysis(r: Figures) -> str | None:
    h = r.get("host")
    if not h or not h["fsync"] or "overhead" not in r:
        return None
    p = r["params"]
    slow = sum(1 for t in h["fsync"] if t > p["slow_fsync_secs"])
    return (f"**The host.** Through the run the one-minute load average had a median of {num(med(h['load']))} "
            f"(highest {num(max(h['load']))}) on {r['machine']['cpu_cores']} cores, and the probe's fsync'd "
            f"{num(p['fsync_probe_bytes'] / 1024)} KiB write took {ms(med(h['fsync']))} at the median and over "
            f"{ms(p['slow_fsync_secs'])} in {slow} of {len(h['fsync'])} samples (slowest {ms(max(h['fsync']))}). "
            "The daemon makes each stage of a task durable with writes like that one before it moves on, and the "
            "bare loop makes none, so a slow disk widens the per-task gap while the engine's own work is common to "
            "both sides.")


def drain_analysis(r: Figures) -> str | None:
    d = r.get("drain")
    if not d:
        return None
    n, cap, bare = d["tasks"], d["capacity"], d["bare_per_task"]
    ideal, serial = n / cap * bare, n * bare
    return (f"**Queue drain.** {n} queued tasks at capacity {cap} drained in {secs(d['makespan'])}. The ideal, "
            f"{n}/{cap} × the serial bare median of {secs(bare)}, is {secs(ideal)} ({times(d['makespan'] / ideal)} "
            f"against the {times(r['targets']['drain_ratio_max'])} target). It assumes the engine starts {cap} "
            f"containers in the time of one: the bare loop with {cap} threads drained the same {n} containers in "
            f"{secs(d['bare_parallel'])}, {times(serial / d['bare_parallel'])} faster than one after the other "
            f"({n} × {secs(bare)} = {secs(serial)}), on {r['machine']['cpu_cores']} cores. Against that "
            f"same-parallelism baseline the daemon's makespan is {times(d['makespan'] / d['bare_parallel'])}. One "
            f"task per poll interval would take {secs(n * r['params']['poll_interval_secs'])}.")


def copy_analysis(r: Figures) -> str | None:
    c = r.get("copy")
    if not c:
        return None
    copy, bind = med(c["copy"]), med(c["bind"])
    text = (f"**Copy mode.** On Docker a trivial task took {ms(copy)} with its workspace copied through the "
            f"engine's API and {ms(bind)} with it bind-mounted: {times(copy / bind)}, {signed_ms(copy - bind)} a "
            "task. That is the fixed cost of one `put_archive` before the start and one `get_archive` after the "
            "exit (and the archive's checks) for a workspace holding only `task.json`; inputs and outputs add their "
            "own transfer on top.")
    if (d := r.get("overhead", {}).get("docker")) is not None:
        text += (f" Bind mode here is the overhead's daemon on Docker ({ms(med(d['daemon']))} there) measured at "
                 "another time of the run: the two differ by the host's load between them, which is why the modes "
                 "are compared only with each other, round by round.")
    return text


def multi_analysis(r: Figures) -> str | None:
    m = r.get("multi")
    if not m:
        return None
    n, one, two, same = m["tasks"], m["one"], m["two"], m["one_same_slots"]
    text = (f"**Two engines.** {n} tasks drained in {secs(one['makespan'])} on one engine at capacity {slots(one)}, "
            f"in {secs(two['makespan'])} over two engines at {slots(two)} ({times(two['makespan'] / one['makespan'])} "
            f"the one-engine time), and in {secs(same['makespan'])} on one engine at capacity {slots(same)}. The "
            f"daemon spread them: {per_engine(two)}.")
    load = f", at a median load average of {num(med(r['host']['load']))}," if r.get("host") else ""
    text += (f" Both engines run on this machine's {r['machine']['cpu_cores']} cores{load} so the second engine "
             "brings slots and a second `dockerd`, not CPU: this compares ways of filling one machine (two "
             f"engines against one engine with as many slots: {times(same['makespan'] / two['makespan'])} in "
             "makespan, one / two), not what a second host would add. On separate hosts each engine would have "
             "its own CPU and disk; here what the figures show is the dispatch working (every engine used, never "
             "over its capacity) and what it costs.")
    second, system = m["second_engine"]["storage_driver"], r["engines"]["docker"]["storage_driver"]
    if second != system:  # a faster driver alone makes its engine's containers start sooner
        text += (f" The engines also differ in storage driver ({second} on the private engine, {system} on the "
                 "system one), so part of any difference between the layouts is the driver's.")
    return text


def scaling_analysis(r: Figures) -> str | None:
    s = r.get("scaling")
    if not s:
        return None
    base, bare_base = med(s[0]["daemon"]), med(s[0]["bare"])
    each = [f"capacity {c['capacity']}: daemon {times(base / med(c['daemon']))}, bare "
            f"{times(bare_base / med(c['bare']))}" for c in s[1:]]
    return (f"**Scaling.** {r['params']['scaling_tasks']} `{r['params']['scaling_script']}` tasks at each capacity, "
            f"speedup over capacity {s[0]['capacity']}: " + "; ".join(each) + ". On a row, the difference between "
            "the two speedups is the daemon's; what both lose against the capacity itself is the host's.")


def resident_analysis(r: Figures) -> str | None:
    m = r.get("resident")
    if not m:
        return None
    size, p = m["transfer_bytes"], r["params"]
    up, plain = med(m["daemon_rates"]), med(m["plain_rates"])
    return (f"**Memory, transfers, idle.** Idle, the daemon's RSS was {mib(med(m['idle_rss']))} and it used "
            f"{pct(m['idle_cpu_secs'], m['idle_secs'])} of one core over {secs(m['idle_secs'])} "
            f"({m['idle_requests']} requests: a poll every {secs(p['poll_interval_secs'])}, a heartbeat every "
            f"{secs(p['heartbeat_interval_secs'])}). While it uploaded a {mib(size)} output its RSS grew by "
            f"{mib(med(m['upload_growth']))} ({pct(med(m['upload_growth']), size)} of the file), while it downloaded "
            f"a {mib(size)} input by {mib(med(m['download_growth']))} ({pct(med(m['download_growth']), size)}). Its "
            f"upload reached {num(up / MIB)} MiB/s against {num(plain / MIB)} MiB/s for a plain streaming httpx "
            f"upload of the same file ({times(up / plain)}); both are received by the dev server, whose multipart "
            "parser is pure Python in the benchmark process, so the rate is the server's as much as the client's. "
            f"From the last byte stored to `complete` the daemon took {ms(med(m['after_upload']))} at the median "
            "(the upload's journal line and the stage record, each fsync'd, then the report), which is why the "
            "transfer is timed to the last byte stored.")


DESIGN_NOTES = """\
These are the code's state, not this run's measurements.

- `Scheduler.write_status` used to run on every runner phase change and journal save. The scheduler now marks \
the status dirty and one thread rewrites `status.json` at most every `STATUS_EVERY_SECS`; a stop step still \
writes at once.
- The runner inspects the container before `wait` only when resuming a journaled task, and `DockerBackend.wait` \
inspects for OOMKilled only after a non-zero exit (an OOM kill never exits zero).
- Not applied: `DockerBackend.save_logs` makes two `logs()` calls, each preceded by docker-py's TTY inspect. One \
`GET /containers/{id}/logs` for both streams, split by its frame headers would do it in one call, but needs \
docker-py's private socket helpers.
- Not applied: `Journal.save` could skip the directory fsync when a record is not new, and the runner the \
UPLOADED record when nothing was uploaded. A lost rename would then replay an older stage, and re-upload a file \
whose id was in the lost record; every stage stays durable instead."""


# --- command line ------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("figures", type=Path, help="the JSON bench.py wrote")
    parser.add_argument("--out", type=Path, help="where to write the page (default: the figures' path, .md)")
    args = parser.parse_args(argv)
    figures = json.loads(args.figures.read_text(encoding="utf-8"))
    out = args.out or args.figures.with_suffix(".md")
    out.write_text(render(figures), encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
