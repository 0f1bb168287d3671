"""``POST /identify`` and ``GET /identifications/{id}``."""

from __future__ import annotations

from functools import partial
from typing import Annotated

from fastapi import APIRouter, File, Form, Query, Request, Response, UploadFile
from starlette.concurrency import run_in_threadpool

from service.access.tenancy import can_read_identification
from service.api.deps import (
    Integration,
    MetricsDep,
    RuntimeDep,
    SessionDep,
    SessionsDep,
    SettingsDep,
)
from service.api.guard import UNCONFIRMED_KEY
from service.api.params import CandidateSet, IdentificationId
from service.api.schemas import (
    INVALID,
    CandidateOut,
    IdentificationOut,
    MatchesOut,
    ModelOut,
    Problem,
)
from service.catalogue.curation import decision_history
from service.catalogue.reads import candidate_matches, recorded_identification
from service.db.checks import column_length
from service.db.tables import Image
from service.errors import KeyRevoked, NotFound, PhotoTooLarge
from service.imaging import parse_bbox
from service.knn import TOP
from service.matching.identify import IdentificationResult
from service.text import check_text

router = APIRouter(tags=["identify"], responses=INVALID)

ERRORS: dict[int | str, dict[str, object]] = {
    413: {"model": Problem, "description": "Photo over the byte or pixel limit."},
    415: {"model": Problem, "description": "Not an image, or an unsupported format."},
    503: {
        "model": Problem,
        "description": "No active model yet, or every decode/embed slot busy (see Retry-After).",
    },
}
FILE_NAME_LENGTH = column_length(Image.original_name)


def to_response(result: IdentificationResult) -> IdentificationOut:
    assert result.identification_id is not None
    return IdentificationOut.model_validate(result)


@router.post("/identify", response_model=IdentificationOut, responses=ERRORS)
async def identify(
    request: Request,
    response: Response,
    caller: Integration,
    runtime: RuntimeDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    photo: Annotated[UploadFile, File(description="The photo: JPEG, PNG, WebP (HEIC if enabled).")],
    filters: CandidateSet,
    bbox: Annotated[
        str | None, Form(max_length=200, description="Crop box x,y,w,h in pixels.")
    ] = None,
) -> IdentificationOut:
    """Identify the individual in one photo: the top five candidates of the active model, with
    `new_individual` placed by the model's cutoff. The answer is recorded for curators.

    The kNN head ranks the individuals among the model's `k` nearest gallery photos (within the
    filters). When they name fewer than four, the next-nearest individuals beyond those `k`
    follow in distance order with `votes: 0`, so the answer always holds five entries when the
    filtered gallery holds at least four individuals. Candidates within the cutoff come first,
    then `new_individual`, then the rest: the answer starts with `new_individual` exactly when
    the nearest photo is farther than the cutoff."""
    if photo.size is not None and photo.size > settings.max_upload_bytes:
        raise PhotoTooLarge(
            f"the upload is {photo.size} bytes, over the limit of {settings.max_upload_bytes}: "
            "send a smaller file"
        )
    check_text("the photo's file name", photo.filename, FILE_NAME_LENGTH, plain=True)
    box = parse_bbox(bbox)
    # A key the guard admitted from its cache is confirmed by the active model's check.
    unconfirmed = request.scope.get("state", {}).get(UNCONFIRMED_KEY, False)
    # One hop to the thread pool; the upload waits there (in memory, or spooled to disk when
    # large) until a decode slot reads it.
    try:
        result = await run_in_threadpool(
            partial(
                runtime.identify,
                photo.file,
                filters=filters,
                bbox=box,
                original_name=photo.filename,
                key_id=caller.key_id,
                confirm_key=caller.key_id if unconfirmed else None,
            )
        )
    except KeyRevoked:
        request.app.state.key_cache.clear()
        raise
    response.headers["Server-Timing"] = server_timing(result.timings)
    metrics.observe_stages(result.timings)
    return to_response(result)


def server_timing(timings: dict[str, float]) -> str:
    """The stages' times (milliseconds) as a Server-Timing header."""
    return ", ".join(f"{name};dur={ms:.2f}" for name, ms in timings.items())


@router.get(
    "/identifications/{identification_id}",
    response_model=IdentificationOut,
    responses={404: {"model": Problem}},
)
def get_identification(
    identification_id: IdentificationId, session: SessionDep, caller: Integration
) -> IdentificationOut:
    """A recorded identification, as it was answered (an integration key reads its own)."""
    ident = recorded_identification(session, identification_id)
    if ident is None or not can_read_identification(caller, ident):
        # Another partner's identification answers as one that does not exist.
        raise NotFound(f"identification {identification_id} does not exist")
    return IdentificationOut(
        identification_id=ident.id,
        candidates=[
            CandidateOut(
                rank=c.rank,
                individual_id=c.label,
                species=c.species,
                votes=c.votes,
                distance=c.distance,
                confidence=(
                    round(1.0 - c.distance, 6)
                    if c.distance is not None
                    else None
                    if c.score is None
                    else round(c.score, 6)
                ),
                best_image_id=c.best_image_id,
                inliers=c.inliers,
                score=c.score,
            )
            for c in ident.candidates
        ],
        model=ModelOut(
            id=ident.model.id,
            name=ident.model.name,
            version=ident.model.version,
            k=ident.k,
            cutoff=ident.cutoff,
            ranking=ident.ranking,
            verification=ident.verification,
        ),
        gallery_size=ident.gallery_size,
        filters=ident.filters,
        status=ident.status,
        decisions=decision_history(session, ident.id),
        created_at=ident.created_at,
        query_image_id=ident.query_image_id,
    )


@router.get(
    "/identifications/{identification_id}/matches",
    response_model=MatchesOut,
    responses={404: {"model": Problem}},
)
def get_matches(
    identification_id: IdentificationId,
    sessions: SessionsDep,
    caller: Integration,
    runtime: RuntimeDep,
    candidate: Annotated[int, Query(ge=1, le=TOP, description="The candidate's rank.")] = 1,
) -> MatchesOut:
    """The matched keypoints between the query photo and the candidate's best photo, in the
    photos' pixels: what the review page draws so a curator sees why an animal was proposed."""
    found = candidate_matches(sessions, runtime.features, caller, identification_id, candidate)
    return MatchesOut.model_validate(found)
