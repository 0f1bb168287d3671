#!/usr/bin/env bash
# Rebuild demo/whaleid-demo.onnx from nothing, on a CPU, in a few minutes:
#   1. render a synthetic training catalogue (200 individuals x 12 photos, seed 1),
#   2. train the compact CNN + ArcFace with demo/config.json (whaleid-train),
#   3. export and verify it (whaleid-export) -> demo/whaleid-demo.onnx,
#   4. import the demo gallery (seed 7: individuals the model never saw) into a throw-away data
#      directory through the service and evaluate the held-out queries (whaleid evaluate),
#   5. copy a few held-out query photos to demo/queries/ for the README's curl.
# Needs the TensorFlow virtualenv .venv-train (created here if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-train
WORK=build/demo
log() { echo "[demo/build.sh] $*" >&2; }

if [ ! -x "$VENV/bin/whaleid-train" ]; then
  log "creating $VENV (TensorFlow 2.15, CPU)"
  "${PYTHON:-python3}" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e '.[train,export,dev]'
fi
rm -rf "$WORK"
mkdir -p "$WORK"
"$VENV/bin/whaleid-synthetic" "$WORK/train" --individuals 200 --photos 12 --seed 1 --size 160
"$VENV/bin/whaleid-train" train --config demo/config.json --output "$WORK/run"
"$VENV/bin/whaleid-export" "$WORK/run/model.keras" --out demo/whaleid-demo.onnx

export WHALEID_DATA_DIR="$WORK/data"
bash demo/setup.sh "$VENV"
"$VENV/bin/whaleid" evaluate "$WORK/data/demo-gallery/queries.csv" \
  --images "$WORK/data/demo-gallery/images" --predictions "$WORK/predictions.csv" \
  | tee "$WORK/evaluation.json"
# The README's curl examples: two held-out photos of catalogued individuals and one of an
# individual the catalogue does not hold. Check that the rebuilt model answers them rightly.
rm -rf demo/queries
mkdir -p demo/queries
for pair in fin-s7-0003_005.jpg:fin-s7-0003 fin-s7-0017_005.jpg:fin-s7-0017 \
            fin-s7-0042_000.jpg:new_individual; do
  name=${pair%%:*} expected=${pair#*:}
  first=$(grep "^$name," "$WORK/predictions.csv" | cut -d, -f2 | cut -d' ' -f1)
  if [ "$first" != "$expected" ]; then
    log "the rebuilt model answers $first for $name, not $expected: pick other examples"
    exit 1
  fi
  cp "$WORK/data/demo-gallery/images/$name" demo/queries/
done
log "demo/whaleid-demo.onnx rebuilt; figures in $WORK/evaluation.json"
