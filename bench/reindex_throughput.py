"""The throughput half of ``bench/reindex.py``: a fresh PostgreSQL database and data directory
with a synthetic gallery imported under the demo model, "retrained" copies of a model, and
re-index throughput against decode + preprocess + embed done serially on the same photos."""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import psycopg
from onnx import helper
from PIL import Image as PILImage
from sqlalchemy import select

from bench._common import DEMO_MODEL
from service.access.auth import COMMAND_LINE
from service.catalogue.imports import CatalogueImport
from service.db import migrate
from service.db.tables import (
    JobChunk,
    Model,
    make_engine,
    make_sessionmaker,
    utcnow,
)
from service.imaging import decode_photo, to_model_input
from service.jobs.queue import Worker, aware, get_job, progress
from service.models.registry import register_model
from service.models.reindex import (
    Embedders,
    missing_images,
    start_reindex,
    worker_handlers,
)
from service.models.switch import activate_model
from service.onnx.embedder import Embedder
from service.settings import Settings
from service.store.photos import PhotoStore

log = logging.getLogger("bench.reindex")
DEMO = DEMO_MODEL


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
    started_at = utcnow()
    started = time.perf_counter()
    while worker.run_once():
        pass
    finished = time.perf_counter()
    with factory() as session:
        # The embedding chunks end when the last phase (catch up, index, evaluate) is claimed:
        # read from the database afterwards, not polled, so the bench adds no work of its own.
        finish_leased = session.scalar(
            select(JobChunk.leased_at).where(JobChunk.job_id == job.id, JobChunk.phase == 1)
        )
    assert finish_leased is not None
    embedded_s = (aware(finish_leased) - started_at).total_seconds()
    embedded_at = started + embedded_s
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
