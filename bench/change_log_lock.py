"""What the change-log lock costs a decision on PostgreSQL, isolated from HTTP and the embedder.

Each writer runs transactions shaped like a decision's tail (move a photo to an individual, an
audit row, the gallery change row, commit), in turns with the lock taken as the service does
and with it skipped, so both see the same machine load. Reports the transaction latency
(p50/p95) and the throughput, for 1 writer and for several at once. A scratch database on the
given server is used and dropped; loopback only; bounded to 2000 transactions per case.

    .venv/bin/python bench/change_log_lock.py \\
        --postgres postgresql+psycopg://postgres@127.0.0.1:55432/postgres --transactions 300
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from sqlalchemy import insert, update
from sqlalchemy.orm import Session, sessionmaker

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import bench_parser, setup_logging, within  # noqa: E402
from bench.replicas import scratch_database  # noqa: E402
from service.db import migrate
from service.db.tables import (  # noqa: E402
    Embedding,
    Image,
    Individual,
    IndividualEvent,
    Model,
    make_engine,
    make_sessionmaker,
    transaction,
)
from service.gallery import sync as model_gallery  # noqa: E402

log = logging.getLogger("bench.change_log_lock")
PHOTOS = 64


def seed(factory: sessionmaker[Session]) -> None:
    """A model, two individuals and ``PHOTOS`` embedded photos."""
    with transaction(factory) as session:
        session.add(
            Model(
                name="bench",
                version="1",
                file_path="none",
                file_hash="0" * 64,
                embedding_dim=4,
                preprocessing={},
                k=10,
                cutoff=0.5,
                ranking="vote",
                status="active",
                metadata_props={},
            )
        )
        session.execute(insert(Individual), [{"catalogue_id": f"i{n}"} for n in range(2)])
        session.execute(
            insert(Image),
            [
                {
                    "content_hash": f"{n:064d}",
                    "file_path": "none",
                    "media_type": "image/png",
                    "byte_size": 1,
                    "width": 1,
                    "height": 1,
                    "source": "query",
                }
                for n in range(PHOTOS)
            ],
        )
        session.execute(
            insert(Embedding),
            [{"image_id": n + 1, "model_id": 1, "vector": bytes(16)} for n in range(PHOTOS)],
        )


def decision_tail(factory: sessionmaker[Session], photo: int, individual: int) -> float:
    """One transaction shaped like a decision's end; its latency in ms."""
    start = time.perf_counter()
    with transaction(factory) as session:
        session.execute(update(Image).where(Image.id == photo).values(individual_id=individual))
        session.add(
            IndividualEvent(individual_id=individual, event="photo_added", detail={}, actor="b")
        )
        model_gallery.log_gallery_changes(session, [photo])
    return (time.perf_counter() - start) * 1000


def run(factory: sessionmaker[Session], writers: int, count: int) -> tuple[list[float], float]:
    """``writers`` threads, ``count`` transactions in all; latencies and transactions/s."""
    latencies: list[float] = []
    lock = threading.Lock()

    def writer(n: int) -> None:
        for i in range(count // writers):
            ms = decision_tail(factory, 1 + (n * 997 + i) % PHOTOS, 1 + i % 2)
            with lock:
                latencies.append(ms)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(writers)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, len(latencies) / (time.perf_counter() - start)


def main() -> None:
    parser = bench_parser(__doc__, postgres=True)
    parser.add_argument("--transactions", type=within(10, 2000), default=300)
    parser.add_argument("--writers", type=within(2, 8), default=4)
    parser.add_argument("--turns", type=within(1, 10), default=3)
    args = parser.parse_args()
    setup_logging("%(message)s", quiet=())
    with scratch_database(args.postgres) as url:
        migrate.upgrade(url)
        engine = make_engine(url)
        factory = make_sessionmaker(engine)
        seed(factory)
        locked = model_gallery._lock_change_log
        skipped: Callable[[Session], None] = lambda session: None  # noqa: E731
        results: dict[tuple[str, int], tuple[list[float], list[float]]] = {}
        for _ in range(args.turns):
            for writers in (1, args.writers):
                for name, hook in (("with lock", locked), ("without", skipped)):
                    model_gallery._lock_change_log = hook  # type: ignore[assignment]
                    ms, rate = run(factory, writers, args.transactions // args.turns)
                    all_ms, rates = results.setdefault((name, writers), ([], []))
                    all_ms.extend(ms)
                    rates.append(rate)
        model_gallery._lock_change_log = locked
        engine.dispose()
    log.info("| writers | change log | p50 | p95 | transactions/s |")
    log.info("|---:|---|---:|---:|---:|")
    for (name, writers), (ms, rates) in sorted(results.items(), key=lambda r: (r[0][1], r[0][0])):
        p50, p95 = np.percentile(ms, [50, 95])
        log.info(
            "| %d | %s | %.2f ms | %.2f ms | %.0f |", writers, name, p50, p95, float(np.mean(rates))
        )


if __name__ == "__main__":
    main()
