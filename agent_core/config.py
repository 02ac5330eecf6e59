"""The config file: typed, validated, and edited without losing the user's comments.

`load(path)` turns `config.toml` into a frozen `Config` or raises one `ConfigError`
naming the offending key. `update(path, changes)` edits values in place with
tomlkit (comments, key order and unknown keys survive), atomically and 0600,
because the file holds the api_key.

Each key is declared once, as a `knob` field of its table's dataclass (default, kind, bounds): `parse`
reads every table from that, and tests/test_config_docs.py holds the default file and the README to it.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import shutil
import stat
import time
from dataclasses import dataclass, field, fields
from enum import Enum
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any, Callable
from urllib.parse import urlsplit

import tomlkit
from tomlkit.exceptions import TOMLKitError

from agent_core import hostpaths
from agent_core.errors import ConfigError
from agent_core.fsutil import write_atomic

log = logging.getLogger(__name__)

DEFAULT_CONFIG_NAME = "config.toml"
EXECUTOR_TYPES = ("standard", "bash", "python", "custom")
WORKSPACE_MODES = ("bind", "copy")  # how /workspace reaches the container: a bind mount, or the engine's API
ENGINES = ("docker", "podman")  # both spoken through docker-py (Podman's Docker-compatible API)
ENGINE_URL_SCHEMES = ("unix", "tcp", "ssh", "npipe")  # what docker-py connects to
DEFAULT_ENGINE_NAME = "default"  # the one engine of a config without [[executor.engines]]
# an engine's name is a label, a log word and a journal field: no spaces, quotes or slashes
_ENGINE_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
KEEP_WORKSPACES = ("none", "failed", "all")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
MAX_HEARTBEAT_INTERVAL = 20.0  # the server marks us offline after 60 s of silence
GPU_VENDORS = ("nvidia",)
# a GPU index, or the UUID nvidia-smi -L prints (GPU-..., MIG-...)
_GPU_ID_RE = re.compile(r"^(\d+|(GPU|MIG)-[0-9A-Za-z-]+)$")

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_size(value: int | str) -> int:
    """Bytes from 1073741824, "512m", "4g", "4GiB" or "10kb" (units are powers of 1024, as Docker reads them)."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 4g or 512m")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("must not be negative")
        return value
    m = _SIZE_RE.match(str(value))
    if not m:
        raise ValueError(f"{value!r} is not a size such as 4g or 512m")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def normalise_base_url(url: str) -> str:
    """http(s) URL without trailing slash; a bare host gets https://."""
    url = url.strip()
    if "://" not in url:
        url = "https://" + url
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"scheme must be http or https (got {parts.scheme!r})")
    if not parts.hostname:
        raise ValueError(f"{url!r} has no host")
    return url.rstrip("/")


def parse_listen(value: str) -> tuple[str, int]:
    """(host, port) from "127.0.0.1:9464" or "[::1]:9464"; port 0 takes a free one."""
    host, sep, port = value.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{value!r} is not host:port, e.g. 127.0.0.1:9464")
    return host, int(port)


def parse_gpu_devices(value: str) -> str:
    """"all" or GPU indexes/UUIDs separated by commas ("0,1"), normalised; ValueError otherwise."""
    if value.strip().lower() == "all":
        return "all"
    ids = [part.strip() for part in value.split(",")]
    if not all(_GPU_ID_RE.match(i) for i in ids):
        raise ValueError(f"must be \"all\" or GPU indexes or UUIDs separated by commas, e.g. \"0,1\" "
                         f"(got {value!r})")
    if len(set(ids)) != len(ids):
        raise ValueError(f"names a GPU twice (got {value!r})")
    return ",".join(ids)


def _without_password(value: str) -> str:
    """`value` fit for an error message: an ssh://user:password@host loses the password."""
    parts = urlsplit(value)
    if parts.password is None:
        return value
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)).geturl()


