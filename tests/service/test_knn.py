"""The kNN head against a brute-force reference, and MAP@5 on hand-worked cases."""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import pytest

from service.contract import PAPER_HEAD, Head, Ranking
from service.knn import (
    CUTOFF_GRID,
    K_GRID,
    NEW_INDIVIDUAL,
    Neighbour,
    average_precision_at_5,
    best_cell,
    map_at_5,
    place_new_individual,
    rank_candidates,
    ranks_at_cutoffs,
)


def reference_head(neighbours, cutoff, ranking):  # type: ignore[no-untyped-def]
    """Straight from DESIGN.md, written independently: one pass per label, then sort."""
    labels = sorted({n.label for n in neighbours})
    stats = []
    for label in labels:
        mine = [n for n in neighbours if n.label == label]
        d = min(n.distance for n in mine)
        inv = sum(1.0 / max(n.distance, 1e-6) for n in mine)
        stats.append((label, len(mine), d, inv))
    if ranking == "vote":
        stats.sort(key=lambda s: (-s[1], -s[3], s[2], s[0]))
    else:
        stats.sort(key=lambda s: (s[2], -s[1], -s[3], s[0]))
    answer = [s[0] for s in stats if s[2] <= cutoff] + [NEW_INDIVIDUAL]
    answer += [s[0] for s in stats if s[2] > cutoff]
    return answer[:5]


@pytest.mark.parametrize("ranking", ["vote", "nearest"])
def test_head_matches_brute_force_reference(ranking: str) -> None:
    rng = random.Random(7)
    for _ in range(500):
        n = rng.randint(0, 60)
        pool = [f"ind{i}" for i in range(rng.randint(1, 12))]
        # Coarse distances make ties in votes and distance common.
        neighbours = [
            Neighbour(rng.choice(pool), rng.choice([0.0, 0.1, 0.3, 0.5, 0.62, 0.7, 0.9]), i)
            for i in range(n)
        ]
        cutoff = rng.choice([0.3, 0.62, 0.8])
        got = [c.label for c in rank_candidates(neighbours, cutoff=cutoff, ranking=ranking)]  # type: ignore[arg-type]
        assert got == reference_head(neighbours, cutoff, ranking)


def test_vote_ranking_counts_votes_before_distance() -> None:
    neighbours = [
        Neighbour("near", 0.10, 1),
        Neighbour("many", 0.20, 2),
        Neighbour("many", 0.25, 3),
        Neighbour("many", 0.30, 4),
    ]
    vote = rank_candidates(neighbours, cutoff=0.62, ranking="vote")
    nearest = rank_candidates(neighbours, cutoff=0.62, ranking="nearest")
    assert [c.label for c in vote] == ["many", "near", NEW_INDIVIDUAL]
    assert [c.label for c in nearest] == ["near", "many", NEW_INDIVIDUAL]
    many = vote[0]
    assert many.votes == 3
    assert many.distance == pytest.approx(0.20)
    assert many.best_image_id == 2
    assert many.confidence == pytest.approx(0.80)


def test_vote_tie_goes_to_larger_inverse_distance_sum() -> None:
    neighbours = [
        Neighbour("a", 0.10, 1),
        Neighbour("a", 0.50, 2),  # 1/0.1 + 1/0.5 = 12
        Neighbour("b", 0.15, 3),
        Neighbour("b", 0.15, 4),  # 2/0.15 = 13.3
    ]
    ranked = rank_candidates(neighbours, cutoff=0.62)
    assert [c.label for c in ranked[:2]] == ["b", "a"]


def test_cutoff_boundary_is_inclusive() -> None:
    at = [Neighbour("a", 0.62, 1)]
    above = [Neighbour("a", float(np.nextafter(0.62, 1.0)), 1)]
    assert [c.label for c in rank_candidates(at, cutoff=0.62)] == ["a", NEW_INDIVIDUAL]
    assert [c.label for c in rank_candidates(above, cutoff=0.62)] == [NEW_INDIVIDUAL, "a"]


def test_new_individual_first_exactly_when_nearest_is_beyond_cutoff() -> None:
    rng = random.Random(3)
    for _ in range(300):
        neighbours = [
            Neighbour(f"i{rng.randint(0, 6)}", rng.uniform(0.0, 1.2), i)
            for i in range(rng.randint(1, 50))
        ]
        ranked = rank_candidates(neighbours, cutoff=0.62, ranking="vote")
        nearest = min(n.distance for n in neighbours)
        assert (ranked[0].label == NEW_INDIVIDUAL) == (nearest > 0.62)


def test_empty_gallery_answers_new_individual() -> None:
    ranked = rank_candidates([], cutoff=0.62)
    assert [c.label for c in ranked] == [NEW_INDIVIDUAL]
    assert ranked[0].votes is None and ranked[0].distance is None


def test_answer_is_cut_to_five() -> None:
    neighbours = [Neighbour(f"i{i}", 0.1 + i / 100, i) for i in range(10)]
    ranked = rank_candidates(neighbours, cutoff=0.62)
    assert len(ranked) == 5
    assert NEW_INDIVIDUAL not in [c.label for c in ranked]


