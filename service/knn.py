"""The kNN head and MAP@5: the one implementation that serving, training and evaluation share."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from service.contract import PAPER_HEAD, RANKINGS, Ranking

NEW_INDIVIDUAL = "new_individual"
TOP = 5
# The grid a catalogue's head is chosen from: the service's shadow evaluation searches it, and
# training should use these values too. The paper's head is ``service.contract.PAPER_HEAD``.
K_GRID = (1, 3, 5, 10, 20, 50, 75, 100)
# From 0.02: frozen ImageNet features put every photo within a cosine distance of 0.3 of the
# others (issue 17), and their cutoff lies below where a trained model's does.
CUTOFF_GRID = tuple(round(0.02 + 0.02 * i, 2) for i in range(45))  # 0.02 ... 0.90
# Choosing where new_individual goes (the head's cutoff, a calibration's threshold) needs at
# least this many known and as many unseen animals (not photos: one animal's photos are one).
MIN_ANIMALS = 5
# A neighbour at distance 0 (the same photo) must not divide by zero.
_MIN_DISTANCE = 1e-6
C = TypeVar("C")


@dataclass(frozen=True)
class Neighbour:
    """One gallery embedding returned by the search."""

    label: str
    distance: float
    image_id: int = 0


@dataclass(frozen=True)
class RankedCandidate:
    """One line of the answer. ``new_individual`` carries no votes, distance or image."""

    label: str
    votes: int | None
    distance: float | None
    inverse_distance_sum: float | None
    best_image_id: int | None

    @property
    def is_new(self) -> bool:
        return self.label == NEW_INDIVIDUAL

    @property
    def confidence(self) -> float | None:
        return None if self.distance is None else 1.0 - self.distance


NEW = RankedCandidate(NEW_INDIVIDUAL, None, None, None, None)


def aggregate(neighbours: Iterable[Neighbour]) -> list[RankedCandidate]:
    """Per individual: votes, its nearest neighbour's distance and image, inverse-distance sum."""
    votes: dict[str, int] = {}
    nearest: dict[str, Neighbour] = {}
    inverse: dict[str, float] = {}
    for n in neighbours:
        votes[n.label] = votes.get(n.label, 0) + 1
        inverse[n.label] = inverse.get(n.label, 0.0) + 1.0 / max(n.distance, _MIN_DISTANCE)
        best = nearest.get(n.label)
        if best is None or n.distance < best.distance:
            nearest[n.label] = n
    return [
        RankedCandidate(
            label, votes[label], nearest[label].distance, inverse[label], nearest[label].image_id
        )
        for label in votes
    ]


def order(candidates: list[RankedCandidate], ranking: Ranking) -> list[RankedCandidate]:
    def vote_key(c: RankedCandidate) -> tuple[float, float, float, str]:
        assert c.votes is not None and c.inverse_distance_sum is not None
        assert c.distance is not None
        return (-c.votes, -c.inverse_distance_sum, c.distance, c.label)

    def nearest_key(c: RankedCandidate) -> tuple[float, float, float, str]:
        assert c.votes is not None and c.inverse_distance_sum is not None
        assert c.distance is not None
        return (c.distance, -c.votes, -c.inverse_distance_sum, c.label)

    if ranking == "vote":
        return sorted(candidates, key=vote_key)
    if ranking == "nearest":
        return sorted(candidates, key=nearest_key)
    raise ValueError(f"unknown ranking {ranking!r}: use one of {', '.join(RANKINGS)}")


def rank_candidates(
    neighbours: Sequence[Neighbour],
    *,
    cutoff: float,
    ranking: Ranking = Ranking.VOTE,
    top: int = TOP,
    beyond: Sequence[Neighbour] = (),
) -> list[RankedCandidate]:
    """The kNN head of the identification contract.

    Candidates are ranked by ``ranking`` (``vote``: most votes, then larger inverse-distance sum,
    then smaller distance; ``nearest``: smallest distance first). When the neighbours name fewer
    than ``top - 1`` individuals, the first new individuals of ``beyond`` (gallery photos past the
    k neighbours, nearest first) follow them with 0 votes, so the answer holds ``top`` entries
    whenever the gallery has enough individuals. Those within ``cutoff`` keep that order, then
    ``new_individual`` is inserted, then the rest follow; the first ``top`` are kept. The answer
    starts with ``new_individual`` exactly when the nearest neighbour is farther than ``cutoff``
    (or there is no neighbour at all).
    """
    ranked = head_order(neighbours, ranking=ranking, top=top, beyond=beyond)
    return place_new_individual(ranked, lambda c: c.distance, cutoff, NEW, top)


