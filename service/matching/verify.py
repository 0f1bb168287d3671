"""Verification: the query's local features matched against each top candidate's photos, the
inlier evidence fused with the embedding distance into one calibrated match probability, and the
candidates re-ranked on it (``new_individual`` placed by ``knn.place_new_individual``).

A pair of photos is matched by nearest descriptors with Lowe's ratio test (0.8), then kept only
where one homography explains the matches (OpenCV's USAC MAGSAC, threshold 1.5 % of the larger
photo side); its evidence is the number of inliers. The calibration (``contract.Calibration``) turns
distance and inliers into a probability; ``fit_calibration`` fits it by logistic regression.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import cv2
import numpy as np

from service.contract import Calibration
from service.errors import TooFewPairs
from service.knn import MIN_ANIMALS, TOP, place_new_individual, ranks_at_cutoffs
from service.matching.features import DIM, Features

RATIO = 0.8
MIN_MATCHES = 8  # a homography needs 4; fewer than 8 tentative matches is no evidence
THRESHOLD = 0.015  # RANSAC reprojection threshold, as a share of the larger photo side


@dataclass(frozen=True)
class PairMatch:
    """Matched keypoints of two photos: ``pairs`` (m, 4) rows of query x, y and candidate x, y in
    each photo's pixels; ``inlier`` (m,) which of them the homography kept."""

    pairs: np.ndarray
    inlier: np.ndarray

    @property
    def distinct(self) -> np.ndarray:
        """Indices of the inlier matches at distinct places: SIFT describes a point once per
        orientation, and two descriptions of one point matched are one piece of evidence."""
        kept = np.flatnonzero(self.inlier)
        if not len(kept):
            return kept
        _, first = np.unique(np.round(self.pairs[kept] * 2), axis=0, return_index=True)
        result: np.ndarray = kept[np.sort(first)]
        return result

    @property
    def inliers(self) -> int:
        return len(self.distinct)

    def weighted(self, query: Features, weights: np.ndarray) -> float:
        """The distinct inliers, each weighted by its query keypoint's weight (``weights``, one
        per keypoint of ``query``; a point described twice weighs its larger). Measured by
        ``bench/inliers.py``; not yet what the service counts (``evidence``)."""
        kept = self.distinct
        if not len(kept):
            return 0.0
        by_point: dict[tuple[float, float], float] = {}
        for (x, y), w in zip(query.points.tolist(), weights.tolist(), strict=True):
            by_point[(x, y)] = max(w, by_point.get((x, y), 0.0))
        return float(
            sum(by_point.get((float(x), float(y)), 0.0) for x, y in self.pairs[kept, :2].tolist())
        )


_NO_MATCH = PairMatch(np.zeros((0, 4), np.float32), np.zeros(0, bool))


def tentative(query: Features, other: Features, ratio: float = RATIO) -> np.ndarray:
    """(m, 2) indices (query, other) of descriptor pairs passing the ratio test."""
    return tentative_many(query, [other], ratio)[0]


# The batched step's similarity block is (query descriptors, photos, longest photo): at most this
# many photo columns per block (3.2 MB of float32 for 400 query descriptors), so that the passes
# after the product read it from the cache: 20% faster than 8,192 columns on textured 640 px
# photos (``bench/local_features.py``).
_BLOCK_COLUMNS = 2_048


