"""``whaleid db``: the database schema (Alembic)."""

from __future__ import annotations

import argparse
import logging

from service.cli.common import Command, arg
from service.db import migrate
from service.settings import Settings

log = logging.getLogger("whaleid")


def cmd_db_upgrade(args: argparse.Namespace, settings: Settings) -> int:
    settings.ensure_dirs()
    migrate.upgrade(settings.sqlalchemy_url, args.revision)
    log.info("database at revision %s", args.revision)
    return 0


def cmd_db_downgrade(args: argparse.Namespace, settings: Settings) -> int:
    migrate.downgrade(settings.sqlalchemy_url, args.revision)
    log.info("database at revision %s", args.revision)
    return 0


COMMANDS = (
    Command(
        ("db", "upgrade"),
        cmd_db_upgrade,
        "apply migrations",
        ("whaleid db upgrade",),
        (arg("--revision", default="head"),),
    ),
    Command(
        ("db", "downgrade"),
        cmd_db_downgrade,
        "revert migrations",
        ("whaleid db downgrade base",),
        (arg("revision"),),
    ),
)
