#!/usr/bin/env bash
# Make the demo ready in the service's data directory: when no model is active yet, register and
# activate demo/whaleid-demo.onnx and import a synthetic gallery (rendered here, deterministically,
# by whaleid-synthetic: no photos are shipped). Does nothing when a model is already active, so it
# never replaces a real one. Runs in the serving virtualenv (numpy and Pillow, no TensorFlow).
#   bash demo/setup.sh [VENV]      # VENV defaults to .venv; WHALEID_* settings apply
#   DEMO_MODEL=other.onnx bash demo/setup.sh   # (demo/build.sh checks a fresh model this way)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${1:-.venv}/bin"
DATA="${WHALEID_DATA_DIR:-data}"
GALLERY="$DATA/demo-gallery"
MODEL="${DEMO_MODEL:-demo/whaleid-demo.onnx}"
# The demo gallery: 40 individuals the model never saw in training (seed 7; it trained on seed 1),
# 5 photos each; queries.csv holds one more photo of each and 5 individuals not in the gallery.
GALLERY_ARGS=(--individuals 40 --photos 5 --queries 1 --unseen 5 --seed 7 --size 160)

log() { echo "[demo/setup.sh] $*" >&2; }

"$BIN/whaleid" db upgrade >/dev/null
if "$BIN/whaleid" models list | cut -f2 | grep -qx active; then
  log "a model is active already: leaving the catalogue as it is"
  exit 0
fi
"$BIN/python" -m training.synthetic "$GALLERY" "${GALLERY_ARGS[@]}"
"$BIN/whaleid" models add "$MODEL" --activate
"$BIN/whaleid" import "$GALLERY/catalogue.csv" --images "$GALLERY/images"
log "demo ready; held-out queries: $GALLERY/queries.csv (evaluate: $BIN/whaleid evaluate" \
  "$GALLERY/queries.csv --images $GALLERY/images)"
log "the demo model knows synthetic fins only. For your own photos pick a start (README," \
  "'Which start to pick'): no training: $BIN/whaleid models add builtin:local-features" \
  "--activate; a laptop and a small catalogue: training/configs/lite0-small-catalogue.yaml;" \
  "a TPU with the internet: training/configs/effb5.json"
