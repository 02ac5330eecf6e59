"""Can the executor work at all? Checked before `run` takes its first task, and again while
intake is paused after launch failures (the circuit breaker in the scheduler).

A task that cannot start costs the operator a task: with a missing image every task in the
queue would be accepted and failed within milliseconds. So each cause is found up front, named
in one line with its fix (in the configured engine's words), and the same classification tells
a launch failure's kind apart. `engine_warning` says when another engine than the configured one
answers: a warning, not a refusal, as tasks would still run.
"""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass
from typing import TYPE_CHECKING

from agent_core.errors import AgentError, DockerUnavailable, ExecutorError, ImageMissing
from agent_core.executor.engine import PODMAN, engine_mismatch

if TYPE_CHECKING:
    from agent_core.config import Config
    from agent_core.executor import Backend

# Network modes every engine has; anything else must exist as a named network.
_BUILTIN_NETWORKS = ("none", "host", "default")
_MAX_ACCOUNT_FILE = 1024 * 1024
_PASSWD, _GROUP = "/etc/passwd", "/etc/group"


@dataclass(frozen=True)
class Problem:
    kind: str  # "engine", "image", "network", "user"
    message: str
    fix: str

    def line(self) -> str:
        return f"{self.message}; fix: {self.fix}"


def _image(image: str, cli: str) -> Problem:
    return Problem("image", f"executor image {image} is not on this host",
                   f"build or load it here (agent-core never pulls), e.g. `{cli} build -t {image} "
                   "executor-example/`, or set executor.image")


def _network(mode: str, cli: str) -> Problem:
    return Problem("network", f"executor.network_mode: the engine has no network {mode!r}",
                   f"`{cli} network create {mode}`, or set executor.network_mode to one `{cli} network ls` "
                   "lists (or \"none\")")


def _start_engine(engine: str) -> str:
    if engine == PODMAN:
        return ("start the Podman service (`systemctl start podman.socket`, rootless `systemctl --user start "
                "podman.socket`, or `podman system service --time=0 unix://...`), or set executor.engine_url")
    return "start the engine (e.g. `systemctl start docker`), or point DOCKER_HOST at it"


def _user(user: str, image: str, what: str) -> Problem:
    return Problem("user", f"executor.user: {what} of {user!r} is not known in image {image}",
                   "use a numeric uid:gid (e.g. \"1000:1000\"), a user the image's /etc/passwd has, "
                   "or unset executor.user")


def kind_of(error: AgentError) -> str | None:
    """Which executor problem a failed launch shows, if it is one a retry cannot fix."""
    if isinstance(error, ImageMissing):
        return "image"
    if isinstance(error, DockerUnavailable) or not isinstance(error, ExecutorError):
        return None
    text = str(error).lower()
    if "network" in text and ("not found" in text or "no such network" in text):
        return "network"
    if "unable to find user" in text or "unable to find group" in text or "no matching entries" in text:
        return "user"
    return None


def account_names(text: str) -> set[str]:
    """The names in an /etc/passwd or /etc/group file."""
    return {line.split(":", 1)[0] for line in text.splitlines() if line and not line.startswith("#")}


def user_problem(user: str, image: str, passwd: str | None, group: str | None) -> Problem | None:
    """Would the engine resolve `user` ("name", "uid", "name:group", "uid:gid") in this image?
    `passwd`/`group` are the image's files, None when it has none. Numbers always work."""
    name, _, grp = user.partition(":")
    if name and not name.isdigit() and name not in account_names(passwd or ""):
        return _user(user, image, "the user")
    if grp and not grp.isdigit() and grp not in account_names(group or ""):
        return _user(user, image, "the group")
    return None


def _text(archive: bytes | None) -> str | None:
    """The one regular file in a tar archive of one path, as text; None without one."""
    if archive is None:
        return None
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        member = next((m for m in tar.getmembers() if m.isfile()), None)
        f = tar.extractfile(member) if member else None
        return f.read().decode("utf-8", "replace") if f else None


def check(cfg: Config, executor: Backend) -> Problem | None:
    """The first reason no task could start with this config on this engine, or None."""
    ex = cfg.executor
    try:
        executor.ping()
    except DockerUnavailable as e:
        return Problem("engine", str(e), f"{_start_engine(ex.engine)}, and check this user may use its socket")
    try:
        if not executor.image_present(ex.image):
            return _image(ex.image, ex.engine)
        mode = ex.network_mode
        if mode not in _BUILTIN_NETWORKS and not mode.startswith("container:") and executor.network(mode) is None:
            return _network(mode, ex.engine)
        if ex.user and not all(part.isdigit() for part in ex.user.split(":") if part):
            files = executor.image_files(ex.image, (_PASSWD, _GROUP), _MAX_ACCOUNT_FILE)
            return user_problem(ex.user, ex.image, _text(files[_PASSWD]), _text(files[_GROUP]))
    except DockerUnavailable as e:
        return Problem("engine", str(e), _start_engine(ex.engine))
    except (ExecutorError, tarfile.TarError) as e:
        return Problem("engine", f"cannot check the executor: {e}", "see the engine's log")
    return None


def engine_warning(cfg: Config, executor: Backend) -> str | None:
    """The warning when the engine that answers is not executor.engine (say Docker at a socket
    configured for Podman); None when it is, or when no engine answers (`check` says that)."""
    try:
        found = executor.engine_info()
    except AgentError:
        return None
    return engine_mismatch(cfg.executor.engine, found)
