"""`agent-core service install|uninstall`: a systemd unit that runs `agent-core run` for one config.

The unit stops the agent with SIGTERM, which starts the drain ladder, and gives it
`shutdown_grace_secs` plus a margin for the cancel step before systemd kills it.
`AGENT_CORE_SYSTEMD_DIR` overrides where the unit goes (tests, packaging).

With `--instance NAME` (several services on one host) it writes the template
`agent-core@.service`, which runs `<folder>/%i.toml`, and for the instance a drop-in
`agent-core@NAME.service.d/agent-core.conf` with that config's stop timeout: one template
per config folder, one `NAME.toml` and data dir per instance.
"""

from __future__ import annotations

import math
import os
import re
import sys
from pathlib import Path
from typing import Callable

from agent_core import process
from agent_core.config import Config
from agent_core.errors import AgentError
from agent_core.fsutil import write_atomic

UNIT_NAME = "agent-core.service"
TEMPLATE_NAME = "agent-core@.service"
DROPIN_NAME = "agent-core.conf"
_INSTANCE_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")  # also a file name: no / or ..
DIR_ENV = "AGENT_CORE_SYSTEMD_DIR"
SYSTEM_DIR = Path("/etc/systemd/system")
# after the grace, the cancel step stops containers (10 s each, in parallel) and reports the tasks
STOP_MARGIN_SECS = 60
RESTART_SECS = 10


def unit_dir(user: bool) -> Path:
    if os.environ.get(DIR_ENV):
        return Path(os.environ[DIR_ENV])
    if not user:
        return SYSTEM_DIR
    config_home = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config_home) / "systemd" / "user"


def agent_command() -> list[str]:
    """This installation's `agent-core` script when it sits beside the interpreter, else `python -m`.

    Not `which agent-core`: PATH may lead to another installation. Not resolved: a
    virtualenv's python is a symlink that must stay inside the virtualenv.
    """
    python = os.path.abspath(sys.executable)
    script = Path(python).parent / "agent-core"
    return [str(script)] if script.is_file() else [python, "-m", "agent_core"]


def _escape(value: str) -> str:
    """systemd expands %specifiers in every value and $VARS in ExecStart: make both literal."""
    return value.replace("%", "%%")


def _exec_arg(arg: str) -> str:
    arg = _escape(arg).replace("$", "$$")
    if re.search(r"[\s\"'\\;]", arg) or not arg:
        arg = '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return arg


def _unit_text(*, description: str, config_arg: str, folder: Path, user: bool,
               stop_secs: int | None) -> str:
    exec_start = " ".join([*(_exec_arg(a) for a in [*agent_command(), "--config"]), config_arg, "run"])
    # a user manager cannot order itself after system units such as docker.service
    after = "" if user else "Wants=network-online.target\nAfter=network-online.target docker.service\n"
    stop = "" if stop_secs is None else f"TimeoutStopSec={stop_secs}\n"
    return (
        "[Unit]\n"
        f"Description={description}\n"
        f"{after}"
        "\n[Service]\n"
        "Type=simple\n"
        f"ExecStart={exec_start}\n"
        f"WorkingDirectory={_escape(str(folder))}\n"
        "Restart=on-failure\n"
        f"RestartSec={RESTART_SECS}\n"
        "# exit 2 is a config or usage error: restarting cannot fix it\n"
        "RestartPreventExitStatus=2\n"
        "# SIGTERM drains: running tasks finish, then the cancel step follows by itself\n"
        "KillSignal=SIGTERM\n"
        f"{stop}"
        "UMask=0077\n"
        "\n[Install]\n"
        f"WantedBy={'default.target' if user else 'multi-user.target'}\n"
    )


def _stop_secs(cfg: Config) -> int:
    return math.ceil(cfg.agent.shutdown_grace_secs) + STOP_MARGIN_SECS


def render_unit(cfg: Config, *, user: bool) -> str:
    return _unit_text(description="agent-core: OpenAaaS execution node", config_arg=_exec_arg(str(cfg.path)),
                      folder=cfg.path.parent, user=user, stop_secs=_stop_secs(cfg))


def render_template(folder: Path, *, user: bool) -> str:
    """`agent-core@NAME` runs `<folder>/NAME.toml`; each instance's drop-in sets its stop timeout."""
    config_arg = _exec_arg(str(folder / "@INSTANCE@.toml")).replace("@INSTANCE@", "%i")
    return _unit_text(description="agent-core %i: OpenAaaS execution node", config_arg=config_arg,
                      folder=folder, user=user, stop_secs=None)


def render_dropin(cfg: Config) -> str:
    return f"[Service]\nTimeoutStopSec={_stop_secs(cfg)}\n"


