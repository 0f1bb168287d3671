"""Validation through the serving path: exact search, the service's head, the grid search."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tensorflow")

from service.knn import NEW_INDIVIDUAL, Neighbour, rank_candidates  # noqa: E402
from service.onnx.embedder import l2_normalise  # noqa: E402
from training.evaluate import grid_search, nearest, predict, score  # noqa: E402


def test_nearest_is_exact_cosine_search() -> None:
    rng = np.random.default_rng(0)
    gallery = l2_normalise(rng.standard_normal((40, 8)))
    queries = l2_normalise(rng.standard_normal((5, 8)))
    labels = [f"ind{i % 9}" for i in range(40)]
    found = nearest(queries, gallery, labels, k=7, chunk=2)
    for q, neighbours in zip(queries, found, strict=True):
        distance = 1 - gallery @ q
        order = np.argsort(distance)[:7]
        assert [n.image_id for n in neighbours] == order.tolist()
        assert [n.label for n in neighbours] == [labels[i] for i in order]
        assert [n.distance for n in neighbours] == pytest.approx(distance[order].tolist(), abs=1e-6)
    assert len(nearest(queries, gallery[:3], labels[:3], k=50)[0]) == 3  # k = min(k, n)


def test_predict_is_the_service_head() -> None:
    neighbours = [
        [Neighbour("a", 0.1), Neighbour("b", 0.2), Neighbour("b", 0.25), Neighbour("c", 0.9)],
        [Neighbour("a", 0.7), Neighbour("b", 0.8)],
    ]
    for ranking in ("vote", "nearest"):
        got = predict(neighbours, k=3, cutoff=0.62, ranking=ranking)  # type: ignore[arg-type]
        want = [
            [c.label for c in rank_candidates(n[:3], cutoff=0.62, ranking=ranking)]  # type: ignore[arg-type]
            for n in neighbours
        ]
        assert got == want
    assert predict(neighbours, k=3, cutoff=0.62, ranking="vote")[0][:2] == ["b", "a"]
    assert predict(neighbours, k=1, cutoff=0.62, ranking="vote")[1][0] == NEW_INDIVIDUAL


def test_grid_search_finds_the_cutoff_that_separates_known_from_new() -> None:
    # known queries have their individual at distance 0.3, unseen ones find someone at 0.5
    neighbours = [[Neighbour(f"i{q}", 0.3), Neighbour("other", 0.6)] for q in range(6)]
    neighbours += [[Neighbour("i0", 0.5), Neighbour("other", 0.6)] for _ in range(4)]
    truths = [f"i{q}" for q in range(6)] + [NEW_INDIVIDUAL] * 4
    grid = grid_search(
        neighbours, truths, k_grid=[1, 3], cutoff_grid=[0.2, 0.4, 0.62], rankings=["vote"]
    )
    assert len(grid.cells) == 6
    best = grid.best
    assert best["cutoff"] == 0.4 and best["map5"] == 1.0 and best["map5_unseen"] == 1.0
    at_paper = next(c for c in grid.cells if c["cutoff"] == 0.62 and c["k"] == 3)
    # at 0.62 the unseen queries find i0 and "other" within the cutoff: new_individual third
    assert at_paper["map5_known"] == 1.0 and at_paper["map5_unseen"] == pytest.approx(1 / 3)
    s = score([["i0"], [NEW_INDIVIDUAL, "i1"]], ["i0", "i1"])
    assert (s.map5, s.map5_known, s.map5_unseen, s.queries) == (0.75, 0.75, None, 2)