def parse_engine_url(value: str) -> str:
    """"" (DOCKER_HOST, else the engine's usual socket) or the engine's address: unix:///run/podman/podman.sock,
    tcp://host:2375, ssh://user@host or npipe:////./pipe/docker_engine; ValueError otherwise."""
    if not value:
        return value
    parts = urlsplit(value)
    shown = repr(_without_password(value))
    if "://" not in value or parts.scheme not in ENGINE_URL_SCHEMES:
        *most, last = (f"{scheme}://" for scheme in ENGINE_URL_SCHEMES)
        raise ValueError(f"must be \"\" or a {', '.join(most)} or {last} address, "
                         f"e.g. \"unix:///run/podman/podman.sock\" (got {shown})")
    try:
        parts.port  # urlsplit checks the port only when asked
    except ValueError:
        raise ValueError(f"has a bad port (got {shown})") from None
    socket = parts.scheme in ("unix", "npipe")
    if not (parts.path if socket else parts.hostname):
        raise ValueError(f"names no {'socket' if socket else 'host'} (got {shown})")
    return value


# --- the declaration: each key once, with its default and what a value may be --------------


class Kind(Enum):
    """How a key is written in the file and held in its dataclass."""

    STRING = "string"
    BOOL = "bool"
    NUMBER = "number"
    INTEGER = "integer"
    SIZE = "size"  # kept as written, "4g"
    BYTES = "bytes"  # a size, held in bytes
    STRINGS = "strings"  # a list of strings
    ARGV = "argv"  # a list of strings, or a lone string (older agent-core configs wrote one)
    PATH = "path"  # resolved against the config file's folder; "" = the default


@dataclass(frozen=True)
class Knob:
    """One key's declaration; `default` is as the file writes it ("10g", "./data")."""

    kind: Kind
    default: Any
    minimum: float | None = None
    maximum: float | None = None
    exclusive: bool = False  # the minimum itself is refused
    choices: tuple[str, ...] = ()

    @property
    def value(self) -> Any:
        """The default as the dataclass holds it."""
        if self.kind is Kind.BYTES:
            return parse_size(self.default)
        return Path(self.default) if self.kind is Kind.PATH else self.default


_KNOB = "agent_core.config.knob"  # the dataclass field metadata key


def knob(default: Any, kind: Kind, *, minimum: float | None = None, maximum: float | None = None,
         exclusive: bool = False, choices: tuple[str, ...] = (), secret: bool = False) -> Any:
    """A config dataclass field that declares its key: `parse` reads and checks the key from this alone."""
    declared_as = Knob(kind, default, minimum, maximum, exclusive, choices)
    return field(default=declared_as.value, repr=not secret, metadata={_KNOB: declared_as})


def declared(cls: type) -> dict[str, Knob]:
    """The keys `cls` declares with `knob`, in field order (tables such as gpu and mounts are read apart)."""
    return {f.name: f.metadata[_KNOB] for f in fields(cls) if _KNOB in f.metadata}


@dataclass(frozen=True)
class GpuConfig:
    vendor: str = knob("nvidia", Kind.STRING, choices=GPU_VENDORS)
    devices: str = knob("all", Kind.STRING)

    @property
    def device_ids(self) -> tuple[str, ...] | None:
        """None = every GPU of the host."""
        return None if self.devices == "all" else tuple(self.devices.split(","))


@dataclass(frozen=True)
class Mount:
    host: Path
    container: str
    readonly: bool = knob(True, Kind.BOOL)


@dataclass(frozen=True)
class EngineConfig:
    """One engine a service's tasks may run on: an `[[executor.engines]]` table, or (without one)
    the engine that executor.engine, engine_url, capacity and workspace describe."""

    name: str = knob("", Kind.STRING)  # "" = engine-<n>, its place in the list
    url: str = knob("", Kind.STRING)
    engine: str = ENGINES[0]  # default: executor.engine
    capacity: int = 1  # default: executor.capacity
    workspace: str = WORKSPACE_MODES[0]  # default: bind for a unix:// engine, copy otherwise
    tls_ca: Path | None = knob(None, Kind.STRING)  # tcp:// only; resolved like every path
    tls_cert: Path | None = knob(None, Kind.STRING)
    tls_key: Path | None = knob(None, Kind.STRING)

    @property
    def tls(self) -> bool:
        return self.tls_ca is not None or self.tls_cert is not None


