"""Migrations up and down on SQLite and PostgreSQL; the models match the newest migration."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from service import migrate
from service.db import Base, make_engine

TABLES = {
    "individuals",
    "images",
    "models",
    "embeddings",
    "identifications",
    "identification_candidates",
}


def test_upgrade_downgrade_upgrade(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        migrate.upgrade(database_url)
        assert TABLES <= set(inspect(engine).get_table_names())
        assert migrate.is_current(engine)
        with engine.connect() as conn:
            diff = compare_metadata(
                MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata
            )
        assert diff == [], f"models and migrations differ: {diff}"
        migrate.downgrade(database_url, "base")
        assert not TABLES & set(inspect(engine).get_table_names())
        assert not migrate.is_current(engine)
        migrate.upgrade(database_url)
        assert TABLES <= set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
