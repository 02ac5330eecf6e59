"""Logging set-up: text or JSON lines, the task id on every task line, secrets redacted.

Secrets are never passed to the logger on purpose; the redacting filter is the
second line of defence, for a message that quotes something unexpected (a
server echoing a request, an exception holding a header).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import IO

MASK = "***"


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
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def setup(level: str = "info", fmt: str = "text", *, stream: IO[str] | None = None,
          secrets: list[str] | None = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(RedactSecrets(secrets or []))
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
