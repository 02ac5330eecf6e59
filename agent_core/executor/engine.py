"""Which engine, at which address: pure rules, unit-tested without an engine.

Both engines are spoken through docker-py (Podman serves Docker's API). `engine_address` picks
the socket from the config and the environment; `engine_mismatch` says when the engine that
answers is not the one configured.

The address, first match wins:

    executor.engine_url     set: that address, for either engine
    docker                  DOCKER_HOST (with DOCKER_TLS_VERIFY / DOCKER_CERT_PATH, as the docker
                            CLI reads them), else the current docker context, else
                            unix:///var/run/docker.sock
    podman                  CONTAINER_HOST when it is a unix:// socket (Podman's own variable; its
                            ssh:// form is podman-remote's protocol, which docker-py cannot speak),
                            else DOCKER_HOST (as for docker), else the rootful
                            unix:///run/podman/podman.sock as root, or the rootless
                            unix://$XDG_RUNTIME_DIR/podman/podman.sock (/run/user/<uid> without it)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from agent_core.config import ENGINES
from agent_core.executor.backend import EngineInfo

DOCKER, PODMAN = ENGINES  # the values of executor.engine
DOCKER_SOCKET = "unix:///var/run/docker.sock"
PODMAN_ROOTFUL_SOCKET = "unix:///run/podman/podman.sock"
PODMAN_USER_SOCKET = "podman/podman.sock"  # under the user's runtime dir
_TITLES = {DOCKER: "Docker", PODMAN: "Podman"}


@dataclass(frozen=True)
class Address:
    """Where the engine is expected, and what said so (for messages)."""

    engine: str  # "docker" or "podman": what the config asks for
    url: str
    source: str  # "executor.engine_url", "DOCKER_HOST", "CONTAINER_HOST" or "the default"
    from_env: bool  # connect as docker-py's from_env does: DOCKER_HOST, TLS variables, docker context

    @property
    def title(self) -> str:
        """The engine's name in a sentence: "Docker", "Podman"."""
        return title(self.engine)


def title(engine: str) -> str:
    return _TITLES.get(engine, engine)


def engine_address(engine: str, engine_url: str, environ: Mapping[str, str], euid: int) -> Address:
    """The address of `engine` (see the module's table); `environ` and `euid` are the process's."""
    if engine_url:
        return Address(engine, engine_url, "executor.engine_url", from_env=False)
    container_host = environ.get("CONTAINER_HOST", "")
    if engine == PODMAN and container_host.startswith("unix://"):
        return Address(engine, container_host, "CONTAINER_HOST", from_env=False)
    docker_host = environ.get("DOCKER_HOST", "")
    if docker_host:
        return Address(engine, docker_host, "DOCKER_HOST", from_env=True)
    if engine == DOCKER:
        return Address(engine, DOCKER_SOCKET, "the default", from_env=True)  # a docker context may say otherwise
    if euid == 0:
        return Address(engine, PODMAN_ROOTFUL_SOCKET, "the default", from_env=False)
    runtime_dir = environ.get("XDG_RUNTIME_DIR") or f"/run/user/{euid}"
    return Address(engine, f"unix://{runtime_dir.rstrip('/')}/{PODMAN_USER_SOCKET}", "the default", from_env=False)


def engine_of(version: Mapping[str, object]) -> str:
    """Which engine wrote this `GET /version` reply: Podman names itself among the Components."""
    components = version.get("Components")
    names = [str(c.get("Name", "")) for c in components if isinstance(c, Mapping)] \
        if isinstance(components, (list, tuple)) else []
    return PODMAN if any(n.lower().startswith("podman") for n in names) else DOCKER


def is_rootless(info: Mapping[str, object]) -> bool:
    """From `GET /info`: Docker lists "name=rootless" in SecurityOptions; Podman does not, but adds
    `"Rootless": true` of its own."""
    options = info.get("SecurityOptions")
    return info.get("Rootless") is True or (isinstance(options, (list, tuple))
                                           and any("name=rootless" in str(o) for o in options))


def engine_info_of(version: Mapping[str, object], info: Mapping[str, object], where: str) -> EngineInfo:
    """The neutral engine description from the engine's own `version` and `info` replies."""
    return EngineInfo(engine=engine_of(version), version=str(version.get("Version") or "?"),
                      rootless=is_rootless(info), where=where)


def engine_mismatch(configured: str, found: EngineInfo) -> str | None:
    """A warning when the engine that answers is not the configured one; None when it is."""
    if found.engine == configured:
        return None
    return (f"executor.engine is {configured!r}, but the engine at {found.where} is {title(found.engine)} "
            f"{found.version}: set executor.engine = {found.engine!r}, or point executor.engine_url at the "
            f"{title(configured)} socket")
