"""Batch identification jobs: submit a ZIP, stored image ids or photo URLs; poll the job at
`GET /jobs/{id}`; read the answers as JSON or Kaggle-style CSV."""

from __future__ import annotations

from functools import partial
from typing import IO, Annotated, Any

from fastapi import APIRouter, File, Form, Query, Request, Response, UploadFile
from fastapi.responses import PlainTextResponse
from pydantic import AfterValidator
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from service.access.auth import Principal
from service.api.deps import Integration, SessionDep, SessionsDep, SettingsDep
from service.api.observability import KeyRate, caller_of
from service.api.params import CandidateSet
from service.api.routes.jobs import JobId
from service.api.schemas import INVALID, MAX_LIST, BatchIn, JobOut, Problem, plain_url, storable
from service.db.tables import Job
from service.errors import Invalid, NotFound, OverRate
from service.gallery.sync import Filters
from service.jobs.archives import ArchiveFiles
from service.jobs.batch.results import results, results_csv
from service.jobs.batch.submit import (
    IDENTIFY_BATCH,
    Item,
    image_items,
    read_archive,
    submit,
    submit_archive,
    url_items,
)
from service.jobs.queue import get_job, progress
from service.outbound.fetch import MAX_URL_LENGTH

router = APIRouter(tags=["jobs"], responses=INVALID)

MAX_PAGE = 1000


FormUrl = Annotated[
    str | None,
    Form(max_length=MAX_URL_LENGTH, description="Where to POST the result."),
    AfterValidator(storable),
    AfterValidator(plain_url),
]


def _out(factory: sessionmaker[Session], job_id: int, caller: Principal) -> JobOut:
    with factory() as session:
        return JobOut.model_validate(progress(session, get_job(session, job_id, caller)))


ACCEPTED: dict[int | str, dict[str, Any]] = {
    413: {"model": Problem, "description": "The archive is over its byte limit."},
    429: {"model": Problem, "description": "The key is over its quota or its rate."},
}


async def charge_photos(request: Request, photos: int) -> None:
    """Count a job's photos against the key's rate (when one is set), as if each were a
    request of its own: 429 with Retry-After when the key has not that many left."""
    rate: KeyRate | None = request.app.state.rate
    if rate is None:
        return
    if photos > rate.item.amount:
        raise OverRate(
            f"{photos} photos is over the rate limit of {rate.item} per key: send at most "
            f"{rate.item.amount} photos per job"
        )
    caller = await caller_of(request.scope)
    if not rate.hit(caller, cost=photos):
        after = rate.retry_after(caller)
        raise OverRate(
            f"{photos} photos would take the key past its rate limit of {rate.item}: retry "
            f"after {after} s (the Retry-After header), or send fewer photos",
            retry_after=after,
        )


@router.post("/jobs/identify", response_model=JobOut, status_code=202, responses=ACCEPTED)
async def identify_batch(
    request: Request,
    body: BatchIn,
    sessions: SessionsDep,
    settings: SettingsDep,
    caller: Integration,
) -> JobOut:
    """Identify stored images or photos at URLs in the background; poll `GET /jobs/{id}`, then
    read `GET /jobs/{id}/results` (or `.csv`). Each photo counts against the key's rate."""
    if (body.image_ids is None) == (body.urls is None):
        raise Invalid("give exactly one of image_ids and urls")
    factory = sessions
    filters = Filters(
        body.species, body.location, body.date_from, body.date_to, body.exclude_encounter
    )
    if body.image_ids is not None:
        ids = body.image_ids

        def lookup() -> list[Item]:
            with factory() as session:
                return image_items(session, ids, caller)

        items = await run_in_threadpool(lookup)
    else:
        items = url_items(settings, body.urls or [])
    await charge_photos(request, len(items))
    job_id = await run_in_threadpool(
        partial(
            submit,
            factory,
            settings,
            items,
            filters=filters,
            callback_url=body.callback_url,
            caller=caller,
        )
    )
    return await run_in_threadpool(_out, factory, job_id, caller)


@router.post("/jobs/identify/archive", response_model=JobOut, status_code=202, responses=ACCEPTED)
async def identify_archive(
    request: Request,
    sessions: SessionsDep,
    settings: SettingsDep,
    caller: Integration,
    archive: Annotated[UploadFile, File(description="A ZIP of photos.")],
    filters: CandidateSet,
    callback_url: FormUrl = None,
) -> JobOut:
    """Identify every photo of a ZIP archive in the background (at most `batch_max_items`
    photos, each within the upload limit, within `batch_max_uncompressed_bytes` inflated).
    An entry that is not a photo is answered as a failed item; it is not kept."""
    factory = sessions
    file: IO[bytes] = archive.file
    kept = await run_in_threadpool(read_archive, settings, file)
    try:
        await charge_photos(request, len(kept.items))
    except OverRate:
        await run_in_threadpool(ArchiveFiles.open(settings).remove, kept.kept)
        raise
    job_id = await run_in_threadpool(
        partial(
            submit_archive,
            factory,
            settings,
            kept,
            filters=filters,
            callback_url=callback_url,
            caller=caller,
        )
    )
    return await run_in_threadpool(_out, factory, job_id, caller)


def _batch_job(session: Session, job_id: int, caller: Principal) -> Job:
    job = get_job(session, job_id, caller)
    if job.kind != IDENTIFY_BATCH:
        raise NotFound(f"job {job_id} is not a batch identification")
    return job


Offset = Annotated[int, Query(ge=0, le=MAX_LIST, description="The first photo's index.")]
Limit = Annotated[int, Query(ge=1, le=MAX_PAGE, description="Photos per page.")]


@router.get("/jobs/{job_id}/results", responses={404: {"model": Problem}})
def batch_results(
    job_id: JobId,
    session: SessionDep,
    caller: Integration,
    response: Response,
    offset: Offset = 0,
    limit: Limit = MAX_PAGE,
) -> list[dict[str, Any]]:
    """Each photo's five candidates (or its error), in the order given, a page at a time from
    `offset`; `state: pending` for a photo not handled yet. `X-Total-Count` says how many
    photos the job has, and `Link` (rel="next") where the next page starts."""
    job = _batch_job(session, job_id, caller)
    total = len(job.params.get("items", []))
    response.headers["X-Total-Count"] = str(total)
    if offset + limit < total:
        following = f"/jobs/{job_id}/results?offset={offset + limit}&limit={limit}"
        response.headers["Link"] = f'<{following}>; rel="next"'
    return results(job, offset, limit)


@router.get(
    "/jobs/{job_id}/results.csv",
    response_class=PlainTextResponse,
    responses={200: {"content": {"text/csv": {}}}, 404: {"model": Problem}},
)
def batch_results_csv(job_id: JobId, session: SessionDep, caller: Integration) -> PlainTextResponse:
    """`image,predictions`: the five candidate ids, best first, space-separated (cells that a
    spreadsheet would run as a formula start with a quote)."""
    return PlainTextResponse(
        results_csv(_batch_job(session, job_id, caller)), media_type="text/csv"
    )
