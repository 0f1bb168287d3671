"""Durable background jobs: a job is a row, its work is split into chunks, and each chunk is
leased by one worker at a time with a heartbeat. A worker that dies stops renewing its lease;
the lease lapses and another worker takes the chunk over.

On PostgreSQL a chunk is claimed with ``SELECT ... FOR UPDATE SKIP LOCKED``, so any number of
workers (in API processes, or ``whaleid worker`` on other machines) claim different chunks without
waiting on each other. On SQLite every write transaction is ``BEGIN IMMEDIATE`` (see
``service.db.tables``), which serialises claims: it is safe, but meant for one worker.

A chunk's output is written in the same transaction that marks it done, and that transaction
checks the lease is still this worker's: a worker whose lease was taken over writes nothing.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sqlalchemy import ColumnElement, and_, exists, func, literal_column, or_, select, update
from sqlalchemy.orm import Session, aliased, sessionmaker

from service.access.auth import Principal
from service.contract import ModelStatus
from service.db.tables import Job, JobChunk, Model, transaction, utcnow
from service.errors import Conflict, NotFound
from service.outbound.redact import public_text, without_secrets

log = logging.getLogger(__name__)

MAX_ERRORS = 100  # a job keeps its first errors; the count of failed items is kept in full
MAX_ATTEMPTS = 3


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class ChunkState(StrEnum):
    PENDING = "pending"
    LEASED = "leased"
    DONE = "done"
    FAILED = "failed"


LIVE_STATES = (JobState.QUEUED, JobState.RUNNING)


class LeaseLost(RuntimeError):
    """The chunk is no longer this worker's (its lease lapsed and was taken, or the job was
    cancelled): whatever it computed must not be written."""


def aware(value: dt.datetime) -> dt.datetime:
    """SQLite hands datetimes back without a zone; they were written in UTC."""
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


@dataclass(frozen=True)
class Lease:
    """A chunk claimed by ``owner``."""

    chunk_id: int
    job_id: int
    kind: str
    seq: int
    phase: int
    items: list[int]
    owner: str
    model_id: int | None
    params: dict[str, Any]
    attempt: int


def create_job(
    session: Session,
    *,
    kind: str,
    model_id: int | None,
    params: dict[str, Any],
    chunks: Sequence[Sequence[int]],
    created_by: str,
    key_id: int | None = None,
    held_bytes: int = 0,
    finish: bool = False,
) -> Job:
    """A queued job with one chunk per item list; with ``finish``, a last chunk (phase 1) that
    runs once every other chunk is done."""
    job = Job(
        kind=kind,
        state=JobState.QUEUED,
        model_id=model_id,
        params=params,
        total=sum(len(c) for c in chunks),
        done=0,
        failed=0,
        errors=[],
        created_by=created_by,
        key_id=key_id,
        held_bytes=held_bytes,
    )
    session.add(job)
    session.flush()
    rows = [
        {"job_id": job.id, "seq": i, "phase": 0, "items": list(c), "state": ChunkState.PENDING}
        for i, c in enumerate(chunks)
    ]
    if finish:
        rows.append(
            {"job_id": job.id, "seq": len(chunks), "phase": 1, "items": [], "state": "pending"}
        )
    for row in rows:
        session.add(JobChunk(attempts=0, **row))
    session.flush()
    return job


def _key_of(job: Any) -> Any:
    # The command line's jobs share one turn. A literal, not a bound parameter: PostgreSQL
    # matches the GROUP BY expression by its text.
    return func.coalesce(job.key_id, literal_column("0"))


def _last_served() -> Any:
    """When each key with live jobs last had a chunk claimed."""
    job = aliased(Job)
    chunk = aliased(JobChunk)
    return (
        select(_key_of(job).label("key"), func.max(chunk.leased_at).label("at"))
        .join(job, job.id == chunk.job_id)
        .where(job.state.in_(LIVE_STATES))
        .group_by(_key_of(job))
        .subquery()
    )


def lease_next(
    factory: sessionmaker[Session], owner: str, lease_seconds: float, kinds: Sequence[str]
) -> Lease | None:
    """Claim the next chunk that is pending, or whose lease lapsed; None if there is none.

    Keys take turns: the chunk comes from the key whose chunk was claimed longest ago (a key
    never served comes first), and within a key from its oldest job, so a partner's thousand
    photos queued first do not hold back another's ten."""
    now = utcnow()
    other = aliased(JobChunk)
    unfinished_work = exists(
        select(other.id).where(
            other.job_id == JobChunk.job_id, other.phase == 0, other.state != ChunkState.DONE
        )
    )
    served = _last_served()
    stmt = (
        select(JobChunk)
        .join(Job, Job.id == JobChunk.job_id)
        .outerjoin(served, served.c.key == _key_of(Job))
        .where(
            Job.state.in_(LIVE_STATES),
            Job.kind.in_(list(kinds)),
            or_(
                JobChunk.state == ChunkState.PENDING,
                and_(JobChunk.state == ChunkState.LEASED, JobChunk.lease_expires_at < now),
            ),
            or_(JobChunk.phase == 0, ~unfinished_work),
        )
        .order_by(served.c.at.asc().nulls_first(), JobChunk.job_id, JobChunk.phase, JobChunk.seq)
        .limit(1)
        .with_for_update(skip_locked=True, of=JobChunk)
    )
    with transaction(factory) as session:
        chunk = session.scalar(stmt)
        if chunk is None:
            return None
        if chunk.state == ChunkState.LEASED:
            log.warning(
                "job %s chunk %s: the lease of %s lapsed; %s takes it over",
                chunk.job_id,
                chunk.seq,
                chunk.lease_owner,
                owner,
            )
        chunk.state = ChunkState.LEASED
        chunk.lease_owner = owner
        chunk.lease_expires_at = now + dt.timedelta(seconds=lease_seconds)
        chunk.leased_at = now
        chunk.attempts += 1
        job = session.get_one(Job, chunk.job_id)
        if job.state == JobState.QUEUED:
            job.state = JobState.RUNNING
            job.started_at = now
        return Lease(
            chunk.id,
            job.id,
            job.kind,
            chunk.seq,
            chunk.phase,
            list(chunk.items),
            owner,
            job.model_id,
            dict(job.params),
            chunk.attempts,
        )


