"""The fusion's per-individual aggregation (max, the sum of the best two, a learned mix), its
stored form, the shortlist's union, the calibration's pairs from the gallery's queries, and the
calibration shown only for the evidence a model's matchers give (issue 26, items 2 and 6)."""

from __future__ import annotations

import datetime as dt
import math

import numpy as np
import pytest

from service.api.schemas import RegisteredModel
from service.contract import Calibration, calibration_shown
from service.knn import NEW_INDIVIDUAL
from service.matching.fusion import union
from service.matching.verify import (
    Evidence,
    Pair,
    fit_calibration,
    fused_probability,
    logit,
    map5_at_thresholds,
    probability,
)
from service.models.openset import Asked, fit_fusion, gallery_pairs, rescored

FUSED = (1.0, -4.0, 2.0)
BASE = Calibration(global_=(6.0, -10.0), local=(-3.0, 1.5), fused=FUSED)


def test_max_is_todays_behaviour_the_best_photo_alone() -> None:
    x = logit(BASE, 0.3, 5, (5, 4, 0))
    assert x == pytest.approx(1.0 - 4.0 * 0.3 + 2.0 * math.log1p(5))
    # The other photos do not count, and neither does their absence.
    assert x == logit(BASE, 0.3, 5, ()) == logit(BASE, 0.3, 5, (5,))
    assert logit(BASE, None, 5, (5, 4)) == pytest.approx(-3.0 + 1.5 * math.log1p(5))
    assert logit(BASE, 0.3, None) == pytest.approx(6.0 - 3.0)
    assert logit(BASE, None, None) is None


def test_best_two_sums_the_two_best_photos() -> None:
    two = Calibration(global_=BASE.global_, local=BASE.local, fused=FUSED, aggregation="best-two")
    assert logit(two, 0.3, 5, (5, 4, 3)) == pytest.approx(1.0 - 4.0 * 0.3 + 2.0 * math.log1p(9))
    assert logit(two, None, 5, (5, 4)) == pytest.approx(-3.0 + 1.5 * math.log1p(9))
    # One photo: its inliers alone.
    assert logit(two, 0.3, 5, (5,)) == pytest.approx(logit(BASE, 0.3, 5, (5,)))
    # Two photos that agree beat one slightly better photo, where max says the opposite.
    steady = Evidence("a", 0.3, (1, 2), inliers=6, photo_inliers=(6, 6))
    lucky = Evidence("b", 0.3, (3,), inliers=8, photo_inliers=(8,))
    assert fused_probability(two, steady) > fused_probability(two, lucky)
    assert fused_probability(BASE, steady) < fused_probability(BASE, lucky)


def test_the_learned_mix_is_its_logistic_and_falls_back_to_the_curves() -> None:
    mix = Calibration(
        global_=BASE.global_,
        local=BASE.local,
        fused=FUSED,
        aggregation="mix",
        mix=(1.0, -2.0, 0.5, 0.25, 0.1),
        mix_local=(-1.0, 0.5, 0.25, 0.1),
    )
    # Best 5, second 4, 2 photos with any inlier (the third had none).
    xs = (math.log1p(5), math.log1p(4), math.log1p(2))
    assert logit(mix, 0.3, 5, (5, 4, 0)) == pytest.approx(
        1.0 - 2.0 * 0.3 + 0.5 * xs[0] + 0.25 * xs[1] + 0.1 * xs[2]
    )
    assert logit(mix, None, 5, (5, 4, 0)) == pytest.approx(
        -1.0 + 0.5 * xs[0] + 0.25 * xs[1] + 0.1 * xs[2]
    )
    # No photos known (a recorded candidate): its best counts as one agreeing photo.
    assert logit(mix, None, 5, ()) == pytest.approx(-1.0 + 0.5 * xs[0] + 0.1 * math.log(2))
    # The distance alone has no mix: the global curve.
    assert logit(mix, 0.3, None) == pytest.approx(logit(BASE, 0.3, None))
    unfitted = Calibration(global_=BASE.global_, local=BASE.local, fused=FUSED, aggregation="mix")
    assert logit(unfitted, 0.3, 5, (5, 4)) == pytest.approx(logit(BASE, 0.3, 5, (5, 4)))


