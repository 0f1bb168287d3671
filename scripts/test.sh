#!/usr/bin/env bash
# Set up everything the tests need and run the whole suite:
#   Debian packages (PostgreSQL 15, Chromium and its driver for the review page), a virtualenv with the service and its dev tools,
#   a throw-away PostgreSQL cluster on a free loopback port, then ruff, mypy and pytest; then
#   the training and export suites in their own TensorFlow virtualenv (.venv-train).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "[test.sh] $*" >&2; }

need_apt=()
[ -x /usr/lib/postgresql/15/bin/postgres ] || need_apt+=(postgresql-15)
command -v chromium >/dev/null || need_apt+=(chromium)
command -v chromedriver >/dev/null || need_apt+=(chromium-driver)
command -v curl >/dev/null || need_apt+=(curl)  # the README walkthrough (tests/test_readme.py)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    log "missing Debian packages ${need_apt[*]}: install them with sudo apt-get install ${need_apt[*]}"
    exit 1
  fi
  log "installing ${need_apt[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  log "creating .venv"
  "$PY" -m venv .venv
fi
log "installing whaleid with the dev and heic extras"
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[dev,heic]'

# A throw-away PostgreSQL cluster. initdb refuses to run as root: use the postgres user then.
PGBIN=/usr/lib/postgresql/15/bin
PGROOT=$(mktemp -d /tmp/whaleid-pg.XXXXXX)
PGPORT=$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
as_pg() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
if [ "$(id -u)" -eq 0 ]; then chown postgres "$PGROOT"; fi
stop_pg() { as_pg "$PGBIN/pg_ctl" -D "$PGROOT/data" -m immediate stop >/dev/null 2>&1 || true; rm -rf "$PGROOT"; }
trap stop_pg EXIT
as_pg "$PGBIN/initdb" -D "$PGROOT/data" -U postgres --auth=trust -E UTF8 >/dev/null
as_pg "$PGBIN/pg_ctl" -D "$PGROOT/data" -l "$PGROOT/log" -w \
  -o "-p $PGPORT -k $PGROOT -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200" start >/dev/null
export WHALEID_TEST_POSTGRES_URL="postgresql+psycopg://postgres@127.0.0.1:$PGPORT/postgres"
log "PostgreSQL 15 on 127.0.0.1:$PGPORT"

log "ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
log "mypy"
.venv/bin/mypy
log "pytest (service, TensorFlow-free virtualenv)"
.venv/bin/pytest --ignore=tests/training --ignore=tests/model_export "$@"

# Training and export need TensorFlow 2.15 (numpy < 2): their own virtualenv, so the serving one
# never sees TensorFlow.
if [ ! -x .venv-train/bin/python ]; then
  log "creating .venv-train"
  "$PY" -m venv .venv-train
fi
log "installing whaleid with the train, export and dev extras into .venv-train"
.venv-train/bin/python -m pip install -q --upgrade pip
.venv-train/bin/python -m pip install -q -e '.[train,export,dev]'
log "pytest (training and export, TensorFlow on the CPU)"
CUDA_VISIBLE_DEVICES= .venv-train/bin/pytest tests/training tests/model_export "$@"
