"""Logging set-up: text or JSON lines, the task id on every task line, secrets redacted.

Secrets are never passed to the logger on purpose; the redacting filter is the
second line of defence, for a message that quotes something unexpected (a
server echoing a request, an exception holding a header).
"""

from __future__ import annotations

import contextvars
import json
import logging
import logging.handlers
import os
import sys
import threading
import time
from pathlib import Path
from typing import IO

MASK = "***"

# The task a thread works for: a runner sets it, so every line it logs, whichever
# module logs it (a client retry, a Docker call), carries the task id.
current_task: contextvars.ContextVar[str | None] = contextvars.ContextVar("task_id", default=None)
_EXC = logging.Formatter()


class RedactSecrets(logging.Filter):
    def __init__(self, secrets: list[str]):
        super().__init__()
        self.secrets = [s for s in secrets if s and len(s) >= 6]

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            message = record.getMessage()
            redacted = mask(message, *self.secrets)
            if redacted != message:
                record.msg, record.args = redacted, None
            if record.exc_info and not record.exc_text:  # formatters reuse exc_text: mask it once here
                record.exc_text = _EXC.formatException(record.exc_info)
            if record.exc_text:
                record.exc_text = mask(record.exc_text, *self.secrets)
        return True


class TaskContext(logging.Filter):
    """Gives a record logged in a task's thread that task's id (unless it names one already)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "task_id", None):
            record.task_id = current_task.get()
        return True


def mask(text: str, *secrets: str | None) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, MASK)
    return text


class JsonFormatter(logging.Formatter):
    """One JSON object per line with stable keys: ts, level, logger, msg, task_id (when known), exc."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        task_id = getattr(record, "task_id", None)
        if task_id:
            entry["task_id"] = task_id
        if record.exc_info or record.exc_text:
            entry["exc"] = record.exc_text or self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


class TextFormatter(logging.Formatter):
    """TEXT_FORMAT lines; a task's line whose message does not name the task gets "task <id>: " first."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        task_id = getattr(record, "task_id", None)
        if task_id and task_id not in record.message:
            return f"{line[:len(line) - len(record.message)]}task {task_id}: {record.message}"
        return line


def _log_uncaught(args: threading.ExceptHookArgs) -> None:
    """A thread's uncaught exception becomes a log line (one JSON object in json format), not bare stderr."""
    if issubclass(args.exc_type, SystemExit):
        return
    logging.getLogger("agent_core").critical(
        "uncaught exception in thread %s", args.thread.name if args.thread else "?",
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


class PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """Size-rotated log file (max_bytes 0 = never) whose every generation is 0600: lines may quote task data."""

    def _open(self) -> IO[str]:
        stream = super()._open()
        os.chmod(self.baseFilename, 0o600)
        return stream


def make_handler(fmt: str = "text", *, stream: IO[str] | None = None, secrets: list[str] | None = None,
                 file: Path | None = None, max_bytes: int = 0, backups: int = 0) -> logging.Handler:
    """The one handler `setup` installs: text or JSON lines to `stream` (or a rotated `file`), task ids
    filled in, secrets masked."""
    handler: logging.Handler
    if file is not None:
        handler = PrivateRotatingFileHandler(file, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
    else:
        handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(TaskContext())
    handler.addFilter(RedactSecrets(secrets or []))
    return handler


def setup(level: str = "info", fmt: str = "text", *, stream: IO[str] | None = None,
          secrets: list[str] | None = None, file: Path | None = None, max_bytes: int = 0,
          backups: int = 0) -> None:
    handler = make_handler(fmt, stream=stream, secrets=secrets, file=file, max_bytes=max_bytes, backups=backups)
    threading.excepthook = _log_uncaught
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # httpx logs every request at INFO; that is our DEBUG
    logging.getLogger("httpx").setLevel(max(logging.WARNING, root.level))
    logging.getLogger("httpcore").setLevel(max(logging.WARNING, root.level))
    logging.getLogger("urllib3").setLevel(max(logging.WARNING, root.level))
    logging.getLogger("docker").setLevel(max(logging.WARNING, root.level))
