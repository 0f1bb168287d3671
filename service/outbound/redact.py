"""What a partner may read of a URL or an error: never a signed query string, never a path on
the server."""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

_URL = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>]+")
# An absolute path of two or more parts that is not part of a URL (no ":" or "/" before it).
_PATH = re.compile(r"(?<![\w:/.~-])/(?:[^\s/'\"<>]+/)+[^\s/'\"<>]*")


def without_query(url: str) -> str:
    """``url`` without its query, fragment and credentials (a signed photo URL's token)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return url.split("?", 1)[0].split("#", 1)[0]
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc += f":{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def public_text(text: str) -> str:
    """``text`` (an error message) with URLs cut to their path and server paths hidden."""
    pieces = []
    last = 0
    for match in _URL.finditer(text):
        pieces.append(_PATH.sub("<server path>", text[last : match.start()]))
        pieces.append(without_query(match.group(0)))
        last = match.end()
    pieces.append(_PATH.sub("<server path>", text[last:]))
    return "".join(pieces)
