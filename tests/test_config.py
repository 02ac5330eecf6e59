"""Config loading, validation and comment-keeping edits (no server, no Docker)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from agent_core import config
from agent_core.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_example_file_is_the_default_that_init_writes():
    assert (REPO / "config.toml.example").read_text() == config.default_text()


def test_defaults_load_and_match_the_dataclasses(tmp_path):
    cfg = config.load(write(tmp_path, config.default_text()))
    assert cfg.executor == config.ExecutorConfig()
    assert cfg.limits == config.LimitsConfig()
    assert cfg.server.poll_interval_secs == 5 and cfg.server.rate_limit_per_minute == 150
    assert cfg.paths.data_dir == tmp_path / "data"
    assert cfg.unknown_keys == ()
    assert not cfg.agent.registered


@pytest.mark.parametrize("text, key", [
    ("[executor]\ncapacity = 0", "executor.capacity"),
    ("[executor]\ncapacity = \"2\"", "executor.capacity"),
    ("[server]\nbase_url = \"ftp://x\"", "server.base_url"),
    ("[server]\npoll_interval_secs = 0", "server.poll_interval_secs"),
    ("[executor]\nexecutor_type = \"ruby\"", "executor.executor_type"),
    ("[executor]\nmemory_limit = \"lots\"", "executor.memory_limit"),
    ("[executor]\ncustom_entrypoint = [\"/bin/sh\", 1]", "executor.custom_entrypoint"),
    ("[executor]\ncustom_entrypoint = 5", "executor.custom_entrypoint"),
    ("[executor]\ncustom_args = \"--a --b\"", "executor.custom_args"),
    ("[executor]\nworking_dir = \"work\"", "executor.working_dir"),
    ("[agent]\nheartbeat_interval_secs = 30", "agent.heartbeat_interval_secs"),
    ("[[paths.mounts]]\nhost = \"/tmp\"\ncontainer = \"relative\"", "paths.mounts[0].container"),
    ("[[paths.mounts]]\nhost = \"/tmp\"\ncontainer = \"/workspace/x\"", "paths.mounts[0].container"),
    ("[[paths.mounts]]\ncontainer = \"/x\"", "paths.mounts[0].host"),
    ("[paths]\nkeep_workspaces = \"some\"", "paths.keep_workspaces"),
    ("[limits]\nmax_output_bytes = \"1x\"", "limits.max_output_bytes"),
    ("[server]\nrate_limit_per_minute = 10\nheartbeat_reserve = 10", "server.heartbeat_reserve"),
    ("[server\n", "not valid TOML"),
    ("[executor]\nengine_url = \"/run/docker.sock\"",
     "executor.engine_url: must be \"\" or a unix://, tcp://, ssh:// or npipe:// address"),
    ("[executor]\nengine_url = \"http://127.0.0.1:2375\"", "executor.engine_url: must be \"\" or a unix://"),
    ("[executor]\nengine_url = \"unix://\"", "executor.engine_url: names no socket"),
    ("[executor]\nengine_url = \"tcp://:2375\"", "executor.engine_url: names no host"),
    ("[executor]\nengine_url = \"tcp://127.0.0.1:port\"", "executor.engine_url: has a bad port"),
    ("[executor]\nengine_url = 2375", "executor.engine_url: must be a string"),
])
def test_bad_values_name_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError) as e:
        config.load(write(tmp_path, text))
    assert key in str(e.value)
    assert "\n" not in str(e.value)


def test_bare_host_gets_https_and_paths_resolve_against_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir("/")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = config.load(write(tmp_path, """
[server]
base_url = "example.org/"
[paths]
data_dir = "state"
[[paths.mounts]]
host = "~/creds"
container = "/creds"
[[paths.mounts]]
host = "rel"
container = "/rel"
readonly = false
"""))
    assert cfg.server.base_url == "https://example.org"
    assert cfg.paths.data_dir == tmp_path / "state"
    assert cfg.paths.mounts == (config.Mount(tmp_path / "home" / "creds", "/creds", True),
                                config.Mount(tmp_path / "rel", "/rel", False))


def test_unknown_keys_are_warned_about_and_kept(tmp_path):
    path = write(tmp_path, "[server]\nbase_url = \"http://h\"\nshiny = 1\n[extra]\na = 1\n")
    cfg = config.load(path)
    assert set(cfg.unknown_keys) == {"server.shiny", "extra"}
    assert any("`server.shiny`" in line for line in config.warnings(cfg))
    config.update(path, {"agent.service_id": "s1"})
    text = path.read_text()
    assert "shiny = 1" in text and "[extra]" in text


@pytest.mark.parametrize("value, expected", [
    ("4g", 4 * 1024**3), ("512m", 512 * 1024**2), ("10kb", 10240), ("1GiB", 1024**3), (123, 123), ("7", 7),
])
def test_parse_size(value, expected):
    assert config.parse_size(value) == expected


def test_update_keeps_comments_order_and_is_0600(tmp_path):
    path = write(tmp_path, "# my comment\n[server]\nbase_url = \"http://h\"  # inline\n\n[agent]\nname = \"n\"\n")
    os.chmod(path, 0o644)
    config.update(path, {"agent.service_id": "svc", "agent.api_key": "ak_agent_x"})
    text = path.read_text()
    assert text.startswith("# my comment\n[server]\nbase_url = \"http://h\"  # inline\n")
    assert text.index("name") < text.index("service_id")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    cfg = config.load(path)
    assert cfg.agent.registered and cfg.agent.api_key == "ak_agent_x"
    assert "ak_agent_x" not in repr(cfg)
    assert not list(tmp_path.glob(".config.toml.*"))  # no temp file left behind


def test_update_refuses_to_write_an_invalid_file(tmp_path):
    path = write(tmp_path, "[executor]\ncapacity = 2\n")
    with pytest.raises(ConfigError):
        config.update(path, {"executor.capacity": 0})
    assert path.read_text() == "[executor]\ncapacity = 2\n"


def test_init_refuses_to_overwrite(tmp_path):
    path = tmp_path / "sub" / "config.toml"
    config.init(path, base_url="127.0.0.1:9")
    assert config.load(path).server.base_url == "https://127.0.0.1:9"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(ConfigError, match="--force"):
        config.init(path)
    config.init(path, force=True)


# --------------------------------------------------------------------------- the reference agent's files

# The reference agent's README example, as operators have it (comments and all).
REFERENCE_README = """\
[server]
base_url = "http://127.0.0.1:8080"  # Server 地址
poll_interval_secs = 5               # 轮询间隔（秒）
use_system_proxy = false             # 是否使用系统代理