def tentative_many(
    query: Features, others: Sequence[Features], ratio: float = RATIO
) -> list[np.ndarray]:
    """For each of ``others``, the (m, 2) indices (query, other) of descriptor pairs passing the
    ratio test, as ``tentative`` finds them pair by pair, in one matrix product per block of
    photos: the query's descriptors against all theirs, each photo's columns padded to the
    longest, then the two nearest per photo and the ratio test for all photos at once."""
    out = [np.zeros((0, 2), np.int64) for _ in others]
    usable = [j for j, other in enumerate(others) if len(other) >= 2]
    if len(query) < 2 or not usable:
        return out
    a = query.unit
    width = max(len(others[j]) for j in usable)
    per_block = max(1, _BLOCK_COLUMNS // width)
    for start in range(0, len(usable), per_block):
        block = usable[start : start + per_block]
        # The padding is zero vectors: their similarity, 0, is the least a pair of RootSIFT
        # descriptors (non-negative) can have, and argmax keeps the first of equals, so a
        # padded column is never a photo's nearest, nor changes its second nearest's value.
        stacked = np.zeros((len(block), width, DIM), np.float32)
        for slot, j in enumerate(block):
            stacked[slot, : len(others[j])] = others[j].unit
        # Squared L2 between unit vectors is 2 - 2 cos: one product does every pair.
        sim = (a @ stacked.reshape(-1, DIM).T).reshape(len(a), len(block), width)
        first = sim.argmax(axis=2)
        best = np.take_along_axis(sim, first[:, :, np.newaxis], axis=2)[:, :, 0]
        np.put_along_axis(sim, first[:, :, np.newaxis], -np.inf, axis=2)
        second = sim.max(axis=2)
        d1 = np.sqrt(np.maximum(2.0 - 2.0 * best, 0.0))
        d2 = np.sqrt(np.maximum(2.0 - 2.0 * second, 0.0))
        rows, slots = np.nonzero(d1 < ratio * d2)
        for slot, pairs in enumerate(
            _one_per_keypoint(rows, slots, first[rows, slots], best[rows, slots], len(block))
        ):
            out[block[slot]] = pairs
    return out


def _one_per_keypoint(
    q_idx: np.ndarray, slots: np.ndarray, o_idx: np.ndarray, score: np.ndarray, photos: int
) -> list[np.ndarray]:
    """Per photo (``slots``: which of ``photos`` each pair belongs to), the (query, other) pairs
    with one query keypoint per candidate keypoint, in the candidate keypoints' order: the
    closest wins (ties: the earlier query keypoint)."""
    order = np.lexsort((q_idx, -score, o_idx, slots))
    q_idx, slots, o_idx = q_idx[order], slots[order], o_idx[order]
    first = np.ones(len(order), bool)
    first[1:] = (slots[1:] != slots[:-1]) | (o_idx[1:] != o_idx[:-1])
    pairs = np.stack([q_idx[first], o_idx[first]], axis=1).astype(np.int64)
    bounds = np.searchsorted(slots[first], np.arange(photos + 1))
    return [pairs[bounds[k] : bounds[k + 1]] for k in range(photos)]


def match_pair(query: Features, other: Features) -> PairMatch:
    """The ratio-test matches of two photos and which of them one homography explains."""
    return geometric(query, other, tentative(query, other))


def match_many(query: Features, others: Sequence[Features]) -> list[PairMatch]:
    """``match_pair`` of the query with each of ``others``, the tentative matches of all found
    in one batched step (``tentative_many``); the homography is sought only for the photos with
    at least ``MIN_MATCHES`` of them."""
    return [
        geometric(query, other, idx)
        for other, idx in zip(others, tentative_many(query, others), strict=True)
    ]


def geometric(query: Features, other: Features, idx: np.ndarray) -> PairMatch:
    """The tentative matches ``idx`` of two photos and which of them one homography explains
    (none, without trying, below ``MIN_MATCHES``)."""
    if len(idx) < MIN_MATCHES:
        return PairMatch(
            np.concatenate([query.points[idx[:, 0]], other.points[idx[:, 1]]], axis=1),
            np.zeros(len(idx), bool),
        )
    src = query.points[idx[:, 0]].astype(np.float32)
    dst = other.points[idx[:, 1]].astype(np.float32)
    threshold = THRESHOLD * max(other.width, other.height, 1)
    cv2.setRNGSeed(0)  # the same photos give the same inliers, every time
    _, mask = cv2.findHomography(
        src, dst, cv2.USAC_MAGSAC, threshold, maxIters=2000, confidence=0.999
    )
    inlier = np.zeros(len(idx), bool) if mask is None else mask.ravel().astype(bool)
    return PairMatch(np.concatenate([src, dst], axis=1), inlier)


def evidence(match: PairMatch) -> int:
    """What one matched pair of photos counts as verification's evidence (its inliers)."""
    return match.inliers


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def local_x(inliers: int) -> float:
    return math.log1p(max(inliers, 0))


def second_best(photos: Sequence[int]) -> int:
    """The second most inliers among an individual's photos (``photos``: best first)."""
    return photos[1] if len(photos) > 1 else 0


def agreeing(inliers: int, photos: Sequence[int]) -> int:
    """How many of an individual's photos had any inlier (at least its best, if it had)."""
    return max(sum(1 for n in photos if n > 0), 1 if inliers > 0 else 0)


def mix_x(inliers: int, photos: Sequence[int]) -> tuple[float, float, float]:
    """The learned mix's inlier evidence (``Calibration.mix``): the best and second best
    photos' ``log(1 + n)`` and ``log(1 + m)``, ``m`` the photos with any inlier."""
    return (
        local_x(inliers),
        local_x(second_best(photos)),
        math.log1p(agreeing(inliers, photos)),
    )


def logit(
    calibration: Calibration,
    distance: float | None,
    inliers: int | None,
    photos: Sequence[int] = (),
) -> float | None:
    """The calibrated log-odds of one candidate from the evidence it has: both (the fused
    logistic), the distance alone (the global curve) or the inliers alone (the local one);
    None without either. ``inliers`` is the best of the individual's photos, ``photos`` each
    photo's inliers (best first): the calibration's ``aggregation`` says how they count
    (``max``: the best alone; ``best-two``: the best two summed; ``mix``: its learned
    logistic, where it has one for the evidence at hand)."""
    if inliers is not None and calibration.aggregation == "best-two":
        inliers += second_best(photos)
    elif inliers is not None and calibration.aggregation == "mix":
        w = calibration.mix if distance is not None else calibration.mix_local
        if w is not None:
            xs: tuple[float, ...] = (
                *(() if distance is None else (distance,)),
                *mix_x(inliers, photos),
            )
            return float(w[0] + sum(wi * xi for wi, xi in zip(w[1:], xs, strict=True)))
    if distance is not None and inliers is not None:
        w0, w1, w2 = calibration.fused_weights
        return w0 + w1 * distance + w2 * local_x(inliers)
    if distance is not None:
        a, b = calibration.global_
        return a + b * distance
    if inliers is not None:
        a, b = calibration.local
        return a + b * local_x(inliers)
    return None


def probability(
    calibration: Calibration,
    distance: float | None,
    inliers: int | None,
    photos: Sequence[int] = (),
) -> float:
    """The match probability of one candidate from its distance and inliers (``logit``)."""
    x = logit(calibration, distance, inliers, photos)
    return 0.0 if x is None else _sigmoid(x)


def fused_probability(calibration: Calibration, candidate: Evidence) -> float:
    """The match probability of one candidate from all its evidence: the calibrated distance
    and inliers (``logit``), plus the calibrated log-odds other matchers added
    (``Evidence.logit``): the sum of calibrated scores, each matcher's own curve."""
    x = logit(calibration, candidate.distance, candidate.inliers, candidate.photo_inliers)
    if x is None and not candidate.logit:
        return 0.0
    return _sigmoid((0.0 if x is None else x) + candidate.logit)


@dataclass(frozen=True)
class Evidence:
    """One candidate individual as verification saw it."""

    label: str
    distance: float | None  # its nearest photo's embedding distance (None: local matcher)
    photos: tuple[int, ...]  # its photos to match, best first
    votes: int | None = None
    inliers: int | None = None
    score: float | None = None
    best_image_id: int | None = None
    # The log-odds other matchers than the embedding and local features add, calibrated by
    # each (``matching.matcher``): summed into the fused probability.
    logit: float = 0.0
    # The inliers of each of its photos matched, most first (``inliers`` is the first): how
    # the calibration's ``aggregation`` counts more than one photo.
    photo_inliers: tuple[int, ...] = ()


def best_photos(
    query: Features,
    candidates: Sequence[Evidence],
    features: Callable[[Sequence[int]], dict[int, Features]],
) -> list[Evidence]:
    """Each candidate with its inliers (the best of its photos) and its best photo; every photo
    of the shortlist matched in one batched step (``match_many``)."""
    wanted = [i for c in candidates for i in c.photos]
    stored = features(wanted)
    photos = [i for i in dict.fromkeys(wanted) if i in stored]
    found = dict(
        zip(
            photos,
            (evidence(m) for m in match_many(query, [stored[i] for i in photos])),
            strict=True,
        )
    )
    out = []
    for c in candidates:
        best, best_image = 0, c.photos[0] if c.photos else None
        each = []
        for image_id in c.photos:
            if image_id not in found:
                continue
            n = found[image_id]
            each.append(n)
            if n > best:
                best, best_image = n, image_id
        out.append(
            replace(
                c,
                inliers=best,
                best_image_id=best_image,
                photo_inliers=tuple(sorted(each, reverse=True)),
            )
        )
    return out


def verify(
    query: Features,
    candidates: Sequence[Evidence],
    features: Callable[[Sequence[int]], dict[int, Features]],
    calibration: Calibration,
    *,
    use_distance: bool = True,
) -> list[Evidence]:
    """Each candidate with its inliers (the best of its photos), its best photo and its fused
    probability. ``features`` gives the stored features of gallery photos."""
    return [
        replace(
            c,
            score=probability(
                calibration, c.distance if use_distance else None, c.inliers, c.photo_inliers
            ),
        )
        for c in best_photos(query, candidates, features)
    ]


def rerank(
    verified: Sequence[Evidence], calibration: Calibration, new: Evidence, top: int = TOP
) -> list[Evidence]:
    """Highest probability first (ties: more inliers, then the earlier rank); those below the
    threshold go after ``new_individual``; the first ``top`` are kept."""
    order = sorted(
        enumerate(verified), key=lambda p: (-(p[1].score or 0.0), -(p[1].inliers or 0), p[0])
    )
    ranked = [c for _, c in order]
    return place_new_individual(
        ranked, lambda c: None if c.score is None else -c.score, -calibration.threshold, new, top
    )


# Fitting the calibration ----------------------------------------------------------------------


def _logistic_fit(x: np.ndarray, y: np.ndarray, l2: float = 1e-3, steps: int = 50) -> np.ndarray:
    """Weights (intercept first) of a logistic regression of ``y`` on the columns of ``x``, by
    Newton's method with a small ridge (the intercept unpenalised)."""
    design = np.concatenate([np.ones((len(x), 1)), x], axis=1)
    w = np.zeros(design.shape[1])
    ridge = np.full(design.shape[1], l2)
    ridge[0] = 0.0
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-np.clip(design @ w, -30, 30)))
        grad = design.T @ (p - y) + ridge * w
        hess = design.T @ (design * (p * (1 - p))[:, None]) + np.diag(ridge + 1e-9)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w


