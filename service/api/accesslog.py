"""Keys never reach a log: the access log's request line loses every path segment that holds a
key (``wid_...``, percent-encoded or not) and every query value that could be one (keys are only
accepted in the Authorization header, but a client may still put one in a URL)."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import parse_qsl, unquote, urlencode

from service.access.auth import KEY_PREFIX

ACCESS_LOGGER = "uvicorn.access"
_SECRET_NAMES = re.compile(r"key|token|auth|secret|password|session", re.IGNORECASE)


def redact(path: str) -> str:
    """``path`` with each segment that holds a key, and the value of each query parameter that
    names or holds a secret, replaced."""
    base, sep, query = path.partition("?")
    base = "/".join(_redact_segment(segment) for segment in base.split("/"))
    if not sep:
        return base
    cleaned = []
    for name, value in parse_qsl(query, keep_blank_values=True):
        if KEY_PREFIX in name:
            name, value = "REDACTED", ""
        elif _SECRET_NAMES.search(name) or KEY_PREFIX in value:
            value = "REDACTED"
        cleaned.append((name, value))
    if not cleaned and KEY_PREFIX in unquote(query):  # nothing parsed, but a key is there
        return f"{base}?REDACTED"
    return f"{base}?{urlencode(cleaned)}"


def _redact_segment(segment: str) -> str:
    # Decoded first: ``wid%5F...`` is the same key to whoever reads the log.
    return "REDACTED" if KEY_PREFIX in unquote(segment) else segment


class RedactQueryKeys(logging.Filter):
    """For uvicorn's access log, whose arguments are (client, method, path, version, status)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
            record.args = (*args[:2], redact(args[2]), *args[3:])
        return True


@contextmanager
def redacted_access_log() -> Iterator[None]:
    """Redact the access log while the app serves (uvicorn configures its loggers first)."""
    logger = logging.getLogger(ACCESS_LOGGER)
    guard = RedactQueryKeys()
    logger.addFilter(guard)
    try:
        yield
    finally:
        logger.removeFilter(guard)
