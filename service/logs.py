"""Structured logs: one JSON object a line (``WHALEID_LOG_FORMAT=json``), each carrying the id of
the request it was written for, so a log search can follow one request across its lines."""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

# Set by the request middleware; thread-pool work inherits it (anyio copies the context).
request_id: ContextVar[str | None] = ContextVar("whaleid_request_id", default=None)

# The loggers a served app writes to: ours (root) and uvicorn's.
SERVED_LOGGERS = ("", "uvicorn", "uvicorn.error", "uvicorn.access")
_ACCESS_FIELDS = ("client", "method", "path", "http_version", "status")


class JsonFormatter(logging.Formatter):
    """``{"time", "level", "logger", "message", "request_id", ...}``; uvicorn's access lines also
    get their client, method, path and status as fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = request_id.get()
        if rid is not None:
            entry["request_id"] = rid
        if record.name == "uvicorn.access" and isinstance(record.args, tuple):
            entry.update(zip(_ACCESS_FIELDS, record.args, strict=False))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


@contextmanager
def json_logs() -> Iterator[None]:
    """Format every handler of the served loggers as JSON while the app serves (uvicorn has
    configured its handlers by then), and restore their formatters afterwards."""
    formatter = JsonFormatter()
    previous: list[tuple[logging.Handler, logging.Formatter | None]] = []
    for name in SERVED_LOGGERS:
        for handler in logging.getLogger(name).handlers:
            previous.append((handler, handler.formatter))
            handler.setFormatter(formatter)
    try:
        yield
    finally:
        for handler, old in previous:
            handler.setFormatter(old)
