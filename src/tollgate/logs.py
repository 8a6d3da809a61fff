"""Log output: one JSON object a line (the default of `tollgate serve`) or text for people.

A log call may carry structured fields as ``extra={"fields": {...}}`` (the per-request line
does); JSON output makes them top-level keys, text output appends them as ``key=value``.
Both write one line per record whatever the message holds: a newline in a value (an end-user
id is client input) is escaped, so nobody can forge a log line.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

__all__ = ["JsonFormatter", "TextFormatter", "configure_logging"]

_QUIET = ("httpx", "httpx2", "httpcore", "openai", "aiohttp.access")


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, "fields", None)
    return fields if isinstance(fields, dict) else {}


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "msg", ...fields, "exc"}``, one line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in _fields(record).items():
            out.setdefault(key, value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message key=value …``, one line."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = _fields(record)
        if fields:
            line += "".join(f" {key}={_text_value(value)}" for key, value in fields.items())
        return line.replace("\r", "\\r").replace("\n", "\\n")


def _text_value(value: object) -> str:
    text = str(value)
    if text and all(c.isprintable() and not c.isspace() and c not in "\"='" for c in text):
        return text
    return json.dumps(text, ensure_ascii=False)


def configure_logging(level: str, fmt: str, stream: TextIO | None = None) -> None:
    """Route the root logger to ``stream`` (stderr) at ``level`` in format ``json``/``text``."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    if level.lower() != "debug":
        # Client libraries log every HTTP call at INFO; that is noise in Tollgate's own log.
        for noisy in _QUIET:
            logging.getLogger(noisy).setLevel(logging.WARNING)
