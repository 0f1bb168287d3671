"""The ``whaleid`` command line: ``main()``, and the parser built from each group's table of
commands (``service/cli/{serve,db,models,jobs,keys,catalogue}.py``). A command raises a
``DomainError`` for what it cannot do; ``main`` logs its message and exits with its status."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from service.cli import catalogue, db, jobs, keys, models, serve
from service.cli.common import Command, examples
from service.errors import DomainError
from service.logs import escape_handlers
from service.settings import Settings

log = logging.getLogger("whaleid")

# The command groups (``whaleid models ...``), in the order --help lists them among commands.
GROUPS = {
    "db": "database schema (Alembic)",
    "models": "embedding models",
    "jobs": "background jobs",
    "keys": "API keys",
}
# The order --help lists commands and groups in (a group's commands in its module's order).
ORDER = (
    "serve",
    "db",
    "models",
    "reindex",
    "jobs",
    "worker",
    "keys",
    "import",
    "prune",
    "evaluate",
)

COMMANDS: tuple[Command, ...] = tuple(
    sorted(
        serve.COMMANDS
        + db.COMMANDS
        + models.COMMANDS
        + jobs.COMMANDS
        + keys.COMMANDS
        + catalogue.COMMANDS,
        key=lambda c: ORDER.index(c.path[0]),
    )
)


def build_parser() -> argparse.ArgumentParser:
    """The ``whaleid`` parser, built from ``COMMANDS``: a group's subparsers appear when its
    first command does."""
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="whaleid",
        formatter_class=fmt,
        description="Photo-ID identification of whales and dolphins.",
        epilog=examples("whaleid serve --host 127.0.0.1 --port 8000"),
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    groups: dict[str, Any] = {}
    for command in COMMANDS:
        where = sub
        if len(command.path) == 2:
            group = command.path[0]
            if group not in groups:
                parent = sub.add_parser(group, help=GROUPS[group])
                groups[group] = parent.add_subparsers(dest=f"{group}_command", required=True)
            where = groups[group]
        leaf = where.add_parser(
            command.path[-1],
            help=command.help,
            formatter_class=fmt,
            description=command.description,
            epilog=examples(*command.examples),
        )
        for a in command.args:
            leaf.add_argument(*a.flags, **a.options)
        leaf.set_defaults(func=command.func)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = Settings()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    escape_handlers(logging.getLogger())  # no input can start a line of its own
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    # Alembic announces its context on every command; `whaleid -v` shows it.
    logging.getLogger("alembic").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    func: Callable[[argparse.Namespace, Settings], int] = args.func
    try:
        return func(args, settings)
    except DomainError as e:  # the one place a command's error becomes its exit status
        log.error("%s", e)
        if e.report is not None:
            sys.stdout.write(json.dumps(e.report, indent=2) + "\n")
        return e.exit_status
