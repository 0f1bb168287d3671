"""Response bodies of the API (field names are part of the contract in DESIGN.md)."""

from __future__ import annotations

import datetime as dt
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class CandidateOut(BaseModel):
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
    confidence: float | None = Field(description="1 - distance.", examples=[0.79])
    best_image_id: int | None = Field(
        description="Its best-matching gallery photo.", examples=[4411]
    )


class ModelOut(BaseModel):
    id: int
    name: str = Field(examples=["effb5-arcface"])
    version: str = Field(examples=["2026.11"])
    k: int = Field(examples=[50])
    cutoff: float = Field(examples=[0.62])
    ranking: str = Field(examples=["vote"])


class DecisionOut(BaseModel):
    decision_id: int
    identification_id: int
    decision: str
    individual_id: str | None
    candidate_rank: int | None
    curator: str
    comment: str | None
    created_at: dt.datetime
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
    created_at: dt.datetime | None = None
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
    individual_id: str | None = Field(
        default=None, description="confirm: the catalogue id of the chosen individual."
    )
    code: str | None = Field(
        default=None, description="new_individual: its catalogue id (generated if omitted)."
    )
    name: str | None = Field(default=None, description="new_individual: a display name.")
    species: str | None = Field(default=None, description="new_individual: its species.")
    comment: str | None = None
    supersede: bool = Field(
        default=False, description="Replace an earlier, different decision (else 409)."
    )


class IdentificationSummary(BaseModel):
    identification_id: int
    status: str
    created_at: dt.datetime
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
    individual_id: str = Field(min_length=1, max_length=200)
    species: str | None = None
    name: str | None = None


class IndividualPatch(BaseModel):
    individual_id: str | None = Field(
        default=None, min_length=1, max_length=200, description="A new catalogue id (rename)."
    )
    name: str | None = None
    species: str | None = None


class MergeIn(BaseModel):
    into: str = Field(description="The catalogue id of the individual to merge into.")


class SplitIn(BaseModel):
    image_ids: list[int] = Field(min_length=1)
    into: str | None = Field(default=None, description="An existing individual to move them to.")
    new_individual_id: str | None = Field(default=None, description="Or a new individual.")
    name: str | None = None


class EventOut(BaseModel):
    event: str
    detail: dict[str, object]
    actor: str
    created_at: dt.datetime


class KeyIn(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    role: Literal["integration", "curator", "admin"]


class KeyOut(BaseModel):
    id: int
    name: str
    role: str
    prefix: str
    created_at: dt.datetime
    revoked: bool
    key: str | None = Field(default=None, description="Shown once, at creation.")


class GalleryDigestOut(BaseModel):
    """What this replica's live gallery holds, as fingerprints; equal on every replica and to
    the database's gallery when all is well."""

    model_id: int
    last_change: int = Field(description="The newest gallery change-log row it has replayed.")
    count: int = Field(description="Embeddings in the live index.")
    ids_sha256: str = Field(description="SHA-256 of the sorted embedding ids, int64 LE.")
    vectors_sha256: str = Field(description="SHA-256 of their float32 LE vectors, by id.")
    labels_sha256: str = Field(description="SHA-256 of the `id<TAB>label<LF>` lines, by id.")
