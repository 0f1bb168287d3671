#!/usr/bin/env bash
# Install the serving part of whaleid into the virtualenv $WHALEID_VENV, from the current
# directory (a copy holding pyproject.toml, README.md, LICENSE, service/ and migrations/).
# The Dockerfile's build stage runs it; tests/test_docker.py replays it in a fresh virtualenv.
# It rewrites pyproject.toml in place: run it on a copy, never on your checkout.
set -euo pipefail
: "${WHALEID_VENV:?set WHALEID_VENV to the virtualenv to create}"
python3 scripts/serving_pyproject.py pyproject.toml
python3 -m venv "$WHALEID_VENV"
"$WHALEID_VENV/bin/pip" install --quiet '.[heic,s3]'
# The image must not hold TensorFlow or the training code.
if "$WHALEID_VENV/bin/python" -c 'import importlib.util as u, sys; sys.exit(not any(u.find_spec(m) for m in ("tensorflow", "training", "model_export")))'; then
  echo "install-serving.sh: TensorFlow or training code got into the serving virtualenv" >&2
  exit 1
fi
