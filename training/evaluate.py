"""Validation through the serving path: photos decoded and preprocessed by ``service.photos``,
embedded (by a Keras model or an ONNX file through ``service.embedder``), searched by cosine
distance and answered by ``service.knn.rank_candidates``; scored with ``service.knn.map_at_5``.

Nothing here re-implements the kNN head or the metric; only the exact nearest-neighbour search
(what faiss does in the service) is done with numpy.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from service.contract import PixelRange, Preprocessing, Ranking
from service.embedder import Embedder, l2_normalise
from service.knn import (
    NEW_INDIVIDUAL,
    Neighbour,
    average_precision_at_5,
    map_at_5,
    rank_candidates,
)
from service.photos import decode_photo, to_model_input
from training.data import MAX_PIXELS

log = logging.getLogger(__name__)

Embed = Callable[[np.ndarray], np.ndarray]
"""NHWC model input -> L2-normalised embeddings."""
Condition = Callable[[Image.Image], Image.Image]
"""A degradation applied to the decoded photo before preprocessing (robustness, §4.3)."""
_PREPARED_LIMIT_BYTES = 1 << 30


def prepare(data: bytes, spec: Preprocessing, condition: Condition | None = None) -> np.ndarray:
    """Decode and preprocess one photo exactly as ``/identify`` does."""
    image = decode_photo(data, max_pixels=MAX_PIXELS, target_size=spec.input_size).image
    if condition is not None:
        image = condition(image)
    return to_model_input(image, spec)


def keras_embed(model: Any, batch_size: int = 32) -> Embed:
    """Embed with a Keras embedding model (inference mode), L2-normalised as the service does.
    ``predict`` runs under the model's distribution strategy (TPU included)."""

    def embed(batch: np.ndarray) -> np.ndarray:
        if not len(batch):
            return np.zeros((0, 0), np.float32)
        out = model.predict(batch, batch_size=batch_size, verbose=0)
        return l2_normalise(np.asarray(out, dtype=np.float32))

    return embed


def onnx_embed(path: Path) -> tuple[Embed, Embedder]:
    """Embed with an exported ONNX file through the service's Embedder."""
    embedder = Embedder(path)
    return embedder.embed, embedder


def embed_photos(
    embed: Embed,
    photos: Iterable[bytes],
    spec: Preprocessing,
    *,
    condition: Condition | None = None,
    batch_size: int = 32,
) -> np.ndarray:
    """Embeddings of photos given as file bytes, in batches."""
    out: list[np.ndarray] = []
    batch: list[np.ndarray] = []
    for data in photos:
        batch.append(prepare(data, spec, condition))
        if len(batch) == batch_size:
            out.append(embed(np.stack(batch)))
            batch = []
    if batch:
        out.append(embed(np.stack(batch)))
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


@dataclass
class PreparedPhotos:
    """Photos decoded and resized once (8-bit, at the input size) for evaluation every epoch;
    ``to_model_input`` does not resample them again, so the tensors equal the service's."""

    spec: Preprocessing
    images: list[Image.Image]

    @classmethod
    def from_bytes(cls, photos: Iterable[bytes], spec: Preprocessing) -> PreparedPhotos:
        eight_bit = Preprocessing(spec.input_size, spec.resize, PixelRange.BYTES)
        images = [
            Image.fromarray(prepare(data, eight_bit).astype(np.uint8), "RGB") for data in photos
        ]
        return cls(spec, images)

    def embed(self, embed: Embed, batch_size: int = 32) -> np.ndarray:
        out = [
            embed(
                np.stack([to_model_input(im, self.spec) for im in self.images[i : i + batch_size]])
            )
            for i in range(0, len(self.images), batch_size)
        ]
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def fits_in_memory(count: int, spec: Preprocessing) -> bool:
    return count * spec.input_size**2 * 3 <= _PREPARED_LIMIT_BYTES


def nearest(
    queries: np.ndarray, gallery: np.ndarray, labels: Sequence[str], k: int, chunk: int = 512
) -> list[list[Neighbour]]:
    """The ``k`` nearest gallery embeddings of each query by cosine distance (exact search)."""
    k = min(k, len(gallery))
    result: list[list[Neighbour]] = []
    if k == 0:
        return [[] for _ in range(len(queries))]
    for start in range(0, len(queries), chunk):
        distance = 1.0 - queries[start : start + chunk] @ gallery.T
        top = np.argpartition(distance, k - 1, axis=1)[:, :k]
        for row, idx in zip(distance, top, strict=True):
            order = idx[np.argsort(row[idx], kind="stable")]
            result.append([Neighbour(labels[i], float(row[i]), int(i)) for i in order])
    return result


def predict(
    neighbours: Sequence[Sequence[Neighbour]], *, k: int, cutoff: float, ranking: Ranking
) -> list[list[str]]:
    """Top-5 labels of each query from its first ``k`` neighbours, through the service's head."""
    return [
        [c.label for c in rank_candidates(n[:k], cutoff=cutoff, ranking=ranking)]
        for n in neighbours
    ]


