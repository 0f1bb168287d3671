"""Control characters: refused in the URLs the service accepts, escaped in what it logs, so no
input can start a line of its own in a log (or a header) that looks like the service's."""

from __future__ import annotations

import re

# C0 (tab, line feed, carriage return, escape...), DEL, C1 (NEL...), and the Unicode line and
# paragraph separators, which some viewers also break lines at.
CONTROL_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def control_character(text: str) -> str | None:
    """The first control character of ``text``, named as U+XXXX, or None."""
    found = CONTROL_CHARACTERS.search(text)
    return None if found is None else f"U+{ord(found.group()):04X}"


def _escaped(match: re.Match[str]) -> str:
    char = match.group()
    return _NAMED.get(char) or (
        f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}"
    )


def escape_controls(text: str) -> str:
    """``text`` with each control character written as an escape (``\\n``, ``\\x1b``,
    ``\\u2028``), as Python writes it in a string literal."""
    return CONTROL_CHARACTERS.sub(_escaped, text)
