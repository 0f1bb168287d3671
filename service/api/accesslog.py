"""Keys never reach a log: the access log's request line loses every query value that could be
a key (keys are only accepted in the Authorization header, but a client may still put one in a
URL)."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import parse_qsl, urlencode

from service.auth import KEY_PREFIX

ACCESS_LOGGER = "uvicorn.access"
_SECRET_NAMES = re.compile(r"key|token|auth|secret|password|session", re.IGNORECASE)


def redact(path: str) -> str:
    """``path`` with the value of each query parameter that names or holds a secret replaced."""
    base, sep, query = path.partition("?")
    if not sep:
        return path
    cleaned = []
    for name, value in parse_qsl(query, keep_blank_values=True):
        if KEY_PREFIX in name:
            name, value = "REDACTED", ""
        elif _SECRET_NAMES.search(name) or KEY_PREFIX in value:
            value = "REDACTED"
        cleaned.append((name, value))
    if not cleaned and KEY_PREFIX in query:  # nothing parsed, but a key is there
        return f"{base}?REDACTED"
    return f"{base}?{urlencode(cleaned)}"


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
