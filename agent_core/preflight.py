"""Can the executor work at all? Checked before `run` takes its first task, and again while
intake is paused after launch failures (the circuit breaker in the scheduler).

A task that cannot start costs the operator a task: with a missing image every task in the
queue would be accepted and failed within milliseconds. So each cause is found up front, named
in one line with its fix (in the configured engine's words), and the same classification tells
a launch failure's kind apart. (Another engine than the configured one answering is a warning,
not a refusal, as tasks would still run: the scheduler says so when it describes the engine.)

A bind engine (`workspace = "bind"`) must see the data dir at the same path, or task workspaces
come up empty: not so when agent-core runs in a container without the data dir mounted at its
own path, or against another host's engine. `bind_problem` asks the engine for a probe file
through a container that is created and never started: no command runs in the image.
"""

from __future__ import annotations

import io
import secrets
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from agent_core import fsutil
from agent_core.archive import BIND
from agent_core.errors import AgentError, DockerUnavailable, ExecutorError, ImageMissing
from agent_core.executor.engine import PODMAN

if TYPE_CHECKING:
    from agent_core.config import Config
    from agent_core.executor import Backend

# Network modes every engine has; anything else must exist as a named network.
_BUILTIN_NETWORKS = ("none", "host", "default")
_MAX_ACCOUNT_FILE = 1024 * 1024
_PASSWD, _GROUP = "/etc/passwd", "/etc/group"
_PROBE_NAME, _MAX_PROBE_ARCHIVE = "probe", 64 * 1024


@dataclass(frozen=True)
class Problem:
    kind: str  # "engine", "image", "network", "user", "workspace"
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


def _not_seen(data_dir: Path, what: str) -> Problem:
    return Problem("workspace", f"the engine {what} the data dir {data_dir} at that path, so bind workspaces "
                                "would come up empty in the task's container",
                   f"mount the data dir at the same path: -v {data_dir}:{data_dir}, or set workspace = \"copy\"")


def _unchecked(e: Exception, engine: str) -> Problem:
    """The engine failed while being asked (not what was asked about)."""
    if isinstance(e, DockerUnavailable):
        return Problem("engine", str(e), _start_engine(engine))
    return Problem("engine", f"cannot check the executor: {e}", "see the engine's log")


def bind_problem(cfg: Config, executor: Backend) -> Problem | None:
    """Does the engine see the data dir at its path here? A random probe file, written in a private
    folder of the data dir (of its nearest parent before the first run makes it), must come back
    through the engine's bind mount of that folder. An image the engine lacks is `check`'s to
    report: this only judges the path."""
    data_dir = cfg.paths.data_dir
    root = fsutil.nearest_existing(data_dir)
    token = secrets.token_hex(16)
    try:
        folder = Path(tempfile.mkdtemp(prefix=".bind-probe-", dir=root))  # 0700: ours alone
    except OSError as e:
        return Problem("workspace", f"cannot write a probe file in the data dir {data_dir}: {e.strerror or e}",
                       "fix its owner or mode, or paths.data_dir")
    try:
        (folder / _PROBE_NAME).write_text(token)
        # the data dir is mounted, not the probe's folder: another folder there is told apart from none
        seen = _text(executor.bound_file(cfg.executor.image, root, f"{folder.name}/{_PROBE_NAME}",
                                         _MAX_PROBE_ARCHIVE))
    except ImageMissing:
        return None
    except (DockerUnavailable, tarfile.TarError) as e:
        return _unchecked(e, cfg.executor.engine)
    except ExecutorError as e:  # the engine has no such folder
        problem = _not_seen(data_dir, "cannot bind-mount")
        return replace(problem, message=f"{problem.message} ({e})")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return None if seen == token else _not_seen(data_dir, "sees another folder than")


def check(cfg: Config, executor: Backend, workspace: str | None = None) -> Problem | None:
    """The first reason no task could start with this config on this engine, or None. With the
    engine's `workspace` mode "bind", whether it sees the data dir is checked too (`run` at start;
    the breaker's rechecks leave it out: a launch failure is never that)."""
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
            problem = user_problem(ex.user, ex.image, _text(files[_PASSWD]), _text(files[_GROUP]))
            if problem is not None:
                return problem
    except (ExecutorError, tarfile.TarError) as e:
        return _unchecked(e, ex.engine)
    return bind_problem(cfg, executor) if workspace == BIND else None
