"""Five candidates whenever the filtered gallery holds four individuals: the kNN head's candidates,
then the next-nearest individuals beyond the k neighbours (0 votes), against brute force."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pytest

from service.gallery.index import GalleryIndex
from service.gallery.sync import Filters, Gallery, GalleryEntries
from service.knn import NEW_INDIVIDUAL, Neighbour, RankedCandidate, rank_candidates

DIM = 16


def reference_answer(
    vectors: np.ndarray,
    labels: list[str],
    allowed: np.ndarray,
    query: np.ndarray,
    *,
    k: int,
    cutoff: float,
    ranking: str,
) -> list[tuple[str, int | None, float | None]]:
    """Straight from DESIGN.md step 4-6, by brute force: every distance, sort, count."""
    rows = np.flatnonzero(allowed)
    distances = 1.0 - vectors[rows] @ query
    order = rows[np.argsort(distances, kind="stable")]
    dist = {int(r): float(1.0 - vectors[r] @ query) for r in rows}
    head = order[:k]
    stats = []
    for label in sorted({labels[r] for r in head}):
        mine = [dist[int(r)] for r in head if labels[r] == label]
        inv = sum(1.0 / max(d, 1e-6) for d in mine)
        stats.append((label, len(mine), min(mine), inv))
    if ranking == "vote":
        stats.sort(key=lambda s: (-s[1], -s[3], s[2], s[0]))
    else:
        stats.sort(key=lambda s: (s[2], -s[1], -s[3], s[0]))
    named = {s[0] for s in stats}
    others: dict[str, float] = {}
    for r in rows:
        if labels[r] not in named:
            others[labels[r]] = min(others.get(labels[r], 2.0), dist[int(r)])
    fill = sorted(others.items(), key=lambda item: item[1])[: max(0, 4 - len(stats))]
    ranked = [(s[0], s[1], s[2]) for s in stats] + [(label, 0, d) for label, d in fill]
    answer = [c for c in ranked if c[2] <= cutoff] + [(NEW_INDIVIDUAL, None, None)]
    answer += [c for c in ranked if c[2] > cutoff]
    return answer[:5]


def make_gallery(tmp_path: Path, seed: int) -> tuple[Gallery, np.ndarray, list[str], list[str]]:
    """A gallery where a few individuals own most photos, so k neighbours often name only one
    to three individuals and the answer needs the fill."""
    rng = np.random.default_rng(seed)
    n_individuals = 9
    counts = rng.integers(1, 40, n_individuals)
    centres = rng.standard_normal((n_individuals, DIM)).astype(np.float32)
    labels: list[str] = []
    vectors = []
    for i, count in enumerate(counts):
        labels += [f"ind-{i}"] * int(count)
        vectors.append(centres[i] + 0.6 * rng.standard_normal((int(count), DIM)))
    v = np.concatenate(vectors).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    species = [("orca" if int(label[4:]) % 3 else "humpback_whale") for label in labels]
    ids = np.arange(len(labels), dtype=np.int64) * 7 + 5  # row ids, not positions
    rows = [
        (int(ids[j]), 1000 + j, labels[j], species[j], "Moray Firth", dt.date(2024, 1, 1), None)
        for j in range(len(labels))
    ]
    gallery = Gallery(1, DIM, tmp_path / "g.faiss")
    gallery.index = GalleryIndex.build(ids, v, DIM)
    gallery.entries = GalleryEntries.from_rows(rows)
    return gallery, v, labels, species


@pytest.mark.parametrize("ranking", ["vote", "nearest"])
def test_answer_matches_brute_force_with_the_fill(tmp_path: Path, ranking: str) -> None:
    filled = 0
    for seed in range(6):
        gallery, vectors, labels, species = make_gallery(tmp_path, seed)
        rng = np.random.default_rng(100 + seed)
        for trial in range(40):
            k = int(rng.choice([1, 3, 10, 30]))
            cutoff = float(rng.choice([0.2, 0.5, 0.9]))
            filters = Filters(species="orca") if trial % 3 == 0 else Filters()
            allowed = np.array([filters.species in (None, s) for s in species])
            query = vectors[rng.integers(len(vectors))] + 0.5 * rng.standard_normal(DIM)
            query = (query / np.linalg.norm(query)).astype(np.float32)

            neighbours, _ = gallery.search(query, k, filters)
            beyond = gallery.search_beyond(query, filters, neighbours)
            got = rank_candidates(neighbours, cutoff=cutoff, ranking=ranking, beyond=beyond)  # type: ignore[arg-type]
            want = reference_answer(
                vectors, labels, allowed, query, k=k, cutoff=cutoff, ranking=ranking
            )
            assert [(c.label, c.votes) for c in got] == [(w[0], w[1]) for w in want]
            for c, w in zip(got, want, strict=True):
                assert c.distance == pytest.approx(w[2], abs=1e-5)
            individuals = len({labels[j] for j in np.flatnonzero(allowed)})
            assert len(got) == (5 if individuals >= 4 else individuals + 1)
            filled += sum(1 for c in got if c.votes == 0)
    assert filled > 50  # the fill was exercised, not only the plain head


def test_fill_follows_the_head_and_keeps_new_individual_at_the_cutoff() -> None:
    neighbours = [Neighbour("a", 0.10, 1), Neighbour("a", 0.12, 2), Neighbour("b", 0.40, 3)]
    beyond = [
        Neighbour("c", 0.45, 4),
        Neighbour("a", 0.46, 5),  # named already: not a second entry
        Neighbour("c", 0.47, 6),
        Neighbour("d", 0.70, 7),
        Neighbour("e", 0.80, 8),
    ]
    got = rank_candidates(neighbours, cutoff=0.5, beyond=beyond)
    assert [(c.label, c.votes, c.best_image_id) for c in got] == [
        ("a", 2, 1),
        ("b", 1, 3),
        ("c", 0, 4),
        (NEW_INDIVIDUAL, None, None),
        ("d", 0, 7),
    ]
    # Enough individuals among the neighbours: nothing is filled.
    many = [Neighbour(x, 0.1 + i / 10, i) for i, x in enumerate("pqrs")]
    assert all(c.votes != 0 for c in rank_candidates(many, cutoff=0.62, beyond=beyond))
    # Beyond the cutoff from the first neighbour on: the answer starts with new_individual.
    farther = [Neighbour(x, 0.75 + i / 100, 10 + i) for i, x in enumerate("cdef")]
    far = rank_candidates([Neighbour("a", 0.7, 1)], cutoff=0.62, beyond=farther)
    assert [c.label for c in far] == [NEW_INDIVIDUAL, "a", "c", "d", "e"]
    assert isinstance(far[2], RankedCandidate) and far[2].confidence == pytest.approx(0.25)
