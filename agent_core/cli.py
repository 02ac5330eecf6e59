"""The `agent-core` command. Each command is a few lines; the work is in the modules.

Exit codes: 0 success, 1 runtime failure, 2 usage or configuration error.
An `AgentError` becomes one line on stderr, never a traceback.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import click

from agent_core import __version__, logs, process
from agent_core import config as configmod
from agent_core.config import DEFAULT_ENGINE_NAME
from agent_core.client import Client
from agent_core.errors import AgentError, NotRunning, UsageError
from agent_core.livestatus import EngineEntry, LiveStatus, TaskEntry, age

log = logging.getLogger("agent_core")


class _Group(click.Group):
    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """Each command's whole first sentence, wrapped (click cuts it at the line's end with "...")."""
        rows = [(name, cmd.get_short_help_str(limit=1000)) for name in self.list_commands(ctx)
                if (cmd := self.get_command(ctx, name)) is not None and not cmd.hidden]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except AgentError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(e.exit_code)


def _remember_config(ctx: click.Context, _param: click.Parameter, value: Path | None) -> None:
    if value is not None:
        ctx.ensure_object(dict)["config"] = value


def _config_option(envvar: str | None = None):
    return click.option("--config", type=click.Path(dir_okay=False, path_type=Path), envvar=envvar,
                        expose_value=False, callback=_remember_config,
                        help="Config file (default ./config.toml).")


def _config_path(ctx: click.Context) -> Path:
    return Path(ctx.ensure_object(dict).get("config") or configmod.DEFAULT_CONFIG_NAME)


def _warn(ctx: click.Context, cfg: configmod.Config) -> None:
    """The config's warnings as plain lines on stderr, once per command however often it is loaded."""
    obj = ctx.ensure_object(dict)
    if not obj.get("warned"):
        obj["warned"] = True
        for line in configmod.warnings(cfg):
            click.echo(f"warning: {line}", err=True)


def _load(ctx: click.Context, path: Path | None = None) -> configmod.Config:
    cfg = configmod.load(path or _config_path(ctx))
    _warn(ctx, cfg)
    return cfg


EPILOG = """\b
Getting started:
  agent-core init --server https://aaas.example.org   write ./config.toml (0600)
  agent-core register --token <TOKEN>                  store service_id and api_key
  agent-core doctor                                    check Docker, image, server
  agent-core run                                       serve tasks (or run-detached)

\b
The config file is --config PATH, else $AGENT_CORE_CONFIG, else ./config.toml.
Exit codes: 0 success, 1 runtime failure (server, Docker, a check failed),
2 usage or configuration error (fix the command line or the config).
"""


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]}, epilog=EPILOG)
@click.version_option(__version__, prog_name="agent-core")
@_config_option(envvar="AGENT_CORE_CONFIG")
def cli() -> None:
    """Run OpenAaaS tasks in Docker containers on this host.

    The agent polls the server for tasks, runs each in a fresh container with its
    input files under /workspace, uploads the outputs and reports the result.
    """
    logs.setup("warning")


@cli.command()
@_config_option()
@click.option("--force", is_flag=True,
              help="Replace an existing file; the old one is kept as <file>.bak-<time> (0600).")
@click.option("--server", "base_url", metavar="URL", help="Set server.base_url.")
@click.pass_context
def init(ctx: click.Context, force: bool, base_url: str | None) -> None:
    """Write a commented default config file (0600); nothing is written when it fails."""
    path = configmod.init(_config_path(ctx), force=force, base_url=base_url, say=click.echo)
    click.echo(f"wrote {path}")
    click.echo(f"next: check server.base_url, then `agent-core --config {path} register --token <token>`")


@cli.command()
@_config_option()
@click.option("--token", envvar="AGENT_CORE_REGISTRATION_TOKEN",
              help="One-time registration token (or env AGENT_CORE_REGISTRATION_TOKEN; prompted when omitted).")
@click.option("--name", help="A name for this agent in logs and status.")
@click.option("--force", is_flag=True, help="Register again although credentials exist.")
@click.pass_context
def register(ctx: click.Context, token: str | None, name: str | None, force: bool) -> None:
    """Register with the server once; stores service_id and api_key in the config."""
    cfg = _load(ctx)
    if cfg.agent.registered and not force:
        click.echo(f"already registered as service {cfg.agent.service_id} "
                   "(use --force to register again with a new token)")
        return
    _register(cfg, token, name)


