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
from PIL import Image as PILImage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import setup_logging  # noqa: E402
from service.access.auth import COMMAND_LINE  # noqa: E402
from service.catalogue.imports import CatalogueImport  # noqa: E402
from service.db import migrate  # noqa: E402
from service.db.tables import (  # noqa: E402
    JobChunk,
    Model,  # noqa: E402
    make_engine,
    make_sessionmaker,
)
from service.imaging import decode_photo, to_model_input  # noqa: E402
from service.jobs.queue import Worker, get_job, progress  # noqa: E402
from service.models.registry import register_model  # noqa: E402
from service.models.reindex import (  # noqa: E402
    Embedders,
    missing_images,
    start_reindex,
    worker_handlers,
)
from service.models.switch import activate_model  # noqa: E402
from service.onnx.embedder import Embedder  # noqa: E402
from service.settings import Settings  # noqa: E402
from service.store.photos import PhotoStore  # noqa: E402
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


def retrained_copy(folder: Path, version: str, source: Path = DEMO) -> Path:
    """``source`` under another version: another file, another model."""
    model = onnx.load(str(source))
    props = {p.key: p.value for p in model.metadata_props}
    props["whaleid.version"] = version
    del model.metadata_props[:]
    helper.set_model_props(model, props)
    path = folder / f"{source.stem}-{version}.onnx"
    onnx.save(model, str(path))
    return path


def render_gallery(gallery: Path, individuals: int, photo_side: int) -> None:
    """The synthetic catalogue, rendered at 160 px; with ``photo_side``, each photo is then
    enlarged to that side with sensor-like noise and saved as a quality-90 JPEG, so that decoding
    one costs what decoding a camera photo does (rendering at that size would take minutes)."""
    started = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "training.synthetic",
            str(gallery),
            "--individuals",
            str(individuals),
            "--photos",
            "5",
            "--queries",
            "1",
            "--unseen",
            str(max(individuals // 10, 1)),
            "--seed",
            "7",
            "--size",
            "160",
        ],
        check=True,
    )
    if photo_side:
        rng = np.random.default_rng(7)
        for path in sorted((gallery / "images").iterdir()):
            with PILImage.open(path) as small:
                big = np.asarray(small.convert("RGB").resize((photo_side, photo_side)), np.float32)
            noisy = big + rng.normal(0, 6, big.shape)
            PILImage.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(path, "JPEG", quality=90)
    log.info("synthetic gallery rendered in %.0f s", time.perf_counter() - started)


def setup(
    args: argparse.Namespace, root: Path, gallery: Path, individuals: int, photo_side: int = 0
) -> Bench:
    """A fresh database and data directory with ``gallery`` imported under the demo model,
    which is active."""
    settings = Settings(
        data_dir=root / "data",
        database_url=create_database(args.postgres_url),
        reindex_chunk_size=args.chunk,
        embed_batch_size=args.batch,
        onnx_threads=args.threads,
        _env_file=None,
    )
    settings.ensure_dirs()
    migrate.upgrade(settings.sqlalchemy_url)
    if not (gallery / "queries.csv").exists():
        render_gallery(gallery, individuals, photo_side)
    factory = make_sessionmaker(make_engine(settings.sqlalchemy_url))
    old = register_model(settings, factory, DEMO)
    activate_model(settings, factory, old.id)
    embedder = Embedder(settings.data_dir / old.file_path, threads=args.threads)
    CatalogueImport(settings, factory, embedder, old.id).run(
        gallery / "catalogue.csv", gallery / "images"
    )
    return Bench(settings, factory, gallery, old.id)


def gallery_photos(bench: Bench, model_id: int) -> tuple[list[bytes], int]:
    """The bytes of the photos a re-index of ``model_id`` embeds (read into memory), and how
    many there are."""
    with bench.factory() as session:
        rows = missing_images(session, model_id)
    store = PhotoStore.open(bench.settings)
    return [store.read(path) for _, path in rows], len(rows)


