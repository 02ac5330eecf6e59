"""Removing what tasks leave behind, without ever stopping the agent.

A task's folders are removed with `workspace.remove_workspace`. When that fails (typically:
a container running as root left root-owned, mode-0 directories, and the agent is not root),
the folder is moved aside into `<data_dir>/trash/` — a rename needs no permission on what is
inside — and logged once. An agent that is not root then has the trash purged by a short-lived
container of the executor image, running as root with only that one entry mounted (see
`Backend.purge`). Whatever still cannot be removed stays in trash/, is named in the log,
and is tried again at the next start. Nothing here raises: leftovers are never a reason for
`run` to stop or for a task to fail.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable

from agent_core.errors import AgentError
from agent_core.workspace import remove_workspace

log = logging.getLogger(__name__)

TRASH_DIR = "trash"
_PURGED_NAME = "ws"  # inside a trash entry: the moved folder, so the entry itself stays ours


class Janitor:
    """`purge(entry)` removes `entry/ws` as root through the engine; None when we are root
    ourselves (then nothing a container made is beyond us)."""

    def __init__(self, data_dir: Path, purge: Callable[[Path], None] | None):
        self.trash = Path(data_dir) / TRASH_DIR
        self._purge = purge
        self._lock = threading.Lock()  # one purge at a time: each is a container

    def dispose(self, path: Path) -> None:
        """Remove `path` (a workspace or a task's own folder), or move it aside and purge it."""
        try:
            remove_workspace(path)
            return
        except AgentError as e:
            error = e
        entry = self._move_aside(path)
        if entry is None:
            log.error("cannot remove %s, nor move it aside (tried again at the next start): %s", path, error)
            return
        log.warning("cannot remove %s (%s); moved it to %s", path, error, entry)
        self._purge_or_report(entry, error)  # removing it again would only fail again

    def sweep(self) -> None:
        """Try every entry of trash/ again (at start)."""
        try:
            entries = sorted(self.trash.iterdir())
        except FileNotFoundError:
            return
        except OSError as e:
            log.error("cannot read %s: %s", self.trash, e)
            return
        for entry in entries:
            try:
                remove_workspace(entry)
            except AgentError as e:
                self._purge_or_report(entry, e)

    def _move_aside(self, path: Path) -> Path | None:
        try:
            self.trash.mkdir(mode=0o700, exist_ok=True)
            entry = self.trash / f"{path.name}.{time.time_ns()}"
            entry.mkdir(mode=0o700)
            os.rename(path, entry / _PURGED_NAME)
            return entry
        except OSError:
            return None

    def _purge_or_report(self, entry: Path, error: AgentError) -> None:
        """A trash entry our own removal could not empty: a root container's turn, else a log line."""
        if self._purge is not None and (entry / _PURGED_NAME).exists():
            with self._lock:
                try:
                    self._purge(entry)
                    remove_workspace(entry)
                    log.info("removed %s with a root container", entry)
                    return
                except AgentError as e:
                    error = e
        log.error("leftovers stay in %s (remove them as root): %s", entry, error)