def _held(lease: Lease) -> ColumnElement[bool]:
    """The lease's chunk, while it is still leased to the lease's owner."""
    return and_(
        JobChunk.id == lease.chunk_id,
        JobChunk.lease_owner == lease.owner,
        JobChunk.state == ChunkState.LEASED,
    )


def renew(factory: sessionmaker[Session], lease: Lease, lease_seconds: float) -> bool:
    """Extend the lease (the heartbeat); False if it is no longer ours or the job was stopped."""
    with transaction(factory) as session:
        result = session.execute(
            update(JobChunk)
            .where(
                _held(lease),
                select(Job.state)
                .where(Job.id == JobChunk.job_id)
                .scalar_subquery()
                .in_(LIVE_STATES),
            )
            .values(lease_expires_at=utcnow() + dt.timedelta(seconds=lease_seconds))
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]


def _locked_job(session: Session, job_id: int) -> Job:
    # Completions of one job are serialised on its row, so exactly one sees the last chunk done.
    return session.execute(select(Job).where(Job.id == job_id).with_for_update()).scalar_one()


def complete(
    session: Session, lease: Lease, *, done: int, failed: int = 0, errors: Sequence[str] = ()
) -> Job:
    """Mark the chunk done and count its items, inside the caller's transaction (the one that
    writes the chunk's output); ``errors`` holds one message per failed item. Raises
    ``LeaseLost`` if the chunk is not ours any more: the caller's transaction then rolls back and
    nothing of this chunk is written."""
    job = _locked_job(session, lease.job_id)
    if job.state not in LIVE_STATES:
        raise LeaseLost(f"job {job.id} is {job.state}")
    result = session.execute(
        update(JobChunk)
        .where(_held(lease))
        .values(state=ChunkState.DONE, finished_at=utcnow(), error=None)
    )
    if not result.rowcount:  # type: ignore[attr-defined]
        raise LeaseLost(f"job {job.id} chunk {lease.seq} was taken over by another worker")
    # An item reported again (a photo a later step retried) is not counted twice.
    repeated = [e for e in errors if e in job.errors]
    job.done += done
    job.failed += failed - len(repeated)
    if errors:
        job.errors = [*job.errors, *(e for e in errors if e not in repeated)][:MAX_ERRORS]
    remaining = session.scalar(
        select(func.count())
        .select_from(JobChunk)
        .where(JobChunk.job_id == job.id, JobChunk.state != ChunkState.DONE)
    )
    if not remaining:
        job.state = JobState.SUCCEEDED
        job.finished_at = utcnow()
    return job