def serial_throughput(bench: Bench, file_path: str, photos: list[bytes], batch: int) -> float:
    """The baseline: photos/s of decode + preprocess + embed done one after another on the
    calling thread, batch by batch, on photos already in memory, with the embedder a re-index
    worker loads (same model file, threads and batch size; idle threads do not spin)."""
    s = bench.settings
    s.embed_batch_size = batch
    embedder = Embedder.for_model(s, file_path, spinning=False)
    spec = embedder.contract.preprocessing

    def run(data: list[bytes]) -> None:
        for start in range(0, len(data), batch):
            pixels = [
                to_model_input(
                    decode_photo(
                        d, max_pixels=s.max_image_pixels, target_size=spec.input_size
                    ).image,
                    spec,
                )
                for d in data[start : start + batch]
            ]
            embedder.embed(np.stack(pixels))

    run(photos[:batch])  # onnxruntime's first run allocates: not part of either figure
    started = time.perf_counter()
    run(photos)
    return len(photos) / (time.perf_counter() - started)


def reindex_throughput(bench: Bench, model_id: int, batch: int) -> dict[str, float]:
    """One in-process worker re-indexes with batches of ``batch``; photos/s over the embedding
    chunks (reading from the photo store, the pipeline, the database writes), and the finish.
    The worker has loaded the model and run it once beforehand, as the baseline has."""
    s, factory = bench.settings, bench.factory
    s.embed_batch_size = batch
    job = start_reindex(s, factory, model_id, actor="bench")
    embedders = Embedders(s, factory)
    photos = embedders(model_id)
    size = photos.embedder.contract.preprocessing.input_size
    photos.embedder.embed(np.zeros((batch, size, size, 3), np.float32))
    worker = Worker(factory, worker_handlers(s, factory, embedders))
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
    assert p.state == "succeeded" and not p.failed, p
    return {
        "photos": p.total,
        "photos_per_s": p.total / (embedded_at - started),
        "finish_s": finished - embedded_at,
        "decoders": photos.decoders,
        "readers": photos.readers,
        "ahead": photos.ahead,
        "shadow": p.result["shadow"] if p.result else {},
    }


def spread(values: list[float]) -> dict[str, float]:
    return {"median": float(np.median(values)), "min": min(values), "max": max(values)}


def throughput(
    bench: Bench, source: Path, root: Path, batches: list[int], rounds: int
) -> dict[str, Any]:
    """Re-index against the serial baseline on the same photos, per batch size. Baseline and
    re-index runs alternate (each re-index on a fresh copy of the model, so it embeds every
    photo again); each re-index is divided by the mean of the baselines either side of it, so
    machine load hits both alike."""
    copies = [
        retrained_copy(root, f"{source.stem}-{r}-{b}", source)
        for r in range(rounds)
        for b in batches
    ]
    ids = [register_model(bench.settings, bench.factory, c).id for c in copies]
    with bench.factory() as session:
        file_path = session.get_one(Model, ids[0]).file_path
    photos, count = gallery_photos(bench, ids[0])
    out: dict[str, Any] = {"photos": count, "by_batch": {}}
    base = {b: [serial_throughput(bench, file_path, photos, b)] for b in batches}
    runs: dict[int, list[dict[str, float]]] = {b: [] for b in batches}
    for r in range(rounds):
        for i, b in enumerate(batches):
            runs[b].append(reindex_throughput(bench, ids[r * len(batches) + i], b))
            base[b].append(serial_throughput(bench, file_path, photos, b))
            log.info(
                "%s round %d batch %d: re-index %.1f photos/s, baseline %.1f / %.1f",
                source.name,
                r + 1,
                b,
                runs[b][-1]["photos_per_s"],
                base[b][-2],
                base[b][-1],
            )
    for b in batches:
        rates = [x["photos_per_s"] for x in runs[b]]
        ratios = [x / ((base[b][i] + base[b][i + 1]) / 2) for i, x in enumerate(rates)]
        out["by_batch"][str(b)] = {
            "baseline_photos_per_s": base[b],
            "reindex_photos_per_s": rates,
            "ratios": ratios,
            "baseline": spread(base[b]),
            "reindex": spread(rates),
            "ratio": spread(ratios),
            "finish_s": [x["finish_s"] for x in runs[b]],
            "pipeline": {k: runs[b][0][k] for k in ("decoders", "readers", "ahead")},
        }
    out["shadow"] = runs[batches[0]][0]["shadow"]
    return out


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
    parser.add_argument("--chunk", type=int, default=256)
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