@dataclass(frozen=True)
class ServerConfig:
    base_url: str | None = knob(None, Kind.STRING)
    poll_interval_secs: float = knob(5.0, Kind.NUMBER, minimum=0, exclusive=True)
    use_system_proxy: bool = knob(False, Kind.BOOL)
    rate_limit_per_minute: int = knob(150, Kind.INTEGER, minimum=0)
    heartbeat_reserve: int = knob(10, Kind.INTEGER, minimum=0)
    connect_timeout_secs: float = knob(10.0, Kind.NUMBER, minimum=0, exclusive=True)
    read_timeout_secs: float = knob(60.0, Kind.NUMBER, minimum=0, exclusive=True)


@dataclass(frozen=True)
class AgentConfig:
    service_id: str | None = knob(None, Kind.STRING)
    api_key: str | None = knob(None, Kind.STRING, secret=True)
    name: str = knob("agent-core", Kind.STRING)
    heartbeat_interval_secs: float = knob(15.0, Kind.NUMBER, minimum=0, exclusive=True,
                                          maximum=MAX_HEARTBEAT_INTERVAL)
    shutdown_grace_secs: float = knob(300.0, Kind.NUMBER, minimum=0)

    @property
    def registered(self) -> bool:
        return bool((self.service_id or "").strip() and (self.api_key or "").strip())  # blank = unset


@dataclass(frozen=True)
class ExecutorConfig:
    engine: str = knob("docker", Kind.STRING, choices=ENGINES)
    engine_url: str = knob("", Kind.STRING)  # "" = the engine's usual address (executor/engine.py)
    workspace: str = knob("bind", Kind.STRING, choices=WORKSPACE_MODES)
    executor_type: str = knob("standard", Kind.STRING, choices=EXECUTOR_TYPES)
    image: str = knob("open-aaas-executor:latest", Kind.STRING)
    capacity: int = knob(2, Kind.INTEGER, minimum=1)
    timeout_minutes: float = knob(0, Kind.NUMBER, minimum=0)
    memory_limit: str | None = knob(None, Kind.SIZE)
    working_dir: str = knob("/workspace", Kind.STRING)
    script_path: str | None = knob(None, Kind.STRING)
    custom_entrypoint: tuple[str, ...] = knob((), Kind.ARGV)  # the container's ENTRYPOINT; () = the image's own
    custom_args: tuple[str, ...] = knob((), Kind.STRINGS)
    network_mode: str = knob("bridge", Kind.STRING)
    user: str | None = knob(None, Kind.STRING)
    pids_limit: int = knob(1024, Kind.INTEGER, minimum=0)
    cpus: float = knob(0.0, Kind.NUMBER, minimum=0)
    read_only: bool = knob(False, Kind.BOOL)
    cap_drop: tuple[str, ...] = knob(("ALL",), Kind.STRINGS)
    cap_add: tuple[str, ...] = knob(("CHOWN", "DAC_OVERRIDE", "FOWNER", "SETUID", "SETGID"), Kind.STRINGS)
    gpu: GpuConfig | None = None
    enable_host_access: bool = knob(False, Kind.BOOL)
    # how long the tasks of an engine that stopped answering wait for it before they fail
    engine_grace_secs: float = knob(300.0, Kind.NUMBER, minimum=0)
    engines: tuple[EngineConfig, ...] = ()  # [[executor.engines]]; () = the one engine above

    @property
    def engine_list(self) -> tuple[EngineConfig, ...]:
        """The engines tasks run on: the [[executor.engines]] tables, or the single one."""
        return self.engines or (EngineConfig(name=DEFAULT_ENGINE_NAME, url=self.engine_url, engine=self.engine,
                                             capacity=self.capacity, workspace=self.workspace),)

    @property
    def total_capacity(self) -> int:
        """Tasks at once over every engine: what `register` offers."""
        return sum(e.capacity for e in self.engine_list)

    @property
    def memory_bytes(self) -> int | None:
        return parse_size(self.memory_limit) if self.memory_limit else None

    @property
    def timeout_secs(self) -> int:
        return int(self.timeout_minutes * 60)

    @property
    def effective_script_path(self) -> str:
        """bash and python run `<working_dir>/run.sh` / `run.py` unless script_path says otherwise."""
        if self.script_path:
            return self.script_path
        name = "run.sh" if self.executor_type == "bash" else "run.py"
        return str(PurePosixPath(self.working_dir) / name)


