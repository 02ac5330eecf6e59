"""GPUs and host access: config validation, the container spec and create kwargs, the start-up precheck."""

from __future__ import annotations

from pathlib import Path

import pytest
from docker.models.containers import _create_container_args

from agent_core import config
from agent_core.config import Config, parse
from agent_core.errors import ConfigError
from agent_core.executor import Owner, build_spec, create_kwargs, gpu_verdict
from tests.agent_fixtures import wait_until

RUNC_ONLY = {"ServerVersion": "24.0.7", "Runtimes": {"runc": {"path": "runc"}}}
WITH_NVIDIA = {"Runtimes": {"runc": {"path": "runc"}, "nvidia": {"path": "nvidia-container-runtime"}}}


def cfg_with(tmp_path: Path, executor_lines: str) -> Config:
    return parse(f'[executor]\nimage = "img:1"\n{executor_lines}\n', tmp_path / "config.toml")


def host_config(cfg: Config, tmp_path: Path) -> dict:
    """What docker-py would send as HostConfig for this config's task container."""
    ws = tmp_path / "ws"
    ws.mkdir(exist_ok=True)
    kw = create_kwargs(build_spec(cfg, task_id="t1", workspace=ws, owner=Owner("svc", "agent")))
    return _create_container_args({**kw, "version": "1.41"})["host_config"]


# --- config -----------------------------------------------------------------


@pytest.mark.parametrize("devices, ids", [("all", None), ("ALL", None), ("0", ("0",)), ("0,1", ("0", "1")),
                                          (" 0 , 2 ", ("0", "2")), ("GPU-3b1f2c4d-aa", ("GPU-3b1f2c4d-aa",))])
def test_gpu_devices_are_parsed(tmp_path, devices, ids):
    gpu = cfg_with(tmp_path, f'gpu.vendor = "nvidia"\ngpu.devices = "{devices}"').executor.gpu
    assert gpu is not None and gpu.vendor == "nvidia" and gpu.device_ids == ids


def test_gpu_unset_means_no_gpu_and_devices_default_to_all(tmp_path):
    assert cfg_with(tmp_path, "").executor.gpu is None
    assert cfg_with(tmp_path, '[executor.gpu]\nvendor = "nvidia"').executor.gpu.device_ids is None


@pytest.mark.parametrize("lines, key", [
    ('gpu.vendor = "nvidia"\ngpu.devices = "0,,x"', "executor.gpu.devices"),
    ('gpu.vendor = "nvidia"\ngpu.devices = "-1"', "executor.gpu.devices"),
    ('gpu.vendor = "nvidia"\ngpu.devices = ""', "executor.gpu.devices"),
    ('gpu.vendor = "nvidia"\ngpu.devices = "0,0"', "executor.gpu.devices"),
    ('gpu.vendor = "nvidia"\ngpu.devices = 1', "executor.gpu.devices"),
    ('gpu.vendor = "amd"', "executor.gpu.vendor"),
    ('gpu.devices = "0"', "executor.gpu.vendor"),
    ('gpu.vendor = "nvidia"\ngpu.device = "0"', "executor.gpu.device"),
    ('gpu = "nvidia"', "executor.gpu"),
    ('network_mode = "none"\nenable_host_access = true', "executor.enable_host_access"),
    ('network_mode = "host"\nenable_host_access = true', "executor.enable_host_access"),
    ('enable_host_access = "yes"', "executor.enable_host_access"),
])
def test_invalid_gpu_and_host_access_settings_name_the_key(tmp_path, lines, key):
    with pytest.raises(ConfigError, match=rf"{key.replace('.', '[.]')}\b"):
        cfg_with(tmp_path, lines)


def test_update_writes_gpu_keys_as_a_sub_table(tmp_path):
    path = tmp_path / "config.toml"
    config.init(path)
    config.update(path, {"executor.gpu.vendor": "nvidia", "executor.gpu.devices": "1"})
    assert config.load(path).executor.gpu == config.GpuConfig("nvidia", "1")
    with pytest.raises(ConfigError, match="executor.gpu.devices"):
        config.update(path, {"executor.gpu.devices": "one"})  # never writes what it could not load


