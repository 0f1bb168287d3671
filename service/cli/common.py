"""What every command module shares: a command's table row (``Command``, ``arg``), the
database sessions a command works in, and how a file it cannot read is reported."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from service.db import migrate
from service.errors import Invalid
from service.settings import Settings


def examples(*lines: str) -> str:
    return "example:\n" + "\n".join(f"  {line}" for line in lines)


def sessions_of(settings: Settings):  # type: ignore[no-untyped-def]
    from service.db.tables import make_engine, make_sessionmaker

    settings.ensure_dirs()
    engine = make_engine(settings.sqlalchemy_url)
    if not migrate.is_current(engine):
        raise SystemExit("the database schema is not up to date: run `whaleid db upgrade` first")
    return make_sessionmaker(engine)


@contextmanager
def reading_files() -> Iterator[None]:
    """A file the command was given that cannot be read (missing, a folder, not allowed) is the
    caller's to fix: ``Invalid`` with the system's message, so ``main`` reports it."""
    try:
        yield
    except OSError as e:
        raise Invalid(str(e)) from e


@dataclass(frozen=True)
class Arg:
    """One ``add_argument`` call: its flags and keywords."""

    flags: tuple[str, ...]
    options: dict[str, Any]


def arg(*flags: str, **options: Any) -> Arg:
    return Arg(flags, options)


@dataclass(frozen=True)
class Command:
    """One ``whaleid`` command: where it sits (``("models", "add")``), what runs it, its help,
    examples and arguments."""

    path: tuple[str, ...]
    func: Callable[[argparse.Namespace, Settings], int]
    help: str
    examples: tuple[str, ...]
    args: tuple[Arg, ...] = ()
    description: str | None = None