@dataclass(frozen=True)
class Pair:
    """One candidate of one labelled query: its evidence and whether it was the right animal.
    ``query`` groups the candidates of one query; ``unseen``: the query's animal is not in the
    gallery (its right answer is ``new_individual``)."""

    distance: float | None
    inliers: int | None
    match: bool
    query: int = -1
    unseen: bool = False
    # The query's animal (None: not known, e.g. a row labelled new_individual; such a query
    # counts as an animal of its own). The threshold is chosen on animals, not photos.
    animal: str | None = None
    # Each of its photos' inliers, most first (``Evidence.photo_inliers``; empty: unknown).
    photos: tuple[int, ...] = ()


THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 20))  # 0.05 ... 0.95


def map5_at_thresholds(pairs: Sequence[Pair], calibration: Calibration) -> dict[float, float]:
    """MAP@5 of the labelled queries of ``pairs`` at each threshold of ``THRESHOLDS``: each
    query's candidates ranked by probability, ``new_individual`` before the first below the
    threshold (``knn.ranks_at_cutoffs``, the rule the kNN head's cutoff grid uses)."""
    queries: dict[int, list[Pair]] = {}
    for p in pairs:
        queries.setdefault(p.query, []).append(p)
    cuts = -np.array(THRESHOLDS)
    total = np.zeros(len(cuts))
    for found in queries.values():
        scored = sorted(
            ((probability(calibration, p.distance, p.inliers, p.photos), p.match) for p in found),
            key=lambda s: -s[0],
        )
        distances = np.array([-s for s, _ in scored])
        if found[0].unseen:
            rank = ranks_at_cutoffs(distances, None, cuts)
        else:
            right = next((i for i, (_, m) in enumerate(scored) if m), None)
            if right is None:
                continue
            rank = ranks_at_cutoffs(distances, right, cuts)
        total += np.where(rank <= TOP, 1.0 / rank, 0.0)
    return {t: float(v / max(len(queries), 1)) for t, v in zip(THRESHOLDS, total, strict=True)}


