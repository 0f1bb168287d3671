"""Response bodies of the API (field names are part of the contract in DESIGN.md)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from service.db.checks import MAX_ROW_ID, column_length
from service.db.tables import ApiKey, Image, Individual
from service.matching.identify import ModelInfo
from service.matching.registry import RegisteredName, verifications
from service.text import check_catalogue_id, text_problem


def storable(value: str | None) -> str | None:
    problem = None if value is None else text_problem(value)
    if problem:
        raise ValueError(problem)
    return value


def _not_reserved(value: str | None) -> str | None:
    if value is not None:
        check_catalogue_id(value)
    return value


def as_utc(value: dt.datetime) -> dt.datetime:
    # Stored times are UTC; SQLite hands them back without a zone.
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


CATALOGUE_ID_LENGTH = column_length(Individual.catalogue_id)
SPECIES_LENGTH = column_length(Image.species)
NAME_LENGTH = column_length(Individual.display_name)
COMMENT_LENGTH = 10_000
RowId = Annotated[int, Field(ge=1, le=MAX_ROW_ID)]
Timestamp = Annotated[dt.datetime, AfterValidator(as_utc)]
CatalogueRef = Annotated[
    str,
    StringConstraints(min_length=1, max_length=CATALOGUE_ID_LENGTH),
    AfterValidator(storable),
]
# A catalogue id being made: `new_individual` (any case, any spaces) is reserved.
NewCatalogueId = Annotated[CatalogueRef, AfterValidator(_not_reserved)]
Species = Annotated[str, StringConstraints(max_length=SPECIES_LENGTH), AfterValidator(storable)]
DisplayName = Annotated[str, StringConstraints(max_length=NAME_LENGTH), AfterValidator(storable)]
Comment = Annotated[str, StringConstraints(max_length=COMMENT_LENGTH), AfterValidator(storable)]
VerificationMode = Annotated[str, RegisteredName("verification", verifications)]
KeyName = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=column_length(ApiKey.name)),
    AfterValidator(storable),
]


class CandidateOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)  # read from the domain's records

    rank: int = Field(examples=[1])
    individual_id: str = Field(
        description="The catalogue's own id of the individual, or `new_individual`.",
        examples=["a1b2c3"],
    )
    species: str | None = Field(examples=["humpback_whale"])
    votes: int | None = Field(
        description="Its photos among the k nearest; 0 for an individual beyond them that fills "
        "the answer up to five entries.",
        examples=[31],
    )
    distance: float | None = Field(
        description="Cosine distance of its nearest photo.", examples=[0.21]
    )
    confidence: float | None = Field(
        description="1 - distance; for the local-features matcher (no distance), its score.",
        examples=[0.79],
    )
    best_image_id: int | None = Field(
        description="Its best-matching gallery photo (with verification: the one with the most "
        "inliers).",
        examples=[4411],
    )
    inliers: int | None = Field(
        default=None,
        description="With verification: the most keypoint matches one homography explains "
        "between the query and one of its photos (GET /identifications/{id}/matches).",
        examples=[23],
    )
    score: float | None = Field(
        default=None,
        description="With verification: the calibrated probability that it is the animal, from "
        "the distance and the inliers; below the model's threshold it ranks after "
        "new_individual.",
        examples=[0.93],
    )


class ModelOut(BaseModel):
    id: int
    name: str = Field(examples=["effb5-arcface"])
    version: str = Field(examples=["2026.11"])
    k: int = Field(examples=[50])
    cutoff: float = Field(examples=[0.62])
    ranking: str = Field(examples=["vote"])
    verification: str = Field(
        default="none", description="`none` or `rerank` (local features).", examples=["none"]
    )

    @classmethod
    def of(cls, model: ModelInfo) -> ModelOut:
        head = model.head
        return cls(
            id=model.id,
            name=model.name,
            version=model.version,
            k=head.k,
            cutoff=head.cutoff,
            ranking=str(head.ranking),
            verification=str(model.verification),
        )


class DecisionOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)  # read from the domain's records

    decision_id: int
    identification_id: int
    decision: str
    individual_id: str | None
    candidate_rank: int | None
    curator: str
    comment: str | None
    created_at: Timestamp
    superseded: bool
    replayed: bool = Field(
        default=False, description="True when this repeats an earlier, identical decision."
    )


class IdentificationOut(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "identification_id": 812,
                    "candidates": [
                        {
                            "rank": 1,
                            "individual_id": "a1b2c3",
                            "species": "humpback_whale",
                            "votes": 31,
                            "distance": 0.21,
                            "confidence": 0.79,
                            "best_image_id": 4411,
                        },
                        {
                            "rank": 2,
                            "individual_id": "new_individual",
                            "species": None,
                            "votes": None,
                            "distance": None,
                            "confidence": None,
                            "best_image_id": None,
                        },
                    ],
                    "model": {
                        "id": 3,
                        "name": "effb5-arcface",
                        "version": "2026.11",
                        "k": 50,
                        "cutoff": 0.62,
                        "ranking": "vote",
                    },
                    "gallery_size": 51033,
                    "filters": {"species": "humpback_whale"},
                }
            ]
        }
    )

    identification_id: int
    candidates: list[CandidateOut]
    model: ModelOut
    gallery_size: int = Field(description="Embeddings in the model's gallery.")
    filters: dict[str, str] = Field(description="The candidate-set filters that were applied.")
    status: str = Field(default="pending", description="pending until a curator decides.")
    decisions: list[DecisionOut] = Field(default_factory=list)
    created_at: Timestamp | None = None
    query_image_id: int | None = None


class ImageOut(BaseModel):
    id: int
    width: int
    height: int
    media_type: str
    species: str | None
    encounter: str | None
    location: str | None
    taken_on: dt.date | None
    original_name: str | None
    url: str = Field(examples=["/images/4411/file"])


class IndividualOut(BaseModel):
    individual_id: str = Field(description="The catalogue's own id.", examples=["a1b2c3"])
    species: str | None
    display_name: str | None
    merged_into: str | None = None
    image_count: int


class IndividualDetail(IndividualOut):
    images: list[ImageOut]


class IndividualPage(BaseModel):
    items: list[IndividualOut]
    total: int
    offset: int
    limit: int


class Health(BaseModel):
    status: str = Field(examples=["ok"])


class Readiness(BaseModel):
    status: str = Field(examples=["ready"])
    model: ModelOut | None = None
    gallery_size: int = 0
    detail: str | None = None


class Problem(BaseModel):
    detail: str = Field(examples=["the upload is empty (0 bytes): attach the photo file"])


class ValidationIssue(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class InvalidRequest(BaseModel):
    """A 422: FastAPI's list of validation issues, or one message from the service."""

    detail: str | list[ValidationIssue] = Field(
        examples=["bbox '1e400,0,10,10' is not four numbers: send bbox=x,y,w,h in pixels"]
    )