[agent]
service_id = "svc-xxx"               # 注册后自动填充
api_key = "ak_xxx"                   # 注册后自动填充
name = "agent-core"                  # Agent 名称

[executor]
executor_type = "standard"           # 执行器类型：standard / bash / python / custom
image = "open-aaas-executor:latest"  # Docker 镜像
capacity = 2                         # 并发任务数
timeout_minutes = 0                  # 任务超时（分钟），0 表示不限制
# memory_limit = "4g"                # 内存限制（可选）
working_dir = "/workspace"           # 容器内工作目录
# script_path = "/workspace/run.sh"  # 脚本路径（bash/python 类型用）
custom_entrypoint = ["/bin/sh"]      # 自定义 ENTRYPOINT（custom 类型）
custom_args = ["-c", "echo hi"]      # 自定义参数（custom 类型）

[paths]
data_dir = "./data"                  # 数据目录

[[paths.mounts]]
host = "./share/kimi-config"         # 宿主机路径（相对或绝对）
container = "/shared/kimi-config"    # 容器内路径
readonly = true                      # 是否只读
"""

# What the reference writes itself at first start (its runtime template), with a custom executor.
REFERENCE_RUNTIME = """\
# OpenAaaS Agent Core 配置文件
# 首次运行时自动生成，注册后 [agent] 节会自动填充 service_id 和 api_key

[server]
# Server 地址
base_url = "http://127.0.0.1:8080"
# 轮询间隔（秒）
poll_interval_secs = 5
# 是否使用系统代理
use_system_proxy = false

[agent]
# 服务 ID（注册后自动填充）
# service_id = "svc-xxx"
# API Key（注册后自动填充）
# api_key = "ak_xxx"
# Agent 名称
name = "agent-core"

