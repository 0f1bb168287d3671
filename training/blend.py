"""Ensemble blending of several models' top-5 predictions (§3.10).

Each model j ranks candidates r = 0..4; rank r scores ``RANK_SCORES[r]`` = 10, 6.5, 3.3, 2.9, 2.7.
A candidate individual i gets ``s_i = sum_j alpha_j * w(r_ij) - 0.033 * f_i`` where ``f_i`` is the
number of training photos of i (frequent individuals are predicted too eagerly), and
``new_individual`` counts a quarter (``NEW_INDIVIDUAL_FACTOR``) when a model ranks it third or
lower, to keep its false positives in check. The weights ``alpha`` start at 1 and are learned by
coordinate ascent on out-of-fold predictions: try ``alpha_j +/- 0.1`` for each model, keep a change
that gains at least 1e-3 MAP@5, and stop when a whole sweep gains nothing more.

MAP@5 is the service's ``map_at_5``. Inputs are Kaggle-style ``image,predictions`` CSVs, as
``whaleid evaluate --predictions`` and ``whaleid-train train`` (``val_predictions.csv``) write them.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from service.knn import NEW_INDIVIDUAL, TOP, map_at_5

log = logging.getLogger(__name__)

RANK_SCORES = (10.0, 6.5, 3.3, 2.9, 2.7)
PHOTO_COUNT_PENALTY = 0.033
NEW_INDIVIDUAL_FACTOR = 0.25  # "down-weighted by 4 unless it is ranked first or second"
STEP = 0.1
MIN_GAIN = 1e-3
MAX_SWEEPS = 500

Predictions = dict[str, list[str]]
"""image -> ranked labels (top 5) of one model."""


def read_predictions(path: Path) -> Predictions:
    with path.open(newline="") as f:
        return {row["image"]: row["predictions"].split()[:TOP] for row in csv.DictReader(f)}


def read_truth(path: Path) -> dict[str, str]:
    with path.open(newline="") as f:
        return {row["image"]: row["individual_id"] for row in csv.DictReader(f)}


def read_photo_counts(catalogue_csv: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    with catalogue_csv.open(newline="", encoding="utf-8-sig") as f:
        for row in csv.DictReader(f):
            counts[row["individual_id"]] = counts.get(row["individual_id"], 0) + 1
    return counts


@dataclass
class Candidates:
    """Every (image, candidate) pair, with each model's rank score of it, flattened for numpy."""

    images: list[str]
    labels: list[str]  # per pair
    starts: np.ndarray  # first pair of each image; pairs of an image are contiguous
    scores: np.ndarray  # pairs x models: w(r) (x factor for new_individual), 0 if not ranked
    penalty: np.ndarray  # per pair: 0.033 x training photos

    @classmethod
    def build(
        cls,
        models: Sequence[Predictions],
        images: Sequence[str],
        counts: Mapping[str, int],
    ) -> Candidates:
        labels: list[str] = []
        rows: list[list[float]] = []
        starts = []
        for image in images:
            starts.append(len(labels))
            ranked = [m.get(image, []) for m in models]
            for label in dict.fromkeys(label for r in ranked for label in r):
                labels.append(label)
                rows.append([_rank_score(r, label) for r in ranked])
        penalty = np.array(
            [
                0.0 if lb == NEW_INDIVIDUAL else PHOTO_COUNT_PENALTY * counts.get(lb, 0)
                for lb in labels
            ]
        )
        return cls(
            list(images),
            labels,
            np.array(starts + [len(labels)]),
            np.array(rows, dtype=np.float64).reshape(len(labels), len(models)),
            penalty,
        )

    def top5(self, weights: np.ndarray) -> list[list[str]]:
        """The blended top-5 of each image (ties: the order candidates first appeared in)."""
        total = self.scores @ weights - self.penalty
        result = []
        for g in range(len(self.images)):
            lo, hi = self.starts[g], self.starts[g + 1]
            order = np.argsort(-total[lo:hi], kind="stable")[:TOP]
            result.append([self.labels[lo + i] for i in order])
        return result