@dataclass(frozen=True)
class LimitsConfig:
    max_input_bytes: int = knob("10g", Kind.BYTES)
    max_output_files: int = knob(1000, Kind.INTEGER, minimum=1)
    max_output_file_bytes: int = knob(0, Kind.BYTES)  # 0: the server's own limit (its max_file_size_mb) decides
    max_output_bytes: int = knob("1g", Kind.BYTES)
    log_max_bytes: int = knob("10m", Kind.BYTES)
    max_reply_bytes: int = knob("16m", Kind.BYTES)  # a JSON reply from the server; more is a protocol error


@dataclass(frozen=True)
class PathsConfig:
    data_dir: Path = knob("./data", Kind.PATH)
    mounts: tuple[Mount, ...] = ()
    keep_workspaces: str = knob("none", Kind.STRING, choices=KEEP_WORKSPACES)
    min_free_disk_mb: int = knob(1024, Kind.INTEGER, minimum=0)


@dataclass(frozen=True)
class LoggingConfig:
    level: str = knob("info", Kind.STRING, choices=LOG_LEVELS)
    format: str = knob("text", Kind.STRING, choices=LOG_FORMATS)
    max_bytes: int = knob("10m", Kind.BYTES)  # agent.log of run-detached is rotated past this; 0 = never
    backups: int = knob(3, Kind.INTEGER, minimum=0)


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = knob("", Kind.STRING)  # host:port of the Prometheus and /healthz endpoint; "" = off


@dataclass(frozen=True)
class Config:
    path: Path
    server: ServerConfig = ServerConfig()
    agent: AgentConfig = AgentConfig()
    executor: ExecutorConfig = ExecutorConfig()
    limits: LimitsConfig = LimitsConfig()
    paths: PathsConfig = PathsConfig()
    logging: LoggingConfig = LoggingConfig()
    metrics: MetricsConfig = MetricsConfig()
    unknown_keys: tuple[str, ...] = ()

    def require_server(self) -> str:
        if not self.server.base_url:
            raise ConfigError(f"{self.path}: server.base_url: not set")
        return self.server.base_url

    def require_registration(self) -> tuple[str, str]:
        if not self.agent.registered:
            raise ConfigError(f"{self.path}: not registered yet: run `agent-core register --token <TOKEN>`")
        return self.agent.service_id, self.agent.api_key  # type: ignore[return-value]


# the tables and the dataclass whose fields are their keys (executor.gpu is a table of two)
_SECTIONS = {"server": ServerConfig, "agent": AgentConfig, "executor": ExecutorConfig, "limits": LimitsConfig,
             "paths": PathsConfig, "logging": LoggingConfig, "metrics": MetricsConfig}
KNOBS = {f"{name}.{key}": declared_as for name, cls in {**_SECTIONS, "executor.gpu": GpuConfig}.items()
         for key, declared_as in declared(cls).items()}
KNOWN_KEYS = (*(f"{name}.{f.name}" for name, cls in _SECTIONS.items() for f in fields(cls)),
              *(f"executor.gpu.{key}" for key in declared(GpuConfig)))


