"""Exported models side by side (e.g. fp32 against int8): embedding time per photo and MAP@5
through the serving path, measured in one run.

    python -m model_export.compare fp32.onnx int8.onnx --catalogue gallery.csv \
        --queries queries.csv --images imgs/ [--out compare.json]

Time: the service's ``Embedder`` (all cores, batch of one photo, already preprocessed), the
models taking turns in blocks of ten so that a machine whose speed drifts treats them alike;
p50 and p90 in milliseconds. MAP@5: every photo decoded and preprocessed by ``service.imaging``,
exact cosine search of the gallery, each model's own head (``service.knn``).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from service.onnx.embedder import Embedder

# The training modules (``_timings``, ``compare``) import TensorFlow: they are imported where they
# are used, so that ``interleaved_seconds`` serves the TensorFlow-free service virtualenv too
# (bench/int8_real.py times the service's own onnxruntime there).
log = logging.getLogger("whaleid-compare")


def interleaved_seconds(
    embedders: Sequence[Embedder], inputs: Sequence[np.ndarray], rounds: int, block: int
) -> list[list[float]]:
    """Seconds per ``embed`` call of each embedder on its input, the embedders taking turns in
    blocks of ``block`` calls (after a warm-up), so that a machine whose speed drifts treats
    them alike."""
    for embedder, photo in zip(embedders, inputs, strict=True):  # warm-up
        for _ in range(3):
            embedder.embed(photo)
    seconds: list[list[float]] = [[] for _ in embedders]
    for _ in range(rounds):
        for i, (embedder, photo) in enumerate(zip(embedders, inputs, strict=True)):
            for _ in range(block):
                started = time.perf_counter()
                embedder.embed(photo)
                seconds[i].append(time.perf_counter() - started)
    return seconds


def _timings(models: Sequence[Path], photo: np.ndarray, rounds: int, block: int) -> list[Any]:
    from training.evaluate import onnx_embed

    embedders = [onnx_embed(path)[1] for path in models]
    seconds = interleaved_seconds(embedders, [photo] * len(embedders), rounds, block)
    return [
        {
            "p50_ms": round(1000 * float(np.percentile(s, 50)), 2),
            "p90_ms": round(1000 * float(np.percentile(s, 90)), 2),
            "runs": len(s),
        }
        for s in seconds
    ]


def compare(
    models: Sequence[Path],
    catalogue: Path,
    queries: Path,
    images: Path,
    *,
    rounds: int = 6,
    block: int = 10,
) -> dict[str, Any]:
    """Speed and MAP@5 of each model; the same photos, gallery and queries for all."""
    from service.knn import NEW_INDIVIDUAL
    from training.data import read_entries
    from training.evaluate import embed_photos, nearest, onnx_embed, predict, prepare, score

    gallery = read_entries(catalogue)
    asked = read_entries(queries)
    known = {e.individual_id for e in gallery}
    truths = [e.individual_id if e.individual_id in known else NEW_INDIVIDUAL for e in asked]
    gallery_bytes = [(images / e.image).read_bytes() for e in gallery]
    query_bytes = [(images / e.image).read_bytes() for e in asked]
    results: dict[str, Any] = {"models": {}}
    for path in models:
        embed, embedder = onnx_embed(path)
        c = embedder.contract
        spec = c.preprocessing
        vectors = embed_photos(embed, gallery_bytes, spec)
        queried = embed_photos(embed, query_bytes, spec)
        found = nearest(queried, vectors, [e.individual_id for e in gallery], c.head.k)
        s = score(predict(found, k=c.head.k, cutoff=c.head.cutoff, ranking=c.head.ranking), truths)
        results["models"][path.name] = {
            "version": c.version,
            "size_mb": round(path.stat().st_size / 1e6, 2),
            "head": {"k": c.head.k, "cutoff": c.head.cutoff, "ranking": str(c.head.ranking)},
            **s.as_dict(),
            "queried": queried,
        }
    first = next(iter(results["models"].values()))["queried"]
    for entry in results["models"].values():
        cos = np.sum(entry.pop("queried") * first, axis=1)
        entry["min_cosine_to_first_model"] = round(float(cos.min()), 5)
    photo = prepare(query_bytes[0], onnx_embed(models[0])[1].contract.preprocessing)[None]
    for name, timing in zip(results["models"], _timings(models, photo, rounds, block), strict=True):
        results["models"][name]["embed_one_photo"] = timing
    results.update(gallery_photos=len(gallery), queries=len(asked))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m model_export.compare",
        description="Embedding time and MAP@5 of exported models, side by side.",
    )
    parser.add_argument("models", nargs="+", help=".onnx files")
    parser.add_argument("--catalogue", required=True, help="gallery CSV")
    parser.add_argument("--queries", required=True, help="labelled queries CSV")
    parser.add_argument("--images", required=True)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--out", help="write the figures as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    results = compare(
        [Path(m) for m in args.models],
        Path(args.catalogue),
        Path(args.queries),
        Path(args.images),
        rounds=args.rounds,
    )
    text = json.dumps(results, indent=2)
    log.info("%s", text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
