"""Path and query parameters, bounded as the database is: ids fit in 64 bits, text has no NUL
and no more characters than its column (so no input reaches the database that it would refuse)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path, Query
from pydantic import AfterValidator

from service.api.schemas import CATALOGUE_ID_LENGTH, SPECIES_LENGTH, storable
from service.limits import MAX_ROW_ID

STATUS_LENGTH = 20

IdentificationId = Annotated[int, Path(ge=1, le=MAX_ROW_ID)]
ImageId = Annotated[int, Path(ge=1, le=MAX_ROW_ID)]
KeyId = Annotated[int, Path(ge=1, le=MAX_ROW_ID)]
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
