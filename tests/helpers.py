"""Small helpers shared by the tests."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any, Callable

import pytest

MiB = 1024 * 1024


def wait_until(check: Callable[[], Any], timeout: float = 5.0, what: str = "condition", step: float = 0.05) -> Any:
    """Poll `check` until it returns something truthy (returned); fail naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(step)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as src:
        while chunk := src.read(MiB):
            digest.update(chunk)
    return digest.hexdigest()


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def skip_or_fail_in_ci(reason: str) -> None:
    """Skip a test this machine cannot run; with CI=true that is a failure, never a silent skip."""
    if in_ci():
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)