def test_unknown_ranking_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown ranking"):
        rank_candidates([Neighbour("a", 0.1)], cutoff=0.62, ranking="best")  # type: ignore[arg-type]


def test_map5_table_2_of_the_paper() -> None:
    # Correct label "A" first: rel(1) = 1, P(1) = 1, later predictions contribute nothing.
    assert average_precision_at_5(["A", "B", "C", "D", "E"], "A") == 1.0


@pytest.mark.parametrize(
    ("predicted", "truth", "expected"),
    [
        (["B", "A", "C", "D", "E"], "A", 1 / 2),
        (["B", "C", "D", "E", "A"], "A", 1 / 5),
        (["B", "C", "D", "E", "F", "A"], "A", 0.0),  # sixth place is outside MAP@5
        (["B", "A", "A", "C", "D"], "A", 1 / 2),  # only the first correct prediction counts
        ([NEW_INDIVIDUAL, "B"], NEW_INDIVIDUAL, 1.0),
        ([], "A", 0.0),
    ],
)
def test_average_precision_at_5(predicted: list[str], truth: str, expected: float) -> None:
    assert average_precision_at_5(predicted, truth) == pytest.approx(expected)


def test_map5_averages_over_images() -> None:
    predictions = [["A", "B"], ["B", "A"], ["C", "D", "E", "F", "G"]]
    assert map_at_5(predictions, ["A", "A", "A"]) == pytest.approx((1 + 0.5 + 0) / 3)
    with pytest.raises(ValueError):
        map_at_5(predictions, ["A"])


def test_map5_of_no_queries_is_zero() -> None:
    assert map_at_5([], []) == 0.0


def test_ranks_at_cutoffs_agrees_with_the_placement_of_new_individual() -> None:
    """The shadow evaluation's vectorised ranks are ``place_new_individual``'s, at every cutoff:
    for each candidate and for ``new_individual`` itself, on 300 random orderings."""
    rng = random.Random(3)
    cutoffs = np.round(np.arange(0.0, 1.01, 0.05), 2)
    for _ in range(300):
        distances = [round(rng.uniform(0.0, 1.0), 2) for _ in range(rng.randint(0, 8))]
        labels = [f"c{i}" for i in range(len(distances))]
        by_label = dict(zip(labels, distances, strict=True))
        array = np.array(distances, dtype=np.float64)
        for j, cutoff in enumerate(cutoffs):
            placed = place_new_individual(labels, by_label.get, float(cutoff), NEW_INDIVIDUAL, 99)
            for position, label in [*enumerate(labels), (None, NEW_INDIVIDUAL)]:
                expected = placed.index(label) + 1
                assert ranks_at_cutoffs(array, position, cutoffs)[j] == expected


def test_a_grids_best_cell_breaks_ties_toward_the_papers_head() -> None:
    cells = [
        {"k": 10, "cutoff": 0.62, "map5": 0.5},
        {"k": 50, "cutoff": 0.70, "map5": 0.5},
        {"k": 50, "cutoff": 0.60, "map5": 0.5},
        {"k": 75, "cutoff": 0.62, "map5": 0.4},
    ]
    assert best_cell(cells) == {"k": 50, "cutoff": 0.60, "map5": 0.5}
    assert best_cell([*cells, {"k": 1, "cutoff": 0.3, "map5": 0.5000001}])["k"] == 50  # 6 places
    assert best_cell([*cells, {"k": 1, "cutoff": 0.3, "map5": 0.51}])["k"] == 1


def test_a_head_reads_back_what_it_writes_and_defaults_to_the_papers() -> None:
    head = Head(7, 0.5, Ranking.NEAREST)
    assert head.as_dict() == {"k": 7, "cutoff": 0.5, "ranking": "nearest"}
    assert Head.from_dict(head.as_dict()) == head
    assert Head.from_dict(None) == PAPER_HEAD
    assert Head.from_dict({"cutoff": 0.4, "map5": 0.9}) == Head(50, 0.4, Ranking.VOTE)
    assert Head.from_dict({"k": "3"}, default=head) == Head(3, 0.5, Ranking.NEAREST)
    with pytest.raises(ValueError):
        Head.from_dict({"ranking": "loudest"})


@pytest.mark.parametrize("doc", ["docs/operations.md", "docs/training.md"])
def test_the_head_grid_is_the_one_documented(doc: str) -> None:
    """Operators read which heads the shadow evaluation (and training's search) tries in the
    docs: k ∈ {…} × cutoff 0.02…0.90 step 0.02."""
    text = " ".join((Path(__file__).parents[2] / doc).read_text().split())
    ks = re.search(r"k ∈ \{([0-9, ]+)\}", text)
    assert ks is not None and tuple(int(k) for k in ks.group(1).split(",")) == K_GRID
    assert re.search(r"cutoff 0\.02…0\.90 \(?step 0\.02", text)
    assert (CUTOFF_GRID[0], CUTOFF_GRID[-1]) == (0.02, 0.90)
    assert np.allclose(np.diff(CUTOFF_GRID), 0.02)