INVALID: dict[int | str, dict[str, object]] = {
    422: {"model": InvalidRequest, "description": "The request is malformed; `detail` says how."}
}


class DecisionIn(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"decision": "confirm", "individual_id": "a1b2c3", "comment": "clear notch"},
                {"decision": "new_individual", "code": "HW-2026-014", "name": "Notchy"},
                {"decision": "reject", "comment": "fluke out of focus"},
            ]
        }
    )

    decision: Literal["confirm", "new_individual", "reject"]
    individual_id: CatalogueRef | None = Field(
        default=None, description="confirm: the catalogue id of the chosen individual."
    )
    code: NewCatalogueId | None = Field(
        default=None, description="new_individual: its catalogue id (generated if omitted)."
    )
    name: DisplayName | None = Field(default=None, description="new_individual: a display name.")
    species: Species | None = Field(default=None, description="new_individual: its species.")
    comment: Comment | None = None
    supersede: bool = Field(
        default=False, description="Replace an earlier, different decision (else 409)."
    )


class IdentificationSummary(BaseModel):
    identification_id: int
    status: str
    created_at: Timestamp
    query_image_id: int
    model_id: int
    filters: dict[str, str]
    top_candidate: str | None
    top_distance: float | None


class IdentificationPage(BaseModel):
    items: list[IdentificationSummary]
    total: int
    offset: int
    limit: int


class IndividualIn(BaseModel):
    individual_id: NewCatalogueId
    species: Species | None = None
    name: DisplayName | None = None


class IndividualPatch(BaseModel):
    individual_id: NewCatalogueId | None = Field(
        default=None, description="A new catalogue id (rename)."
    )
    name: DisplayName | None = None
    species: Species | None = None


class MergeIn(BaseModel):
    into: CatalogueRef = Field(description="The catalogue id of the individual to merge into.")


class SplitIn(BaseModel):
    image_ids: list[RowId] = Field(min_length=1, max_length=100_000)
    into: CatalogueRef | None = Field(
        default=None, description="An existing individual to move them to."
    )
    new_individual_id: NewCatalogueId | None = Field(
        default=None, description="Or a new individual."
    )
    name: DisplayName | None = None


class EventOut(BaseModel):
    event: str
    detail: dict[str, object]
    actor: str
    created_at: Timestamp


class KeyIn(BaseModel):
    name: KeyName
    role: Literal["integration", "curator", "admin"]


class KeyOut(BaseModel):
    id: int
    name: str
    role: str
    prefix: str
    created_at: Timestamp
    revoked: bool
    key: str | None = Field(default=None, description="Shown once, at creation.")
    callback_hosts: list[str] = Field(
        default_factory=list, description="Hosts this key's job callbacks may go to."
    )
    has_callback_secret: bool = Field(
        default=False, description="Whether the key has its own callback secret."
    )


class CallbackHostsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hosts: list[Annotated[str, StringConstraints(min_length=1, max_length=253)]] = Field(
        max_length=20, description="Host names (no scheme, port or path), e.g. hooks.example.org."
    )


class CallbackSecretOut(BaseModel):
    key_id: int
    callback_secret: str = Field(
        description="Shown once: the key's receivers verify callbacks with it (the previous "
        "secret stops at once)."
    )


class GalleryDigestOut(BaseModel):
    """What this replica's live gallery holds, as fingerprints; equal on every replica and to
    the database's gallery when all is well."""

    model_id: int
    last_change: int = Field(description="The newest gallery change-log row it has replayed.")
    count: int = Field(description="Embeddings in the live index.")
    ids_sha256: str = Field(description="SHA-256 of the sorted embedding ids, int64 LE.")
    vectors_sha256: str = Field(description="SHA-256 of their float32 LE vectors, by id.")
    labels_sha256: str = Field(description="SHA-256 of the `id<TAB>label<LF>` lines, by id.")
