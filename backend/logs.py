"""How the ``nbs`` command logs: readable text by default, or one JSON object per line.

Library code logs through module loggers and never configures logging; the CLI calls
:func:`configure` once at start and again when ``nbs serve`` reloads its config.  Both formats
go to stderr (the journal under systemd).

JSON lines carry ``time`` (UTC, RFC 3339 with milliseconds), ``level``, ``logger``,
``message``, every field a caller passed with ``extra={...}`` (``peer``, ``export``, ...)
and ``exception`` when the record has a traceback.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import TextIO

TEXT_FORMAT = "nbs: %(levelname)s %(name)s: %(message)s"

# Attributes every LogRecord has: whatever else a record carries came from ``extra``.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


class JSONFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class _Handler(logging.StreamHandler[TextIO]):
    """The one handler :func:`configure` installs (recognised again on reconfiguration)."""


def configure(level: str = "info", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Send every log record at ``level`` or above to stderr as ``fmt`` (text or json).

    Replaces the handlers of the root logger, so calling it again switches level and format
    at once (as a config reload does) without duplicating lines.
    """
    root = logging.getLogger()
    handler = next((h for h in root.handlers if isinstance(h, _Handler)), None)
    if handler is None or (stream is not None and handler.stream is not stream):
        handler = _Handler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JSONFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    for other in list(root.handlers):
        if other is not handler:
            root.removeHandler(other)
    if handler not in root.handlers:
        root.addHandler(handler)
    root.setLevel(level.upper())
