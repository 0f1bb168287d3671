"""Closing a batch job that ended: its archive's photos removed, its photo URLs' query
strings forgotten, and its end reported to its callback. A job that succeeded is closed by its
last chunk (``service.jobs.batch.chunks``); one that failed or was cancelled, in any process, by
``JobCloser`` in the worker's idle time."""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from service.db.tables import ApiKey, Job, transaction, utcnow
from service.jobs.archives import ArchiveFiles
from service.jobs.batch.results import payload
from service.jobs.batch.submit import IDENTIFY_BATCH
from service.jobs.queue import LIVE_STATES, JobState, Lease, complete
from service.outbound.callbacks import CallbackTrust, deliver, trust_of
from service.outbound.redact import without_query
from service.settings import Settings

log = logging.getLogger(__name__)


def _archive_refs(params: dict[str, Any]) -> list[str]:
    return [str(i["ref"]) for i in params.get("items", []) if i["kind"] == "archive"]


def _forget_urls(params: dict[str, Any]) -> dict[str, Any]:
    """The job's parameters without the signed query strings of its photo URLs."""
    items = [
        {**i, "ref": without_query(str(i["ref"]))} if i["kind"] == "url" else i
        for i in params.get("items", [])
    ]
    return {**params, "items": items}


def _undelivered(url: str, why: str) -> dict[str, Any]:
    return {"url": url, "delivered": False, "attempts": [], "error": why}


def report_end(
    settings: Settings, factory: sessionmaker[Session], job_id: int, state: str
) -> dict[str, Any] | None:
    """POST the job's end to its callback (signed with its key's secret, read now, so a rotated
    secret applies); what happened, or None when it has no callback."""
    with factory() as session:
        job = session.get_one(Job, job_id)
        url = job.params.get("callback_url")
        if not url:
            return None
        body = payload(job, state)
        key = session.get(ApiKey, job.key_id) if job.key_id is not None else None
        trust: CallbackTrust | None = trust_of(key)
    if trust is None:
        return _undelivered(url, "the key was revoked, or has no callback secret or hosts")
    return deliver(settings, trust, url, body, str(job_id))


def close_succeeded(
    settings: Settings, factory: sessionmaker[Session], files: ArchiveFiles, lease: Lease
) -> None:
    """The last phase of a job whose photos all have their answer: remove the archive's photos,
    deliver the callback, and close the job."""
    files.remove(_archive_refs(lease.params))
    delivery = report_end(settings, factory, lease.job_id, JobState.SUCCEEDED)
    with transaction(factory) as session:
        job = complete(session, lease, done=0)
        job.result = {**(job.result or {}), "callback": delivery}
        job.params = _forget_urls(job.params)
        job.closed_at = utcnow()


class JobCloser:
    """Closes jobs that ended (failed or cancelled, in any process): removes their archive's
    photos, forgets their photo URLs' query strings, and reports the end to the callback. Runs
    in the worker's idle time; each job is closed once (its ``closed_at`` is claimed first)."""

    def __init__(self, settings: Settings, factory: sessionmaker[Session]) -> None:
        self.settings = settings
        self.factory = factory
        self.files = ArchiveFiles.open(settings)

    def __call__(self) -> None:
        with self.factory() as session:
            ended = session.scalars(
                select(Job.id)
                .where(Job.closed_at.is_(None), Job.state.not_in(LIVE_STATES))
                .order_by(Job.id)
                .limit(20)
            ).all()
        for job_id in ended:
            self.close(job_id)

    def close(self, job_id: int) -> bool:
        """Close one ended job; False if it is live or another worker closed it."""
        with transaction(self.factory) as session:
            claimed = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.closed_at.is_(None), Job.state.not_in(LIVE_STATES))
                .values(closed_at=utcnow())
            ).rowcount  # type: ignore[attr-defined]
            if not claimed:
                return False
            job = session.get_one(Job, job_id)
            state, kind, params = job.state, job.kind, dict(job.params)
            job.params = _forget_urls(params) if kind == IDENTIFY_BATCH else params
        if kind != IDENTIFY_BATCH:
            return True
        self.files.remove(_archive_refs(params))
        delivery = report_end(self.settings, self.factory, job_id, state)
        if delivery is not None:
            with transaction(self.factory) as session:
                job = session.get_one(Job, job_id)
                job.result = {**(job.result or {}), "callback": delivery}
        log.info("job %s (%s) closed: its files removed", job_id, state)
        return True


def prune_batch_files(
    settings: Settings, factory: sessionmaker[Session], grace: dt.timedelta
) -> int:
    """Remove archive photos that no open job holds (a crash between keeping them and queuing
    the job, or between a job's end and its closing), older than ``grace``; how many."""
    with factory() as session:
        params = session.scalars(select(Job.params).where(Job.closed_at.is_(None))).all()
    live = {str(p.get("archive_token")) for p in params if p.get("archive_token")}
    files = ArchiveFiles.open(settings)
    stale = files.stale(live, utcnow() - grace)
    files.remove(stale)
    return len(stale)
