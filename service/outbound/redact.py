"""What a partner may read of a URL or an error: never a signed query string, never a path on
the server."""

from __future__ import annotations

import re
from urllib.parse import quote, urlsplit, urlunsplit

# A query or fragment found without its "?" or "#" is cut from this length on.
_SHORTEST_BARE = 6
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


def without_secrets(text: str, url: str) -> str:
    """``text`` without the parts of ``url`` a partner may not read (its query, fragment and
    credentials), found by parsing ``url`` itself: wherever they appear in ``text``, raw,
    escaped as ``repr`` writes them, or percent-encoded as a client sends them. This is the
    redaction to use where the URL is known; ``public_text`` is the last resort."""
    try:
        parts = urlsplit(url)
        secrets = [parts.query, parts.fragment, parts.netloc.rpartition("@")[0]]
    except ValueError:
        secrets = [url.partition("?")[2], url.partition("#")[2]]
    for secret in sorted(filter(None, secrets), key=len, reverse=True):
        forms = {secret, repr(secret)[1:-1], quote(secret, safe="!#$&'()*+,/:;=?@[]~%")}
        for form in sorted(forms, key=len, reverse=True):
            text = text.replace(f"?{form}", "").replace(f"#{form}", "")
            if len(form) >= _SHORTEST_BARE:  # "4" alone would turn "404" into "…0…"
                text = text.replace(form, "…")
    return text


def public_text(text: str) -> str:
    """``text`` (an error message) with URLs cut to their path and server paths hidden (a
    pattern, which stops at a quote or a space: a last resort after ``without_secrets``)."""
    pieces = []
    last = 0
    for match in _URL.finditer(text):
        pieces.append(_PATH.sub("<server path>", text[last : match.start()]))
        pieces.append(without_query(match.group(0)))
        last = match.end()
    pieces.append(_PATH.sub("<server path>", text[last:]))
    return "".join(pieces)
