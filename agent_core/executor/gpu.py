"""The start-up GPU precheck, pure: can the configured GPUs work on this engine and OS?"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from agent_core.config import GpuConfig


@dataclass(frozen=True)
class GpuVerdict:
    """The start-up GPU precheck's decision: level is "ok", "warn" or "refuse"."""

    level: str
    message: str


def gpu_verdict(gpu: GpuConfig | None, engine_info: Mapping[str, Any], os_name: str) -> GpuVerdict:
    """Decide from `docker info` and `platform.system()` whether configured GPUs can work.

    Linux may still get GPUs without a registered "nvidia" runtime (the toolkit's hook serves
    `--gpus` too), so there it is a warning; Docker Desktop on macOS or Windows has nothing
    else to offer, so there the agent refuses to start rather than fail every task.
    """
    if gpu is None:
        return GpuVerdict("ok", "no GPUs configured")
    runtimes = sorted((engine_info.get("Runtimes") or {}).keys())
    wanted = f"GPUs {gpu.devices}"
    if gpu.vendor in runtimes:
        return GpuVerdict("ok", f"{gpu.vendor} runtime present ({wanted})")
    missing = (f"executor.gpu: the Docker engine has no {gpu.vendor} runtime "
               f"(runtimes: {', '.join(runtimes) or 'none'})")
    if os_name == "Linux":
        return GpuVerdict("warn", f"{missing}; GPU tasks may fail: install the NVIDIA Container Toolkit, "
                                  "run `nvidia-ctk runtime configure --runtime=docker` and restart dockerd")
    return GpuVerdict("refuse", f"{missing} and none can be added on {os_name}: run the agent on a Linux "
                                "host with the NVIDIA Container Toolkit (or in WSL 2 with Docker's GPU "
                                "support), or remove executor.gpu")
