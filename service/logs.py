"""Logs: one JSON object a line (``WHALEID_LOG_FORMAT=json``), each carrying the id of the request
it was written for, so a log search can follow one request across its lines; or text, where
control characters in a message and its arguments are written escaped (``\\n``), so that no
input (a URL, a name) can start a line that passes for one of the service's own.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from typing import Any

from service.text import escape_controls

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


class _Escaped:
    """An argument of a log call, written with its control characters escaped by ``%s``,
    ``%r`` and ``%(name)s`` alike."""

    def __init__(self, value: object) -> None:
        self.value = value

    def __str__(self) -> str:
        return escape_controls(str(self.value))

    def __repr__(self) -> str:
        return escape_controls(repr(self.value))

    def __format__(self, spec: str) -> str:  # f-strings, as uvicorn's access formatter uses
        return escape_controls(format(self.value, spec))


def _escaped_argument(value: object) -> object:
    # Numbers stay numbers, for %d and %.2f; they hold no control characters.
    return value if isinstance(value, int | float) else _Escaped(value)


def escaped_record(record: logging.LogRecord) -> logging.LogRecord:
    """A copy of ``record`` whose message and arguments write control characters escaped."""
    copy = logging.makeLogRecord(record.__dict__)
    copy.msg = escape_controls(record.msg) if isinstance(record.msg, str) else _Escaped(record.msg)
    args: Any = record.args
    if isinstance(args, Mapping):
        copy.args = {key: _escaped_argument(value) for key, value in args.items()}
    elif isinstance(args, tuple):
        copy.args = tuple(_escaped_argument(value) for value in args)
    return copy


class EscapingFormatter(logging.Formatter):
    """Formats as ``inner`` does (uvicorn's formatters included), with every control character
    of the message and its arguments escaped. Only a traceback or stack can follow on more
    lines; they are indented, so none of their lines passes for a record of its own."""

    def __init__(self, inner: logging.Formatter | None = None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        text = self.inner.format(escaped_record(record))
        first, newline, rest = text.partition("\n")
        if not newline:
            return text
        return first + "".join(f"\n  {escape_controls(line)}" for line in rest.split("\n"))


def escaping(formatter: logging.Formatter | None) -> logging.Formatter:
    """``formatter`` wrapped in an ``EscapingFormatter`` (once: a wrapped one is kept)."""
    if isinstance(formatter, EscapingFormatter | JsonFormatter):  # JSON escapes on its own
        return formatter
    return EscapingFormatter(formatter)


def escape_handlers(logger: logging.Logger) -> None:
    """Escape control characters in what every handler of ``logger`` writes (the command
    line's, set up by ``logging.basicConfig``)."""
    for handler in logger.handlers:
        handler.setFormatter(escaping(handler.formatter))


@contextmanager
def _formatted(make: Callable[[logging.Formatter | None], logging.Formatter]) -> Iterator[None]:
    """Give every handler of the served loggers ``make(its formatter)`` while the app serves
    (uvicorn has configured its handlers by then), and restore their formatters afterwards."""
    previous: list[tuple[logging.Handler, logging.Formatter | None]] = []
    for name in SERVED_LOGGERS:
        for handler in logging.getLogger(name).handlers:
            previous.append((handler, handler.formatter))
            handler.setFormatter(make(handler.formatter))
    try:
        yield
    finally:
        for handler, old in previous:
            handler.setFormatter(old)


def json_logs() -> AbstractContextManager[None]:
    """Every served logger's lines as JSON objects (``JsonFormatter``)."""
    formatter = JsonFormatter()
    return _formatted(lambda _: formatter)


def text_logs() -> AbstractContextManager[None]:
    """Every served logger's lines as its formatter writes them, control characters escaped."""
    return _formatted(escaping)
