"""Text the service takes in: control characters refused in the URLs it accepts and escaped in
what it logs, so no input can start a line of its own in a log (or a header) that looks like the
service's; and the checks every stored text passes, the same on every database (PostgreSQL
refuses a NUL and text longer than its column, SQLite would keep both; ``service.db.checks``
applies them before each flush). The label ``new_individual`` marks "not in the catalogue" in
every answer, so it can never be a catalogue id, whichever way one is made."""

from __future__ import annotations

import re

from service.errors import BadText
from service.knn import NEW_INDIVIDUAL

NUL = "\x00"

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


def text_problem(value: str, max_length: int | None = None) -> str | None:
    """What is wrong with ``value`` (None if nothing)."""
    if NUL in value:
        return "must not contain a NUL (\\x00) character"
    if max_length is not None and len(value) > max_length:
        return f"is {len(value)} characters long, over its limit of {max_length}"
    return None


def check_text(
    field: str, value: str | None, max_length: int | None = None, *, plain: bool = False
) -> None:
    """Raise ``BadText`` naming ``field`` if ``value`` cannot be stored. ``plain``: a name that
    answers, CSV files and logs print as it is (a file name) may hold no control character."""
    if value is None:
        return
    problem = text_problem(value, max_length)
    char = control_character(value) if plain and problem is None else None
    if char is not None:
        problem = f"holds a control character ({char}): rename it without one"
    if problem:
        raise BadText(f"{field} {problem}")


def is_reserved(catalogue_id: str) -> bool:
    return catalogue_id.strip().casefold() == NEW_INDIVIDUAL


def check_catalogue_id(catalogue_id: str) -> None:
    if is_reserved(catalogue_id):
        raise BadText(
            f"{catalogue_id!r} is reserved: {NEW_INDIVIDUAL} marks an animal not in the "
            "catalogue in every answer; choose another catalogue id"
        )
    char = control_character(catalogue_id)
    if char is not None:  # answers, results.csv and logs print a catalogue id as it is
        raise BadText(
            f"catalogue id {escape_controls(catalogue_id)!r} holds a control character ({char}): "
            "choose one without"
        )
