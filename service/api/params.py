"""Path and query parameters, bounded as the database is: ids fit in 64 bits, text has no NUL
and no more characters than its column (so no input reaches the database that it would refuse)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from fastapi import Depends, Form, Path, Query
from pydantic import AfterValidator

from service.api.schemas import CATALOGUE_ID_LENGTH, SPECIES_LENGTH, storable
from service.db.checks import MAX_ROW_ID, column_length
from service.db.tables import Image
from service.gallery.sync import Filters

STATUS_LENGTH = 20

IdentificationId = Annotated[int, Path(ge=1, le=MAX_ROW_ID)]
ImageId = Annotated[int, Path(ge=1, le=MAX_ROW_ID)]
KeyId = Annotated[int, Path(ge=1, le=MAX_ROW_ID)]
ModelId = Annotated[int, Path(ge=1, le=MAX_ROW_ID, description="The model's id.")]
IndividualId = Annotated[
    str,
    Path(max_length=CATALOGUE_ID_LENGTH, description="The catalogue's own id."),
    AfterValidator(storable),
]
ModelIdFilter = Annotated[int | None, Query(ge=1, le=MAX_ROW_ID)]
Offset = Annotated[int, Query(ge=0, le=MAX_ROW_ID)]
Limit = Annotated[int, Query(ge=1, le=500)]
SpeciesFilter = Annotated[
    str | None,
    Query(max_length=SPECIES_LENGTH, examples=["humpback_whale"]),
    AfterValidator(storable),
]
StatusFilter = Annotated[
    str | None, Query(max_length=STATUS_LENGTH, examples=["pending"]), AfterValidator(storable)
]


# The caller's candidate set, as form fields: one definition for every route that identifies
# (one photo, an encounter, a batch archive).
PLACE_LENGTH = column_length(Image.location)
FormSpecies = Annotated[
    str | None,
    Form(max_length=SPECIES_LENGTH, examples=["humpback_whale"]),
    AfterValidator(storable),
]
FormPlace = Annotated[str | None, Form(max_length=PLACE_LENGTH), AfterValidator(storable)]
FormDate = Annotated[
    dt.date | None,
    Form(
        description="YYYY-MM-DD, inclusive. Under a date filter, gallery photos without a date "
        "are left out."
    ),
]
FormEncounter = Annotated[
    str | None,
    Form(max_length=PLACE_LENGTH, description="Leave out gallery photos of this encounter."),
    AfterValidator(storable),
]


async def candidate_set(
    species: FormSpecies = None,
    location: FormPlace = None,
    date_from: FormDate = None,
    date_to: FormDate = None,
    exclude_encounter: FormEncounter = None,
) -> Filters:
    """The gallery photos to search: those matching every field given (blank means any)."""
    return Filters(species or None, location or None, date_from, date_to, exclude_encounter or None)


CandidateSet = Annotated[Filters, Depends(candidate_set)]