def test_a_calibration_stored_before_aggregations_keeps_its_form_and_version() -> None:
    old = {
        "global": [6.0, -10.0],
        "local": [-3.0, 1.5],
        "fused": list(FUSED),
        "threshold": 0.4,
        "fitted": {"source": "labelled queries q.csv"},
    }
    read = Calibration.from_dict(old, 0.6)
    assert read.aggregation == "max" and read.mix is None and read.mix_local is None
    assert read.as_dict() == old
    mix = Calibration.from_dict({**old, "aggregation": "mix", "mix": [1, 2, 3, 4, 5]}, 0.6)
    assert mix.aggregation == "mix" and mix.mix == (1, 2, 3, 4, 5)
    assert Calibration.from_dict(mix.as_dict(), 0.6) == mix
    assert mix.version != read.version
    with pytest.raises(ValueError, match="aggregation 'mean'"):
        Calibration.from_dict({**old, "aggregation": "mean"}, 0.6)
    with pytest.raises(ValueError, match="expected 5"):
        Calibration.from_dict({**old, "aggregation": "mix", "mix": [1, 2]}, 0.6)


def _steady_pairs(seed: int) -> list[Pair]:
    """Queries whose right animal has two photos that agree, moderately; the wrong ones one
    lucky photo, sometimes better than the right animal's best."""
    rng = np.random.default_rng(seed)
    pairs = []
    for q in range(60):
        animal = f"ind-{q % 12}"
        a, b = sorted(rng.integers(4, 12, size=2), reverse=True)
        pairs.append(Pair(0.5, int(a), True, q, animal=animal, photos=(int(a), int(b), 0)))
        for _ in range(4):
            n = int(rng.integers(0, 14))
            pairs.append(Pair(0.5, n, False, q, animal=animal, photos=(n, 0, 0)))
    return pairs


def test_each_aggregation_is_fitted_and_the_steady_evidence_wins() -> None:
    pairs = _steady_pairs(0)
    fits = {
        name: fit_calibration(pairs, BASE, source="t", aggregation=name)
        for name in ("max", "best-two", "mix")
    }
    assert {n: f.aggregation for n, f in fits.items()} == {n: n for n in fits}
    assert fits["mix"].mix is not None and fits["mix"].mix_local is not None
    assert fits["max"].mix is None and fits["max"].fitted["aggregation"] == "max"
    # The mix learns that a second photo agreeing is evidence.
    assert fits["mix"].mix[3] > 0
    best = {n: max(map5_at_thresholds(pairs, f).values()) for n, f in fits.items()}
    assert best["best-two"] > best["max"] and best["mix"] > best["max"]


def test_the_shortlist_is_the_union_of_every_matchers() -> None:
    head = [Evidence("a", 0.2, (1, 2), 5), Evidence("b", 0.3, (3,), 2)]
    local = [Evidence("c", None, (7,), 9), Evidence("a", None, (2, 4), 3)]
    merged = union([head, local])
    assert [c.label for c in merged] == ["a", "b", "c"]
    assert merged[0].photos == (1, 2, 4) and merged[0].distance == 0.2 and merged[0].votes == 5
    assert merged[2] == local[0]
    assert union([[], local]) == local


def _asked(q: int, animal: str, unseen: bool, scored: list[Evidence]) -> Asked:
    return Asked(q, animal, unseen, lambda _: [], tuple(scored))