[executor]
# 执行器类型：standard / bash / python / custom
executor_type = "custom"
# Docker 镜像
image = "custom-executor:latest"
# 并发任务数
capacity = 4
# 任务超时时间（分钟），0 表示不限制
timeout_minutes = 60
# 内存限制
memory_limit = "2g"
# 是否允许任务容器访问宿主机服务（可选，true = 注入 host.docker.internal 指向宿主机）
# enable_host_access = false
# 工作目录（容器内）
working_dir = "/workspace"
# 自定义 ENTRYPOINT（仅 custom 类型使用）
custom_entrypoint = ["/bin/sh", "-c"]
# 自定义命令参数（仅 custom 类型使用）
custom_args = ["echo", "hello"]

[paths]
# 数据目录
data_dir = "./data"
mounts = []
"""


def test_the_reference_readme_config_loads_unchanged_and_means_the_same(tmp_path):
    cfg = config.load(write(tmp_path, REFERENCE_README))
    assert cfg.unknown_keys == ()
    assert cfg.server == config.ServerConfig(base_url="http://127.0.0.1:8080", poll_interval_secs=5,
                                             use_system_proxy=False)
    assert (cfg.agent.service_id, cfg.agent.api_key, cfg.agent.name) == ("svc-xxx", "ak_xxx", "agent-core")
    ex = cfg.executor
    assert (ex.executor_type, ex.image, ex.capacity, ex.timeout_minutes, ex.memory_limit, ex.working_dir,
            ex.script_path) == ("standard", "open-aaas-executor:latest", 2, 0, None, "/workspace", None)
    assert ex.custom_entrypoint == ("/bin/sh",) and ex.custom_args == ("-c", "echo hi")
    assert cfg.paths.data_dir == tmp_path / "data"
    assert cfg.paths.mounts == (config.Mount(tmp_path / "share" / "kimi-config", "/shared/kimi-config", True),)


def test_the_reference_runtime_config_loads_unchanged_and_means_the_same(tmp_path):
    cfg = config.load(write(tmp_path, REFERENCE_RUNTIME))
    assert cfg.unknown_keys == () and not cfg.agent.registered and cfg.agent.name == "agent-core"
    ex = cfg.executor
    assert (ex.executor_type, ex.image, ex.capacity, ex.timeout_secs, ex.memory_bytes) == (
        "custom", "custom-executor:latest", 4, 3600, 2 * 1024**3)
    assert ex.custom_entrypoint == ("/bin/sh", "-c") and ex.custom_args == ("echo", "hello")
    assert cfg.paths.mounts == ()


@pytest.mark.parametrize("text, name", [
    ("[agent]\nname = \"\"", "agent-core"), ("", "agent-core"), ("[agent]\nname = \"n-1\"", "n-1"),
])
def test_agent_name_defaults_to_agent_core_as_the_reference(tmp_path, text, name):
    assert config.load(write(tmp_path, text)).agent.name == name


@pytest.mark.parametrize("value, expected", [
    ('"/usr/bin/run me"', ("/usr/bin/run me",)),  # a lone string: older agent-core configs
    ('""', ()), ("[]", ()), ('["/bin/sh", "-c"]', ("/bin/sh", "-c")),
])
def test_custom_entrypoint_is_a_list_or_one_string(tmp_path, value, expected):
    cfg = config.load(write(tmp_path, f'[executor]\nexecutor_type = "custom"\ncustom_entrypoint = {value}\n'))
    assert cfg.executor.custom_entrypoint == expected


@pytest.mark.parametrize("text", [REFERENCE_README, REFERENCE_RUNTIME])
def test_register_keeps_the_chinese_comments(tmp_path, text):
    path = write(tmp_path, text)
    config.update(path, {"agent.service_id": "svc-new", "agent.api_key": "ak_agent_" + "1" * 32})
    after = path.read_text(encoding="utf-8")
    comments = ["#" + line.split("#", 1)[1] for line in text.splitlines() if "#" in line]
    assert len(comments) > 10 and [c for c in comments if c not in after] == []
    cfg = config.load(path)
    assert cfg.agent.registered and cfg.agent.service_id == "svc-new"
    assert cfg.executor.custom_entrypoint in (("/bin/sh",), ("/bin/sh", "-c"))


def test_init_with_changes_writes_once_and_validates_first(tmp_path):
    path = tmp_path / "config.toml"
    with pytest.raises(ConfigError, match="executor.capacity"):
        config.init(path, changes={"executor.capacity": 0})
    assert not path.exists()
    config.init(path, base_url="http://127.0.0.1:8080", changes={"executor.capacity": 3})
    cfg = config.load(path)
    assert cfg.executor.capacity == 3 and cfg.server.base_url == "http://127.0.0.1:8080"
    assert path.read_text().count("#") > 20


@pytest.mark.parametrize("key, guess", [
    ("executor.capasity", "executor.capacity"), ("agent.shutdown_grace", "agent.shutdown_grace_secs"),
    ("executr", "executor"), ("capacity", "executor.capacity"), ("executor.gpu.devics", "executor.gpu.devices"),
    ("zzz.qqq", None),
])
def test_an_unknown_key_names_the_closest_known_one(key, guess):
    assert config.closest_key(key) == guess


def test_warnings_are_one_plain_line_per_unknown_key_and_for_a_readable_file(tmp_path):
    path = write(tmp_path, "[executor]\ncapasity = 3\n")
    path.chmod(0o600)
    (line,) = config.warnings(config.load(path))
    assert line == f"{path}: unknown key `executor.capasity` is ignored: did you mean `executor.capacity`?"
    path.chmod(0o644)
    lines = config.warnings(config.load(path))
    assert len(lines) == 2 and lines[1].endswith(f"chmod 600 {path}") and "0644" in lines[1]


def test_logging_rotation_keys(tmp_path):
    assert config.load(write(tmp_path, "")).logging == config.LoggingConfig(max_bytes=10 * 1024**2, backups=3)
    cfg = config.load(write(tmp_path, "[logging]\nmax_bytes = 0\nbackups = 1\n"))
    assert (cfg.logging.max_bytes, cfg.logging.backups) == (0, 1)
    with pytest.raises(ConfigError, match="logging.backups"):
        config.load(write(tmp_path, "[logging]\nbackups = -1\n"))


def test_writes_through_a_symlinked_config_update_its_target(tmp_path):
    target = tmp_path / "real" / "config.toml"
    config.init(target, base_url="http://127.0.0.1:9")
    link = tmp_path / "config.toml"
    link.symlink_to(target)
    config.update(link, {"agent.service_id": "s1"})
    assert link.is_symlink() and config.load(target).agent.service_id == "s1"
    config.init(link, force=True, say=lambda _line: None)
    assert link.is_symlink() and config.load(target).agent.service_id is None
    assert [p.name for p in target.parent.glob("config.toml.bak-*")]


def test_init_force_keeps_a_private_backup_and_says_where(tmp_path):
    path = tmp_path / "config.toml"
    config.init(path, base_url="http://127.0.0.1:9")
    config.update(path, {"agent.api_key": "ak_" + "1" * 32})
    old = path.read_text()
    said: list[str] = []
    config.init(path, force=True, say=said.append)
    (saved,) = tmp_path.glob("config.toml.bak-*")
    assert saved.read_text() == old and stat.S_IMODE(saved.stat().st_mode) == 0o600
    assert said == [f"kept the old file as {saved} (mode 0600)"]
    assert config.load(path).agent.api_key is None


def test_a_failed_init_writes_nothing_and_the_corrected_retry_works(tmp_path):
    path = tmp_path / "sub" / "config.toml"
    with pytest.raises(ConfigError, match="scheme"):
        config.init(path, base_url="ftp://x")
    assert not (tmp_path / "sub").exists()
    config.init(path, base_url="http://127.0.0.1:9")
    assert config.load(path).server.base_url == "http://127.0.0.1:9"


# --------------------------------------------------------------------------- the declaration drives the parser

def test_engine_is_docker_unless_podman_is_chosen(tmp_path):
    assert config.load(write(tmp_path, "")).executor.engine == "docker"
    assert config.load(write(tmp_path, '[executor]\nengine = "podman"\n')).executor.engine == "podman"
    with pytest.raises(ConfigError) as e:
        config.load(write(tmp_path, '[executor]\nengine = "containerd"\n'))
    assert str(e.value).endswith("executor.engine: must be one of docker, podman (got 'containerd')")


@pytest.mark.parametrize("url", [
    "", "unix:///run/podman/podman.sock", "unix:///run/user/1000/podman/podman.sock", "tcp://127.0.0.1:2375",
    "tcp://[::1]:2375", "ssh://me@build-host", "npipe:////./pipe/docker_engine",
])
def test_engine_url_takes_the_engines_address_forms(tmp_path, url):
    assert config.load(write(tmp_path, f'[executor]\nengine_url = "{url}"\n')).executor.engine_url == url


def test_every_key_is_declared_with_its_default_but_the_tables():
    assert set(config.KNOWN_KEYS) - set(config.KNOBS) == {"executor.gpu", "executor.engines", "paths.mounts"}
    defaults = config.Config(Path("config.toml"))
    for dotted, knob in config.KNOBS.items():
        *tables, key = dotted.split(".")
        holder = config.GpuConfig() if tables == ["executor", "gpu"] else getattr(defaults, tables[0])
        assert getattr(holder, key) == knob.value, dotted
    # the declaration says sizes and paths as the file writes them; the dataclass holds bytes and a Path
    assert config.KNOBS["limits.max_input_bytes"].default == "10g"
    assert config.LimitsConfig().max_input_bytes == 10 * 1024**3 and config.PathsConfig().data_dir == Path("data")


NUMBERS = {key: k for key, k in config.KNOBS.items() if k.kind in (config.Kind.NUMBER, config.Kind.INTEGER)}


def load_one(tmp_path: Path, dotted: str, value: object) -> object:
    """What a file setting only `dotted` to `value` (as TOML) loads as."""
    section, key = dotted.split(".")
    return getattr(getattr(config.load(write(tmp_path, f"[{section}]\n{key} = {value}\n")), section), key)


@pytest.mark.parametrize("dotted", sorted(NUMBERS))
def test_each_numbers_bounds_come_from_its_declaration(tmp_path, dotted):
    k = NUMBERS[dotted]
    step = 1 if k.kind is config.Kind.INTEGER else 0.5
    below = k.minimum if k.exclusive else k.minimum - step
    with pytest.raises(ConfigError) as e:
        load_one(tmp_path, dotted, below)
    assert f"{dotted}: must be {'>' if k.exclusive else '≥'} {k.minimum:g} (got {below!r})" in str(e.value)
    lowest = k.minimum + step if k.exclusive else k.minimum
    assert load_one(tmp_path, dotted, lowest) == lowest
    if k.maximum is not None:
        assert load_one(tmp_path, dotted, k.maximum) == k.maximum
        with pytest.raises(ConfigError, match=f"{dotted}: must be ≤ {k.maximum:g}"):
            load_one(tmp_path, dotted, k.maximum + step)
    if k.kind is config.Kind.INTEGER:
        with pytest.raises(ConfigError, match=f"{dotted}: must be an integer"):
            load_one(tmp_path, dotted, float(lowest) + 0.5)


@pytest.mark.parametrize("dotted", sorted(key for key, k in config.KNOBS.items() if k.choices and
                                          not key.startswith("executor.gpu.")))
def test_each_choice_key_takes_its_declared_choices_and_nothing_else(tmp_path, dotted):
    choices = config.KNOBS[dotted].choices
    assert [load_one(tmp_path, dotted, f'"{choice}"') for choice in choices] == list(choices)
    with pytest.raises(ConfigError, match=f"{dotted}: must be one of {', '.join(choices)}"):
        load_one(tmp_path, dotted, '"other"')


def test_a_bad_engine_url_error_never_shows_its_password(tmp_path):
    with pytest.raises(ConfigError) as e:
        config.load(write(tmp_path, '[executor]\nengine_url = "ssh://ops:s3cret@host:port"\n'))
    assert "s3cret" not in str(e.value) and "ssh://ops:***@host:port" in str(e.value)