def release_failed(factory: sessionmaker[Session], lease: Lease, error: str) -> None:
    """A chunk raised: put it back for another try, or fail the job after ``MAX_ATTEMPTS``."""
    with transaction(factory) as session:
        job = _locked_job(session, lease.job_id)
        chunk = session.get_one(JobChunk, lease.chunk_id)
        if chunk.lease_owner != lease.owner or chunk.state != ChunkState.LEASED:
            return
        for item in lease.params.get("items", []):  # a batch's photo URLs, as parsed
            if item.get("kind") == "url":
                error = without_secrets(error, str(item["ref"]))
        error = public_text(error)
        chunk.error = error[:2000]
        chunk.lease_owner = None
        chunk.lease_expires_at = None
        job.errors = [*job.errors, f"chunk {chunk.seq}: {error[:500]}"][:MAX_ERRORS]
        if chunk.attempts < MAX_ATTEMPTS:
            chunk.state = ChunkState.PENDING
            return
        chunk.state = ChunkState.FAILED
        if job.state in LIVE_STATES:
            _stop(session, job, JobState.FAILED)


def release(factory: sessionmaker[Session], lease: Lease) -> None:
    """Give a chunk back untouched (the worker is shutting down): another takes it at once."""
    with transaction(factory) as session:
        session.execute(
            update(JobChunk)
            .where(_held(lease))
            .values(state=ChunkState.PENDING, lease_owner=None, lease_expires_at=None)
        )


def _stop(session: Session, job: Job, state: JobState) -> None:
    job.state = state
    job.finished_at = utcnow()
    if job.model_id is not None:
        # A model being prepared by this job goes back to registered (its embeddings stay, so
        # the next re-index resumes where this one stopped).
        session.execute(
            update(Model)
            .where(Model.id == job.model_id, Model.status == ModelStatus.INDEXING)
            .values(status=ModelStatus.REGISTERED)
        )


def can_see(viewer: Principal, job: Job) -> bool:
    """A job is its key's: an admin sees every job, any other key only the jobs it made (so a
    re-index, made by an admin, is an admin's only)."""
    return viewer.can("admin") or (job.key_id is not None and job.key_id == viewer.key_id)


def cancel(factory: sessionmaker[Session], job_id: int, viewer: Principal) -> Job:
    """Stop a job: no chunk is leased any more, and running chunks write nothing (their next
    heartbeat or completion sees the job stopped). Its files go when it is closed."""
    with transaction(factory) as session:
        job = session.scalar(select(Job).where(Job.id == job_id).with_for_update())
        if job is None or not can_see(viewer, job):
            raise NotFound(f"job {job_id} does not exist")
        if job.state not in LIVE_STATES:
            raise Conflict(f"job {job_id} is already {job.state}: there is nothing to cancel")
        _stop(session, job, JobState.CANCELLED)
        session.flush()
        return job


def get_job(session: Session, job_id: int, viewer: Principal) -> Job:
    """The job, if ``viewer`` may see it; otherwise the same 404 as a job that does not exist,
    so ids cannot be walked to learn what others run."""
    job = session.get(Job, job_id)
    if job is None or not can_see(viewer, job):
        raise NotFound(f"job {job_id} does not exist")
    return job


@dataclass(frozen=True)
class Progress:
    """What a client polls: state, done/total, rate (items/s), ETA (s), errors."""

    id: int
    kind: str
    state: str
    model_id: int | None
    done: int
    failed: int
    total: int
    rate: float | None
    eta_seconds: float | None
    errors: list[str]
    result: dict[str, Any] | None
    created_by: str
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    chunks: dict[str, int]
    redone_chunks: int

    @property
    def finished(self) -> bool:
        return self.state not in LIVE_STATES


def _summary(result: dict[str, Any] | None) -> dict[str, Any] | None:
    # A batch's per-photo answers are read page by page (GET /jobs/{id}/results): polling a
    # thousand-photo job stays small.
    if result is None:
        return None
    return {k: v for k, v in result.items() if k != "items"}


def progress(session: Session, job: Job) -> Progress:
    """The job's progress, with the rate since it started and the time left at that rate."""
    counts = dict(
        session.execute(
            select(JobChunk.state, func.count())
            .where(JobChunk.job_id == job.id)
            .group_by(JobChunk.state)
        ).all()
    )
    redone = session.scalar(
        select(func.count()).where(JobChunk.job_id == job.id, JobChunk.attempts > 1)
    )
    handled = job.done + job.failed
    rate = eta = None
    if job.started_at is not None and handled:
        end = aware(job.finished_at) if job.finished_at else utcnow()
        elapsed = (end - aware(job.started_at)).total_seconds()
        if elapsed > 0:
            rate = handled / elapsed
            eta = max(job.total - handled, 0) / rate if job.state in LIVE_STATES else 0.0
    return Progress(
        job.id,
        job.kind,
        job.state,
        job.model_id,
        job.done,
        job.failed,
        job.total,
        rate,
        eta,
        list(job.errors),
        _summary(job.result),
        job.created_by,
        aware(job.created_at),
        aware(job.started_at) if job.started_at else None,
        aware(job.finished_at) if job.finished_at else None,
        {str(k): int(v) for k, v in counts.items()},
        int(redone or 0),
    )


