"""The switch under load: every /identify answered, wholly by the old or the new model; a
second replica follows at its next request; a worker process that dies mid-job leaves one chunk
to redo and no photo embedded twice."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import astuple
from pathlib import Path

import httpx
import numpy as np
import pytest
from sqlalchemy import func, select

from service.access.auth import COMMAND_LINE
from service.db.tables import Embedding, Identification, JobChunk
from service.jobs.queue import Worker
from service.models.registry import register_model
from service.models.reindex import Embedders, start_reindex, worker_handlers
from service.settings import Settings
from tests.conftest import Catalogue, LiveServer, free_port, make_keys, run_server, serve_process
from tests.toy import build_toy_model, encode, photo

log = logging.getLogger(__name__)


def ready_model(catalogue: Catalogue, path: Path) -> int:
    """Register ``path`` and run its re-index to the end in this process."""
    s = catalogue.settings
    model_id = register_model(s, catalogue.sessions, path).id
    start_reindex(s, catalogue.sessions, model_id)
    worker = Worker(
        catalogue.sessions, worker_handlers(s, catalogue.sessions, Embedders(s, catalogue.sessions))
    )
    worker.run(threading.Event(), exit_when_idle=True)
    return model_id


@pytest.fixture
def server(catalogue: Catalogue) -> Iterator[LiveServer]:
    catalogue.settings.worker = False
    yield from run_server(catalogue.settings)


@pytest.mark.slow
def test_every_request_during_switches_is_answered_by_one_model(
    server: LiveServer, catalogue: Catalogue, tmp_path: Path
) -> None:
    new_id = ready_model(
        catalogue, build_toy_model(tmp_path / "v2.onnx", seed=7, metadata={"whaleid.name": "v2"})
    )
    stop = threading.Event()
    answers: list[tuple[float, float, int, int | None, str]] = []
    lock = threading.Lock()

    def load(n: int) -> None:
        with server.client() as client:
            shot = 100 * (n + 1)
            while not stop.is_set():
                shot += 1
                start = time.perf_counter()
                try:
                    r = client.post(
                        "/identify", files={"photo": ("q.png", encode(photo(n % 12, shot)))}
                    )
                    status, body = r.status_code, r.json()
                except httpx.HTTPError as e:
                    status, body = 0, {"error": str(e)}
                end = time.perf_counter()
                with lock:
                    answers.append(
                        (start, end, status, body.get("identification_id"), str(body.get("model")))
                    )

    threads = [threading.Thread(target=load, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    switches: list[tuple[float, float]] = []
    try:
        with server.client("admin") as admin:
            for action in ("activate", "rollback", "activate"):
                time.sleep(0.5)
                start = time.perf_counter()
                if action == "activate":
                    r = admin.post(f"/models/{new_id}/activate", json={"force": True})
                else:
                    r = admin.post("/models/rollback")
                assert r.status_code == 200, r.text
                switches.append((start, time.perf_counter()))
            time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join()
    failed = [a for a in answers if a[2] != 200]
    assert not failed, failed[:3]
    with catalogue.sessions() as session:
        recorded = dict(
            session.execute(
                select(Identification.id, Identification.model_id).where(
                    Identification.id.in_([a[3] for a in answers])
                )
            ).all()
        )
    # The answer and the record name the same model, and a request sent after a switch returned
    # (and answered before the next began) is answered by the model it switched to.
    expected = [new_id, catalogue.model_id, new_id]
    bounds = [*(s for s, _ in switches[1:]), float("inf")]
    for start, end, _status, ident, model in answers:
        assert f"'id': {recorded[ident]}," in model
        for (_, ended), model_id, next_start in zip(switches, expected, bounds, strict=True):
            if ended < start and end < next_start:
                assert recorded[ident] == model_id
    assert {recorded[a[3]] for a in answers} == {catalogue.model_id, new_id}
    during = [(e - s) * 1000 for s, e, *_ in answers if any(a - 0.2 <= s <= b for a, b in switches)]
    log.info(
        "%d requests, none failed; during the switches (%d): p50 %.1f ms, p99 %.1f ms",
        len(answers),
        len(during),
        np.percentile(during, 50),
        np.percentile(during, 99),
    )


@pytest.mark.slow
@pytest.mark.postgres
def test_a_second_replica_follows_a_switch_at_its_next_request(
    tmp_path: Path, postgres_url: str, toy_model: Path
) -> None:
    from tests.conftest import load_catalogue

    settings = Settings(data_dir=tmp_path / "data", database_url=postgres_url, _env_file=None)  # type: ignore[call-arg]
    settings.ensure_dirs()
    from service.db import migrate

    migrate.upgrade(settings.sqlalchemy_url)
    catalogue = load_catalogue(settings, tmp_path / "catalogue", toy_model)
    new_id = ready_model(
        catalogue, build_toy_model(tmp_path / "v2.onnx", seed=7, metadata={"whaleid.name": "v2"})
    )
    keys = make_keys(settings)
    ports = [free_port(), free_port()]
    processes = [serve_process(settings, p, WHALEID_WORKER="false") for p in ports]
    try:
        a, b = (
            httpx.Client(
                base_url=f"http://127.0.0.1:{p}",
                timeout=30,
                headers={"Authorization": f"Bearer {keys['admin']}"},
            )
            for p in ports
        )

        def model_of(client: httpx.Client, shot: int) -> str:
            r = client.post("/identify", files={"photo": ("q.png", encode(photo(1, shot)))})
            assert r.status_code == 200, r.text
            return str(r.json()["model"]["name"])

        assert model_of(b, 1) == "toy"
        assert a.post(f"/models/{new_id}/activate", json={"force": True}).status_code == 200
        switched = time.perf_counter()
        assert model_of(b, 2) == "v2"  # the very next request on the other replica
        lag = (time.perf_counter() - switched) * 1000
        assert b.post("/models/rollback").status_code == 200
        assert model_of(a, 3) == "toy"
        log.info("replica B answered with the new model %.1f ms after A's switch returned", lag)
    finally:
        for p in processes:
            p.terminate()
            p.wait(timeout=20)


@pytest.mark.slow
@pytest.mark.postgres
def test_a_killed_worker_process_loses_one_chunk_and_embeds_nothing_twice(
    tmp_path: Path, postgres_url: str, toy_model: Path
) -> None:
    from service.db import migrate
    from tests.conftest import load_catalogue

    settings = Settings(  # type: ignore[call-arg]
        data_dir=tmp_path / "data", database_url=postgres_url, reindex_chunk_size=2, _env_file=None
    )
    settings.ensure_dirs()
    migrate.upgrade(settings.sqlalchemy_url)
    catalogue = load_catalogue(settings, tmp_path / "catalogue", toy_model, individuals=20)
    new_id = register_model(
        settings, catalogue.sessions, build_toy_model(tmp_path / "v2.onnx", seed=7)
    ).id
    job_id = start_reindex(settings, catalogue.sessions, new_id).id
    env = {
        **os.environ,
        "WHALEID_DATA_DIR": str(settings.data_dir),
        "WHALEID_DATABASE_URL": settings.sqlalchemy_url,
        "WHALEID_JOB_LEASE_SECONDS": "1",
        "WHALEID_JOB_POLL_SECONDS": "0.05",
    }

    def worker(name: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "service.cli", "worker", "--name", name],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def held_by(name: str) -> int | None:
        with catalogue.sessions() as session:
            return session.scalar(
                select(JobChunk.id).where(JobChunk.lease_owner == name, JobChunk.state == "leased")
            )

    doomed = worker("doomed")
    survivor: subprocess.Popen[bytes] | None = None
    try:
        deadline = time.monotonic() + 60
        while True:
            assert time.monotonic() < deadline, "the worker never held a chunk"
            if held_by("doomed") is not None:
                doomed.send_signal(signal.SIGSTOP)  # frozen: no heartbeat, like a dead machine
                lost = held_by("doomed")
                if lost is not None:
                    break
                doomed.send_signal(signal.SIGCONT)
            time.sleep(0.005)
        doomed.kill()
        survivor = worker("survivor")
        deadline = time.monotonic() + 60
        with catalogue.sessions() as session:
            while session.get_one(JobChunk, lost).state != "done":
                assert time.monotonic() < deadline, "the lost chunk was never taken over"
                time.sleep(0.1)
                session.expire_all()
        # The survivor (still working) finishes the job.
        from service.jobs.queue import get_job, progress

        while True:
            with catalogue.sessions() as session:
                p = progress(session, get_job(session, job_id, COMMAND_LINE))
            if p.finished:
                break
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        doomed.kill()
        if survivor is not None:
            survivor.send_signal(signal.SIGTERM)
            survivor.wait(timeout=20)
    assert p.state == "succeeded" and p.done == p.total == 60
    assert p.redone_chunks == 1
    with catalogue.sessions() as session:
        assert session.get_one(JobChunk, lost).attempts == 2
        counts = session.execute(
            select(Embedding.image_id, func.count())
            .where(Embedding.model_id == new_id)
            .group_by(Embedding.image_id)
        ).all()
    assert len(counts) == 60 and {n for _, n in counts} == {1}
    log.info(
        "one worker killed mid-job: %d of %d chunks redone", p.redone_chunks, sum(p.chunks.values())
    )


@pytest.mark.slow
def test_a_prepared_model_is_switched_to_without_loading_and_with_the_chosen_head(
    catalogue: Catalogue, tmp_path: Path
) -> None:
    from service.contract import Head, Ranking
    from service.matching.runtime import Runtime
    from service.models.switch import switch_to

    s = catalogue.settings
    new_id = ready_model(catalogue, build_toy_model(tmp_path / "v2.onnx", seed=7))
    runtime = Runtime(s, catalogue.sessions)
    old = runtime.current()
    runtime.prepare(new_id)
    assert runtime.current() is old  # prepared, not active yet
    prepared = runtime._standby
    head = Head(7, 0.5, Ranking.NEAREST)
    embedders = Embedders(s, catalogue.sessions)
    switch_to(s, catalogue.sessions, embedders(new_id), new_id, action="t", head=head, actor="t")
    now = runtime.current()
    assert now is prepared
    assert (now.model.id, *astuple(now.model.head)) == (
        new_id,
        7,
        0.5,
        "nearest",
    )
