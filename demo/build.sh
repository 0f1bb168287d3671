#!/usr/bin/env bash
# Rebuild demo/whaleid-demo.onnx from nothing, on a CPU, in about five minutes:
#   1. render a synthetic training catalogue (200 individuals x 12 photos, seed 1),
#   2. train the compact CNN + ArcFace with demo/config.json (whaleid-train),
#   3. export and verify it (whaleid-export),
#   4. import the demo gallery (seed 7: 40 individuals the model never saw) into a throw-away
#      data directory through the service, exactly as demo/setup.sh does for `serve`, and
#      evaluate the held-out queries (whaleid evaluate): MAP@5 must reach 0.8,
#   5. check the README's three example photos are answered rightly, then copy the model to
#      demo/whaleid-demo.onnx and the photos to demo/queries/;
#   6. export the int8 version (whaleid-export --quantize int8): if it passes the gate it becomes
#      demo/whaleid-demo-int8.onnx, and both models are timed and scored side by side on the
#      demo gallery (build/demo/compare.json, the figures of docs/performance.md).
# Needs the TensorFlow virtualenv .venv-train (created here if missing). Training on a CPU is not
# bit-for-bit repeatable, so a rebuild gives a slightly different model with similar figures.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-train
WORK=build/demo
log() { echo "[demo/build.sh] $*" >&2; }

if [ ! -x "$VENV/bin/whaleid-train" ]; then
  log "creating $VENV (TensorFlow, CPU)"
  "${PYTHON:-python3}" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e '.[train,export,dev]'
fi
rm -rf "$WORK"
mkdir -p "$WORK"
"$VENV/bin/whaleid-synthetic" "$WORK/train" --individuals 200 --photos 12 --seed 1 --size 160
"$VENV/bin/whaleid-train" train --config demo/config.json --output "$WORK/run"
"$VENV/bin/whaleid-export" "$WORK/run/model.keras" --out "$WORK/whaleid-demo.onnx"

export WHALEID_DATA_DIR="$WORK/data"
DEMO_MODEL="$WORK/whaleid-demo.onnx" bash demo/setup.sh "$VENV"
GALLERY="$WORK/data/demo-gallery"
"$VENV/bin/whaleid" evaluate "$GALLERY/queries.csv" --images "$GALLERY/images" \
  --predictions "$WORK/predictions.csv" > "$WORK/evaluation.json"
cat "$WORK/evaluation.json" >&2
"$VENV/bin/python" - "$WORK/evaluation.json" <<'PY'
import json, sys
figures = json.load(open(sys.argv[1]))
if figures["map5"] < 0.8:
    sys.exit(f"MAP@5 {figures['map5']:.3f} < 0.8 on the demo gallery: not replacing the demo model")
PY

# The README's curl examples: two held-out photos of catalogued individuals and one of an
# individual the catalogue does not hold.
EXAMPLES="fin-s7-0003_005.jpg:fin-s7-0003 fin-s7-0017_005.jpg:fin-s7-0017 fin-s7-0042_000.jpg:new_individual"
for pair in $EXAMPLES; do
  name=${pair%%:*} expected=${pair#*:}
  first=$(grep "^$name," "$WORK/predictions.csv" | cut -d, -f2 | cut -d' ' -f1)
  if [ "$first" != "$expected" ]; then
    log "the rebuilt model answers $first for $name, not $expected: choose other examples"
    exit 1
  fi
done
cp "$WORK/whaleid-demo.onnx" demo/whaleid-demo.onnx
rm -rf demo/queries
mkdir -p demo/queries
for pair in $EXAMPLES; do cp "$GALLERY/images/${pair%%:*}" demo/queries/; done
log "demo/whaleid-demo.onnx rebuilt: $(tr -d '\n ' < "$WORK/evaluation.json")"

if "$VENV/bin/whaleid-export" "$WORK/run/model.keras" --out "$WORK/whaleid-demo-int8.onnx" \
  --quantize int8; then
  cp "$WORK/whaleid-demo-int8.onnx" demo/whaleid-demo-int8.onnx
  "$VENV/bin/python" -m model_export.compare demo/whaleid-demo.onnx demo/whaleid-demo-int8.onnx \
    --catalogue "$GALLERY/catalogue.csv" --queries "$GALLERY/queries.csv" \
    --images "$GALLERY/images" --out "$WORK/compare.json"
  log "demo/whaleid-demo-int8.onnx rebuilt; fp32 against int8: $WORK/compare.json"
else
  rm -f demo/whaleid-demo-int8.onnx
  log "the int8 model did not pass the gate: only the fp32 demo model is shipped"
fi