@dataclass
class Scores:
    """MAP@5 overall and split into known individuals and unseen ones (truth new_individual)."""

    map5: float
    map5_known: float | None
    map5_unseen: float | None
    queries: int

    def as_dict(self) -> dict[str, float | int | None]:
        return {
            "map5": self.map5,
            "map5_known": self.map5_known,
            "map5_unseen": self.map5_unseen,
            "queries": self.queries,
        }


def average_precisions(predictions: Sequence[Sequence[str]], truths: Sequence[str]) -> np.ndarray:
    """Each query's AP@5 (``service.knn.average_precision_at_5``), in query order: their mean is
    ``map_at_5``; paired with another model's on the same queries they show where it differs."""
    if len(predictions) != len(truths):
        raise ValueError(f"{len(predictions)} predictions but {len(truths)} truths")
    return np.array(
        [average_precision_at_5(p, t) for p, t in zip(predictions, truths, strict=True)],
        dtype=np.float64,
    )


def score(predictions: Sequence[Sequence[str]], truths: Sequence[str]) -> Scores:
    known = [i for i, t in enumerate(truths) if t != NEW_INDIVIDUAL]
    unseen = [i for i, t in enumerate(truths) if t == NEW_INDIVIDUAL]

    def part(idx: list[int]) -> float | None:
        return map_at_5([predictions[i] for i in idx], [truths[i] for i in idx]) if idx else None

    return Scores(map_at_5(predictions, truths), part(known), part(unseen), len(truths))


@dataclass
class GridResult:
    """The k x cutoff (x ranking) grid of validation MAP@5 and its best cell."""

    cells: list[dict[str, Any]] = field(default_factory=list)

    @property
    def best(self) -> dict[str, Any]:
        # Ties go to the paper's head (k = 50, cutoff 0.62): the closest cell to it wins.
        return max(
            self.cells,
            key=lambda c: (round(c["map5"], 6), -abs(c["k"] - 50), -abs(c["cutoff"] - 0.62)),
        )

    def as_dict(self) -> dict[str, Any]:
        return {"best": self.best, "cells": self.cells}


def grid_search(
    neighbours: Sequence[Sequence[Neighbour]],
    truths: Sequence[str],
    *,
    k_grid: Sequence[int],
    cutoff_grid: Sequence[float],
    rankings: Sequence[Ranking],
) -> GridResult:
    """§3.8-3.9: MAP@5 for every k, cutoff and ranking; ``neighbours`` must hold max(k_grid)."""
    result = GridResult()
    for ranking, k, cutoff in itertools.product(rankings, k_grid, cutoff_grid):
        s = score(predict(neighbours, k=k, cutoff=cutoff, ranking=ranking), truths)
        result.cells.append({"ranking": ranking, "k": k, "cutoff": cutoff, **s.as_dict()})
    return result


@dataclass
class Validation:
    """A validation set embedded through the serving path: gallery photos and labelled queries."""

    gallery: PreparedPhotos | list[bytes]
    gallery_labels: list[str]
    queries: PreparedPhotos | list[bytes]
    query_names: list[str]
    truths: list[str]
    spec: Preprocessing

    def _embed(self, embed: Embed, photos: PreparedPhotos | list[bytes]) -> np.ndarray:
        if isinstance(photos, PreparedPhotos):
            return photos.embed(embed)
        return embed_photos(embed, photos, self.spec)

    def embeddings(self, embed: Embed) -> tuple[np.ndarray, np.ndarray]:
        """The gallery's and the queries' embeddings."""
        return self._embed(embed, self.gallery), self._embed(embed, self.queries)

    def neighbours(self, embed: Embed, k: int) -> list[list[Neighbour]]:
        gallery, queries = self.embeddings(embed)
        return nearest(queries, gallery, self.gallery_labels, k)

    def predictions(
        self,
        gallery: np.ndarray,
        queries: np.ndarray,
        *,
        k: int,
        cutoff: float,
        ranking: Ranking,
    ) -> list[list[str]]:
        """Each query's top-5 labels through the service's head, from embeddings already
        computed (by ``embeddings``)."""
        neighbours = nearest(queries, gallery, self.gallery_labels, k)
        return predict(neighbours, k=k, cutoff=cutoff, ranking=ranking)

    def score(
        self,
        gallery: np.ndarray,
        queries: np.ndarray,
        *,
        k: int,
        cutoff: float,
        ranking: Ranking,
    ) -> Scores:
        """MAP@5 of embeddings already computed (by ``embeddings``)."""
        predictions = self.predictions(gallery, queries, k=k, cutoff=cutoff, ranking=ranking)
        return score(predictions, self.truths)

    def evaluate(self, embed: Embed, *, k: int, cutoff: float, ranking: Ranking) -> Scores:
        return self.score(*self.embeddings(embed), k=k, cutoff=cutoff, ranking=ranking)
