"""Response bodies of the API (field names are part of the contract in DESIGN.md)."""

from __future__ import annotations

import datetime as dt

from pydantic import BaseModel, ConfigDict, Field


class CandidateOut(BaseModel):
    rank: int = Field(examples=[1])
    individual_id: str = Field(
        description="The catalogue's own id of the individual, or `new_individual`.",
        examples=["a1b2c3"],
    )
    species: str | None = Field(examples=["humpback_whale"])
    votes: int | None = Field(description="Neighbours among the k nearest.", examples=[31])
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
