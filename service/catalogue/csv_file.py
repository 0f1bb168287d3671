"""Reading a catalogue file (Happywhale's ``train.csv`` layout): the rows the import stores, the
evaluation scores and training learns from. It imports no database, index or store, so
training reads catalogues with it alone."""

from __future__ import annotations

import csv
import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from service.errors import BadText, CatalogueError
from service.knn import NEW_INDIVIDUAL
from service.text import check_catalogue_id, check_text, is_reserved

REQUIRED_COLUMNS = ("image", "species", "individual_id")
OPTIONAL_COLUMNS = ("encounter", "location", "date")
# The longest text each column may hold: the database's column lengths (a test keeps them equal),
# so a row the import would refuse is refused here, on every database.
TEXT_LIMITS = {
    "image": 500,
    "species": 100,
    "individual_id": 200,
    "encounter": 200,
    "location": 200,
}


@dataclass
class CatalogueRow:
    line: int
    image: str
    species: str
    individual_id: str
    encounter: str | None
    location: str | None
    taken_on: dt.date | None


def read_catalogue(
    path: Path, *, new_individual_allowed: bool = False
) -> Iterator[CatalogueRow | tuple[int, str]]:
    """Rows of the CSV, or (line, problem) for a row that cannot be used. ``new_individual`` is
    refused as an individual_id (it is no catalogue id) unless ``new_individual_allowed``: a
    query set's truth for an animal outside the catalogue (the Kaggle convention), read as
    exactly ``new_individual``."""
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in REQUIRED_COLUMNS if c not in columns]
        if missing:
            raise CatalogueError(
                f"{path} lacks the column(s) {', '.join(missing)}: the header must name "
                f"{','.join(REQUIRED_COLUMNS)} (optional: {','.join(OPTIONAL_COLUMNS)})"
            )
        for raw in reader:
            line = reader.line_num
            row = {k.strip(): (v or "").strip() for k, v in raw.items() if k}
            if not row["image"] or not row["individual_id"]:
                yield line, "image and individual_id must not be empty"
                continue
            try:
                taken_on = dt.date.fromisoformat(row["date"]) if row.get("date") else None
            except ValueError:
                yield line, f"date {row['date']!r} is not YYYY-MM-DD"
                continue
            unseen = new_individual_allowed and is_reserved(row["individual_id"])
            if unseen:
                row["individual_id"] = NEW_INDIVIDUAL
            problem = _row_problem(row, catalogue_id=not unseen)
            if problem:
                yield line, problem
                continue
            yield CatalogueRow(
                line,
                row["image"],
                row["species"],
                row["individual_id"],
                row.get("encounter") or None,
                row.get("location") or None,
                taken_on,
            )


def _row_problem(row: dict[str, str], *, catalogue_id: bool = True) -> str | None:
    """Why a row cannot be stored (the same on every database), or None. ``catalogue_id``: the
    individual_id must be one a catalogue can hold."""
    try:
        for column, limit in TEXT_LIMITS.items():
            check_text(column, row.get(column), limit)
        if catalogue_id:
            check_catalogue_id(row["individual_id"])
    except BadText as e:
        return str(e)
    image = PurePosixPath(row["image"])
    if image.is_absolute() or ".." in image.parts:  # refused before any file is opened
        return (
            f"image {row['image']!r} leads outside the images folder: name each photo by its "
            "path within that folder (--images), with no leading / and no .."
        )
    return None
