#!/usr/bin/env bash
# Set up whaleid on the embedded default (SQLite and files under ./data) and start it; on the
# first run it activates the demo model and imports a synthetic gallery (demo/setup.sh).
#   HOST and PORT choose where it listens (default 127.0.0.1:8000); WHALEID_* settings apply.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
if [ -z "${SKIP_INSTALL:-}" ]; then  # SKIP_INSTALL=1: use .venv as it is (tests/test_readme.py)
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[heic]'
fi
# First run: the demo model and a synthetic gallery, unless a model is active already.
bash demo/setup.sh .venv
# `serve` applies the database migrations before it starts (the prestart step).
exec .venv/bin/whaleid serve --host "${HOST:-127.0.0.1}" --port "${PORT:-8000}"