def test_the_gallery_queries_give_labelled_pairs() -> None:
    fill = Evidence("z", None, (), 0, 0, 0.0, 9)  # named to fill an answer, never scored
    asked = [
        _asked(1, "a", False, [Evidence("a", 0.2, (1,), inliers=7, photo_inliers=(7, 2)), fill]),
        _asked(1, "a", True, [Evidence("b", 0.5, (2,), inliers=1, photo_inliers=(1,))]),
    ]
    pairs = gallery_pairs(asked)
    assert pairs == [
        Pair(0.2, 7, True, 0, False, "a", (7, 2)),
        Pair(0.5, 1, False, 1, True, "a", (1,)),
    ]
    again = rescored(asked, BASE)
    assert again[0].scored[0].score == pytest.approx(probability(BASE, 0.2, 7))
    assert again[0].scored[1].score == 0.0  # the unscored one stays unscored
    assert again[0].answer_at(0.01)[0] == "a" and again[1].answer_at(0.99)[0] == NEW_INDIVIDUAL


def test_the_fusion_fit_on_gallery_queries_keeps_what_answers_best() -> None:
    """Synthetic gallery queries whose right animal has two agreeing photos: ``auto`` keeps an
    aggregation that counts them, better than ``max``; forced, ``max`` is kept as asked."""
    rng = np.random.default_rng(3)
    asked = []
    for q in range(80):  # 64 known: enough right pairs for the mix's five parameters
        animal, unseen = f"ind-{q % 12}", q % 5 == 0
        scored = []
        if not unseen:
            a, b = sorted(rng.integers(4, 12, size=2), reverse=True)
            scored.append(Evidence(animal, 0.5, (1, 2), inliers=int(a), photo_inliers=(a, b)))
        for w in range(4):
            n = int(rng.integers(0, 14))
            scored.append(Evidence(f"w{q}-{w}", 0.5, (3,), inliers=n, photo_inliers=(n,)))
        asked.append(_asked(q, animal, unseen, scored))
    auto = fit_fusion(asked, BASE, p_new=0.2)
    forced = fit_fusion(asked, BASE, p_new=0.2, aggregation="max")
    assert auto.calibration is not None and forced.calibration is not None
    assert forced.calibration.aggregation == "max"
    assert auto.calibration.aggregation != "max"
    assert auto.expected_map5 > forced.expected_map5
    tried = auto.calibration.fitted["tried"]
    assert set(tried) == {"max", "best-two", "mix"}
    assert tried["max"] == pytest.approx(forced.expected_map5, abs=1e-6)
    assert auto.calibration.fitted["source"] == "gallery"
    assert auto.calibration.threshold == auto.value
    assert auto.figures["calibration"]["aggregation"] == auto.calibration.aggregation
    # 36 right pairs: ten a parameter for max and best-two (three), not for the mix (five).
    fewer = fit_fusion(asked[:45], BASE, p_new=0.2)
    assert fewer.calibration is not None
    assert set(fewer.calibration.fitted["tried"]) == {"max", "best-two"}


def test_the_local_features_model_shows_no_placeholder_distance_curve() -> None:
    stored = Calibration.default(2.0).as_dict()
    assert stored["global"] == [20.0, -10.0]  # the placeholder the kind has no use for
    shown = calibration_shown(stored, distance=False, inliers=True)
    assert "global" not in shown and "fused" not in shown
    assert shown["local"] == stored["local"] and shown["threshold"] == stored["threshold"]
    assert calibration_shown(stored, distance=True, inliers=True) == stored
    row = {
        "id": 1,
        "name": "local-features",
        "version": "1",
        "status": "active",
        "embedding_dim": 0,
        "k": 50,
        "cutoff": 2.0,
        "ranking": "nearest",
        "preprocessing": {},
        "created_at": dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
        "kind": "local-features",
        "verification": "rerank",
        "calibration": stored,
    }
    assert "global" not in RegisteredModel.model_validate(row).model_dump()["calibration"]
    onnx = RegisteredModel.model_validate({**row, "kind": "onnx"}).model_dump()
    assert onnx["calibration"]["global"] == [20.0, -10.0]