def _rank_score(ranked: Sequence[str], label: str) -> float:
    if label not in ranked:
        return 0.0
    rank = ranked.index(label)
    score = RANK_SCORES[rank]
    return score * NEW_INDIVIDUAL_FACTOR if label == NEW_INDIVIDUAL and rank >= 2 else score


@dataclass
class BlendResult:
    weights: list[float]
    blend_map5: float
    model_map5: list[float]
    sweeps: int
    images: int
    history: list[float] = field(default_factory=list)


def learn_weights(
    models: Sequence[Predictions],
    truth: Mapping[str, str],
    counts: Mapping[str, int] | None = None,
    *,
    step: float = STEP,
    min_gain: float = MIN_GAIN,
) -> BlendResult:
    """Coordinate ascent of the blend weights on the images every model and the truth cover."""
    images = sorted(set(truth).intersection(*[set(m) for m in models]))
    if not images:
        raise ValueError("no image is in the truth and in every prediction file")
    truths = [truth[i] for i in images]
    candidates = Candidates.build(models, images, counts or {})

    def objective(w: np.ndarray) -> float:
        return map_at_5(candidates.top5(w), truths)

    weights = np.ones(len(models))
    best = objective(weights)
    history = [best]
    sweeps = 0
    while sweeps < MAX_SWEEPS:
        sweeps += 1
        gained = False
        for j in range(len(models)):
            trials = []
            for delta in (step, -step):
                trial = weights.copy()
                trial[j] = round(trial[j] + delta, 6)
                if trial[j] >= 0:
                    trials.append((objective(trial), trial))
            if not trials:
                continue
            value, trial = max(trials, key=lambda t: t[0])
            if value >= best + min_gain:
                weights, best, gained = trial, value, True
                history.append(best)
        if not gained:
            break
    model_map5 = [map_at_5([m[i] for i in images], truths) for m in models]
    return BlendResult([float(w) for w in weights], best, model_map5, sweeps, len(images), history)


def blend(
    models: Sequence[Predictions],
    weights: Sequence[float],
    counts: Mapping[str, int] | None = None,
) -> Predictions:
    """Blended top-5 of every image any model predicted, with given weights."""
    images = sorted(set().union(*[set(m) for m in models]))
    candidates = Candidates.build(models, images, counts or {})
    return dict(zip(images, candidates.top5(np.asarray(weights, dtype=np.float64)), strict=True))


def run_blend(
    prediction_csvs: Sequence[Path],
    *,
    truth_csv: Path,
    catalogue_csv: Path | None = None,
    out: Path | None = None,
    blended_csv: Path | None = None,
) -> BlendResult:
    """Learn the weights, log each model's and the blend's MAP@5, optionally write them."""
    models = [read_predictions(p) for p in prediction_csvs]
    counts = read_photo_counts(catalogue_csv) if catalogue_csv else {}
    result = learn_weights(models, read_truth(truth_csv), counts)
    for path, value, w in zip(prediction_csvs, result.model_map5, result.weights, strict=True):
        log.info("MAP@5 %.4f  weight %.1f  %s", value, w, path)
    log.info(
        "blend MAP@5 %.4f on %d images (best single %.4f) after %d sweeps",
        result.blend_map5,
        result.images,
        max(result.model_map5),
        result.sweeps,
    )
    if out is not None:
        report = {
            "models": [
                {"predictions": str(p), "map5": v, "weight": w}
                for p, v, w in zip(prediction_csvs, result.model_map5, result.weights, strict=True)
            ],
            "blend_map5": result.blend_map5,
            "images": result.images,
            "sweeps": result.sweeps,
            "history": result.history,
        }
        out.write_text(json.dumps(report, indent=2) + "\n")
    if blended_csv is not None:
        with blended_csv.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["image", "predictions"])
            for image, labels in blend(models, result.weights, counts).items():
                writer.writerow([image, " ".join(labels)])
    return result
