"""Robustness to image quality (§4.3): MAP@5 of degraded query photos against a clean gallery.

Conditions: Gaussian blur with sigma 0.5, 1 and 2 pixels of the model input, and brightness
reduced to 70, 60 and 50 %. The degradation is applied to the photo after it is resized to the
model's input size (so sigma means the same for every photo size), then the service's
preprocessing continues. Works with a training ``model.keras`` or an exported ``.onnx``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from service.contract import Head, PixelRange, Preprocessing, Ranking
from service.imaging import to_model_input
from service.knn import NEW_INDIVIDUAL
from training.data import Entry, read_entries
from training.evaluate import Condition, Embed, embed_photos, nearest, predict, score

log = logging.getLogger(__name__)


def blur(sigma: float) -> Condition:
    def apply(image: Image.Image) -> Image.Image:
        return image.filter(ImageFilter.GaussianBlur(sigma))

    return apply


def dim(factor: float) -> Condition:
    def apply(image: Image.Image) -> Image.Image:
        return ImageEnhance.Brightness(image).enhance(factor)

    return apply


CONDITIONS: dict[str, Condition | None] = {
    "clean": None,
    "blur sigma 0.5": blur(0.5),
    "blur sigma 1": blur(1.0),
    "blur sigma 2": blur(2.0),
    "brightness 70%": dim(0.7),
    "brightness 60%": dim(0.6),
    "brightness 50%": dim(0.5),
}


def at_input_size(condition: Condition, spec: Preprocessing) -> Condition:
    """Resize to the model input first (8-bit, as the service would), then degrade."""
    eight_bit = Preprocessing(spec.input_size, spec.resize, PixelRange.BYTES)

    def apply(image: Image.Image) -> Image.Image:
        resized = Image.fromarray(to_model_input(image, eight_bit).astype(np.uint8), "RGB")
        return condition(resized)

    return apply


def open_model(path: Path) -> tuple[Embed, Preprocessing, Head]:
    """An embedding function, its preprocessing and its kNN head, from .keras or .onnx."""
    if path.suffix == ".onnx":
        from training.evaluate import onnx_embed

        embed, embedder = onnx_embed(path)
        c = embedder.contract
        return embed, c.preprocessing, c.head
    from training.evaluate import keras_embed
    from training.model import embedding_submodel
    from training.runs import find_summary, load_model, preprocessing_of

    model = load_model(path)
    summary = find_summary(path)
    head = Head.from_dict((summary or {}).get("head"))
    spec = preprocessing_of(model, summary)
    return keras_embed(embedding_submodel(model)), spec, head


def split_by_photo(entries: Sequence[Entry], seed: int) -> tuple[list[Entry], list[Entry]]:
    """Half of each individual's photos (at least one) in the gallery, the rest as queries."""
    by_individual: dict[str, list[Entry]] = defaultdict(list)
    for e in entries:
        by_individual[e.individual_id].append(e)
    gallery: list[Entry] = []
    queries: list[Entry] = []
    for photos in by_individual.values():
        photos.sort(key=lambda e: hashlib.sha256(f"{seed}:{e.image}".encode()).hexdigest())
        cut = max(1, len(photos) // 2)
        gallery += photos[:cut]
        queries += photos[cut:]
    return gallery, queries


def run_robustness(
    model_path: Path,
    catalogue_csv: Path,
    images: Path,
    *,
    queries_csv: Path | None = None,
    out: Path | None = None,
    k: int | None = None,
    cutoff: float | None = None,
    ranking: str | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Log (and optionally write) MAP@5 per condition."""
    embed, spec, head = open_model(model_path)
    head = Head(
        k or head.k,
        cutoff if cutoff is not None else head.cutoff,
        Ranking(ranking) if ranking else head.ranking,
    )
    entries = read_entries(catalogue_csv)
    if queries_csv is None:
        gallery, queries = split_by_photo(entries, seed)
    else:
        gallery, queries = entries, read_entries(queries_csv)
    known = {e.individual_id for e in gallery}
    truths = [e.individual_id if e.individual_id in known else NEW_INDIVIDUAL for e in queries]
    labels = [e.individual_id for e in gallery]
    gallery_vectors = embed_photos(embed, [(images / e.image).read_bytes() for e in gallery], spec)
    query_bytes = [(images / e.image).read_bytes() for e in queries]
    results: dict[str, Any] = {}
    for name, condition in CONDITIONS.items():
        vectors = embed_photos(
            embed,
            query_bytes,
            spec,
            condition=at_input_size(condition, spec) if condition else None,
        )
        neighbours = nearest(vectors, gallery_vectors, labels, head.k)
        s = score(predict(neighbours, k=head.k, cutoff=head.cutoff, ranking=head.ranking), truths)
        results[name] = s.as_dict()
        log.info(
            "%-15s MAP@5 %.4f (known %s, unseen %s, %d queries)",
            name,
            s.map5,
            "-" if s.map5_known is None else f"{s.map5_known:.4f}",
            "-" if s.map5_unseen is None else f"{s.map5_unseen:.4f}",
            s.queries,
        )
    report = {
        "model": str(model_path),
        "head": {"k": head.k, "cutoff": head.cutoff, "ranking": head.ranking},
        "gallery_photos": len(gallery),
        "conditions": results,
    }
    if out is not None:
        out.write_text(json.dumps(report, indent=2) + "\n")
    return report
