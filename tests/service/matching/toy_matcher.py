"""A toy matcher, the worked example of docs/design.md's "Matchers": a matcher is its own module
and one registry line.

``Favourite`` believes every photo shows one individual. It shortlists that individual (when
the request's filters allow it) and adds 20 to the log-odds of any pair naming it, so, in a
fusion with the kNN head, the favourite comes first and the head's own candidates follow,
each scored by the calibrated distance."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from service.matching.matcher import Context, Matcher, Need, Query
from service.matching.registry import register_verification
from service.matching.verify import Evidence

FAVOURITE = "ind-7"


class Favourite(Matcher):
    name = "favourite"
    needs = frozenset({Need.EMBEDDING})

    def shortlist(self, query: Query, context: Context, *, top: int, photos: int) -> list[Evidence]:
        within = context.gallery.nearest_of(query.vector, [FAVOURITE], query.filters)
        return [Evidence(FAVOURITE, None, ())] if FAVOURITE in within else []

    def score(
        self, query: Query, context: Context, candidates: Sequence[Evidence]
    ) -> list[Evidence]:
        return [replace(c, logit=c.logit + 20.0) if c.label == FAVOURITE else c for c in candidates]


register_verification("toy", Favourite)  # the one registry line
