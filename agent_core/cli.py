"""The `agent-core` command. Each command is a few lines; the work is in the modules.

Exit codes: 0 success, 1 runtime failure, 2 usage or configuration error.
An `AgentError` becomes one line on stderr, never a traceback.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

import click

from agent_core import __version__, logs, process
from agent_core import config as configmod
from agent_core.client import Client
from agent_core.errors import AgentError, NotRunning, UsageError

log = logging.getLogger("agent_core")


class _Group(click.Group):
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


def _load(ctx: click.Context) -> configmod.Config:
    return configmod.load(_config_path(ctx))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="agent-core")
@_config_option(envvar="AGENT_CORE_CONFIG")
def cli() -> None:
    """Run OpenAaaS tasks in Docker containers on this host."""
    logs.setup("warning")


@cli.command()
@_config_option()
@click.option("--force", is_flag=True, help="Overwrite an existing file (its credentials are lost).")
@click.option("--server", "base_url", metavar="URL", help="Set server.base_url.")
@click.pass_context
def init(ctx: click.Context, force: bool, base_url: str | None) -> None:
    """Write a commented default config file."""
    path = configmod.init(_config_path(ctx), force=force, base_url=base_url)
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
    """Register with the server; stores service_id and api_key in the config."""
    cfg = _load(ctx)
    if cfg.agent.registered and not force:
        click.echo(f"already registered as service {cfg.agent.service_id} "
                   "(use --force to register again with a new token)")
        return
    cfg.require_server()
    if not token:
        if not sys.stdin.isatty():
            raise UsageError("no registration token: pass --token (stdin is not a terminal)")
        token = click.prompt("registration token", hide_input=True)
    try:
        with Client.from_config(cfg, registered=False) as client:
            reg = client.register(token, cfg.executor.capacity)
    except AgentError as e:
        raise type(e)(logs.mask(str(e), token)) from None
    changes: dict[str, Any] = {"agent.service_id": reg.service_id, "agent.api_key": reg.api_key}
    if name:
        changes["agent.name"] = name
    configmod.update(cfg.path, changes)
    click.echo(f"registered: service id {reg.service_id}")


def _status(cfg: configmod.Config) -> dict[str, Any]:
    ex = cfg.executor
    live = process.read_status(cfg.paths.data_dir)
    return {
        "config": str(cfg.path),
        "data_dir": str(cfg.paths.data_dir),
        "server": {"base_url": cfg.server.base_url, "poll_interval_secs": cfg.server.poll_interval_secs,
                   "rate_limit_per_minute": cfg.server.rate_limit_per_minute},
        "registered": cfg.agent.registered,
        "service_id": cfg.agent.service_id,
        "name": cfg.agent.name,
        "executor": {"executor_type": ex.executor_type, "image": ex.image, "capacity": ex.capacity,
                     "timeout_minutes": ex.timeout_minutes, "memory_limit": ex.memory_limit,
                     "network_mode": ex.network_mode},
        "daemon": {"running": live is not None, **(live or {})},
    }


def _print_status(data: dict[str, Any]) -> None:
    daemon = data["daemon"]
    ex = data["executor"]
    timeout = f"{ex['timeout_minutes']:g} min" if ex["timeout_minutes"] else "none"
    lines = [
        ("config", data["config"]),
        ("data dir", data["data_dir"]),
        ("server", f"{data['server']['base_url'] or '(not set)'} (poll every "
                   f"{data['server']['poll_interval_secs']:g} s)"),
        ("registered", f"yes, service {data['service_id']}" if data["registered"] else "no"),
        ("executor", f"{ex['executor_type']}, image {ex['image']}, capacity {ex['capacity']}, "
                     f"timeout {timeout}, memory {ex['memory_limit'] or 'no limit'}, "
                     f"network {ex['network_mode']}"),
        ("daemon", f"running (pid {daemon['pid']}, {daemon.get('state', 'starting')})"
                   if daemon["running"] else "not running"),
    ]
    if daemon["running"]:
        requests = daemon.get("requests") or {}
        if requests.get("limit_per_minute"):
            lines.append(("requests", f"{requests['sent_last_window']} in the last minute of "
                                      f"{requests['limit_per_minute']}/min "
                                      f"({requests['heartbeat_reserve']} kept for heartbeats)"))
        for key in ("last_poll", "last_heartbeat"):
            if daemon.get(key):
                lines.append((key.replace("_", " "), f"{_ago(daemon[key])} ago"))
        tasks = daemon.get("tasks") or []
        lines.append(("tasks", str(len(tasks)) if tasks else "none running"))
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        click.echo(f"{key:<{width}}  {value}")
    for t in (daemon.get("tasks") or []) if daemon["running"] else []:
        click.echo(f"  {t['id']}  {t['stage']:<11} {t['age_secs']:>7.0f} s  container {t['container'] or '-'}")


def _ago(ts: float) -> str:
    return f"{max(0.0, time.time() - ts):.0f} s"


@cli.command()
@_config_option()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Show the configuration, the registration and the running daemon."""
    data = _status(_load(ctx))
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        _print_status(data)


