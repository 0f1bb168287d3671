#!/usr/bin/env bash
# Set up everything the tests need and run the whole suite:
#   Debian packages (PostgreSQL 15, Chromium and its driver for the review page), a virtualenv with the service and its dev tools,
#   a throw-away PostgreSQL cluster on a free loopback port, then ruff, mypy and pytest; then
#   the training and export suites in TensorFlow virtualenvs of their own, on Python 3.13 and
#   3.11 (WHALEID_TF_PYTHONS="3.13" runs 3.13 only).
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

# Training and export (TensorFlow, Keras 3) on each Python in WHALEID_TF_PYTHONS, each in its own
# virtualenv (.venv-train for the first, .venv-train-X.Y for the others), so that the serving one
# above never sees TensorFlow. Each gets the serving install first and then the train and export
# extras, which must not downgrade anything the service installed.
find_python() {  # python3.13 on the PATH, or pyenv's 3.13.x
  if "python$1" --version >/dev/null 2>&1; then command -v "python$1"; return; fi
  if command -v pyenv >/dev/null; then
    local v
    v=$(pyenv versions --bare | grep -E "^$1\.[0-9]+$" | sort -V | tail -1)
    if [ -n "$v" ]; then echo "$(pyenv root)/versions/$v/bin/python$1"; return; fi
  fi
  return 1
}
tf_suite() {  # VERSION VENV
  local py venv=$2
  py=$(find_python "$1") || { log "Python $1 not found: install it (e.g. pyenv install $1)"; exit 1; }
  [ -x "$venv/bin/python" ] || { log "creating $venv (Python $1)"; "$py" -m venv "$venv"; }
  log "installing whaleid with the dev and heic extras, then train and export, into $venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q -e '.[dev,heic]'
  "$venv/bin/python" -m pip freeze --exclude-editable > "$venv/serving-freeze.txt"
  "$venv/bin/python" -m pip install -q -e '.[dev,heic,train,export]'
  "$venv/bin/python" - "$venv/serving-freeze.txt" <<'PY'
import importlib.metadata as md, sys
from packaging.version import Version
lower = []
for line in open(sys.argv[1]):
    name, _, was = line.strip().partition("==")
    if was and Version(md.version(name)) < Version(was):
        lower.append(f"{name} {was} -> {md.version(name)}")
if lower:
    sys.exit("the train/export extras downgrade serving dependencies: " + ", ".join(lower))
PY
  "$venv/bin/python" -m pip check
  log "pytest (training and export, TensorFlow on the CPU, Python $1)"
  CUDA_VISIBLE_DEVICES= "$venv/bin/pytest" tests/training tests/model_export "${@:3}"
}
read -r -a tf_pythons <<< "${WHALEID_TF_PYTHONS:-3.13 3.11}"
for i in "${!tf_pythons[@]}"; do
  version=${tf_pythons[$i]}
  venv=.venv-train
  [ "$i" -eq 0 ] || venv=".venv-train-$version"
  tf_suite "$version" "$venv" "$@"
done
