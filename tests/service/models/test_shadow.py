"""The shadow evaluation's grid ranks exactly as /identify's head does, cell by cell."""

from __future__ import annotations

import numpy as np

from service.contract import RANKINGS
from service.knn import NEW_INDIVIDUAL, Neighbour, map_at_5, rank_candidates
from service.models.shadow import grid


def test_every_grid_cell_equals_the_head_of_identify() -> None:
    rng = np.random.default_rng(3)
    neighbours, truths = [], []
    for q in range(60):
        labels = rng.integers(0, 9, size=40)
        distances = np.sort(rng.uniform(0.05, 0.95, size=40))
        pairs = zip(labels, distances, strict=True)
        neighbours.append([Neighbour(f"ind-{a}", float(d), i) for i, (a, d) in enumerate(pairs)])
        truths.append(NEW_INDIVIDUAL if q % 5 == 0 else f"ind-{rng.integers(0, 12)}")
    k_grid, cutoff_grid = [1, 3, 10, 30], [0.1, 0.3, 0.5, 0.62, 0.9]
    cells = grid(neighbours, truths, k_grid, cutoff_grid)
    assert len(cells) == len(RANKINGS) * len(k_grid) * len(cutoff_grid)
    known = [i for i, t in enumerate(truths) if t != NEW_INDIVIDUAL]
    unseen = [i for i, t in enumerate(truths) if t == NEW_INDIVIDUAL]
    for cell in cells:
        k, cutoff, ranking = cell["k"], cell["cutoff"], cell["ranking"]
        answers = [
            [c.label for c in rank_candidates(n[:k], cutoff=cutoff, ranking=ranking, beyond=n[k:])]
            for n in neighbours
        ]
        assert np.isclose(cell["map5"], map_at_5(answers, truths)), cell
        assert np.isclose(
            cell["map5_known"], map_at_5([answers[i] for i in known], [truths[i] for i in known])
        )
        assert np.isclose(
            cell["map5_unseen"],
            map_at_5([answers[i] for i in unseen], [truths[i] for i in unseen]),
        )
    assert len({round(c["map5"], 6) for c in cells}) > 5  # the cells differ: the test can tell