def list_jobs(session: Session, viewer: Principal, limit: int = 50) -> list[Job]:
    """The newest jobs ``viewer`` may see."""
    stmt = select(Job).order_by(Job.id.desc()).limit(limit)
    if not viewer.can("admin"):
        stmt = stmt.where(Job.key_id == viewer.key_id)
    return list(session.scalars(stmt))


# Does one chunk of one kind of job. It writes its output and calls ``complete`` in one
# transaction, and checks ``alive()`` between steps (False: the lease is lost, stop).
ChunkHandler = Callable[[Lease, Callable[[], bool]], None]


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class Worker:
    """Claims chunks and runs them, renewing each lease from a heartbeat thread."""

    def __init__(
        self,
        factory: sessionmaker[Session],
        handlers: dict[str, ChunkHandler],
        *,
        lease_seconds: float = 30.0,
        poll_seconds: float = 1.0,
        idle: Sequence[Callable[[], None]] = (),
        housekeeping_seconds: float = 30.0,
        name: str | None = None,
    ) -> None:
        self.factory = factory
        self.handlers = handlers
        self.lease_seconds = lease_seconds
        self.poll_seconds = poll_seconds
        self.idle = idle
        self.housekeeping_seconds = housekeeping_seconds
        self.name = name or worker_name()
        self._stopping = threading.Event()

    def run_once(self) -> bool:
        """Claim and run one chunk; False if there was nothing to do."""
        lease = lease_next(self.factory, self.name, self.lease_seconds, list(self.handlers))
        if lease is None:
            return False
        lost = threading.Event()
        stop = threading.Event()
        beat = threading.Thread(
            target=self._heartbeat, args=(lease, lost, stop), daemon=True, name="job-heartbeat"
        )
        beat.start()
        try:
            self.handlers[lease.kind](
                lease, lambda: not lost.is_set() and not self._stopping.is_set()
            )
        except LeaseLost as e:
            if self._stopping.is_set():
                release(self.factory, lease)
                log.info("job %s chunk %s: given back, the worker stops", lease.job_id, lease.seq)
            else:
                log.info("job %s chunk %s: %s; dropped", lease.job_id, lease.seq, e)
        except Exception as e:
            log.exception("job %s chunk %s failed", lease.job_id, lease.seq)
            release_failed(self.factory, lease, f"{type(e).__name__}: {e}")
        finally:
            stop.set()
            beat.join()
        return True

    def _keep_house(self) -> None:
        for step in self.idle:
            try:
                step()
            except Exception:  # the next round tries again
                log.exception("worker %s: housekeeping failed", self.name)

    def _heartbeat(self, lease: Lease, lost: threading.Event, stop: threading.Event) -> None:
        while not stop.wait(self.lease_seconds / 3):
            try:
                if not renew(self.factory, lease, self.lease_seconds):
                    lost.set()
                    return
            except Exception:  # a database hiccup: the next beat tries again
                log.warning("job %s: heartbeat failed", lease.job_id, exc_info=True)

    def run(self, stop: threading.Event, *, exit_when_idle: bool = False) -> None:
        """Work until ``stop`` is set (or, with ``exit_when_idle``, until nothing is left)."""
        log.info("worker %s started (jobs: %s)", self.name, ", ".join(self.handlers))
        # A chunk in progress stops at its next batch and is given back to the other workers.
        self._stopping = stop
        kept_house = time.monotonic()
        while not stop.is_set():
            try:
                worked = self.run_once()
            except Exception:  # the database is away: wait and try again
                log.exception("worker %s: claiming work failed", self.name)
                worked = False
            # Housekeeping (closing ended jobs, keeping the gallery) runs when there is no chunk
            # to claim, and at least every housekeeping_seconds while there always is one.
            if not worked or time.monotonic() - kept_house >= self.housekeeping_seconds:
                self._keep_house()
                kept_house = time.monotonic()
            if worked:
                continue
            if exit_when_idle:
                return
            stop.wait(self.poll_seconds)
        log.info("worker %s stopped", self.name)
