"""Limits on what reaches the database, the same on every database.

PostgreSQL refuses a NUL character in text and text longer than its column; SQLite would store
both. Refusing them here, before a flush, makes the behaviour independent of the database. The
label ``new_individual`` marks "not in the catalogue" in every answer, so it can never be a
catalogue id, whichever way one is made (decision, create, rename, import, split).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, String, inspect
from sqlalchemy.orm import InstrumentedAttribute, Session

from service.text import check_catalogue_id, check_text

# Database ids are signed 64-bit integers: a larger number can name no row.
MAX_ROW_ID = 2**63 - 1


def column_length(attribute: InstrumentedAttribute[Any]) -> int:
    """The length of a ``String(n)`` column: the one source of each text limit."""
    length = attribute.property.columns[0].type.length
    assert isinstance(length, int), f"{attribute} is not a String(n) column"
    return length


def _check_json(field: str, value: Any) -> None:
    if isinstance(value, str):
        check_text(field, value)
    elif isinstance(value, dict):
        for key, item in value.items():
            check_text(field, str(key))
            _check_json(field, item)
    elif isinstance(value, list | tuple):
        for item in value:
            _check_json(field, item)


def check_row(instance: object) -> None:
    """Check every loaded text and JSON value of a mapped ``instance`` against its column."""
    state = inspect(instance)
    table = state.mapper.local_table.name
    for prop in state.mapper.column_attrs:
        if prop.key not in state.dict:
            continue
        value = state.dict[prop.key]
        column_type = prop.columns[0].type
        field = f"{table}.{prop.columns[0].name}"
        if isinstance(column_type, String) and isinstance(value, str):
            check_text(field, value, column_type.length)
        elif isinstance(column_type, JSON):
            _check_json(field, value)
    if table == "individuals" and isinstance(state.dict.get("catalogue_id"), str):
        check_catalogue_id(state.dict["catalogue_id"])


def refuse_bad_text(session: Session, _context: object, _instances: object) -> None:
    """A ``before_flush`` hook: nothing the checks above refuse is ever written."""
    for instance in (*session.new, *session.dirty):
        check_row(instance)
