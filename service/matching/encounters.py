"""Encounter identification: several photos of one animal from one encounter, each identified on
its own (and recorded), then fused into one ranking.

The fusion rule, ``similarity_sum`` (the default): per individual named in the photos' own
answers (their five entries, ``new_individual`` left out), the similarity ``1 - distance`` is
summed over the photos that name it; the largest sum ranks first, ties going to the smaller
distance. An individual's fused distance is its smallest over the photos (its votes the sum of
its votes); ``new_individual`` is then placed by the model's cutoff on that distance, as for one
photo: candidates within the cutoff keep their order, then ``new_individual``, then the rest, five
in all. An individual that several photos agree on outscores one that a single (bad) photo puts
close. docs/performance.md ("Encounters") measures it against the alternatives:

- ``rank_sum``: points by place in each photo's answer (5 for the first ... 1 for the fifth),
  summed; it ignores how close a candidate is.
- ``min_distance``: the fused distance alone (the nearest over all photos, Wildbook-style); one
  photo that happens to lie close to a wrong individual wins."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import IO

from service.errors import PhotoError
from service.gallery.sync import Filters
from service.knn import NEW_INDIVIDUAL, TOP, place_new_individual
from service.matching.identify import AnsweredCandidate, IdentificationResult, Identifier


class Fusion(StrEnum):
    SIMILARITY_SUM = "similarity_sum"
    RANK_SUM = "rank_sum"
    MIN_DISTANCE = "min_distance"


@dataclass
class _Tally:
    individual_id: str
    species: str | None
    points: int = 0
    similarity: float = 0.0
    votes: int = 0
    distance: float = float("inf")
    best_image_id: int | None = None
    photos: int = 0


@dataclass(frozen=True)
class EncounterPhoto:
    data: IO[bytes] | bytes
    name: str | None = None


@dataclass
class EncounterResult:
    candidates: list[AnsweredCandidate]
    fusion: Fusion
    photos: list[IdentificationResult]


def fuse(
    answers: Sequence[Sequence[AnsweredCandidate]],
    *,
    cutoff: float,
    fusion: Fusion = Fusion.SIMILARITY_SUM,
    top: int = TOP,
) -> list[AnsweredCandidate]:
    """One ranking from the photos' own answers, by ``fusion`` (see the module docstring)."""
    tallies: dict[str, _Tally] = {}
    for answer in answers:
        named = [c for c in answer if c.individual_id != NEW_INDIVIDUAL and c.distance is not None]
        for place, c in enumerate(named):
            assert c.distance is not None
            t = tallies.setdefault(c.individual_id, _Tally(c.individual_id, c.species))
            t.points += top - place
            t.similarity += 1.0 - c.distance
            t.votes += c.votes or 0
            t.photos += 1
            if c.distance < t.distance:
                t.distance, t.best_image_id = c.distance, c.best_image_id
    ordered = sorted(tallies.values(), key=_order_key(fusion))
    placed: list[_Tally | None] = place_new_individual(
        ordered, lambda t: None if t is None else t.distance, cutoff, None, top
    )
    return [_answer(rank, t) for rank, t in enumerate(placed, start=1)]


def _order_key(fusion: Fusion) -> Callable[[_Tally], tuple[float, float, str]]:
    if fusion is Fusion.RANK_SUM:
        return lambda t: (-t.points, t.distance, t.individual_id)
    if fusion is Fusion.SIMILARITY_SUM:
        return lambda t: (-t.similarity, t.distance, t.individual_id)
    return lambda t: (t.distance, -t.votes, t.individual_id)


def _answer(rank: int, t: _Tally | None) -> AnsweredCandidate:
    if t is None:
        return AnsweredCandidate(rank, NEW_INDIVIDUAL, None, None, None, None, None)
    distance = round(t.distance, 6)
    return AnsweredCandidate(
        rank,
        t.individual_id,
        t.species,
        t.votes,
        distance,
        round(1.0 - distance, 6),
        t.best_image_id,
    )


def identify_encounter(
    identifier: Identifier,
    photos: Sequence[EncounterPhoto],
    *,
    filters: Filters,
    fusion: Fusion = Fusion.SIMILARITY_SUM,
    key_id: int | None = None,
) -> EncounterResult:
    """Identify and record each photo with the one model (each through the decode and embed
    slots), then fuse. A photo that cannot be read stops the encounter with its error, naming
    the photo; the photos before it stay recorded, like single identifications."""
    results = []
    for number, item in enumerate(photos, start=1):
        try:
            results.append(
                identifier.identify(
                    item.data, filters=filters, original_name=item.name, key_id=key_id
                )
            )
        except PhotoError as e:
            raise type(e)(f"photo {number} ({item.name or 'unnamed'}): {e}") from e
    cutoff = identifier.model.head.cutoff
    fused = fuse([r.candidates for r in results], cutoff=cutoff, fusion=fusion)
    return EncounterResult(fused, fusion, results)
