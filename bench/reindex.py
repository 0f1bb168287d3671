"""Re-index figures (docs/operations.md): re-index throughput against the embedder's raw
throughput on pre-decoded batches in the same run; the switch (time from ready to active,
/identify p50/p99 while two replicas serve under load, replica lag); rollback; and the share of
work redone when one of two ``whaleid worker`` processes is killed mid-job.

Needs PostgreSQL (the replicas and workers share it). The gallery is rendered by
``training.synthetic`` (numpy and Pillow only); the model is demo/whaleid-demo.onnx, and the
"retrained" model is the same network with other metadata (so its file, and its embeddings, are
its own). Writes the figures as JSON.

    .venv/bin/python bench/reindex.py --individuals 300 --out build/bench-reindex.json \
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
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import psycopg
from onnx import helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.access.auth import COMMAND_LINE
from service.catalogue.imports import CatalogueImport  # noqa: E402
from service.db import migrate  # noqa: E402
from service.db.tables import JobChunk, make_engine, make_sessionmaker  # noqa: E402
from service.imaging import decode_photo, to_model_input  # noqa: E402
from service.jobs.queue import Worker, get_job, progress  # noqa: E402
from service.models.registry import register_model  # noqa: E402
from service.models.reindex import Embedders, start_reindex, worker_handlers  # noqa: E402
from service.models.switch import activate_model  # noqa: E402
from service.onnx.embedder import Embedder  # noqa: E402
from service.settings import Settings  # noqa: E402
from tests.conftest import free_port, make_keys, serve_process  # noqa: E402

log = logging.getLogger("bench.reindex")
DEMO = Path(__file__).resolve().parents[1] / "demo" / "whaleid-demo.onnx"


@dataclass
class Bench:
    settings: Settings
    factory: Any
    gallery: Path
    old_id: int


def create_database(base: str) -> str:
    name = f"whaleid_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(
        base.replace("postgresql+psycopg://", "postgresql://"), autocommit=True
    ) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    return base.rsplit("/", 1)[0] + f"/{name}"


def retrained_copy(folder: Path, version: str) -> Path:
    """The demo network under another version: another file, another model."""
    model = onnx.load(str(DEMO))
    props = {p.key: p.value for p in model.metadata_props}
    props["whaleid.version"] = version
    del model.metadata_props[:]
    helper.set_model_props(model, props)
    path = folder / f"demo-{version}.onnx"
    onnx.save(model, str(path))
    return path


def setup(args: argparse.Namespace, root: Path) -> Bench:
    settings = Settings(  # type: ignore[call-arg]
        data_dir=root / "data",
        database_url=create_database(args.postgres_url),
        reindex_chunk_size=args.chunk,
        embed_batch_size=args.batch,
        onnx_threads=args.threads,
        _env_file=None,
    )
    settings.ensure_dirs()
    migrate.upgrade(settings.sqlalchemy_url)
    gallery = args.gallery or root / "gallery"
    started = time.perf_counter()
    if not (gallery / "queries.csv").exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "training.synthetic",
                str(gallery),
                "--individuals",
                str(args.individuals),
                "--photos",
                "5",
                "--queries",
                "1",
                "--unseen",
                str(max(args.individuals // 10, 1)),
                "--seed",
                "7",
                "--size",
                "160",
            ],
            check=True,
        )
        log.info("synthetic gallery rendered in %.0f s", time.perf_counter() - started)
    factory = make_sessionmaker(make_engine(settings.sqlalchemy_url))
    old = register_model(settings, factory, DEMO)
    activate_model(settings, factory, old.id)
    embedder = Embedder(settings.data_dir / old.file_path, threads=args.threads)
    CatalogueImport(settings, factory, embedder, old.id).run(
        gallery / "catalogue.csv", gallery / "images"
    )
    return Bench(settings, factory, gallery, old.id)


def stored_photos(bench: Bench) -> list[Path]:
    return sorted((bench.settings.photos_dir).rglob("*.*"))


def raw_throughput(bench: Bench, model_path: Path) -> tuple[float, float]:
    """Photos/s of the bare embedder on batches decoded and preprocessed beforehand, and of
    decoding + preprocessing alone on one thread (what the re-index adds)."""
    s = bench.settings
    embedder = Embedder(model_path, threads=s.onnx_threads, max_batch_size=s.embed_batch_size)
    spec = embedder.contract.preprocessing
    files = [p.read_bytes() for p in stored_photos(bench)]
    started = time.perf_counter()
    batch = np.stack(
        [
            to_model_input(
                decode_photo(
                    data, max_pixels=s.max_image_pixels, target_size=spec.input_size
                ).image,
                spec,
            )
            for data in files
        ]
    )
    decode_rate = len(files) / (time.perf_counter() - started)
    embedder.embed(batch[: s.embed_batch_size])
    started = time.perf_counter()
    embedder.embed(batch)
    return len(batch) / (time.perf_counter() - started), decode_rate


def reindex_throughput(bench: Bench, model_id: int) -> dict[str, float]:
    """One in-process worker re-indexes; photos/s over the embedding chunks, and the finish."""
    s, factory = bench.settings, bench.factory
    job = start_reindex(s, factory, model_id, actor="bench")
    worker = Worker(factory, worker_handlers(s, factory, Embedders(s, factory)))
    started = time.perf_counter()
    embedded_at = None
    while worker.run_once():
        if embedded_at is None:
            with factory() as session:
                left = (
                    session.query(JobChunk)
                    .filter(
                        JobChunk.job_id == job.id, JobChunk.phase == 0, JobChunk.state != "done"
                    )
                    .count()
                )
            if not left:
                embedded_at = time.perf_counter()
    finished = time.perf_counter()
    assert embedded_at is not None
    with factory() as session:
        p = progress(session, get_job(session, job.id, COMMAND_LINE))
    assert p.state == "succeeded", p
    return {
        "photos": p.total,
        "photos_per_s": p.total / (embedded_at - started),
        "finish_s": finished - embedded_at,
        "shadow": p.result["shadow"] if p.result else {},
    }


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--postgres-url", required=True)
    parser.add_argument("--individuals", type=int, default=300)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--lease", type=float, default=5.0)
    parser.add_argument("--gallery", type=Path, help="render the gallery here once, reuse it")
    parser.add_argument("--rounds", type=int, default=3, help="re-index runs for throughput")
    parser.add_argument("--kill-chunk", type=int, default=64, help="chunk size of the kill run")
    parser.add_argument("--out", type=Path, default=Path("build/bench-reindex.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    results: dict[str, Any] = {
        "model": "demo/whaleid-demo.onnx",
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    with tempfile.TemporaryDirectory(prefix="whaleid-bench-") as tmp:
        root = Path(tmp)
        bench = setup(args, root)
        new_path = retrained_copy(root, "retrained")
        new_id = register_model(bench.settings, bench.factory, new_path).id
        keys = make_keys(bench.settings)
        ports = [free_port(), free_port()]
        servers = [serve_process(bench.settings, p, WHALEID_WORKER="false") for p in ports]
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        try:
            results["confirmations"] = confirm_queries(urls[0], keys["curator"], bench.gallery)
            # Alternate raw and re-index runs (a fresh model copy each), so machine load hits
            # both alike; the ratio is taken against the two raw runs around each re-index.
            measured = [raw_throughput(bench, new_path)]
            rounds = []
            for r in range(args.rounds):
                model_id = new_id
                if r:
                    copy = retrained_copy(root, f"round{r}")
                    model_id = register_model(bench.settings, bench.factory, copy).id
                rounds.append(reindex_throughput(bench, model_id))
                measured.append(raw_throughput(bench, new_path))
            raws = [m[0] for m in measured]
            ratios = [
                x["photos_per_s"] / ((raws[i] + raws[i + 1]) / 2) for i, x in enumerate(rounds)
            ]
            reindex = rounds[0]
            results["throughput"] = {
                "raw_photos_per_s": raws,
                "decode_photos_per_s_one_thread": [m[1] for m in measured],
                "reindex_photos_per_s": [x["photos_per_s"] for x in rounds],
                "ratios": ratios,
                "median_ratio": float(np.median(ratios)),
                "photos": reindex["photos"],
                "finish_s": [x["finish_s"] for x in rounds],
            }
            results["shadow"] = reindex["shadow"]
            log.info("throughput: %s", results["throughput"])
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
                [("activate", activate), ("rollback", rollback)],  # type: ignore[list-item]
            )
            log.info("switch: %s", results["switch"])
        finally:
            for s in servers:
                s.terminate()
                s.wait(timeout=30)
        bench.settings.reindex_chunk_size = args.kill_chunk
        third = register_model(bench.settings, bench.factory, retrained_copy(root, "retrained-b"))
        results["killed_worker"] = killed_worker(bench, third.id, args.lease)
        log.info("killed worker: %s", results["killed_worker"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