def head_order(
    neighbours: Sequence[Neighbour],
    *,
    ranking: Ranking = Ranking.VOTE,
    top: int = TOP,
    beyond: Sequence[Neighbour] = (),
) -> list[RankedCandidate]:
    """The head's candidates in ``rank_candidates``' order, before ``new_individual`` is placed:
    what does not depend on the cutoff (the open-set fit places it at many cutoffs)."""
    ranked = order(aggregate(neighbours), ranking)
    ranked += fill(beyond, {c.label for c in ranked}, top - 1 - len(ranked))
    return ranked


def place_new_individual(
    ordered: Sequence[C],
    distance: Callable[[C], float | None],
    cutoff: float,
    new: C,
    top: int = TOP,
) -> list[C]:
    """Where ``new_individual`` goes in an answer: the candidates within ``cutoff`` keep their
    order, then ``new``, then the rest; the first ``top`` are kept. (Candidates without a
    distance are dropped.) ``ranks_at_cutoffs`` is the same rule for a grid of cutoffs."""
    within = [c for c in ordered if (d := distance(c)) is not None and d <= cutoff]
    beyond = [c for c in ordered if (d := distance(c)) is not None and d > cutoff]
    return [*within, new, *beyond][:top]


def ranks_at_cutoffs(
    distances: np.ndarray, position: int | None, cutoffs: np.ndarray
) -> np.ndarray:
    """``place_new_individual`` for many cutoffs at once: the 1-based rank, at each cutoff, of
    the candidate at ``position`` in an ordering whose distances are ``distances`` (``None``:
    the rank of ``new_individual`` itself)."""
    within = distances[None, :] <= cutoffs[:, None]
    n_within = within.sum(axis=1)
    if position is None:
        return np.asarray(n_within + 1)
    before = within[:, :position].sum(axis=1)
    return np.asarray(
        np.where(within[:, position], before + 1, n_within + 1 + (position - before) + 1)
    )


def best_cell(cells: Iterable[Mapping[str, Any]]) -> Any:
    """The best cell of a head grid by MAP@5 (to 6 places); ties go to the cell closest to the
    paper's head, in k and then in cutoff (training's grid search and the shadow evaluation)."""
    return max(
        cells,
        key=lambda c: (
            round(c["map5"], 6),
            -abs(c["k"] - PAPER_HEAD.k),
            -abs(c["cutoff"] - PAPER_HEAD.cutoff),
        ),
    )


def fill(beyond: Sequence[Neighbour], named: set[str], count: int) -> list[RankedCandidate]:
    """The first ``count`` individuals of ``beyond`` (nearest first) not in ``named``, each with
    its nearest photo there and 0 votes: they were not among the k neighbours."""
    out: list[RankedCandidate] = []
    seen = set(named)
    for n in sorted(beyond, key=lambda n: n.distance):
        if len(out) >= count:
            break
        if n.label not in seen:
            seen.add(n.label)
            out.append(RankedCandidate(n.label, 0, n.distance, 0.0, n.image_id))
    return out


def shortfall(neighbours: Iterable[Neighbour], top: int = TOP) -> int:
    """How many more individuals the answer needs beyond those the neighbours name (the fill)."""
    return max(0, top - 1 - len({n.label for n in neighbours}))


def average_precision_at_5(predicted: Sequence[str], truth: str) -> float:
    """1/rank of the first correct label among the first five; later repeats count for nothing."""
    for rank, label in enumerate(predicted[:TOP], start=1):
        if label == truth:
            return 1.0 / rank
    return 0.0


def map_at_5(predictions: Sequence[Sequence[str]], truths: Sequence[str]) -> float:
    """Mean average precision at 5, the Happywhale metric. An empty set scores 0."""
    if len(predictions) != len(truths):
        raise ValueError(f"{len(predictions)} predictions but {len(truths)} truths")
    if not truths:
        return 0.0
    return sum(
        average_precision_at_5(p, t) for p, t in zip(predictions, truths, strict=True)
    ) / len(truths)