def _register(cfg: configmod.Config, token: str | None, name: str | None = None) -> configmod.Config:
    """Register with `token` (asked for on a terminal when None), store the credentials, return the new config."""
    cfg.require_server()
    if not token:
        if not sys.stdin.isatty():
            raise UsageError("no registration token: pass --token (stdin is not a terminal)")
        token = click.prompt("registration token", hide_input=True)
    try:
        with Client.from_config(cfg, registered=False) as client:
            reg = client.register(token, cfg.executor.total_capacity)
    except AgentError as e:
        raise type(e)(logs.mask(str(e), token)) from None
    changes: dict[str, Any] = {"agent.service_id": reg.service_id, "agent.api_key": reg.api_key}
    if name:
        changes["agent.name"] = name
    configmod.update(cfg.path, changes)
    click.echo(f"registered: service id {reg.service_id}")
    return configmod.load(cfg.path)  # its warnings were said when it was first loaded


def _status(cfg: configmod.Config, live: LiveStatus | None, now: float) -> dict[str, Any]:
    ex = cfg.executor
    return {
        "config": str(cfg.path),
        "data_dir": str(cfg.paths.data_dir),
        "server": {"base_url": cfg.server.base_url, "poll_interval_secs": cfg.server.poll_interval_secs,
                   "rate_limit_per_minute": cfg.server.rate_limit_per_minute},
        "registered": cfg.agent.registered,
        "service_id": cfg.agent.service_id,
        "name": cfg.agent.name,
        "executor": {"executor_type": ex.executor_type, "image": ex.image, "capacity": ex.total_capacity,
                     "timeout_minutes": ex.timeout_minutes, "memory_limit": ex.memory_limit,
                     "network_mode": ex.network_mode},
        "daemon": {"running": live is not None, **(live.with_ages(now) if live is not None else {})},
        "warnings": process.same_service_elsewhere(cfg),
    }


def _secs(value: float | None) -> str:
    return f"{value:.0f} s" if value is not None else "?"


def _mib(n: Any) -> str:
    return f"{n / 1024**2:.1f}" if isinstance(n, (int, float)) else "?"


def _progress(p: dict[str, int]) -> str:
    """ "down 1.0/2.0 MiB, up 1/3 files 0.5/1.2 MiB" from a task's progress (parts may be absent)."""
    parts = []
    if p.get("down_total") or p.get("down_bytes"):
        parts.append(f"down {_mib(p.get('down_bytes', 0))}/{_mib(p.get('down_total'))} MiB")
    if p.get("up_files_total") or p.get("up_files"):
        parts.append(f"up {p.get('up_files', 0)}/{p.get('up_files_total', '?')} files "
                     f"{_mib(p.get('up_bytes', 0))}/{_mib(p.get('up_bytes_total'))} MiB")
    return ", ".join(parts)


def _task_line(t: TaskEntry, now: float) -> str:
    stage = f"{_secs(t.age(now)):>7}"
    if age(t.stage_since, now) is not None:
        stage += f" (stage {_secs(age(t.stage_since, now))})"
    progress = _progress(t.progress)
    return (f"  {t.id}  {t.stage:<11} {stage}  {progress + '  ' if progress else ''}"
            f"container {t.container or '-'}{f' on {t.engine}' if t.engine and t.engine != DEFAULT_ENGINE_NAME else ''}")


def _pool_line(e: EngineEntry, now: float) -> str:
    """One engine of several: "docker 24.0.7 at unix://..., 1 of 2 tasks, bind", or since when it is away."""
    if e.up:
        said = e.seen.line if e.seen else f"reachable at {e.where}"
    else:
        said = f"NOT reachable at {e.where} for {_secs(age(e.down_since, now))} (no new tasks)"
    return f"{said}, {e.running} of {e.capacity if e.capacity is not None else '?'} tasks, {e.workspace or '?'}"


def _engine_line(live: LiveStatus) -> str | None:
    """The engine as last reached ("docker 20.10.24 at unix://..."), or that it is not reachable now."""
    if live.engine_ok is None:  # a daemon that does not say
        return None
    if not live.engine_ok:
        where = f" at {live.engine.where}" if live.engine else ""
        return f"NOT reachable{where} (no new tasks)"
    return live.engine.line if live.engine else "reachable"