_log_options = [
    click.option("--log-level", type=click.Choice(configmod.LOG_LEVELS), help="Overrides logging.level."),
    click.option("--log-format", type=click.Choice(configmod.LOG_FORMATS), help="Overrides logging.format."),
    click.option("--burst", is_flag=True, help="Leave when the queue is empty and no task runs."),
]


def _with_run_options(f):
    for option in reversed(_log_options):
        f = option(f)
    return f


@cli.command()
@_config_option()
@_with_run_options
@click.pass_context
def run(ctx: click.Context, log_level: str | None, log_format: str | None, burst: bool) -> None:
    """Run the agent in the foreground (Ctrl+C: drain; again: cancel; a third time: exit at once)."""
    from agent_core.daemon import serve  # keeps Docker out of the other commands' start-up

    cfg = _load(ctx)
    logs.setup(log_level or cfg.logging.level, log_format or cfg.logging.format, stream=sys.stderr,
               secrets=[cfg.agent.api_key or ""])
    ctx.exit(serve(cfg, burst=burst))


@cli.command("run-detached")
@_config_option()
@_with_run_options
@click.pass_context
def run_detached(ctx: click.Context, log_level: str | None, log_format: str | None, burst: bool) -> None:
    """Start the agent in the background, logging to <data_dir>/agent.log."""
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
    """Stop the background agent: drain, then cancel, then kill."""
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
    """Check config, data dir, Docker, image, server, credentials (one heartbeat), disk and GPU."""
    from agent_core import doctor  # keeps Docker out of the other commands' start-up

    checks = doctor.run(_config_path(ctx))
    click.echo(doctor.to_json(checks) if as_json else doctor.render(checks))
    ctx.exit(doctor.exit_code(checks))


@cli.group()
def service() -> None:
    """Install or remove a systemd unit that runs `agent-core run` for this config."""


_user_option = click.option("--user", is_flag=True,
                            help="A user unit (~/.config/systemd/user), not a system one.")


@service.command("install")
@_config_option()
@_user_option
@click.option("--print", "print_only", is_flag=True, help="Only print the unit.")
@click.pass_context
def service_install(ctx: click.Context, user: bool, print_only: bool) -> None:
    """Write agent-core.service and print how to enable it."""
    from agent_core import service as servicemod

    servicemod.install(_load(ctx), user=user, print_only=print_only, say=click.echo)


@service.command("uninstall")
@_user_option
def service_uninstall(user: bool) -> None:
    """Remove agent-core.service (and its enable link)."""
    from agent_core import service as servicemod

    servicemod.uninstall(user=user, say=click.echo)


def main() -> None:
    if hasattr(signal, "SIGPIPE"):  # `agent-core status | head` must not end in a traceback
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    cli(prog_name="agent-core")
