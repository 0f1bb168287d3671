"""One error path: every error a request or command can meet is a ``DomainError`` of
``service/errors.py``, the API answers it from one table, and the command line catches it once."""

from __future__ import annotations

import ast
import inspect
import logging
from pathlib import Path

import pytest

from service import errors
from service.api.errors import PROBLEMS, answer_of
from service.cli import main
from service.errors import (
    Busy,
    DomainError,
    KeyRevoked,
    NoActiveModel,
    OverRate,
    PhotoTooLarge,
    UnreadablePhoto,
    UnsupportedPhoto,
)

SERVICE = Path(__file__).resolve().parents[3] / "service"

# Raised and handled inside the service; no request or command meets them (service/errors.py
# says why for each).
INTERNAL = {
    "jobs/queue.py": {"LeaseLost"},
    "models/switch.py": {"_TooManyLate"},
    "gallery/index.py": {"GalleryFileError"},
    "matching/local.py": {"IndexFileError"},  # a saved descriptor index: rebuilt, never shown
    "store/objects.py": {"MissingObject"},
    "outbound/callbacks.py": {"BadSignature"},
    "client.py": {"WhaleidError", "JobTimeout"},
    "api/guard.py": {"Refused"},
}
# Domain errors the API answers 500 (logged): the service's own state is wrong, not the request.
# (``SignInRefused`` itself is only raised as one of its kinds, which the table answers.)
NOT_IN_THE_TABLE = {"ModelFileCorrupt", "SchemaNotCurrent", "SignInRefused"}


def _exception_classes(path: Path) -> set[str]:
    """The classes ``path`` defines that derive from something named like an exception."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ClassDef):
            bases = [ast.unparse(b) for b in node.bases]
            if any(b.endswith(("Error", "Exception", "Exit")) for b in bases):
                found.add(node.name)
            elif any(b in {"NotFound", "Conflict", "Invalid", "DomainError"} for b in bases):
                found.add(node.name)
    return found


def test_every_error_class_is_defined_in_service_errors() -> None:
    wrong = []
    for path in sorted(SERVICE.rglob("*.py")):
        name = path.relative_to(SERVICE).as_posix()
        if name == "errors.py":
            continue
        extra = _exception_classes(path) - INTERNAL.get(name, set())
        wrong += [f"{name}: {cls}" for cls in sorted(extra)]
    assert not wrong, "define these in service/errors.py:\n" + "\n".join(wrong)


def test_every_domain_error_has_a_status_from_the_one_table() -> None:
    classes = [
        cls
        for _, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, DomainError) and cls is not DomainError
    ]
    unanswered = {cls.__name__ for cls in classes if not any(c in PROBLEMS for c in cls.__mro__)}
    assert unanswered == NOT_IN_THE_TABLE


@pytest.mark.parametrize(
    ("error", "status", "headers"),
    [
        (UnsupportedPhoto("not an image"), 415, {}),
        (PhotoTooLarge("too large"), 413, {}),
        (UnreadablePhoto("truncated"), 422, {}),
        (NoActiveModel(), 503, {}),
        (Busy("decode", 2.5), 503, {"Retry-After": "3"}),
        (KeyRevoked(), 401, {"WWW-Authenticate": "Bearer"}),
        (OverRate("over the rate", retry_after=7), 429, {"Retry-After": "7"}),
        (OverRate("over the rate"), 429, {}),
    ],
)
def test_the_table_answers_the_nearest_class(
    error: DomainError, status: int, headers: dict[str, str]
) -> None:
    answer = answer_of(error)
    assert answer is not None
    assert (answer.status, dict(answer.headers(error))) == (status, headers)


def test_routers_raise_domain_errors_not_http_exceptions() -> None:
    users = sorted(
        p.relative_to(SERVICE).as_posix()
        for p in (SERVICE / "api").rglob("*.py")
        if "HTTPException" in p.read_text()
    )
    assert users == ["api/errors.py", "api/guard.py"]


def test_the_command_line_catches_domain_errors_once() -> None:
    handlers = []
    for path in sorted((SERVICE / "cli").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ExceptHandler):
                handlers.append(f"{path.name}: {ast.unparse(node.type) if node.type else ''}")
    assert handlers == ["__init__.py: DomainError", "common.py: OSError"]


def test_a_commands_domain_error_is_logged_and_exits_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("WHALEID_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("WHALEID_DATABASE_URL", f"sqlite:///{tmp_path / 'db.sqlite'}")
    assert main(["db", "upgrade"]) == 0
    with caplog.at_level(logging.ERROR, logger="whaleid"):
        assert main(["keys", "revoke", "99"]) == 2
        assert main(["prune", "--days", "-1"]) == 2
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR] == [
        "key 99 does not exist",
        "--days must be 0 or more, not -1",
    ]
