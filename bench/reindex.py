"""Re-index figures (docs/operations.md): re-index throughput against decode + preprocess +
embed done serially on the same photos in the same run, for the demo model and a B5, at two
batch sizes; the switch (time from ready to active, /identify p50/p99 while two replicas serve
under load, replica lag); rollback; and the share of work redone when one of two
``whaleid worker`` processes is killed mid-job.

Needs PostgreSQL (the replicas and workers share it). The galleries are rendered by
``training.synthetic`` (numpy and Pillow only): 160 px photos for the demo model, the same
enlarged to 3 MP JPEGs for the B5. Each "retrained" model is the same network with another
version in its metadata (so its file, and its embeddings, are its own). The B5 is
``bench/make_effb5_onnx.py``'s (random weights). Writes the figures as JSON.

    flock /tmp/bench.lock .venv/bin/python bench/reindex.py --parts demo,b5 \
        --gallery /tmp/reindex-gallery --b5-gallery /tmp/reindex-gallery-b5 \
        --out build/bench-reindex.json \
        --postgres-url postgresql+psycopg://postgres@127.0.0.1:55432/postgres
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import setup_logging  # noqa: E402
from bench.reindex_throughput import (  # noqa: E402
    DEMO,
    Bench,
    reindex_throughput,
    retrained_copy,
    setup,
    throughput,
)
from service.access.auth import COMMAND_LINE  # noqa: E402
from service.db.tables import (  # noqa: E402
    JobChunk,
)
from service.jobs.queue import get_job, progress  # noqa: E402
from service.models.registry import register_model  # noqa: E402
from service.models.reindex import (  # noqa: E402
    start_reindex,
)
from service.settings import Settings  # noqa: E402
from tests.conftest import free_port, make_keys, serve_process  # noqa: E402

log = logging.getLogger("bench.reindex")


def confirm_queries(url: str, key: str, gallery: Path) -> int:
    """Curators confirm the held-out queries (unseen individuals as new individuals)."""
    known = {r["individual_id"] for r in csv.DictReader((gallery / "catalogue.csv").open())}
    done = 0
    with httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {key}"}) as c:
        for row in csv.DictReader((gallery / "queries.csv").open()):
            data = (gallery / "images" / row["image"]).read_bytes()
            r = c.post("/identify", files={"photo": (row["image"], data)})
            r.raise_for_status()
            ident = r.json()["identification_id"]
            if row["individual_id"] in known:
                body = {"decision": "confirm", "individual_id": row["individual_id"]}
            else:  # the first sighting is a new individual; later ones confirm it
                body = {"decision": "new_individual", "code": row["individual_id"]}
                known.add(row["individual_id"])
            c.post(f"/identifications/{ident}/decision", json=body).raise_for_status()
            done += 1
    return done


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "p50_ms": float(np.percentile(values, 50)),
        "p99_ms": float(np.percentile(values, 99)),
    }


def under_load(
    urls: list[str], key: str, photos: list[bytes], actions: list[tuple[str, Callable[[], float]]]
) -> dict[str, Any]:
    """Two clients per replica send /identify while ``actions`` run on replica A, one second
    apart; latencies, failures and, per action, how long replica B took to follow."""
    stop = threading.Event()
    answers: list[tuple[int, float, float, int, int | None]] = []
    lock = threading.Lock()

    def client(replica: int, offset: int) -> None:
        with httpx.Client(
            base_url=urls[replica], timeout=60, headers={"Authorization": f"Bearer {key}"}
        ) as c:
            i = offset
            while not stop.is_set():
                i += 1
                start = time.perf_counter()
                try:
                    r = c.post("/identify", files={"photo": ("q.jpg", photos[i % len(photos)])})
                    status, model = r.status_code, r.json()["model"]["id"] if r.is_success else None
                except httpx.HTTPError:
                    status, model = 0, None
                with lock:
                    answers.append((replica, start, time.perf_counter(), status, model))

    threads = [threading.Thread(target=client, args=(r, 7 * n)) for r in (0, 1) for n in (0, 1)]
    for t in threads:
        t.start()
    windows = []
    try:
        time.sleep(3)
        for name, action in actions:
            start = time.perf_counter()
            target = action()
            windows.append((name, start, time.perf_counter(), target))
            time.sleep(3)
    finally:
        stop.set()
        for t in threads:
            t.join()
    first = windows[0][1]
    out: dict[str, Any] = {
        "requests": len(answers),
        "failed": sum(1 for a in answers if a[3] != 200),
        "before": percentiles([(e - s) * 1000 for _, s, e, st, _ in answers if e < first]),
    }
    for i, (name, start, end, target) in enumerate(windows):
        following = windows[i + 1][1] if i + 1 < len(windows) else float("inf")
        during = [(e - s) * 1000 for _, s, e, _, _ in answers if s <= end + 1 and e >= start]
        on_b = sorted(
            (s, e, m) for r, s, e, _, m in answers if r == 1 and e > end and s < following
        )
        followed = next((e for s, e, m in on_b if m == target), None)
        stale = sum(1 for s, e, m in on_b if s > end and m != target)
        out[name] = {
            "switch_s": end - start,
            "during": percentiles(during),
            "replica_b_lag_ms": None if followed is None else (followed - end) * 1000,
            "replica_b_stale_answers_after_switch": stale,
        }
    return out


def killed_worker(bench: Bench, model_id: int, lease_seconds: float) -> dict[str, Any]:
    """Two ``whaleid worker`` processes share a re-index; one is killed (SIGKILL) mid-job."""
    s = bench.settings
    job = start_reindex(s, bench.factory, model_id, actor="bench")
    env = {
        **os.environ,
        "WHALEID_DATA_DIR": str(s.data_dir),
        "WHALEID_DATABASE_URL": s.sqlalchemy_url,
        "WHALEID_JOB_LEASE_SECONDS": str(lease_seconds),
        "WHALEID_ONNX_THREADS": str(s.onnx_threads),
        "WHALEID_EMBED_BATCH_SIZE": str(s.embed_batch_size),
    }
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "service.cli", "worker", "--name", f"w{i}"],
            env=env,
            stderr=subprocess.DEVNULL,
        )
        for i in (1, 2)
    ]
    started = time.perf_counter()
    names = ["w1", "w2"]
    try:
        while True:  # both workers busy, 40 % done: kill one that holds a chunk right now
            with bench.factory() as session:
                p = progress(session, get_job(session, job.id, COMMAND_LINE))
                owners = dict(
                    session.query(JobChunk.lease_owner, JobChunk.state)
                    .filter(JobChunk.job_id == job.id, JobChunk.state == "leased")
                    .all()
                )
                worked = {
                    o
                    for (o,) in session.query(JobChunk.lease_owner).filter(
                        JobChunk.job_id == job.id, JobChunk.lease_owner.is_not(None)
                    )
                }
            holding = [n for n in names if n in owners]
            if p.done >= p.total * 0.4 and worked >= set(names) and holding:
                break
            assert not p.finished, "the job ended before a worker could be killed"
            time.sleep(0.01)
        victim = names.index(holding[0])
        workers[victim].send_signal(signal.SIGKILL)
        killed_at = p.done
        while not p.finished:
            time.sleep(0.2)
            with bench.factory() as session:
                p = progress(session, get_job(session, job.id, COMMAND_LINE))
        elapsed = time.perf_counter() - started
    finally:
        for w in workers:
            w.send_signal(signal.SIGTERM)
            w.wait(timeout=30)
    with bench.factory() as session:
        redone = (
            session.query(JobChunk)
            .filter(JobChunk.job_id == job.id, JobChunk.attempts > 1, JobChunk.phase == 0)
            .all()
        )
        chunks = session.query(JobChunk).filter(JobChunk.job_id == job.id).count()
    redone_photos = sum(len(c.items) for c in redone)
    return {
        "state": p.state,
        "photos": p.total,
        "killed_after_photos": killed_at,
        "chunks": chunks,
        "redone_chunks": len(redone),
        "redone_photos": redone_photos,
        "redone_share": redone_photos / p.total if p.total else 0.0,
        "elapsed_s": elapsed,
        "lease_s": lease_seconds,
    }


def switch_and_kill(args: argparse.Namespace, bench: Bench, root: Path) -> dict[str, Any]:
    """Curators confirm the queries; the switch and rollback under load on two replicas; then
    a re-index with one of two worker processes killed mid-job."""
    results: dict[str, Any] = {}
    s = bench.settings
    new_id = register_model(s, bench.factory, retrained_copy(root, "retrained")).id
    keys = make_keys(s)
    ports = [free_port(), free_port()]
    servers = [serve_process(s, p, WHALEID_WORKER="false") for p in ports]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    try:
        results["confirmations"] = confirm_queries(urls[0], keys["curator"], bench.gallery)
        s.embed_batch_size = args.batch
        reindex = reindex_throughput(bench, new_id, args.batch)
        results["shadow"] = reindex["shadow"]
        results["finish_s"] = reindex["finish_s"]
        queries = csv.DictReader((bench.gallery / "queries.csv").open())
        photos = [(bench.gallery / "images" / r["image"]).read_bytes() for r in queries]
        admin = httpx.Client(
            base_url=urls[0], timeout=120, headers={"Authorization": f"Bearer {keys['admin']}"}
        )

        def activate() -> float:
            admin.post(f"/models/{new_id}/activate", json={"head": "model"}).raise_for_status()
            return new_id

        def rollback() -> float:
            admin.post("/models/rollback").raise_for_status()
            return bench.old_id

        results["switch"] = under_load(
            urls,
            keys["integration"],
            photos,
            [("activate", activate), ("rollback", rollback)],
        )
        log.info("switch: %s", results["switch"])
    finally:
        for server in servers:
            server.terminate()
            server.wait(timeout=30)
    s.reindex_chunk_size = args.kill_chunk
    third = register_model(s, bench.factory, retrained_copy(root, "retrained-b"))
    results["killed_worker"] = killed_worker(bench, third.id, args.lease)
    log.info("killed worker: %s", results["killed_worker"])
    return results


PARTS = ("demo", "b5", "switch")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--postgres-url", required=True)
    parser.add_argument(
        "--parts",
        default=",".join(PARTS),
        help="demo: the demo model's throughput; b5: the B5's; switch: the switch, rollback "
        "and killed-worker runs (default: all)",
    )
    parser.add_argument("--individuals", type=int, default=300)
    parser.add_argument(
        "--chunk", type=int, default=Settings.model_fields["reindex_chunk_size"].default
    )
    parser.add_argument("--batch", type=int, default=16, help="the embedder's batch size")
    parser.add_argument("--batches", default="1,16", help="batch sizes the throughput runs compare")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--lease", type=float, default=5.0)
    parser.add_argument("--gallery", type=Path, help="render the gallery here once, reuse it")
    parser.add_argument("--rounds", type=int, default=5, help="re-index runs per batch size")
    parser.add_argument("--kill-chunk", type=int, default=64, help="chunk size of the kill run")
    parser.add_argument("--b5-model", type=Path, default=Path("/work/bench-cache/effb5-380.onnx"))
    parser.add_argument("--b5-rounds", type=int, default=3, help="the B5's, at 20 s a run")
    parser.add_argument("--b5-individuals", type=int, default=32)
    parser.add_argument("--b5-photo-side", type=int, default=1728, help="3 MP photos")
    parser.add_argument("--b5-gallery", type=Path, help="render the B5's gallery here once")
    parser.add_argument("--out", type=Path, default=Path("build/bench-reindex.json"))
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    if unknown := parts - set(PARTS):
        parser.error(f"unknown parts {sorted(unknown)}: choose from {', '.join(PARTS)}")
    if "b5" in parts and not args.b5_model.exists():
        parser.error(f"no B5 at {args.b5_model}: build it with bench/make_effb5_onnx.py")
    batches = [int(b) for b in args.batches.split(",")]
    setup_logging("%(asctime)s %(name)s: %(message)s")
    results: dict[str, Any] = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "baseline": "decode + preprocess + embed, one after another on one thread, batch by "
        "batch, photos in memory; the same photos, the same embedder settings",
    }
    with tempfile.TemporaryDirectory(prefix="whaleid-bench-") as tmp:
        root = Path(tmp)
        if parts & {"demo", "switch"}:
            (root / "demo").mkdir()
            gallery = args.gallery or root / "gallery"
            bench = setup(args, root / "demo", gallery, args.individuals)
            if "demo" in parts:
                results["demo"] = throughput(bench, DEMO, root, batches, args.rounds)
                results["demo"]["model"] = "demo/whaleid-demo.onnx"
                log.info("demo throughput: %s", results["demo"]["by_batch"])
            if "switch" in parts:
                results.update(switch_and_kill(args, bench, root))
        if "b5" in parts:
            (root / "b5").mkdir()
            gallery = args.b5_gallery or root / "b5-gallery"
            b5 = setup(args, root / "b5", gallery, args.b5_individuals, args.b5_photo_side)
            results["b5"] = throughput(b5, args.b5_model, root, batches, args.b5_rounds)
            results["b5"]["model"] = str(args.b5_model)
            log.info("B5 throughput: %s", results["b5"]["by_batch"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
