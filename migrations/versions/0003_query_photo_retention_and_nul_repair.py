"""query photo retention (images.pruned_at); remove NUL characters from stored text

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30 04:40:00

Before 0003 a NUL character could reach the database: SQLite kept it in any text column, and
PostgreSQL kept it as a \\u0000 escape in JSON columns (an identification's filters), where it
broke every later query reading that JSON. Those NULs are removed ("x\\0y" becomes "xy"); the
service now refuses them at the edge.
"""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TEXT_COLUMNS = {
    "individuals": ("catalogue_id", "species", "display_name"),
    "images": ("original_name", "species", "encounter", "location"),
    "identification_candidates": ("label", "species"),
    "decisions": ("curator", "comment"),
    "individual_events": ("actor",),
    "api_keys": ("name",),
}
JSON_COLUMNS = {"identifications": ("filters",), "individual_events": ("detail",)}


def _without_nul(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("\x00", "")
    if isinstance(value, dict):
        return {_without_nul(k): _without_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_nul(v) for v in value]
    return value


def _repair_text(conn: sa.Connection) -> None:
    # Only SQLite can hold a NUL in a text column; compare bytes, as its text functions stop at
    # a NUL.
    for table, columns in TEXT_COLUMNS.items():
        for column in columns:
            rows = conn.execute(
                sa.text(
                    f"SELECT id, {column} FROM {table} "
                    f"WHERE instr(CAST({column} AS BLOB), x'00') > 0"
                )
            ).all()
            for row_id, value in rows:
                conn.execute(
                    sa.text(f"UPDATE {table} SET {column} = :value WHERE id = :id"),
                    {"value": value.replace("\x00", ""), "id": row_id},
                )


def _repair_json(conn: sa.Connection, postgres: bool) -> None:
    # Both databases keep a NUL in JSON as the six characters \u0000.
    for table, columns in JSON_COLUMNS.items():
        for column in columns:
            as_text = f"CAST({column} AS TEXT)"
            found = "strpos" if postgres else "instr"
            rows = conn.execute(
                sa.text(
                    f"SELECT id, {as_text} FROM {table} WHERE {found}({as_text}, '\\u0000') > 0"
                )
            ).all()
            for row_id, text in rows:
                repaired = json.dumps(_without_nul(json.loads(text)))
                cast = "CAST(:value AS JSON)" if postgres else ":value"
                conn.execute(
                    sa.text(f"UPDATE {table} SET {column} = {cast} WHERE id = :id"),
                    {"value": repaired, "id": row_id},
                )


def upgrade() -> None:
    with op.batch_alter_table("images", schema=None) as batch_op:
        batch_op.add_column(sa.Column("pruned_at", sa.DateTime(timezone=True), nullable=True))
    conn = op.get_bind()
    postgres = conn.dialect.name == "postgresql"
    if not postgres:
        _repair_text(conn)
    _repair_json(conn, postgres)


def downgrade() -> None:
    with op.batch_alter_table("images", schema=None) as batch_op:
        batch_op.drop_column("pruned_at")