# --- reading --------------------------------------------------------------


class _Section:
    """Typed reads from one table, each error naming `section.key`; remembers which keys it used."""

    def __init__(self, path: Path, name: str, raw: Any):
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: [{name}] must be a table")
        self.path, self.name, self.raw, self.used = path, name, raw, set()

    def fail(self, key: str, why: str) -> ConfigError:
        return ConfigError(f"{self.path}: {self.name}.{key}: {why}")

    def knobs(self, cls: type) -> dict[str, Any]:
        """Every key `cls` declares, read and checked as declared."""
        return {key: self.read(key, declared_as) for key, declared_as in declared(cls).items()}

    def read(self, key: str, k: Knob) -> Any:
        match k.kind:
            case Kind.STRING:
                return self.string(key, k.default, k.choices)
            case Kind.BOOL:
                return self.boolean(key, k.default)
            case Kind.NUMBER | Kind.INTEGER:
                return self.number(key, k.default, minimum=k.minimum, exclusive=k.exclusive, maximum=k.maximum,
                                   integer=k.kind is Kind.INTEGER)
            case Kind.SIZE:
                return self.size(key, k.default)
            case Kind.BYTES:
                return parse_size(self.size(key, k.default))
            case Kind.STRINGS:
                return self.strings(key, k.default)
            case Kind.ARGV:
                return self.argv(key, k.default)
            case Kind.PATH:
                return _resolve(self, key, self.string(key, k.default) or k.default)

    def _get(self, key: str, default: Any) -> Any:
        self.used.add(key)
        value = self.raw.get(key, default)
        return default if value == "" and default is None else value

    def string(self, key: str, default: str | None, choices: tuple[str, ...] = ()) -> Any:
        value = self._get(key, default)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self.fail(key, f"must be a string (got {value!r})")
        if choices and value not in choices:
            raise self.fail(key, f"must be one of {', '.join(choices)} (got {value!r})")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise self.fail(key, f"must be true or false (got {value!r})")
        return value

    def number(self, key: str, default: float, *, minimum: float | None, exclusive: bool = False,
               maximum: float | None = None, integer: bool = False) -> Any:
        value = self._get(key, default)
        kinds = (int,) if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise self.fail(key, f"must be {'an integer' if integer else 'a number'} (got {value!r})")
        if minimum is not None and (value < minimum or (exclusive and value == minimum)):
            raise self.fail(key, f"must be {'>' if exclusive else '≥'} {minimum:g} (got {value!r})")
        if maximum is not None and value > maximum:
            raise self.fail(key, f"must be ≤ {maximum:g} (got {value!r})")
        return value

    def size(self, key: str, default: Any) -> Any:
        value = self._get(key, default)
        if value is None:
            return None
        try:
            parse_size(value)
        except ValueError as e:
            raise self.fail(key, str(e)) from None
        return value

    def strings(self, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = self._get(key, default)
        if isinstance(value, str):
            raise self.fail(key, "must be a list of strings, e.g. [\"--flag\", \"value\"]")
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise self.fail(key, f"must be a list of strings (got {value!r})")
        return tuple(value)

    def argv(self, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = self._get(key, default)
        if isinstance(value, str):
            return (value,) if value else ()
        return self.strings(key, default)

    def unknown(self) -> list[str]:
        return [f"{self.name}.{k}" for k in self.raw if k not in self.used]


def _resolve(section: _Section, key: str, value: str) -> Path:
    """`value` as a path, relative ones against the config file's folder."""
    return Path(_check(section, key, value, lambda v: hostpaths.resolve(v, section.path.parent)))


def _check(section: _Section, key: str, value: Any, test: Callable[[Any], Any]) -> Any:
    try:
        return test(value)
    except ValueError as e:
        raise section.fail(key, str(e)) from None


def _read_mounts(paths: _Section) -> tuple[Mount, ...]:
    paths.used.add("mounts")
    raw = paths.raw.get("mounts")
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError(f"{paths.path}: paths.mounts: must be an array of tables ([[paths.mounts]])")
    mounts = []
    for i, item in enumerate(raw):
        s = _Section(paths.path, f"paths.mounts[{i}]", item)
        host = s.string("host", None)
        container = s.string("container", None)
        if not host:
            raise s.fail("host", "is required")
        if not container or not container.startswith("/"):
            raise s.fail("container", f"must be an absolute path (got {container!r})")
        if container.rstrip("/") in ("", "/workspace") or container.startswith("/workspace/"):
            raise s.fail("container", "must not be / or inside /workspace, which holds the task")
        mounts.append(Mount(_resolve(s, "host", host), container, **s.knobs(Mount)))
        for key in s.unknown():
            raise ConfigError(f"{paths.path}: {key}: unknown mount key")
    return tuple(mounts)


def _read_gpu(executor: _Section) -> GpuConfig | None:
    """`gpu.vendor` / `gpu.devices` inside [executor]; a typo there must not silently mean "all GPUs"."""
    executor.used.add("gpu")
    g = _Section(executor.path, "executor.gpu", executor.raw.get("gpu"))
    vendor = g.string("vendor", None, GPU_VENDORS)  # unset: no GPU, whatever GpuConfig() holds
    devices = g.read("devices", declared(GpuConfig)["devices"])
    for key in g.unknown():
        raise ConfigError(f"{executor.path}: {key}: unknown key (vendor and devices are known)")
    if vendor is None:
        if "devices" in g.raw:
            raise g.fail("vendor", "is required when executor.gpu.devices is set (\"nvidia\")")
        return None
    return GpuConfig(vendor=vendor, devices=_check(g, "devices", devices, parse_gpu_devices))


# What the declaration cannot say: conversions, the tables, checks across keys. Each gets the section
# and its declared keys as read.

def _server(s: _Section, values: dict[str, Any]) -> ServerConfig:
    if values["base_url"]:
        values["base_url"] = _check(s, "base_url", values["base_url"], normalise_base_url)
    server = ServerConfig(**values)
    if server.rate_limit_per_minute and server.heartbeat_reserve >= server.rate_limit_per_minute:
        raise s.fail("heartbeat_reserve", "must be smaller than rate_limit_per_minute")
    return server


def _agent(s: _Section, values: dict[str, Any]) -> AgentConfig:
    # "" in a file is unset, as for the reference agent
    return AgentConfig(**{**values, "name": values["name"] or AgentConfig.name})


def _read_engine(s: _Section, index: int, executor: dict[str, Any]) -> EngineConfig:
    """One [[executor.engines]] table; what it leaves out comes from [executor]."""
    values = s.knobs(EngineConfig)
    url = _check(s, "url", values["url"], parse_engine_url)
    if not url:
        raise s.fail("url", "is required: unix://, tcp:// or ssh:// (e.g. \"tcp://build-2:2376\")")
    name = values["name"] or f"engine-{index + 1}"
    if not _ENGINE_NAME_RE.match(name):
        raise s.fail("name", f"use letters, digits, '_', '.' and '-' (at most 64; got {name!r})")
    scheme = urlsplit(url).scheme
    tls = {key: _resolve(s, key, values[key]) if values[key] else None for key in ("tls_ca", "tls_cert", "tls_key")}
    if any(tls.values()) and scheme != "tcp":
        raise s.fail("tls_ca", f"TLS settings need a tcp:// url (got {scheme}://)")
    if (tls["tls_cert"] is None) != (tls["tls_key"] is None):
        raise s.fail("tls_cert", "tls_cert and tls_key go together (the client certificate and its key)")
    return EngineConfig(
        name=name, url=url, **tls,
        engine=s.string("engine", executor["engine"], ENGINES),
        capacity=s.number("capacity", executor["capacity"], minimum=1, integer=True),
        workspace=s.string("workspace", WORKSPACE_MODES[0 if scheme == "unix" else 1], WORKSPACE_MODES))


def _read_engines(executor: _Section, values: dict[str, Any]) -> tuple[EngineConfig, ...]:
    executor.used.add("engines")
    raw = executor.raw.get("engines")
    if raw is None:
        return ()
    if not isinstance(raw, list) or not raw:
        raise executor.fail("engines", "must be an array of tables ([[executor.engines]]), at least one")
    engines = []
    for i, item in enumerate(raw):
        s = _Section(executor.path, f"executor.engines[{i}]", item)
        engine = _read_engine(s, i, values)
        for key in s.unknown():
            raise ConfigError(f"{executor.path}: {key}: unknown key (name, engine, url, capacity, workspace, "
                              "tls_ca, tls_cert and tls_key are known)")
        for other in engines:
            if other.name == engine.name:
                raise s.fail("name", f"{engine.name!r} names two engines: each needs its own")
            if other.url == engine.url:  # one engine twice: its capacity counted twice, its containers swept twice
                raise s.fail("url", f"{engine.url!r} is also engine {other.name!r}")
        engines.append(engine)
    return tuple(engines)


def _executor(s: _Section, values: dict[str, Any]) -> ExecutorConfig:
    _check(s, "engine_url", values["engine_url"], parse_engine_url)
    executor = ExecutorConfig(**values, gpu=_read_gpu(s), engines=_read_engines(s, values))
    if not executor.image:
        raise s.fail("image", "must not be empty")
    if not executor.working_dir.startswith("/"):
        raise s.fail("working_dir", f"must be an absolute path (got {executor.working_dir!r})")
    if executor.enable_host_access and (executor.network_mode in ("none", "host")
                                        or executor.network_mode.startswith("container:")):
        raise s.fail("enable_host_access", f"needs a network of the task's own; network_mode = "
                     f"{executor.network_mode!r} has none (use \"bridge\" or a user-defined network)")
    if executor.network_mode == "host":
        log.warning("%s: executor.network_mode = \"host\" gives tasks the host's network", s.path)
    return executor


def _paths(s: _Section, values: dict[str, Any]) -> PathsConfig:
    return PathsConfig(**values, mounts=_read_mounts(s))


def _metrics(s: _Section, values: dict[str, Any]) -> MetricsConfig:
    if values["listen"]:
        _check(s, "listen", values["listen"], parse_listen)
    return MetricsConfig(**values)


_FINISH: dict[str, Callable[[_Section, dict[str, Any]], Any]] = {
    "server": _server, "agent": _agent, "executor": _executor, "paths": _paths, "metrics": _metrics}


def parse(text: str, path: Path) -> Config:
    """Validate a config document; `path` locates relative paths and names the file in errors."""
    try:
        doc = tomlkit.parse(text).unwrap()
    except TOMLKitError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    sections: dict[str, Any] = {}
    unknown: list[str] = []
    for name, cls in _SECTIONS.items():
        s = _Section(path, name, doc.get(name))
        values = s.knobs(cls)
        finish = _FINISH.get(name)
        sections[name] = finish(s, values) if finish else cls(**values)
        unknown += s.unknown()
    unknown += [k for k in doc if k not in _SECTIONS]
    return Config(path=path, **sections, unknown_keys=tuple(unknown))


def load(path: Path | str) -> Config:
    """The config at `path`; what is worth a warning (unknown keys, a readable file) is `warnings(cfg)`."""
    path = Path(path).expanduser().absolute()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path} (create one with `agent-core init`)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    return parse(text, path)


def closest_key(key: str) -> str | None:
    """The known key an unknown one most likely meant: "executor.capasity" -> "executor.capacity"."""
    match = difflib.get_close_matches(key, [*KNOWN_KEYS, *_SECTIONS], n=1, cutoff=0.6)
    if match:
        return match[0]
    leaf = key.rpartition(".")[2]  # a known key in the wrong table ("capacity" at the top)
    by_leaf = {k.rpartition(".")[2]: k for k in KNOWN_KEYS}
    match = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.8)
    return by_leaf[match[0]] if match else None