def _daemon_lines(live: LiveStatus, name: str, now: float) -> list[tuple[str, str]]:
    reason = f": {live.reason}" if live.reason else ""
    lines = [("daemon", f"running (pid {live.pid}, {live.state_name}{reason})")]
    if live.name and live.name != name:
        lines.append(("runs as", f"{live.name} (the name when it started)"))
    if age(live.started_at, now) is not None:
        lines.append(("up", _secs(age(live.started_at, now))))
    if live.engines:
        lines += [(f"engine {e.name}", _pool_line(e, now)) for e in live.engines]
    elif (engine := _engine_line(live)) is not None:
        lines.append(("engine", engine))
    requests = live.requests
    if requests.get("limit_per_minute"):
        lines.append(("requests", f"{requests.get('sent_last_window', '?')} in the last minute of "
                                  f"{requests['limit_per_minute']}/min "
                                  f"({requests.get('heartbeat_reserve', '?')} kept for heartbeats)"))
    for label, when in (("last poll", live.last_poll), ("last heartbeat", live.last_heartbeat)):
        if age(when, now) is not None:
            lines.append((label, f"{_secs(age(when, now))} ago"))
    for kind, error in live.errors.items():
        lines.append((f"last {kind} error", f"{_secs(age(error.at, now))} ago: {error.message}"))
    capacity = f" of capacity {live.capacity}" if live.capacity else ""
    lines.append(("tasks", f"{len(live.tasks)}{capacity}" if live.tasks else "none running"))
    return lines


def _print_status(data: dict[str, Any], live: LiveStatus | None, now: float) -> None:
    ex = data["executor"]
    timeout = f"{ex['timeout_minutes']:g} min" if ex["timeout_minutes"] else "none"
    lines = [
        ("config", data["config"]),
        ("data dir", data["data_dir"]),
        ("server", f"{data['server']['base_url'] or '(not set)'} (poll every "
                   f"{data['server']['poll_interval_secs']:g} s)"),
        ("name", data["name"]),
        ("registered", f"yes, service {data['service_id']}" if data["registered"] else "no"),
        ("executor", f"{ex['executor_type']}, image {ex['image']}, capacity {ex['capacity']}, "
                     f"timeout {timeout}, memory {ex['memory_limit'] or 'no limit'}, "
                     f"network {ex['network_mode']}"),
        *(_daemon_lines(live, data["name"], now) if live is not None else [("daemon", "not running")]),
        *(("warning", w) for w in data.get("warnings") or []),
    ]
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        click.echo(f"{key:<{width}}  {value}")
    for t in live.tasks if live is not None else ():
        click.echo(_task_line(t, now))


@cli.command()
@_config_option()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Show the config, the registration, and the running daemon's state, tasks and last errors."""
    cfg = _load(ctx)
    live, now = process.read_status(cfg.paths.data_dir), time.time()
    data = _status(cfg, live, now)
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        _print_status(data, live, now)


_log_options = [
    click.option("--log-level", type=click.Choice(configmod.LOG_LEVELS), help="Overrides logging.level."),
    click.option("--log-format", type=click.Choice(configmod.LOG_FORMATS), help="Overrides logging.format."),
    click.option("--burst", is_flag=True, help="Leave when the queue is empty and no task runs."),
]
# where run-detached's child logs, size-rotated per logging.max_bytes / logging.backups
_log_file_option = click.option("--log-file", type=click.Path(dir_okay=False, path_type=Path), hidden=True)


def _with_run_options(f):
    for option in reversed(_log_options):
        f = option(f)
    return f


def _base_url(answer: str) -> str:
    try:
        return configmod.normalise_base_url(answer)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None  # click.prompt shows it and asks again


def _first_start(path: Path) -> None:
    """Ask what a first start needs and write the file only after the last answer (Ctrl+C or EOF: no file)."""
    default = configmod.default_value
    click.echo(f"no config file at {path}: answer a few questions to write one (Enter takes the default)")
    changes = {
        "server.base_url": click.prompt("server URL", default=default("server.base_url"), value_proc=_base_url),
        "paths.data_dir": click.prompt("data dir", default=default("paths.data_dir")),
        "executor.image": click.prompt("executor image", default=default("executor.image")),
        "executor.capacity": click.prompt("capacity (tasks at once)", default=default("executor.capacity"),
                                          type=click.IntRange(min=1)),
    }
    configmod.init(path, changes=changes)
    click.echo(f"wrote {path}")


def _config_to_run(ctx: click.Context, interactive: bool) -> configmod.Config:
    """On a terminal, ask for what is missing, as the reference agent does: the file, then a token."""
    terminal = sys.stdin.isatty()
    if interactive and not terminal:
        raise UsageError("run --interactive needs a terminal (stdin is not one)")
    path = _config_path(ctx)
    if terminal and not path.exists():
        _first_start(path)
    cfg = _load(ctx, path)
    if terminal and not cfg.agent.registered:
        cfg = _register(cfg, None)
    return cfg


