"""What the command line says on a normal first run: what a user needs at INFO, no noise; and
that no input can forge a line of the text log."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.logs import EscapingFormatter
from service.settings import Settings
from tests.conftest import run_server
from tests.toy import build_toy_model


def whaleid(data_dir: Path, *args: str) -> str:
    """Run ``whaleid ARGS`` on ``data_dir`` and return what it logged (stderr)."""
    env = {**os.environ, "WHALEID_DATA_DIR": str(data_dir), "WHALEID_LOG_LEVEL": "INFO"}
    env.pop("WHALEID_DATABASE_URL", None)
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return done.stderr


@pytest.mark.slow
def test_a_first_run_logs_what_happened_and_nothing_else(tmp_path: Path) -> None:
    data = tmp_path / "data"
    model = build_toy_model(tmp_path / "toy.onnx")
    upgrade = whaleid(data, "db", "upgrade")
    added = whaleid(data, "models", "add", str(model), "--activate")
    listed = whaleid(data, "models", "list")
    everything = upgrade + added + listed
    # Alembic's context lines, an empty progress bar and a "missing; rebuilding" for an index
    # that was never written are noise on a normal first run.
    assert "alembic" not in everything
    assert "0batch" not in everything and "embed:" not in everything
    assert "rebuilding" not in everything and "missing" not in everything
    assert "database at revision head" in upgrade
    assert "activated model id 1" in added
    assert listed.strip() == ""
    # -v shows it all.
    assert "alembic" in whaleid(data, "-v", "models", "list")


FORGED = "http://platform/hook\n2030-01-01 00:00:00,000 INFO service.jobs.queue: all is well"


def test_a_served_app_writes_control_characters_in_arguments_escaped(
    sqlite_settings: Settings,
) -> None:
    """The default text format, through a real server's lifespan: a line feed in an argument
    (a URL, say) cannot start a forged line."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        for _ in run_server(sqlite_settings):
            logging.getLogger("service.outbound.callbacks").warning(
                "callback to %s refused", FORGED
            )
    finally:
        root.removeHandler(handler)
    lines = [
        line for line in out.getvalue().splitlines() if "callback to" in line or "forged" in line
    ]
    assert lines == [
        "WARNING service.outbound.callbacks: callback to http://platform/hook\\n"
        "2030-01-01 00:00:00,000 "
        "INFO service.jobs.queue: all is well refused"
    ], out.getvalue()
    assert not isinstance(handler.formatter, EscapingFormatter)  # restored when it stopped


def test_the_text_formatter_escapes_every_control_character_and_indents_tracebacks() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(EscapingFormatter(logging.Formatter("%(levelname)s %(message)s")))
    log = logging.getLogger("tests.escaping")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("%s|%r|%d|%.1f|%s", "a\r\nb", "c\x1bd", 7, 0.25, ValueError("e\x85f"))
        log.warning("%(url)s", {"url": "g\u2028h"})
        log.warning("message\nitself")
        try:
            raise RuntimeError(FORGED)
        except RuntimeError:
            log.exception("failed at %s", "i\nj")
    finally:
        log.removeHandler(handler)
        log.propagate = True
    lines = out.getvalue().splitlines()
    assert lines[:3] == [
        "WARNING a\\r\\nb|'c\\x1bd'|7|0.2|e\\x85f",
        "WARNING g\\u2028h",
        "WARNING message\\nitself",
    ]
    assert lines[3] == "ERROR failed at i\\nj"
    # The traceback below it is indented, its forged line too: only records start a line.
    assert len(lines) > 5 and all(line.startswith("  ") for line in lines[4:]), lines
    assert lines[-1].startswith("  2030-01-01")


def test_uvicorns_access_lines_are_escaped_too() -> None:
    from uvicorn.logging import AccessFormatter

    formatter = EscapingFormatter(
        AccessFormatter('%(client_addr)s - "%(request_line)s" %(status_code)s', use_colors=False)
    )
    record = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        ("10.0.0.1:5\n", "GET", "/a\x85b", "1.1", 404),
        None,
    )
    assert formatter.format(record) == '10.0.0.1:5\\n - "GET /a\\x85b HTTP/1.1" 404 Not Found'


def test_a_retired_callback_setting_is_named_at_start(
    sqlite_settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An operator upgrading with WHALEID_CALLBACK_SECRET still set learns that it is ignored
    and where callback trust lives now."""
    monkeypatch.setenv("WHALEID_CALLBACK_SECRET", "the old shared secret")
    with caplog.at_level(logging.WARNING, logger="service.api.app"):
        for _ in run_server(sqlite_settings):
            pass
    warned = [r.getMessage() for r in caplog.records if "WHALEID_CALLBACK_SECRET" in r.getMessage()]
    assert len(warned) == 1 and "whaleid keys callbacks" in warned[0]
    assert "the old shared secret" not in caplog.text
