"""Every request and response body of the API (field names are part of the contract in
DESIGN.md). A response is read from the domain's row or record (``from_attributes``:
``XOut.model_validate(record)``), never copied field by field."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AliasChoices,
    AliasPath,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)

from service.catalogue.curation import DecisionRecord
from service.contract import Head, calibration_shown
from service.db.checks import MAX_ROW_ID, column_length
from service.db.tables import ApiKey, Image, Individual
from service.knn import NEW_INDIVIDUAL
from service.matching.encounters import Fusion
from service.matching.registry import RegisteredName, kind_of, verifications
from service.matching.verify import PairMatch
from service.models.switch import HeadChoice
from service.outbound.fetch import MAX_URL_LENGTH, url_problem
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


def _as_dict(value: Any) -> Any:
    """A head (``contract.Head``) as its JSON object; anything else as it is."""
    return value.as_dict() if isinstance(value, Head) else value


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


def _of_head(name: str) -> AliasChoices:
    """A field read from the object itself or from its ``head`` (a ``ModelInfo``'s)."""
    return AliasChoices(name, AliasPath("head", name))


class ModelOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)  # read from a ModelInfo

    id: int
    name: str = Field(examples=["effb5-arcface"])
    version: str = Field(examples=["2026.11"])
    k: int = Field(validation_alias=_of_head("k"), examples=[50])
    cutoff: float = Field(validation_alias=_of_head("cutoff"), examples=[0.62])
    ranking: str = Field(validation_alias=_of_head("ranking"), examples=["vote"])
    verification: str = Field(
        default="none", description="`none` or `rerank` (local features).", examples=["none"]
    )


class IdentificationOut(BaseModel):
    model_config = ConfigDict(
        from_attributes=True,  # read from an IdentificationResult
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
        },
    )

    identification_id: int
    candidates: list[CandidateOut]
    model: ModelOut
    gallery_size: int = Field(description="Embeddings in the model's gallery.")
    filters: dict[str, str] = Field(description="The candidate-set filters that were applied.")
    status: str = Field(default="pending", description="pending until a curator decides.")
    decisions: list[DecisionRecord] = Field(default_factory=list)
    created_at: Timestamp | None = None
    query_image_id: int | None = None


def _image_url(value: object) -> object:
    """An image's id as the path of its file (a ``url`` already made stays as it is)."""
    return f"/images/{value}/file" if isinstance(value, int) else value


class ImageOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)  # read from an Image row

    id: int
    width: int
    height: int
    media_type: str
    species: str | None
    encounter: str | None
    location: str | None
    taken_on: dt.date | None
    original_name: str | None
    url: Annotated[str, BeforeValidator(_image_url)] = Field(
        validation_alias=AliasChoices("url", "id"), examples=["/images/4411/file"]
    )


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


def _top_candidate(value: object) -> object:
    """The first candidate's label, from an identification's ranked candidates."""
    if isinstance(value, list):
        return value[0].label if value else None
    return value


def _top_distance(value: object) -> object:
    """The distance of the first candidate that is an individual (not ``new_individual``)."""
    if not isinstance(value, list):
        return value
    top = next((c for c in value if c.label != NEW_INDIVIDUAL), None)
    return top.distance if top else None


class IdentificationSummary(BaseModel):
    model_config = ConfigDict(from_attributes=True)  # read from an Identification row

    identification_id: int = Field(validation_alias=AliasChoices("identification_id", "id"))
    status: str
    created_at: Timestamp
    query_image_id: int
    model_id: int
    filters: dict[str, str]
    top_candidate: Annotated[str | None, BeforeValidator(_top_candidate)] = Field(
        validation_alias=AliasChoices("top_candidate", "candidates")
    )
    top_distance: Annotated[float | None, BeforeValidator(_top_distance)] = Field(
        validation_alias=AliasChoices("top_distance", "candidates")
    )


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


# A stored value (a revocation time, a secret) answered as whether it is set.
IsSet = Annotated[bool, BeforeValidator(bool)]


class KeyOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)  # read from an ApiKey row

    id: int
    name: str
    role: str
    prefix: str
    created_at: Timestamp
    revoked: IsSet = Field(validation_alias=AliasChoices("revoked", "revoked_at"))
    key: str | None = Field(default=None, description="Shown once, at creation.")
    callback_hosts: Annotated[list[str], BeforeValidator(lambda hosts: list(hosts or []))] = Field(
        default_factory=list, description="Hosts this key's job callbacks may go to."
    )
    has_callback_secret: IsSet = Field(
        default=False,
        validation_alias=AliasChoices("has_callback_secret", "callback_secret"),
        description="Whether the key has its own callback secret.",
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
    vectors: Literal["float32", "float16"] = Field(
        description="How the index holds the vectors. With `float16` the digest is of the "
        "database's vectors rounded to half floats by faiss's encoder and read back as float32."
    )


class JobOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)  # read from a job's Progress

    id: int
    kind: str = Field(examples=["reindex"])
    state: str = Field(
        examples=["running"], description="queued, running, succeeded, failed or cancelled"
    )
    model_id: int | None
    done: int = Field(description="Items handled.")
    failed: int = Field(description="Items that could not be handled (see errors).")
    total: int
    rate: float | None = Field(description="Items per second since the job started.")
    eta_seconds: float | None = Field(description="Time left at that rate.")
    errors: list[str]
    result: dict[str, Any] | None = Field(
        description="What the job produced: for a re-index, the shadow evaluation; for a batch, "
        "its callback's delivery (the photos' answers: GET /jobs/{id}/results)."
    )
    chunks: dict[str, int] = Field(description="Chunks per state.")
    redone_chunks: int = Field(description="Chunks leased more than once (a worker was lost).")
    created_by: str
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None


class RegisteredModel(BaseModel):
    """A registered model, as every route that answers one gives it (GET /models too)."""

    model_config = ConfigDict(from_attributes=True)  # read from a Model row

    id: int
    name: str
    version: str
    status: str = Field(description="registered, indexing, ready, active or retired")
    embedding_dim: int
    k: int
    cutoff: float
    ranking: str
    preprocessing: dict[str, Any]
    created_at: Timestamp
    kind: str = Field(default="onnx", description="onnx, or the built-in local-features matcher")
    verification: str = Field(default="none", description="none or rerank (local features)")
    calibration: dict[str, Any] | None = Field(
        default=None, description="How distance and inliers become a match probability."
    )
    open_set: dict[str, Any] | None = Field(
        default=None,
        description="The open-set decision last fitted on the model's gallery (`whaleid models "
        "calibrate ID`, activation, re-index): mode (cutoff or threshold), value, start, p_new, "
        "expected_map5, map5_known, map5_unseen, known_new_first (the share of known queries "
        "answered new_individual first), queries (known and unseen photos and animals), "
        "trigger, fitted_at. None: never fitted.",
    )

    @model_validator(mode="after")
    def _only_its_matchers(self) -> RegisteredModel:
        # The curves of the evidence the model's matchers give: the local-features matcher
        # has no distance, so no global curve (its defaults would be a placeholder).
        if self.calibration:
            has_distance = kind_of(self.kind).grid
            self.calibration = calibration_shown(
                self.calibration, distance=has_distance, inliers=True
            )
        return self


class VerificationIn(BaseModel):
    verification: VerificationMode = Field(
        description="rerank: verify the top candidates with local features and re-rank them "
        "on the calibrated probability; none: the kNN head's answer as it is."
    )


class ReindexIn(BaseModel):
    include_queries: bool = Field(
        default=False, description="Also embed kept query photos that are not in the gallery."
    )


class ActivateIn(BaseModel):
    head: HeadChoice = Field(
        default=HeadChoice.MODEL,
        description="model: the head exported with the model; paper: k 50, cutoff 0.62, vote; "
        "best: the best head of the grid on this catalogue's confirmations.",
    )
    force: bool = Field(
        default=False, description="Activate even if the shadow evaluation says no."
    )


class SwitchOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)  # read from a Switch

    from_model_id: int | None
    to_model_id: int
    action: str
    head: Annotated[dict[str, Any], BeforeValidator(_as_dict)]
    caught_up: int = Field(description="Gallery photos embedded at the switch.")
    report: dict[str, Any] | None = Field(description="The shadow evaluation it passed.")


PLACE_LENGTH = 200


MAX_LIST = 10_000


def plain_url(value: str | None) -> str | None:
    """Refuse a URL holding a control character (it could forge a log line or split a header)."""
    problem = None if value is None else url_problem(value)
    if problem:
        raise ValueError(problem)
    return value


Url = Annotated[
    str,
    StringConstraints(min_length=1, max_length=MAX_URL_LENGTH),
    AfterValidator(storable),
    AfterValidator(plain_url),
]


OptionalSpecies = Annotated[str | None, Field(max_length=SPECIES_LENGTH), AfterValidator(storable)]


Place = Annotated[str | None, Field(max_length=PLACE_LENGTH), AfterValidator(storable)]


class BatchIn(BaseModel):
    """Exactly one of `image_ids` and `urls`."""

    model_config = ConfigDict(extra="forbid")

    image_ids: list[RowId] | None = Field(None, max_length=MAX_LIST)
    urls: list[Url] | None = Field(
        None, max_length=MAX_LIST, description="Photo URLs on hosts in WHALEID_FETCH_HOSTS."
    )
    species: OptionalSpecies = None
    location: Place = None
    date_from: dt.date | None = None
    date_to: dt.date | None = None
    exclude_encounter: Place = None
    callback_url: Url | None = Field(
        None,
        description="POSTed the signed result when the job ends (a host the key may call back).",
    )


class EncounterOut(BaseModel):
    candidates: list[CandidateOut] = Field(description="The fused ranking, five entries.")
    fusion: Fusion
    identification_ids: list[int] = Field(
        description="Each photo's recorded identification, in upload order (curators decide on "
        "these; the fused ranking itself is not stored)."
    )
    photos: list[IdentificationOut] = Field(description="Each photo's own answer.")
    model: ModelOut
    gallery_size: int
    filters: dict[str, str]


class MatchOut(BaseModel):
    query: tuple[float, float] = Field(description="x, y in the query photo's pixels.")
    candidate: tuple[float, float] = Field(description="x, y in the candidate photo's pixels.")
    inlier: bool = Field(description="Whether the homography explains this match.")


# The matches /matches shows that the homography does not explain, at most.
OUTLIERS_SHOWN = 200


def _shown_matches(value: object) -> object:
    """A ``PairMatch`` as the matches shown: every inlier at a distinct place, then at most
    ``OUTLIERS_SHOWN`` of the others, in pixels to a tenth (a list already made stays)."""
    if not isinstance(value, PairMatch):
        return value
    pairs, inlier = value.pairs.tolist(), value.inlier.tolist()
    shown = value.distinct.tolist()  # each place once
    shown += [i for i, ok in enumerate(inlier) if not ok][:OUTLIERS_SHOWN]
    return [
        {
            "query": (round(pairs[i][0], 1), round(pairs[i][1], 1)),
            "candidate": (round(pairs[i][2], 1), round(pairs[i][3], 1)),
            "inlier": inlier[i],
        }
        for i in shown
    ]


class MatchesOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)  # read from a CandidateMatches

    identification_id: int
    rank: int
    individual_id: str
    query_image_id: int = Field(description="GET /images/{id}/file serves it.")
    candidate_image_id: int = Field(description="The candidate's best photo.")
    query_size: tuple[int, int] = Field(description="Width and height of the stored photo.")
    candidate_size: tuple[int, int]
    inliers: int = Field(
        validation_alias=AliasChoices("inliers", AliasPath("match", "inliers")), examples=[23]
    )
    matches: Annotated[list[MatchOut], BeforeValidator(_shown_matches)] = Field(
        validation_alias=AliasChoices("matches", "match"),
        description="Every inlier (each place once), then at most 200 of the other ratio-test "
        "matches.",
    )
