"""The embedding's matcher: the kNN head (``service.knn``) as a ``Matcher``.

Alone it answers as the head does (votes among the k nearest photos, ``new_individual`` at the
cutoff). In a fusion it shortlists the head's first individuals, and scores any individual by
the embedding distance of its nearest photo within the filters (0 votes for one the k nearest
did not name)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from service.knn import RankedCandidate, aggregate, fill, order, rank_candidates
from service.matching.matcher import Context, Matcher, Need, Query
from service.matching.verify import Evidence


class KnnHead(Matcher):
    name = "knn"
    needs = frozenset({Need.EMBEDDING})
    answers_alone = True

    def shortlist(self, query: Query, context: Context, *, top: int, photos: int) -> list[Evidence]:
        """The head's first ``top`` individuals (topped up from beyond the k), each with its
        ``photos`` nearest photos among the k."""
        ordered = order(aggregate(query.neighbours), query.head.ranking)[:top]
        ordered += fill(query.beyond, {c.label for c in ordered}, top - len(ordered))
        nearest: dict[str, list[int]] = {}
        for n in sorted(query.neighbours, key=lambda n: n.distance):
            if len(nearest.setdefault(n.label, [])) < photos:
                nearest[n.label].append(n.image_id)
        return [
            Evidence(
                c.label,
                c.distance,
                tuple(nearest.get(c.label) or ([c.best_image_id] if c.best_image_id else [])),
                c.votes,
                best_image_id=c.best_image_id,
            )
            for c in ordered
        ]

    def score(
        self, query: Query, context: Context, candidates: Sequence[Evidence]
    ) -> list[Evidence]:
        """Each candidate without a distance (another matcher named it) gets its nearest
        photo's (and that photo as its best, unless it has one), and 0 votes."""
        others = [c.label for c in candidates if c.distance is None]
        nearest = context.gallery.nearest_of(query.vector, others, query.filters)
        out = []
        for c in candidates:
            if c.distance is None:
                n = nearest.get(c.label)
                c = replace(
                    c,
                    distance=None if n is None else n.distance,
                    votes=0,
                    best_image_id=c.best_image_id or (None if n is None else n.image_id),
                )
            out.append(c)
        return out

    def rank_alone(self, query: Query, context: Context) -> list[RankedCandidate]:
        return rank_candidates(
            query.neighbours,
            cutoff=query.head.cutoff,
            ranking=query.head.ranking,
            beyond=query.beyond,
        )