def check_instance(cfg: Config, instance: str) -> None:
    """The instance's config is `<folder>/NAME.toml`, and no other config there shares its data dir."""
    if not _INSTANCE_RE.match(instance):
        raise AgentError(f"instance name {instance!r}: use letters, digits, '_', '.' and '-' (at most 64)")
    if cfg.path.name != f"{instance}.toml":
        raise AgentError(f"instance {instance!r} runs {cfg.path.parent / (instance + '.toml')}, but the "
                         f"config is {cfg.path}: rename it, or pass --config <folder>/{instance}.toml")
    from agent_core import config as configmod  # only this check reads the neighbours

    for other in sorted(cfg.path.parent.glob("*.toml")):
        if other.name == cfg.path.name:
            continue
        try:
            data_dir = configmod.load(other).paths.data_dir
        except AgentError:
            continue  # not an agent config, or a broken one: its own start will say so
        if data_dir == cfg.paths.data_dir:
            raise AgentError(f"{cfg.path.name} and {other.name} share the data dir {data_dir}: give each "
                             f"instance its own paths.data_dir (two agents cannot share one)")


def _systemctl(user: bool) -> str:
    return "systemctl --user" if user else "systemctl"


def _write(path: Path, text: str, user: bool) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, text, mode=0o644)  # units are public; these hold no secret
    except OSError as e:
        hint = "" if user else " (run it as root, or use --user)"
        raise AgentError(f"cannot write {path}: {e.strerror or e}{hint}") from None


def _working_dir(unit_text: str) -> str | None:
    m = re.search(r"^WorkingDirectory=(.*)$", unit_text, re.MULTILINE)
    return m.group(1) if m else None


def install(cfg: Config, *, user: bool, print_only: bool, say: Callable[[str], None],
            instance: str | None = None) -> Path | None:
    if instance is not None:
        check_instance(cfg, instance)
        template = render_template(cfg.path.parent, user=user)
        if print_only:
            say(f"# {TEMPLATE_NAME}\n{template}\n# agent-core@{instance}.service.d/{DROPIN_NAME}\n"
                f"{render_dropin(cfg)}".rstrip("\n"))
            return None
        folder = unit_dir(user)
        path = folder / TEMPLATE_NAME
        try:
            existing = path.read_text(encoding="utf-8")
        except OSError:
            existing = None
        if existing is not None and _working_dir(existing) != _working_dir(template):
            raise AgentError(f"{path} already runs the configs of {_working_dir(existing)}: one template "
                             f"serves one config folder; put {cfg.path.name} there")
        _write(path, template, user)
        _write(folder / f"agent-core@{instance}.service.d" / DROPIN_NAME, render_dropin(cfg), user)
        say(f"wrote {path} and its instance {instance}")
        unit = f"agent-core@{instance}"
    else:
        text = render_unit(cfg, user=user)
        if print_only:
            say(text.rstrip("\n"))
            return None
        path = unit_dir(user) / UNIT_NAME
        _write(path, text, user)
        say(f"wrote {path}")
        unit = "agent-core"
    if not cfg.agent.registered:
        say("note: the config is not registered yet: `agent-core register --token ...` first")
    pid = process.running_pid(cfg.paths.data_dir)
    if pid:
        say(f"note: an agent already runs for this data dir (pid {pid}): `agent-core stop` it first")
    systemctl = _systemctl(user)
    say(f"enable and start it: {systemctl} daemon-reload && {systemctl} enable --now {unit}")
    if user:
        say("to keep it running after you log out: loginctl enable-linger $USER")
    return path


def uninstall(*, user: bool, say: Callable[[str], None], instance: str | None = None) -> bool:
    """Remove the unit (or the instance, and the template with the last one) and the links `enable`
    made; systemd itself is told by the operator."""
    folder = unit_dir(user)
    unit = UNIT_NAME if instance is None else f"agent-core@{instance}.service"
    path = folder / (UNIT_NAME if instance is None else TEMPLATE_NAME)
    dropin = folder / f"{unit}.d"
    if not path.exists() and not dropin.exists():
        say(f"no unit at {path}")
        return False
    removed = [path]  # what the message names
    try:
        for wants in folder.glob(f"*.wants/{unit}"):
            if wants.is_symlink():
                wants.unlink()
        if instance is not None:
            (dropin / DROPIN_NAME).unlink(missing_ok=True)
            if dropin.is_dir() and not any(dropin.iterdir()):
                dropin.rmdir()
            if any(folder.glob("agent-core@*.service.d")):
                removed = [dropin]  # the template still serves the other instances
        if removed == [path]:
            path.unlink(missing_ok=True)
    except OSError as e:
        raise AgentError(f"cannot remove {path}: {e.strerror or e}") from None
    say(f"removed {removed[0]}")
    systemctl = _systemctl(user)
    say(f"if it runs, stop it and reload: {systemctl} stop {unit.removesuffix('.service')} && "
        f"{systemctl} daemon-reload")
    return True
