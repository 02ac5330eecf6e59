"""Host paths from the config, for the OS agent-core runs on. Pure: every flavour is testable anywhere.

`resolve()` turns a `paths.data_dir` or `[[paths.mounts]] host` value into an absolute
path; `bind_source()` is the string Docker gets as a bind mount's source.

* Windows: `C:/x`, `C:\\x`, `\\\\server\\share\\x`, `\\x` (on the config file's drive) and
  relative forms (`x\\y`, `./x`, `C:x` on the config's drive); `/` and `\\` both separate.
  The bind source is the native form `C:\\x`, which is what the docker CLI on Windows
  sends and Docker Desktop translates; the Toolbox-era `/c/x` form is never emitted.
* POSIX: plain POSIX paths. A Windows drive or UNC path there is a config written for
  another host and is refused, except under WSL, where `C:/x` is the same folder at
  `/mnt/c/x` (WSL's default automount root).
"""

from __future__ import annotations

import ntpath
import os
import platform
import re
from pathlib import PurePath, PurePosixPath, PureWindowsPath

POSIX = "posix"
WINDOWS = "windows"
WSL_MOUNT_ROOT = "/mnt"

_DRIVE_PATH = re.compile(r"^([A-Za-z]):[\\/]")
_UNC_PATH = re.compile(r"^[\\/]{2}[^\\/]")


def current_flavour() -> str:
    return WINDOWS if os.name == "nt" else POSIX


def running_in_wsl() -> bool:
    return bool(os.environ.get("WSL_DISTRO_NAME")) or "microsoft" in platform.uname().release.lower()


def _expand_home(value: str, home: str | None) -> str:
    if home is None:
        return os.path.expanduser(value)
    if value == "~" or value[:2] in ("~/", "~\\"):
        return home + value[1:]
    return value


def _posix_form(value: str, wsl: bool) -> str:
    """A Windows drive path becomes its WSL mount; elsewhere it, and a UNC path, is refused."""
    drive = _DRIVE_PATH.match(value)
    if drive and wsl:
        rest = value[drive.end():].replace("\\", "/")
        return f"{WSL_MOUNT_ROOT}/{drive.group(1).lower()}/{rest}".rstrip("/")
    if drive or (_UNC_PATH.match(value) and "\\" in value):
        raise ValueError(f"{value!r} is a Windows path, but this host is not Windows: write a POSIX path"
                         f"{' (drives are under /mnt in WSL)' if not wsl else ''}")
    return value


def resolve(value: str, base: str | PurePath, *, flavour: str | None = None, home: str | None = None,
            wsl: bool | None = None) -> PurePath:
    """`value` as an absolute path of `flavour` (default: this OS); relative forms resolve against
    `base` (the config file's folder) and `~` expands (to `home` when given). ValueError when the
    value cannot name a folder on such a host."""
    flavour = flavour or current_flavour()
    if not value:
        raise ValueError("must not be empty")
    if value.startswith("~"):
        value = _expand_home(value, home)
    if flavour == WINDOWS:
        path = PureWindowsPath(base) / value
        if path.drive and not path.root:
            # "D:x" is relative to D:'s current directory, which a service does not have
            raise ValueError(f"{value!r} is relative to a drive's current folder: write {path.drive}/...")
        return PureWindowsPath(ntpath.normpath(path))  # Windows itself folds `..` lexically
    return PurePosixPath(base) / _posix_form(value, running_in_wsl() if wsl is None else wsl)


def bind_source(path: str | PurePath, *, flavour: str | None = None) -> str:
    """The bind-mount source Docker gets: `C:\\x` on Windows (never `/c/x`), the path itself on POSIX."""
    if (flavour or current_flavour()) == WINDOWS:
        return str(PureWindowsPath(path))
    return str(PurePosixPath(path))
