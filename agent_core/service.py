"""`agent-core service install|uninstall`: a systemd unit that runs `agent-core run` for one config.

The unit stops the agent with SIGTERM, which starts the drain ladder, and gives it
`shutdown_grace_secs` plus a margin for the cancel step before systemd kills it.
`AGENT_CORE_SYSTEMD_DIR` overrides where the unit goes (tests, packaging).
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


def render_unit(cfg: Config, *, user: bool) -> str:
    exec_start = " ".join(_exec_arg(a) for a in [*agent_command(), "--config", str(cfg.path), "run"])
    stop_secs = math.ceil(cfg.agent.shutdown_grace_secs) + STOP_MARGIN_SECS
    # a user manager cannot order itself after system units such as docker.service
    after = "" if user else "Wants=network-online.target\nAfter=network-online.target docker.service\n"
    return (
        "[Unit]\n"
        "Description=agent-core: OpenAaaS execution node\n"
        f"{after}"
        "\n[Service]\n"
        "Type=simple\n"
        f"ExecStart={exec_start}\n"
        f"WorkingDirectory={_escape(str(cfg.path.parent))}\n"
        "Restart=on-failure\n"
        f"RestartSec={RESTART_SECS}\n"
        "# exit 2 is a config or usage error: restarting cannot fix it\n"
        "RestartPreventExitStatus=2\n"
        "# SIGTERM drains: running tasks finish, then the cancel step follows by itself\n"
        "KillSignal=SIGTERM\n"
        f"TimeoutStopSec={stop_secs}\n"
        "UMask=0077\n"
        "\n[Install]\n"
        f"WantedBy={'default.target' if user else 'multi-user.target'}\n"
    )


def _systemctl(user: bool) -> str:
    return "systemctl --user" if user else "systemctl"


def install(cfg: Config, *, user: bool, print_only: bool, say: Callable[[str], None]) -> Path | None:
    text = render_unit(cfg, user=user)
    if print_only:
        say(text.rstrip("\n"))
        return None
    path = unit_dir(user) / UNIT_NAME
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, text, mode=0o644)  # units are public; this one holds no secret
    except OSError as e:
        hint = "" if user else " (run it as root, or use --user)"
        raise AgentError(f"cannot write {path}: {e.strerror or e}{hint}") from None
    say(f"wrote {path}")
    if not cfg.agent.registered:
        say("note: the config is not registered yet: `agent-core register --token ...` first")
    pid = process.running_pid(cfg.paths.data_dir)
    if pid:
        say(f"note: an agent already runs for this data dir (pid {pid}): `agent-core stop` it first")
    systemctl = _systemctl(user)
    say(f"enable and start it: {systemctl} daemon-reload && {systemctl} enable --now agent-core")
    if user:
        say("to keep it running after you log out: loginctl enable-linger $USER")
    return path


def uninstall(*, user: bool, say: Callable[[str], None]) -> bool:
    """Remove the unit and the symlink `enable` made; systemd itself is told by the operator."""
    folder = unit_dir(user)
    path = folder / UNIT_NAME
    if not path.exists():
        say(f"no unit at {path}")
        return False
    systemctl = _systemctl(user)
    try:
        for wants in folder.glob(f"*.wants/{UNIT_NAME}"):
            if wants.is_symlink():
                wants.unlink()
        path.unlink()
    except OSError as e:
        raise AgentError(f"cannot remove {path}: {e.strerror or e}") from None
    say(f"removed {path}")
    say(f"if it runs, stop it and reload: {systemctl} stop agent-core && {systemctl} daemon-reload")
    return True
