"""Background jobs: progress (state, done/total, rate, ETA, errors) and cancellation."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query
from starlette.concurrency import run_in_threadpool

from service.api.deps import Integration, SessionDep, SessionsDep
from service.api.schemas import JobOut, Problem
from service.jobs.queue import cancel, get_job, list_jobs, progress

router = APIRouter(tags=["jobs"])

JobId = Annotated[int, Path(ge=1, le=2**63 - 1, description="The job's id.")]


@router.get("/jobs", response_model=list[JobOut])
def get_jobs(
    session: SessionDep, caller: Integration, limit: Annotated[int, Query(ge=1, le=500)] = 50
) -> list[JobOut]:
    """The newest jobs first: the caller's own (an admin sees every job)."""
    return [JobOut.model_validate(progress(session, j)) for j in list_jobs(session, caller, limit)]


@router.get("/jobs/{job_id}", response_model=JobOut, responses={404: {"model": Problem}})
def get_one_job(job_id: JobId, session: SessionDep, caller: Integration) -> JobOut:
    """A job's state, done/total, rate, ETA and errors; poll it until `state` is final. A key
    sees the jobs it made (another key's job is a 404); an admin sees every job."""
    return JobOut.model_validate(progress(session, get_job(session, job_id, caller)))


@router.post(
    "/jobs/{job_id}/cancel",
    response_model=JobOut,
    responses={404: {"model": Problem}, 409: {"model": Problem}},
)
async def cancel_job(job_id: JobId, sessions: SessionsDep, caller: Integration) -> JobOut:
    """Stop a queued or running job of the caller's (an admin: any job); chunks being worked on
    write nothing, and an archive's photos are removed."""
    job = await run_in_threadpool(cancel, sessions, job_id, caller)
    with sessions() as session:
        return JobOut.model_validate(progress(session, get_job(session, job.id, caller)))