def warnings(cfg: Config) -> list[str]:
    """One plain line per thing an operator should fix: each unknown key, a file others can read."""
    lines = []
    for key in cfg.unknown_keys:
        guess = closest_key(key)
        lines.append(f"{cfg.path}: unknown key `{key}` is ignored"
                     + (f": did you mean `{guess}`?" if guess else ""))
    try:
        mode = stat.S_IMODE(cfg.path.stat().st_mode)
    except OSError:
        mode = 0
    if mode & 0o077:
        lines.append(f"{cfg.path} is readable by other users (mode {mode:04o}) and holds the api_key: "
                     f"chmod 600 {cfg.path}")
    return lines


# --- writing --------------------------------------------------------------


def default_text() -> str:
    """The commented default config; the same text as config.toml.example."""
    return resources.files("agent_core").joinpath("default_config.toml").read_text(encoding="utf-8")


def default_value(dotted: str) -> Any:
    """A value as the default config file writes it, e.g. "paths.data_dir" -> "./data"."""
    value: Any = tomlkit.parse(default_text()).unwrap()
    for key in dotted.split("."):
        value = value[key]
    return value


def _write_target(path: Path) -> Path:
    """Where a write to `path` goes: through a symlink to its target, so the link stays a link."""
    return path.resolve() if path.is_symlink() else path


