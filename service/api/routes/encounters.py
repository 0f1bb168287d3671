"""``POST /encounters/identify``: several photos of one animal, one fused ranking."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile
from starlette.concurrency import run_in_threadpool

from service.api.deps import Integration, MetricsDep, RuntimeDep, SettingsDep
from service.api.params import CandidateSet
from service.api.routes.identify import (
    ERRORS,
    FILE_NAME_LENGTH,
    to_response,
)
from service.api.schemas import INVALID, CandidateOut, EncounterOut, ModelOut
from service.errors import Invalid, PhotoTooLarge
from service.matching.encounters import EncounterPhoto, EncounterResult, Fusion, identify_encounter
from service.text import check_text

router = APIRouter(tags=["identify"], responses=INVALID)

FUSION_RULE = (
    "**Fusion** (`similarity_sum`, the default): per individual named in the photos' own "
    "answers, the similarity `1 - distance` is summed over the photos that name it; the largest "
    "sum ranks first, ties going to the smaller distance. An individual's fused distance is its "
    "smallest over the photos, its votes the sum of its votes; `new_individual` is then placed "
    "by the model's cutoff on that distance, as for one photo. Alternatives: `rank_sum` (points "
    "5, 4, ... 1 by place in each photo's answer, summed) and `min_distance` (the nearest over "
    "all photos)."
)


@router.post(
    "/encounters/identify",
    response_model=EncounterOut,
    responses=ERRORS,
    description="Identify one animal from several photos of one encounter. Each photo is "
    "identified as by `POST /identify` (same slots and limits) and recorded; the answer is "
    "one fused ranking plus each photo's own.\n\n" + FUSION_RULE + "\n\nAt most "
    "`WHALEID_ENCOUNTER_MAX_PHOTOS` photos (default 5; more: 422), each within the upload "
    "limit; a body over their sum gets 413.",
)
async def identify_encounter_route(
    caller: Integration,
    runtime: RuntimeDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    photos: Annotated[
        list[UploadFile], File(description="The encounter's photos (repeat the field).")
    ],
    filters: CandidateSet,
    fusion: Annotated[Fusion, Form()] = Fusion.SIMILARITY_SUM,
) -> EncounterOut:
    _check_photos(photos, settings.encounter_max_photos, settings.max_upload_bytes)
    identifier = await run_in_threadpool(runtime.current)
    result = await run_in_threadpool(
        identify_encounter,
        identifier,
        [EncounterPhoto(p.file, p.filename) for p in photos],
        filters=filters,
        fusion=fusion,
        key_id=caller.key_id,
    )
    for photo in result.photos:
        metrics.observe_stages(photo.timings)
    return _to_encounter(result)


def _check_photos(photos: list[UploadFile], most: int, max_bytes: int) -> None:
    if len(photos) > most:
        raise Invalid(
            f"{len(photos)} photos, over the limit of {most} per encounter: send the best {most}"
        )
    for number, photo in enumerate(photos, start=1):
        if photo.size is not None and photo.size > max_bytes:
            raise PhotoTooLarge(
                f"photo {number} is {photo.size} bytes, over the limit of {max_bytes}: "
                "send a smaller file"
            )
        check_text(f"photo {number}'s file name", photo.filename, FILE_NAME_LENGTH, plain=True)


def _to_encounter(result: EncounterResult) -> EncounterOut:
    first = result.photos[0]
    return EncounterOut(
        candidates=[CandidateOut.model_validate(c) for c in result.candidates],
        fusion=result.fusion,
        identification_ids=[r.identification_id for r in result.photos if r.identification_id],
        photos=[to_response(r) for r in result.photos],
        model=ModelOut.model_validate(first.model),
        gallery_size=first.gallery_size,
        filters=first.filters,
    )