# --- container spec and create kwargs -----------------------------------------


def test_no_gpu_and_no_host_access_by_default(tmp_path):
    host = host_config(cfg_with(tmp_path, ""), tmp_path)
    assert not host.get("DeviceRequests") and not host.get("ExtraHosts")


def test_all_gpus_are_requested_with_count_minus_one(tmp_path):
    host = host_config(cfg_with(tmp_path, 'gpu.vendor = "nvidia"\ngpu.devices = "all"'), tmp_path)
    assert host["DeviceRequests"] == [{"Driver": "nvidia", "Count": -1, "DeviceIDs": [],
                                       "Capabilities": [["gpu"]], "Options": {}}]


def test_listed_gpus_are_requested_by_id(tmp_path):
    cfg = cfg_with(tmp_path, 'gpu.vendor = "nvidia"\ngpu.devices = "0,1"')
    ws = tmp_path / "ws"
    ws.mkdir()
    spec = build_spec(cfg, task_id="t1", workspace=ws, owner=Owner("svc", "agent"))
    assert spec.gpu_driver == "nvidia" and spec.gpu_device_ids == ("0", "1")
    (request,) = host_config(cfg, tmp_path)["DeviceRequests"]
    # Docker refuses a request with both a count and ids
    assert request["DeviceIDs"] == ["0", "1"] and request["Count"] == 0
    assert request["Capabilities"] == [["gpu"]] and request["Driver"] == "nvidia"


def test_host_access_maps_host_docker_internal_to_the_host_gateway(tmp_path):
    host = host_config(cfg_with(tmp_path, "enable_host_access = true"), tmp_path)
    assert host["ExtraHosts"] == ["host.docker.internal:host-gateway"]


# --- the start-up precheck ----------------------------------------------------


def test_precheck_passes_when_the_engine_has_the_nvidia_runtime(tmp_path):
    gpu = cfg_with(tmp_path, 'gpu.vendor = "nvidia"').executor.gpu
    for os_name in ("Linux", "Darwin", "Windows"):
        assert gpu_verdict(gpu, WITH_NVIDIA, os_name).level == "ok"


def test_precheck_warns_on_linux_without_the_runtime(tmp_path):
    gpu = cfg_with(tmp_path, 'gpu.vendor = "nvidia"').executor.gpu
    verdict = gpu_verdict(gpu, RUNC_ONLY, "Linux")
    assert verdict.level == "warn"
    assert "no nvidia runtime" in verdict.message and "NVIDIA Container Toolkit" in verdict.message


@pytest.mark.parametrize("os_name", ["Darwin", "Windows"])
def test_precheck_refuses_on_macos_and_windows_without_the_runtime(tmp_path, os_name):
    gpu = cfg_with(tmp_path, 'gpu.vendor = "nvidia"').executor.gpu
    for info in (RUNC_ONLY, {}, {"Runtimes": None}):
        verdict = gpu_verdict(gpu, info, os_name)
        assert verdict.level == "refuse"
        assert os_name in verdict.message and "executor.gpu" in verdict.message


def test_precheck_is_silent_without_gpus():
    assert gpu_verdict(None, {}, "Windows").level == "ok"


@pytest.mark.docker
def test_run_warns_at_start_when_gpus_are_configured_but_the_engine_lacks_the_runtime(
        make_agent, docker_engine):
    if "nvidia" in (docker_engine.info().get("Runtimes") or {}):
        pytest.skip("this engine has the nvidia runtime: nothing to warn about")
    agent = make_agent({"executor.gpu.vendor": "nvidia", "executor.gpu.devices": "0"})
    agent.start()
    # a warning on Linux, not a refusal: the agent goes on to run
    wait_until(lambda: "running: service" in agent.log() or not agent.alive(), 60, "the agent to run")
    assert "no nvidia runtime" in agent.log() and agent.alive()
    assert agent.stop() == 0