def update(path: Path | str, changes: dict[str, Any]) -> None:
    """Set `section.key` values in the file, keeping everything else as the user wrote it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot update {path}: {e}") from None
    text = _apply(text, changes, path)
    try:
        write_atomic(_write_target(path), text)
    except OSError as e:
        raise ConfigError(f"cannot update {path}: {e}") from None


def _apply(text: str, changes: dict[str, Any], path: Path) -> str:
    """`text` with `changes` set; refuses a result we could not load back."""
    try:
        doc = tomlkit.parse(text)
    except TOMLKitError as e:
        raise ConfigError(f"cannot update {path}: {e}") from None
    for dotted, value in changes.items():
        *tables, key = dotted.split(".")  # "executor.gpu.vendor" is a key of the [executor.gpu] table
        table = doc
        for name in tables:
            if name not in table:
                table[name] = tomlkit.table()
            table = table[name]
        table[key] = value
    text = tomlkit.dumps(doc)
    parse(text, path.absolute())
    return text


def backup(path: Path) -> Path:
    """A 0600 copy of `path` beside it, <name>.bak-<time>, before a file with credentials is replaced."""
    target = _write_target(path)
    dest = target.with_name(f"{target.name}.bak-{time.strftime('%Y%m%d-%H%M%S')}")
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never onto an existing file
    with os.fdopen(fd, "wb") as out, open(target, "rb") as src:
        shutil.copyfileobj(src, out)
    return dest


def init(path: Path | str, *, force: bool = False, base_url: str | None = None,
         changes: dict[str, Any] | None = None, say: Callable[[str], None] = log.info) -> Path:
    """Write the commented default with `changes` set, in one write (a failed or interrupted init leaves
    no file). A file `force` replaces is copied first (it may hold the only copy of the credentials)."""
    path = Path(path)
    if path.exists() and not force:
        raise ConfigError(f"{path} already exists (it may hold credentials); use --force to overwrite it")
    changes = dict(changes or {})
    if base_url:
        try:
            changes["server.base_url"] = normalise_base_url(base_url)
        except ValueError as e:
            raise ConfigError(f"server.base_url: {e}") from None
    text = _apply(default_text(), changes, path)
    try:
        if path.exists():
            say(f"kept the old file as {backup(path)} (mode 0600)")
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(_write_target(path), text)
    except OSError as e:
        raise ConfigError(f"cannot write {path}: {e}") from None
    return path
