"""The fusion: how the matchers of a model answer together. The idea is wildlife-tools'
``WildFusion`` (each matcher's raw score calibrated into one scale, then combined; it averages
calibrated probabilities), the code whaleid's own: here each matcher's evidence becomes
calibrated log-odds, and the log-odds are summed (what the default fused logistic of distance
and inliers already is).

A fusion of one matcher that can answer alone (the kNN head) answers as it does. Otherwise:

1. shortlist: the union of every matcher's shortlist: each matcher in turn proposes its first
   individuals (``rerank_individuals``, each with ``rerank_photos`` photos); an individual
   proposed by more than one keeps its place of first proposal and the union of the photos
   they proposed (the first's first);
2. score: each matcher adds its evidence on every candidate, whoever proposed it (the head a
   distance, local features inliers, any other matcher its calibrated log-odds);
3. calibrate: the evidence becomes one match probability (``verify.fused_probability``: the
   model's ``Calibration`` of distance and inliers, plus the other matchers' log-odds);
4. rank: highest probability first, ``new_individual`` before the first below the
   calibration's threshold (``verify.rerank``).

``at_least``: when fewer individuals were shortlisted, more are named from the embedding's
neighbours, unscored (the local-features matcher's thumbnail stand-in), so an answer still
holds five lines.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property

from service.knn import NEW_INDIVIDUAL, RankedCandidate, fill
from service.matching.matcher import Context, Matcher, Need, Query
from service.matching.verify import Evidence, fused_probability, rerank


@dataclass(frozen=True)
class Answer:
    """The ranked lines (the first five and ``new_individual``), and, from a calibrated
    fusion, every candidate scored (the evidence ``models.calibration`` fits on)."""

    ranked: list[RankedCandidate] | list[Evidence]
    scored: list[Evidence]


def union(shortlists: list[list[Evidence]]) -> list[Evidence]:
    """The union of the matchers' shortlists: each individual once, where it was first
    proposed, with the photos every matcher proposed for it (the first proposal's first)."""
    found: dict[str, Evidence] = {}
    for shortlist in shortlists:
        for c in shortlist:
            first = found.get(c.label)
            if first is None:
                found[c.label] = c
            else:
                more = tuple(i for i in c.photos if i not in first.photos)
                found[c.label] = replace(first, photos=(*first.photos, *more))
    return list(found.values())


@dataclass(frozen=True)
class Fusion:
    matchers: tuple[Matcher, ...]
    at_least: int = 0

    @cached_property
    def needs(self) -> frozenset[Need]:
        return frozenset().union(*(m.needs for m in self.matchers))

    @property
    def calibrated(self) -> bool:
        """Whether the answer is a calibrated probability (not one matcher answering alone)."""
        return not (len(self.matchers) == 1 and self.matchers[0].answers_alone)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.matchers)

    def answer(self, query: Query, context: Context) -> Answer:
        if not self.calibrated:
            return Answer(self.matchers[0].rank_alone(query, context), [])
        top, photos = context.settings.rerank_individuals, context.settings.rerank_photos
        candidates = union(
            [matcher.shortlist(query, context, top=top, photos=photos) for matcher in self.matchers]
        )
        named = {c.label for c in candidates}
        for matcher in self.matchers:
            candidates = matcher.score(query, context, candidates)
        scored = [replace(c, score=fused_probability(query.calibration, c)) for c in candidates]
        if len(named) < self.at_least:
            # Too few individuals share evidence with the query: name more, unscored.
            more = fill([*query.neighbours, *query.beyond], named, self.at_least - len(named))
            scored += [Evidence(c.label, None, (), 0, 0, 0.0, c.best_image_id) for c in more]
        new = Evidence(NEW_INDIVIDUAL, None, ())
        return Answer(rerank(scored, query.calibration, new), scored)
