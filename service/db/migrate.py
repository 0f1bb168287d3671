"""Schema changes go through Alembic only; the app never calls ``create_all``."""

from __future__ import annotations

import importlib.util

from alembic import command
from alembic.config import Config
from sqlalchemy import inspect
from sqlalchemy.engine import Engine


def script_location() -> str:
    """The folder of the Alembic scripts, installed beside ``service`` as the ``migrations``
    package's data. Found, not imported: ``migrations/env.py`` imports ``service``, and the
    service never imports ``migrations``."""
    spec = importlib.util.find_spec("migrations")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the migrations folder is not installed: reinstall whaleid")
    return str(next(iter(spec.submodule_search_locations)))


def alembic_config(url: str) -> Config:
    """An Alembic config pointing at ``migrations/`` for the database at ``url``."""
    config = Config()
    config.set_main_option("script_location", script_location())
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the schema at ``url`` up to ``revision``."""
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    """Take the schema at ``url`` down to ``revision`` (``base`` drops everything)."""
    command.downgrade(alembic_config(url), revision)


def is_current(engine: Engine) -> bool:
    """True when the database has the schema of the newest migration."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(alembic_config(str(engine.url)))
    with engine.connect() as connection:
        if not inspect(connection).has_table("alembic_version"):
            return False
        current = MigrationContext.configure(connection).get_current_heads()
    return set(current) == set(script.get_heads())
