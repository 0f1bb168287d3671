"""The ``Matcher`` interface: one way of telling individuals apart, as a part ``/identify``
composes (``matching.fusion``) and finds by name (``matching.registry``).

A matcher says three things:

- what it ``needs`` from the query photo: its embedding (always computed: the gallery is
  searched with it) and, or, its local features (extracted only when a matcher needs them);
- how it ``shortlist``\\ s: the individuals it proposes, each as ``verify.Evidence`` with the
  photos of theirs it would compare;
- how it ``score``\\ s a (query, individual) pair: the evidence it adds to each candidate,
  whoever proposed it. The embedding head adds a distance, local features their inliers; any
  other matcher adds its calibrated ``logit`` (``Evidence.logit``), which the fusion sums
  with the calibrated distance and inliers into one probability.

A matcher holds no per-request state: it is made once per process and reads what it needs
from the ``Context`` (the identifier: its gallery, its features, its descriptor index).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, ClassVar, Protocol

if TYPE_CHECKING:
    import numpy as np

    from service.contract import Calibration, Head
    from service.gallery.sync import Filters, Gallery
    from service.knn import Neighbour, RankedCandidate
    from service.matching.features import Features, FeatureStore
    from service.matching.local import LocalMatcher
    from service.matching.verify import Evidence
    from service.settings import Settings


class Need(StrEnum):
    """What a matcher needs from the query photo."""

    EMBEDDING = "embedding"
    LOCAL_FEATURES = "local features"


@dataclass(frozen=True)
class Query:
    """One photo as the matchers see it: its embedding, its local features (None unless a
    matcher needs them), the gallery's ``neighbours`` of the embedding (the head's k) and
    ``beyond`` them (photos naming the next individuals), the request's filters, and the
    model's head and calibration."""

    vector: np.ndarray
    features: Features | None
    neighbours: list[Neighbour]
    beyond: list[Neighbour]
    filters: Filters
    head: Head
    calibration: Calibration


class Context(Protocol):
    """What a matcher may read: the model's gallery and the stores beside it (the
    ``Identifier`` is one)."""

    settings: Settings
    gallery: Gallery
    features: FeatureStore

    def descriptors(self) -> LocalMatcher: ...


class Matcher(ABC):
    """One way of telling individuals apart (see the module's text)."""

    name: ClassVar[str]
    needs: ClassVar[frozenset[Need]] = frozenset({Need.EMBEDDING})
    # Whether it can answer alone, uncalibrated (``rank_alone``): the kNN head can.
    answers_alone: ClassVar[bool] = False

    @abstractmethod
    def shortlist(self, query: Query, context: Context, *, top: int, photos: int) -> list[Evidence]:
        """At most ``top`` individuals, best first, each with at most ``photos`` photos."""

    @abstractmethod
    def score(
        self, query: Query, context: Context, candidates: Sequence[Evidence]
    ) -> list[Evidence]:
        """``candidates`` (in their order) with this matcher's evidence on each added."""

    def rank_alone(self, query: Query, context: Context) -> list[RankedCandidate]:
        """The answer when this matcher answers alone, uncalibrated (the kNN head: votes and
        its cutoff); only where ``answers_alone``."""
        raise NotImplementedError(f"the {self.name} matcher answers only in a fusion")