@cli.command()
@_config_option()
@_with_run_options
@click.option("--interactive", is_flag=True,
              help="Ask for a missing config file or registration token (needs a terminal; on one, run asks anyway).")
@_log_file_option
@click.pass_context
def run(ctx: click.Context, log_level: str | None, log_format: str | None, burst: bool, interactive: bool,
        log_file: Path | None) -> None:
    """Run the agent in the foreground (Ctrl+C: drain; again: cancel; a third time: exit at once)."""
    from agent_core.daemon import serve  # keeps Docker out of the other commands' start-up

    cfg = _config_to_run(ctx, interactive)
    for line in process.same_service_elsewhere(cfg):
        click.echo(f"warning: {line}", err=True)
    logs.setup(log_level or cfg.logging.level, log_format or cfg.logging.format, stream=sys.stderr,
               secrets=[cfg.agent.api_key or ""], file=log_file, max_bytes=cfg.logging.max_bytes,
               backups=cfg.logging.backups)
    ctx.exit(serve(cfg, burst=burst))


@cli.command("run-detached")
@_config_option()
@_with_run_options
@click.pass_context
def run_detached(ctx: click.Context, log_level: str | None, log_format: str | None, burst: bool) -> None:
    """Start the agent in the background, logging to <data_dir>/agent.log (rotated by size)."""
    cfg = _load(ctx)
    cfg.require_registration()
    args = [*(["--log-level", log_level] if log_level else []),
            *(["--log-format", log_format] if log_format else []), *(["--burst"] if burst else [])]
    pid = process.detach(cfg.path, cfg.paths.data_dir, args)
    click.echo(f"agent started (pid {pid}); log: {cfg.paths.data_dir / process.LOGFILE}")


@cli.command()
@_config_option()
@click.option("--force", is_flag=True, help="Cancel running tasks at once instead of letting them finish.")
@click.pass_context
def stop(ctx: click.Context, force: bool) -> None:
    """Stop this data dir's agent: drain, then cancel, then kill; says how far it got.

    While a stop is under way, a plain `stop` only reports it (exit 0); `--force` cancels.
    """
    cfg = _load(ctx)
    try:
        process.stop(cfg.paths.data_dir, force=force, grace=cfg.agent.shutdown_grace_secs, say=click.echo)
    except NotRunning as e:
        click.echo(str(e))


@cli.command("doctor")
@_config_option()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def doctor_command(ctx: click.Context, as_json: bool) -> None:
    """Check config, data dir, Docker, image, server, credentials, disk and GPU, with fixes."""
    from agent_core import doctor  # keeps Docker out of the other commands' start-up

    checks = doctor.run(_config_path(ctx))  # its warnings are lines of the report, not stderr
    click.echo(doctor.to_json(checks) if as_json else doctor.render(checks))
    ctx.exit(doctor.exit_code(checks))


@cli.group(cls=_Group)
def service() -> None:
    """Install or remove a systemd unit that runs `agent-core run` for this config."""


_user_option = click.option("--user", is_flag=True,
                            help="A user unit (~/.config/systemd/user), not a system one.")
_instance_option = click.option("--instance", metavar="NAME",
                                help="One of several agents on this host: the template agent-core@.service, "
                                     "running NAME.toml of the config's folder.")


@service.command("install")
@_config_option()
@_user_option
@click.option("--print", "print_only", is_flag=True, help="Only print the unit.")
@_instance_option
@click.pass_context
def service_install(ctx: click.Context, user: bool, print_only: bool, instance: str | None) -> None:
    """Write agent-core.service (or agent-core@NAME) and print how to enable it."""
    from agent_core import service as servicemod

    servicemod.install(_load(ctx), user=user, print_only=print_only, say=click.echo, instance=instance)


@service.command("uninstall")
@_user_option
@_instance_option
def service_uninstall(user: bool, instance: str | None) -> None:
    """Remove agent-core.service or an agent-core@NAME instance (and its enable link)."""
    from agent_core import service as servicemod

    servicemod.uninstall(user=user, say=click.echo, instance=instance)


def main() -> None:
    # SIGPIPE stays ignored (Python's default): a server closing a connection mid-upload must be an
    # error `run` handles, not a silent death. A reader leaving `status | head` is click's EPIPE exit.
    cli(prog_name="agent-core")
