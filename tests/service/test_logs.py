"""What the command line says on a normal first run: what a user needs at INFO, no noise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
