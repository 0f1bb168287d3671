"""Keypoints on the animal, not the background (issue 26 item 4): a query keypoint whose
descriptor lies near many individuals' (the mud flat, the same site photographed again) weighs
less in the verification's evidence than one near a single individual's."""

from __future__ import annotations

import numpy as np

from service.gallery.sync import Filters, GalleryEntries
from service.matching.features import DIM, Features
from service.matching.local import DescriptorIndex, distinctiveness, query_weights
from service.matching.verify import PairMatch

INDIVIDUALS = ("a", "b", "c", "d", "e", "f")
PHOTOS = 2  # per individual
BACKGROUND = 3  # keypoints on what every photo shows
DISTINCT = 3  # keypoints on individual a's pattern
FILLER = 40


def _descriptor(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 90, DIM).astype(np.int64)


def _copy(d: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Another photo's description of the same point: a little noise."""
    return np.clip(d + rng.integers(-3, 4, DIM), 0, 255).astype(np.uint8)


def _features(rows: list[np.ndarray], rng: np.random.Generator) -> Features:
    points = rng.uniform(0, 200, (len(rows), 2)).astype(np.float32)
    return Features(points, np.stack(rows).astype(np.uint8), 200, 200)


def _gallery() -> tuple[dict[int, Features], GalleryEntries, Features]:
    """Six individuals, two photos each: every photo shows the background's points, individual
    a's also its own pattern's; a query of a shows both."""
    rng = np.random.default_rng(0)
    background = [_descriptor(rng) for _ in range(BACKGROUND)]
    pattern = [_descriptor(rng) for _ in range(DISTINCT)]
    found: dict[int, Features] = {}
    rows = []
    image_id = 0
    for label in INDIVIDUALS:
        for _ in range(PHOTOS):
            image_id += 1
            mine = [_copy(d, rng) for d in background]
            if label == "a":
                mine += [_copy(d, rng) for d in pattern]
            mine += [_descriptor(rng).astype(np.uint8) for _ in range(FILLER)]
            found[image_id] = _features(mine, rng)
            rows.append((image_id, image_id, label, "seal", None, None, f"{label}/{image_id}"))
    query = _features([_copy(d, rng) for d in [*background, *pattern]], rng)
    return found, GalleryEntries.from_rows(rows), query


def test_a_point_near_many_individuals_weighs_less_than_one_near_a_single_individual() -> None:
    found, entries, query = _gallery()
    index = DescriptorIndex()
    index.add(found)
    weights = query_weights(index, query, entries, Filters())
    on_background, on_animal = weights[:BACKGROUND], weights[BACKGROUND:]
    assert ((weights >= 0) & (weights <= 1)).all(), weights
    assert on_animal.min() > 0.9, on_animal
    assert on_background.max() < 0.5, on_background


def test_weighted_inliers_count_a_distinctive_inlier_more_than_a_background_one() -> None:
    found, entries, query = _gallery()
    index = DescriptorIndex()
    index.add(found)
    weights = query_weights(index, query, entries, Filters())
    n = len(query)
    # A pair whose inliers are the query's background points, and one whose inliers are on the
    # animal: as many inliers, not as much evidence.
    pairs = np.concatenate([query.points, query.points], axis=1)
    background = PairMatch(pairs, np.arange(n) < BACKGROUND)
    animal = PairMatch(pairs, np.arange(n) >= BACKGROUND)
    assert background.inliers == animal.inliers == 3
    assert background.weighted(query, weights) < 1.5 < 2.7 < animal.weighted(query, weights)
    # Unit weights give the plain count back.
    assert animal.weighted(query, np.ones(n, np.float32)) == animal.inliers


def test_no_neighbours_no_weighting() -> None:
    """An empty gallery (or one descriptor) leaves every keypoint its full weight."""
    weights = distinctiveness(np.zeros((4, 1), np.float32), np.zeros((4, 1), np.int64), {}, 4)
    assert (weights == 1.0).all()