def _inlier_x(aggregation: str, p: Pair) -> float:
    """The curves' inlier evidence of one pair under ``aggregation`` (``logit``'s)."""
    n = p.inliers or 0
    return local_x(n + second_best(p.photos) if aggregation == "best-two" else n)


def fit_calibration(
    pairs: Sequence[Pair], base: Calibration, *, source: str, aggregation: str = "max"
) -> Calibration:
    """The calibration fitted on ``pairs``: each curve on the pairs with its evidence, the fused
    logistic on those with both. Each needs at least 10 matches and 10 non-matches.
    ``aggregation`` (``contract.AGGREGATIONS``): how an individual's photos count; ``mix``
    also fits its learned logistics (``Calibration.mix``, ``mix_local``) beside the curves."""

    def usable(rows: list[Pair]) -> bool:
        positives = sum(p.match for p in rows)
        return positives >= 10 and len(rows) - positives >= 10

    with_d = [p for p in pairs if p.distance is not None]
    with_n = [p for p in pairs if p.inliers is not None]
    both = [p for p in with_d if p.inliers is not None]
    if not usable(with_d) and not usable(with_n):
        raise TooFewPairs(
            f"{len(pairs)} labelled candidates with {sum(p.match for p in pairs)} right ones: "
            "the fit needs at least 10 right and 10 wrong candidates; label more queries"
        )
    g, loc, fused = base.global_, base.local, base.fused
    if usable(with_d):
        w = _logistic_fit(
            np.array([[p.distance] for p in with_d], float), np.array([p.match for p in with_d])
        )
        g = (float(w[0]), float(w[1]))
    if usable(with_n):
        w = _logistic_fit(
            np.array([[_inlier_x(aggregation, p)] for p in with_n], float),
            np.array([p.match for p in with_n]),
        )
        loc = (float(w[0]), float(w[1]))
    if usable(both):
        w = _logistic_fit(
            np.array([[p.distance, _inlier_x(aggregation, p)] for p in both], float),
            np.array([p.match for p in both]),
        )
        fused = (float(w[0]), float(w[1]), float(w[2]))
    mix = mix_local = None
    if aggregation == "mix":
        if usable(both):
            xs = [[p.distance or 0.0, *mix_x(p.inliers or 0, p.photos)] for p in both]
            w = _logistic_fit(np.array(xs, float), np.array([p.match for p in both]))
            mix = tuple(float(v) for v in w)
        if usable(with_n):
            xs = [list(mix_x(p.inliers or 0, p.photos)) for p in with_n]
            w = _logistic_fit(np.array(xs, float), np.array([p.match for p in with_n]))
            mix_local = tuple(float(v) for v in w)
    fitted = Calibration(
        global_=g,
        local=loc,
        fused=fused,
        threshold=base.threshold,
        aggregation=aggregation,
        mix=mix,
        mix_local=mix_local,
    )
    grouped = {p.query: p.unseen for p in pairs if p.query >= 0}
    unseen = sum(grouped.values())
    animals = {
        (p.unseen, p.animal if p.animal is not None else f"query {p.query}")
        for p in pairs
        if p.query >= 0
    }
    unseen_animals = sum(1 for is_unseen, _ in animals if is_unseen)
    known_animals = len(animals) - unseen_animals
    choose = len(grouped) >= 20 and min(known_animals, unseen_animals) >= MIN_ANIMALS
    threshold = base.threshold
    if choose:
        # The probability is calibrated; where new_individual goes is a choice for MAP@5, made
        # on labelled queries as the kNN head's cutoff is (ties: the one nearest 0.5). Without
        # at least 20 queries of MIN_ANIMALS known and as many unseen animals (animals, not
        # photos: one animal's photos decide as one) the choice would be one-sided: 0.5 stays.
        scores = map5_at_thresholds([p for p in pairs if p.query >= 0], fitted)
        threshold = max(scores, key=lambda t: (round(scores[t], 6), -abs(t - 0.5)))
    return replace(
        fitted,
        threshold=threshold,
        fitted={
            "source": source,
            "pairs": len(pairs),
            "matches": sum(p.match for p in pairs),
            "with_distance": len(with_d),
            "with_inliers": len(with_n),
            "queries": len(grouped),
            "unseen_queries": unseen,
            "known_animals": known_animals,
            "unseen_animals": unseen_animals,
            "threshold_chosen_on_map5": choose,
            "aggregation": aggregation,
        },
    )
