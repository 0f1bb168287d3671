"""The job table and its workers: leases, take-over of a lapsed lease, SKIP LOCKED claims,
cancellation, retries, and the finishing chunk, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from service.access.auth import COMMAND_LINE
from service.db.tables import Job, JobChunk, transaction
from service.jobs.queue import (
    Lease,
    LeaseLost,
    Worker,
    cancel,
    complete,
    create_job,
    get_job,
    lease_next,
    progress,
    renew,
)


def _job(sessions: sessionmaker[Session], chunks: list[list[int]], finish: bool = False) -> int:
    with transaction(sessions) as session:
        return create_job(
            session,
            kind="test",
            model_id=None,
            params={},
            chunks=chunks,
            created_by="tester",
            finish=finish,
        ).id


def _complete(sessions: sessionmaker[Session], lease: Lease) -> None:
    with transaction(sessions) as session:
        complete(session, lease, done=len(lease.items))


@pytest.mark.slow
def test_a_lapsed_lease_is_taken_over_and_its_first_holder_writes_nothing(
    sessions: sessionmaker[Session],
) -> None:
    job_id = _job(sessions, [[1, 2], [3]])
    first = lease_next(sessions, "w1", 0.3, ["test"])
    assert first is not None and first.seq == 0
    second = lease_next(sessions, "w2", 0.3, ["test"])
    assert second is not None and second.seq == 1  # a live lease is not taken
    time.sleep(0.4)
    taken = lease_next(sessions, "w2", 30, ["test"])
    assert taken is not None and taken.chunk_id == first.chunk_id and taken.attempt == 2
    assert not renew(sessions, first, 30)  # w1's heartbeat learns it lost the chunk
    with pytest.raises(LeaseLost):
        _complete(sessions, first)
    _complete(sessions, second)  # lapsed but not taken: still w2's to finish
    _complete(sessions, taken)
    with sessions() as session:
        p = progress(session, get_job(session, job_id, COMMAND_LINE))
    assert (p.state, p.done, p.total, p.redone_chunks) == ("succeeded", 3, 3, 1)
    assert p.rate is not None and p.rate > 0 and p.eta_seconds == 0


@pytest.mark.slow
def test_concurrent_workers_claim_different_chunks(sessions: sessionmaker[Session]) -> None:
    _job(sessions, [[i] for i in range(24)])
    claimed: list[int] = []
    lock = threading.Lock()

    def claim(name: str) -> None:
        while (lease := lease_next(sessions, name, 30, ["test"])) is not None:
            with lock:
                claimed.append(lease.chunk_id)

    threads = [threading.Thread(target=claim, args=(f"w{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(claimed) == 24 and len(set(claimed)) == 24


@pytest.mark.slow
def test_the_finishing_chunk_waits_for_the_others(sessions: sessionmaker[Session]) -> None:
    _job(sessions, [[1], [2]], finish=True)
    a = lease_next(sessions, "w", 30, ["test"])
    b = lease_next(sessions, "w", 30, ["test"])
    assert a is not None and b is not None and (a.phase, b.phase) == (0, 0)
    assert lease_next(sessions, "w", 30, ["test"]) is None  # b is not done yet
    _complete(sessions, a)
    assert lease_next(sessions, "w", 30, ["test"]) is None
    _complete(sessions, b)
    last = lease_next(sessions, "w", 30, ["test"])
    assert last is not None and last.phase == 1


def test_a_cancelled_job_is_not_leased_and_its_running_chunk_writes_nothing(
    sessions: sessionmaker[Session],
) -> None:
    job_id = _job(sessions, [[1], [2]])
    running = lease_next(sessions, "w", 30, ["test"])
    assert running is not None
    assert cancel(sessions, job_id, COMMAND_LINE).state == "cancelled"
    assert lease_next(sessions, "w", 30, ["test"]) is None
    assert not renew(sessions, running, 30)
    with pytest.raises(LeaseLost):
        _complete(sessions, running)
    with sessions() as session:
        assert get_job(session, job_id, COMMAND_LINE).done == 0


def _run_worker(
    sessions: sessionmaker[Session], handler: Callable[[Lease, Callable[[], bool]], None]
) -> None:
    worker = Worker(sessions, {"test": handler}, lease_seconds=30, poll_seconds=0.01)
    worker.run(threading.Event(), exit_when_idle=True)


def test_a_failing_chunk_is_retried_then_fails_the_job(sessions: sessionmaker[Session]) -> None:
    job_id = _job(sessions, [[1]])
    calls: list[int] = []

    def broken(lease: Lease, alive: Callable[[], bool]) -> None:
        calls.append(lease.attempt)
        raise OSError("photo store unreachable")

    for _ in range(3):
        _run_worker(sessions, broken)
    with sessions() as session:
        job = get_job(session, job_id, COMMAND_LINE)
        assert job.state == "failed" and job.finished_at is not None
        assert len(job.errors) == 3 and "photo store unreachable" in job.errors[0]
    assert calls == [1, 2, 3]


@pytest.mark.slow
def test_the_worker_renews_its_lease_while_a_chunk_runs(sessions: sessionmaker[Session]) -> None:
    job_id = _job(sessions, [[1]])
    seen: list[bool] = []

    def slow(lease: Lease, alive: Callable[[], bool]) -> None:
        time.sleep(1.0)  # three lease lengths
        seen.append(alive())
        _complete(sessions, lease)

    worker = Worker(sessions, {"test": slow}, lease_seconds=0.3, poll_seconds=0.01)
    assert worker.run_once()
    assert seen == [True]
    with sessions() as session:
        assert get_job(session, job_id, COMMAND_LINE).state == "succeeded"
        attempts = session.scalar(select(func.max(JobChunk.attempts)))
    assert attempts == 1
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 1


@pytest.mark.slow
def test_a_chunk_running_for_several_lease_lengths_is_never_offered_to_another_worker(
    sessions: sessionmaker[Session],
) -> None:
    """The heartbeat renews the lease well before it lapses (every third of it), so another
    worker polling meanwhile never gets the chunk."""
    _job(sessions, [[1]])
    offered: list[Lease | None] = []

    def slow(lease: Lease, alive: Callable[[], bool]) -> None:
        for _ in range(3):
            time.sleep(0.8)
            offered.append(lease_next(sessions, "other", 30, ["test"]))
        _complete(sessions, lease)

    worker = Worker(sessions, {"test": slow}, lease_seconds=1.0, poll_seconds=0.01)
    assert worker.run_once()
    assert offered == [None, None, None]


def test_a_stopping_worker_gives_its_chunk_back_at_once(sessions: sessionmaker[Session]) -> None:
    job_id = _job(sessions, [[1, 2, 3]])
    stop = threading.Event()
    started = threading.Event()

    def long_chunk(lease: Lease, alive: Callable[[], bool]) -> None:
        started.set()
        while alive():
            time.sleep(0.01)
        raise LeaseLost("stopping")

    worker = Worker(sessions, {"test": long_chunk}, lease_seconds=300, poll_seconds=0.01)
    thread = threading.Thread(target=worker.run, args=(stop,))
    thread.start()
    assert started.wait(10)
    stop.set()
    thread.join(10)
    assert not thread.is_alive()
    # Not after the 300 s lease: the chunk is pending again now.
    again = lease_next(sessions, "other", 30, ["test"])
    assert again is not None and again.job_id == job_id and again.attempt == 2


def test_a_busy_worker_still_keeps_house(sessions: sessionmaker[Session]) -> None:
    """Housekeeping (closing ended jobs) runs between chunks too, not only when the queue is
    empty: a worker that always has work would otherwise never remove a cancelled job's files."""
    _job(sessions, [[i] for i in range(4)])
    pending_at_housekeeping: list[int] = []

    def count_pending() -> None:
        with sessions() as session:
            pending_at_housekeeping.append(
                session.scalar(
                    select(func.count()).where(JobChunk.state == "pending", JobChunk.phase == 0)
                )
                or 0
            )

    def work(lease: Lease, alive: Callable[[], bool]) -> None:
        _complete(sessions, lease)

    worker = Worker(
        sessions, {"test": work}, poll_seconds=0.01, idle=[count_pending], housekeeping_seconds=0
    )
    worker.run(threading.Event(), exit_when_idle=True)
    assert pending_at_housekeeping[:4] == [3, 2, 1, 0]  # after each chunk, work still queued
    quiet = Worker(sessions, {"test": work}, poll_seconds=0.01, idle=[count_pending])
    _job(sessions, [[i] for i in range(3)])
    pending_at_housekeeping.clear()
    quiet.run(threading.Event(), exit_when_idle=True)
    assert pending_at_housekeeping == [0]  # within 30 s: only once the queue is empty
