"""MAP@5 and open-set figures of a labelled query set, through the same path as ``/identify``."""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from service.catalogue.csv_file import read_catalogue
from service.errors import PhotoError
from service.gallery.sync import Filters
from service.knn import NEW_INDIVIDUAL, average_precision_at_5
from service.matching.identify import Identifier

log = logging.getLogger(__name__)


@dataclass
class Evaluation:
    """Average precision per query, split into individuals the gallery knows and unseen ones."""

    known: list[float] = field(default_factory=list)
    unseen: list[float] = field(default_factory=list)
    new_first_on_unseen: int = 0
    new_first_on_known: int = 0
    # Known queries whose individual came first, and within the answer's first five.
    known_top1: int = 0
    known_top5: int = 0
    errors: list[tuple[int, str]] = field(default_factory=list)

    @property
    def scored(self) -> int:
        """Queries identified and scored: the ones every MAP@5 covers."""
        return len(self.known) + len(self.unseen)

    @property
    def rows(self) -> int:
        """Every row of the query file: the scored ones and those skipped as errors."""
        return self.scored + len(self.errors)

    @staticmethod
    def _mean(values: list[float]) -> float | None:
        return sum(values) / len(values) if values else None

    @property
    def map5(self) -> float | None:
        return self._mean(self.known + self.unseen)

    @property
    def map5_known(self) -> float | None:
        return self._mean(self.known)

    @property
    def map5_unseen(self) -> float | None:
        return self._mean(self.unseen)

    def summary(self) -> dict[str, float | int | None]:
        return {
            "queries": self.scored,
            "rows": self.rows,
            "map5": self.map5,
            "map5_known": self.map5_known,
            "map5_unseen": self.map5_unseen,
            "known_queries": len(self.known),
            "unseen_queries": len(self.unseen),
            # Open-set figures: how often new_individual came first.
            "unseen_flagged_new": self.new_first_on_unseen,
            "known_flagged_new": self.new_first_on_known,
            # Retrieval of the known queries: their individual first, and in the first five.
            "known_top1": self.known_top1,
            "known_top5": self.known_top5,
            # Rows skipped as errors (unreadable row or photo): in no MAP@5.
            "errors": len(self.errors),
        }


def evaluate(
    identifier: Identifier,
    queries_csv: Path,
    images_dir: Path,
    *,
    predictions_csv: Path | None = None,
    species_filter: bool = False,
) -> Evaluation:
    """Identify every query photo (nothing is recorded) and score the answers. A query whose
    individual has no photo in the gallery, or whose individual_id is ``new_individual`` (the
    Kaggle convention for an animal outside the catalogue), should be answered
    ``new_individual`` first."""
    known_labels = identifier.gallery.entries.labels
    result = Evaluation()
    rows = list(read_catalogue(queries_csv, new_individual_allowed=True))
    writer = None
    out = predictions_csv.open("w", newline="") if predictions_csv else None
    try:
        if out is not None:
            writer = csv.writer(out)
            writer.writerow(["image", "predictions"])
        for row in tqdm(rows, desc="evaluate", unit="photo"):
            if isinstance(row, tuple):
                result.errors.append(row)
                log.warning("line %d: %s", *row)
                continue
            path = images_dir / row.image
            try:
                answer = identifier.identify(
                    path.read_bytes(),
                    filters=Filters(species=row.species or None) if species_filter else Filters(),
                    record=False,
                )
            except (OSError, PhotoError) as e:
                result.errors.append((row.line, f"image {row.image!r}: {e}"))
                log.warning("line %d: %s", row.line, e)
                continue
            labels = [c.individual_id for c in answer.candidates]
            unseen = row.individual_id == NEW_INDIVIDUAL or row.individual_id not in known_labels
            truth = NEW_INDIVIDUAL if unseen else row.individual_id
            (result.unseen if unseen else result.known).append(
                average_precision_at_5(labels, truth)
            )
            if not unseen and truth in labels[:5]:
                result.known_top5 += 1
                result.known_top1 += labels[0] == truth
            if labels and labels[0] == NEW_INDIVIDUAL:
                if unseen:
                    result.new_first_on_unseen += 1
                else:
                    result.new_first_on_known += 1
            if writer is not None:
                writer.writerow([row.image, " ".join(labels)])
    finally:
        if out is not None:
            out.close()
    return result
