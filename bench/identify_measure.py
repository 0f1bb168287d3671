"""The measurements of ``bench/identify.py``: synthetic galleries and photos, the gallery
search and kNN head, the bare embedder, and ``POST /identify`` end to end against a real
``whaleid serve``. The figures go to ``bench/identify_report.py``."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import gc
import logging
import math
import os
import platform
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import faiss
import httpx
import numpy as np
from sqlalchemy import insert
from sqlalchemy.orm import Session, sessionmaker

from service.access.auth import create_key
from service.db import migrate
from service.db import tables as service_db
from service.db.tables import (
    Embedding,
    Image,
    Individual,
    make_engine,
    make_sessionmaker,
    transaction,
)
from service.gallery.index import GalleryIndex, IndexPlan
from service.imaging import decode_photo, to_model_input
from service.knn import Neighbour, rank_candidates
from service.models.registry import register_model
from service.models.switch import activate_model
from service.onnx.embedder import Embedder
from service.settings import Settings

log = logging.getLogger("bench.identify")
T = TypeVar("T")

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = Path("/work/bench-cache/effb5-380.onnx")
DIM = 512
K = 50
CUTOFF = 0.62
IVF_THRESHOLD: int = Settings.model_fields["ivf_threshold"].default
CORES = os.cpu_count() or 1

# Synthetic gallery: Happywhale's train set has 51,033 photos of 15,587 individuals (3.3 each).
PHOTOS_PER_INDIVIDUAL = 3.3
N_SPECIES = 30
LATENT_DIM = 64  # "lowrank": embeddings live near a 64-dimensional subspace of the 512
SPECIES_WEIGHT = 0.5  # share of an individual's latent centre that its species explains
POSE_NOISE = 0.5  # per-photo variation inside the latent space (pose, light, water)
ISO_NOISE = 0.15  # per-photo variation in all 512 dimensions
PHOTO_NOISE = 0.6  # "isotropic": photo = random unit centre + 0.6 * random unit direction

# The 3-megapixel query photo.
JPEG_SIZE = (2000, 1500)
JPEG_NOISE = 11.0
JPEG_QUALITY = 90
SMALL_SIZE = (1000, 750)  # the same photo resized by the client before uploading

TARGETS = {
    "search_head_50k_1core_ms": 5.0,
    "search_head_1m_ms": 20.0,
    "recall_1m": 0.98,
    # /identify p50 over the unavoidable work (decode + preprocess + embed), same photo, same run
    "e2e_ratio": 1.05,
    # throughput under 1, 4 and 16 clients over the bare pipeline's on the same cores
    "throughput_ratio": 0.95,
}


@dataclass(frozen=True)
class Profile:
    """How much work a run does: the full run or the ``--quick`` smoke run."""

    e2e_sizes: tuple[int, ...]
    search_sizes: tuple[int, ...]  # the first is the "50k" row, the last the "1M" row
    sweep: tuple[int, ...]  # nprobe values tried on the largest IVF gallery
    sklearn_sizes: tuple[int, ...]
    stress_size: int  # isotropic gallery (0: skip)
    queries: int  # query vectors for recall
    timed_queries: int  # of which timed one by one
    requests: int  # sequential /identify requests per gallery size
    embed_reps: int
    concurrency: tuple[int, ...]
    requests_per_level: int  # per concurrency level and round, all clients together
    sklearn_reps_small: int
    sklearn_reps_large: int


FULL = Profile(
    e2e_sizes=(1_000, 50_000, 1_000_000),
    search_sizes=(50_000, 200_000, 1_000_000),
    sweep=(64, 128, 256, 384, 512, 768, 1024, 1536),
    sklearn_sizes=(50_000, 1_000_000),
    stress_size=1_000_000,
    queries=300,
    timed_queries=200,
    requests=60,
    embed_reps=40,
    concurrency=(1, 4, 16),
    requests_per_level=32,
    sklearn_reps_small=30,
    sklearn_reps_large=5,
)
QUICK = Profile(
    e2e_sizes=(1_000, 20_000),
    search_sizes=(20_000, 200_000),
    sweep=(64, 384, 512, 768),
    sklearn_sizes=(20_000,),
    stress_size=200_000,
    queries=100,
    timed_queries=60,
    requests=10,
    embed_reps=10,
    concurrency=(1, 4),
    requests_per_level=8,
    sklearn_reps_small=10,
    sklearn_reps_large=2,
)


# --------------------------------------------------------------------------- statistics


def pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else math.nan


def p50(values: Sequence[float]) -> float:
    return pct(values, 50)


def p90(values: Sequence[float]) -> float:
    return pct(values, 90)


@contextlib.contextmanager
def stopwatch(label: str) -> Iterator[dict[str, float]]:
    out: dict[str, float] = {}
    start = time.perf_counter()
    log.info("%s ...", label)
    try:
        yield out
    finally:
        out["s"] = time.perf_counter() - start
        log.info("%s: %.1f s", label, out["s"])


# --------------------------------------------------------------------------- machine load


def _cpu_seconds() -> tuple[float, float]:
    """(CPU seconds the whole machine has been busy, CPU seconds of this process and its
    finished children). The difference over an interval is what other processes used."""
    ticks = os.sysconf("SC_CLK_TCK")
    fields = Path("/proc/stat").read_text().split("\n")[0].split()[1:]
    values = [int(v) for v in fields]
    idle = values[3] + values[4]  # idle + iowait
    busy = (sum(values[:8]) - idle) / ticks  # user..steal, without guest (counted in user)
    own = os.times()
    return busy, own.user + own.system + own.children_user + own.children_system


@contextlib.contextmanager
def load_meter(into: dict[str, Any], key: str, server: Service | None = None) -> Iterator[None]:
    """Record under ``into[key]`` how many cores other processes kept busy meanwhile (the
    server subprocess, if given, counts as ours)."""
    busy0, own0 = _cpu_seconds()
    server0 = server.cpu_seconds() if server else 0.0
    t0 = time.perf_counter()
    try:
        yield
    finally:
        busy1, own1 = _cpu_seconds()
        server1 = server.cpu_seconds() if server else 0.0
        wall = time.perf_counter() - t0
        others = (busy1 - busy0) - (own1 - own0) - (server1 - server0)
        into[key] = max(0.0, others / wall) if wall > 0 else math.nan


def wait_for_idle(max_wait_s: float, threshold: float = 0.15, window_s: float = 10.0) -> float:
    """Wait (up to ``max_wait_s``) until other processes use under ``threshold`` cores over
    ``window_s``; return their load over the last window."""
    start = time.monotonic()
    said = False
    while True:
        probe: dict[str, Any] = {}
        with load_meter(probe, "others"):
            time.sleep(window_s)
        waited = time.monotonic() - start
        if probe["others"] < threshold or waited >= max_wait_s:
            WAITED_S[0] += waited if said else 0.0
            if said:
                log.info(
                    "waited %.0f s; other processes now use %.2f cores", waited, probe["others"]
                )
            return float(probe["others"])
        if not said:
            log.info("other processes use %.2f cores; waiting for a quiet machine", probe["others"])
            said = True


# How long each timed phase may wait for other processes to leave the CPUs alone (--wait-idle);
# 0: measure at once, whatever the load.
QUIET_WAIT_S = 0.0
WAITED_S = [0.0]  # time spent waiting for other processes, over the whole run
NOISY = 0.25  # cores used by other processes above which a phase is measured again


def guarded(label: str, measure: Callable[[], T], load_of: Callable[[T], float]) -> T:
    """Run ``measure``; with --wait-idle, first wait for a quiet machine, and measure once more
    if other processes were busy meanwhile."""
    result = measure()
    for _ in range(2 if QUIET_WAIT_S > 0 else 0):
        load = load_of(result)
        if load <= NOISY:
            break
        log.warning("%s: other processes used %.2f cores; measuring again", label, load)
        wait_for_idle(QUIET_WAIT_S, window_s=5.0)
        result = measure()
    return result


# --------------------------------------------------------------------------- synthetic data


@dataclass
class Synthetic:
    """A synthetic gallery: unit vectors, the individual of each, and fresh query photos of
    individuals that are in the gallery."""

    structure: str
    vectors: np.ndarray
    owners: np.ndarray
    species: np.ndarray  # species index of each individual
    queries: np.ndarray
    query_owners: np.ndarray

    @property
    def n_individuals(self) -> int:
        return len(self.species)

    def label(self, position: int) -> str:
        return f"ind-{int(self.owners[position]):07d}"


def _unit(v: np.ndarray) -> np.ndarray:
    out: np.ndarray = v / np.linalg.norm(v, axis=-1, keepdims=True)
    return out.astype(np.float32, copy=False)


def synthetic_gallery(n: int, n_queries: int, *, structure: str, seed: int = 0) -> Synthetic:
    """``n`` photo embeddings of ``n / 3.3`` individuals, clustered like a photo-ID gallery.

    ``lowrank`` (the realistic case): 30 species centres and per-individual centres in a
    64-dimensional latent space (an individual = 0.5 species + 0.87 own direction), a photo = its
    individual's centre + pose noise (norm 0.5) in that space, mapped into 512 dimensions by a
    random orthonormal basis, + isotropic noise (norm 0.15), L2-normalised. Learnt embeddings have
    a far lower intrinsic dimension than their width; this is what makes IVF work on them.

    ``isotropic`` (the stress case): individuals = random unit centres in all 512 dimensions,
    photo = centre + 0.6 * random unit direction, renormalised. Apart from a photo's own
    individual, its neighbours are then random points: the worst case for any partitioning index.
    """
    rng = np.random.default_rng(seed)
    n_ind = max(1, round(n / PHOTOS_PER_INDIVIDUAL))
    species = rng.integers(0, N_SPECIES, n_ind)
    if structure == "lowrank":
        basis = np.linalg.qr(rng.standard_normal((DIM, LATENT_DIM)))[0].astype(np.float32)
        species_centres = _unit(rng.standard_normal((N_SPECIES, LATENT_DIM), dtype=np.float32))
        own = _unit(rng.standard_normal((n_ind, LATENT_DIM), dtype=np.float32))
        centres = _unit(
            SPECIES_WEIGHT * species_centres[species] + math.sqrt(1 - SPECIES_WEIGHT**2) * own
        )

        def photos(owners: np.ndarray) -> np.ndarray:
            pose = _unit(rng.standard_normal((len(owners), LATENT_DIM), dtype=np.float32))
            latent = _unit(centres[owners] + POSE_NOISE * pose)
            iso = _unit(rng.standard_normal((len(owners), DIM), dtype=np.float32))
            return _unit(latent @ basis.T + ISO_NOISE * iso)

    elif structure == "isotropic":
        centres = _unit(rng.standard_normal((n_ind, DIM), dtype=np.float32))

        def photos(owners: np.ndarray) -> np.ndarray:
            noise = _unit(rng.standard_normal((len(owners), DIM), dtype=np.float32))
            return _unit(centres[owners] + PHOTO_NOISE * noise)

    else:
        raise ValueError(f"unknown structure {structure!r}")
    owners = rng.integers(0, n_ind, n)
    vectors = np.empty((n, DIM), dtype=np.float32)
    for start in range(0, n, 100_000):
        vectors[start : start + 100_000] = photos(owners[start : start + 100_000])
    query_owners = owners[rng.integers(0, n, n_queries)]
    return Synthetic(structure, vectors, owners, species, photos(query_owners), query_owners)


def make_jpeg(size: tuple[int, int] = JPEG_SIZE, seed: int = 0) -> bytes:
    """A ~1 MB, 3-megapixel JPEG with photo-like content: a sky/sea gradient, shapes, and sensor
    noise (noise is what makes real photos large and slow to decode)."""
    from PIL import Image as PILImage
    from PIL import ImageDraw

    w, h = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack(
        [40 + 80 * xx / w + 30 * yy / h, 70 + 60 * yy / h, 110 + 90 * (1 - yy / h)], axis=-1
    )
    image = PILImage.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(40):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        box = (x0, y0, x0 + int(rng.integers(20, 400)), y0 + int(rng.integers(20, 300)))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, JPEG_NOISE, (h, w, 3))
    image = PILImage.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")
    import io

    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def downscaled(jpeg: bytes, size: tuple[int, int]) -> bytes:
    """The photo as a client would send it after resizing it itself (Lanczos, same quality)."""
    import io

    from PIL import Image as PILImage

    buf = io.BytesIO()
    with PILImage.open(io.BytesIO(jpeg)) as image:
        image.resize(size, PILImage.Resampling.LANCZOS).save(buf, "JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def unique_variant(jpeg: bytes, n: int) -> bytes:
    """The same photo with a JPEG comment segment holding ``n``: new bytes (so a new stored photo
    and database row, as with real traffic) but identical pixels and decode cost."""
    payload = f"whaleid bench request {n}".encode()
    segment = b"\xff\xfe" + (len(payload) + 2).to_bytes(2, "big") + payload
    return jpeg[:2] + segment + jpeg[2:]


# --------------------------------------------------------------------------- search benchmark


def _answer(syn: Synthetic, distances: np.ndarray, ids: np.ndarray) -> list[str]:
    """The kNN head's five labels for one search result (ids are gallery positions + 1)."""
    neighbours = [
        Neighbour(syn.label(int(i) - 1), float(d), int(i))
        for d, i in zip(distances, ids, strict=True)
    ]
    return [c.label for c in rank_candidates(neighbours, cutoff=CUTOFF, ranking="vote")]


def _search_head(syn: Synthetic, index: GalleryIndex, q: np.ndarray) -> tuple[float, float]:
    """One query through GalleryIndex.search and the kNN head; (search ms, head ms)."""
    t0 = time.perf_counter()
    distances, ids = index.search(q, K)
    t1 = time.perf_counter()
    _answer(syn, distances, ids)
    t2 = time.perf_counter()
    return (t1 - t0) * 1000, (t2 - t1) * 1000


def _quality(
    syn: Synthetic, index: GalleryIndex, truth_ids: np.ndarray, truth_answers: list[list[str]]
) -> dict[str, float]:
    """recall@50 and recall@5 against exact search, and how often the answer is the same as with
    exact search: its first label, and all five labels in order."""
    r50 = r5 = same = first = 0.0
    for j, q in enumerate(syn.queries):
        distances, ids = index.search(q, K)
        r50 += len(set(ids.tolist()) & set(truth_ids[j].tolist())) / K
        r5 += len(set(ids[:5].tolist()) & set(truth_ids[j][:5].tolist())) / 5
        answer = _answer(syn, distances, ids)
        same += answer == truth_answers[j]
        first += answer[0] == truth_answers[j][0]
    n = len(syn.queries)
    return {
        "recall50": r50 / n,
        "recall5": r5 / n,
        "top1_agreement": first / n,
        "answer_agreement": same / n,
    }


def _search_threads(index: GalleryIndex, threads: int) -> None:
    """Search with ``threads`` OpenMP threads. The service searches on the calling thread
    (``GalleryIndex.search_threads``, which ``search`` applies); this overrides it for one index."""
    faiss.omp_set_num_threads(threads)
    index.search_threads = threads


def _timed(syn: Synthetic, index: GalleryIndex, threads: int, count: int) -> dict[str, float]:
    _search_threads(index, threads)
    try:
        for q in syn.queries[:5]:  # warm-up
            index.search(q, K)
        search, head, both = [], [], []
        for q in syn.queries[:count]:
            s, h = _search_head(syn, index, q)
            search.append(s)
            head.append(h)
            both.append(s + h)
    finally:
        faiss.omp_set_num_threads(CORES)
        index.__dict__.pop("search_threads", None)
    return {
        "search_p50": p50(search),
        "search_p90": p90(search),
        "head_p50": p50(head),
        "total_p50": p50(both),
        "total_p90": p90(both),
    }


@dataclass
class SearchResult:
    n: int
    structure: str
    plan: IndexPlan
    build_s: float
    exact_batch_ms: float
    exact_one_core_p50: float
    quality: dict[str, float]
    one_core: dict[str, float]
    all_cores: dict[str, float]
    sweep: list[dict[str, float]] = field(default_factory=list)
    sklearn: dict[str, float] = field(default_factory=dict)
    load: dict[str, float] = field(default_factory=dict)


def bench_search(
    syn: Synthetic,
    profile: Profile,
    *,
    sweep: Sequence[int] = (),
    with_sklearn: bool = False,
    timed: bool = True,
) -> SearchResult:
    n = len(syn.vectors)
    ids = np.arange(1, n + 1, dtype=np.int64)
    faiss.omp_set_num_threads(CORES)
    with stopwatch(f"GalleryIndex.build({n:,} {syn.structure})") as built:
        index = GalleryIndex.build(ids, syn.vectors, DIM, IVF_THRESHOLD)
    exact = faiss.IndexFlatIP(DIM)
    exact.add(syn.vectors)
    t0 = time.perf_counter()
    scores, positions = exact.search(syn.queries, K)
    exact_batch_ms = (time.perf_counter() - t0) * 1000 / len(syn.queries)
    truth_ids = positions + 1
    truth_answers = [_answer(syn, 1.0 - scores[j], truth_ids[j]) for j in range(len(syn.queries))]
    quality = _quality(syn, index, truth_ids, truth_answers)
    load: dict[str, float] = {}
    one: dict[str, float] = {}
    every: dict[str, float] = {}
    exact_one = math.nan
    if timed:

        def measure() -> tuple[dict[str, float], dict[str, float], float, float]:
            meter: dict[str, float] = {}
            with load_meter(meter, "timed"):
                one = _timed(syn, index, 1, profile.timed_queries)
                every = _timed(syn, index, CORES, profile.timed_queries)
                exact_one = _exact_one_core(syn, exact, 20 if n > 200_000 else 50)
            return one, every, exact_one, meter["timed"]

        one, every, exact_one, load["timed"] = guarded(
            f"search timing at {n:,}", measure, lambda r: r[3]
        )
    log.info(
        "%s %s n=%d: build %.1f s, one core p50 %.2f ms, recall@50 %.4f",
        syn.structure,
        index.plan,
        n,
        built["s"],
        one.get("total_p50", math.nan),
        quality["recall50"],
    )
    result = SearchResult(
        n, syn.structure, index.plan, built["s"], exact_batch_ms, exact_one, quality, one, every
    )
    result.load = load
    if index.plan.kind == "ivf":
        for nprobe in sorted({*sweep, index.plan.nprobe}):
            if nprobe > index.plan.nlist:
                continue
            index.index.nprobe = nprobe
            row = {"nprobe": nprobe, **_quality(syn, index, truth_ids, truth_answers)}
            if timed:
                row.update(_timed(syn, index, 1, min(100, profile.timed_queries)))
            log.info("nprobe %d: %s", nprobe, {k: round(v, 4) for k, v in row.items()})
            result.sweep.append(row)
        index.index.nprobe = index.plan.nprobe
    if with_sklearn:
        result.sklearn = bench_sklearn(syn, exact, index, profile)
    return result


def _exact_one_core(syn: Synthetic, exact: Any, count: int) -> float:
    """p50 of one query against ``IndexFlatIP`` (a full exact scan) on one core."""
    faiss.omp_set_num_threads(1)
    try:
        times = []
        for q in syn.queries[: count + 2]:
            t0 = time.perf_counter()
            exact.search(q[np.newaxis], K)
            times.append((time.perf_counter() - t0) * 1000)
    finally:
        faiss.omp_set_num_threads(CORES)
    return p50(times[2:])


def bench_sklearn(
    syn: Synthetic, exact: Any, index: GalleryIndex, profile: Profile
) -> dict[str, float]:
    """scikit-learn brute-force cosine kNN against faiss on the same vectors, one query at a time
    (what /identify does) and as a batch of 50 queries."""
    from sklearn.neighbors import NearestNeighbors

    n = len(syn.vectors)
    reps = profile.sklearn_reps_small if n <= 100_000 else profile.sklearn_reps_large
    with stopwatch(f"scikit-learn NearestNeighbors fit + {reps} queries at {n:,}"):
        nn = NearestNeighbors(n_neighbors=K, metric="cosine", algorithm="brute").fit(syn.vectors)
        nn.kneighbors(syn.queries[:1], K)  # warm-up
        sk_times, overlap = [], []
        for j in range(reps):
            q = syn.queries[j : j + 1]
            t0 = time.perf_counter()
            _, sk_ids = nn.kneighbors(q, K)
            sk_times.append((time.perf_counter() - t0) * 1000)
            _, fa_ids = exact.search(q, K)
            overlap.append(len(set(sk_ids[0].tolist()) & set(fa_ids[0].tolist())) / K)
        batch = syn.queries[:50]
        t0 = time.perf_counter()
        nn.kneighbors(batch, K)
        sk_batch = (time.perf_counter() - t0) * 1000 / len(batch)
    faiss.omp_set_num_threads(CORES)
    t0 = time.perf_counter()
    exact.search(batch, K)
    fa_batch = (time.perf_counter() - t0) * 1000 / len(batch)
    faiss.omp_set_num_threads(1)
    flat_times, index_times = [], []
    for q in syn.queries[: max(reps, 30)]:
        t0 = time.perf_counter()
        exact.search(q[np.newaxis], K)
        t1 = time.perf_counter()
        index.search(q, K)
        t2 = time.perf_counter()
        flat_times.append((t1 - t0) * 1000)
        index_times.append((t2 - t1) * 1000)
    faiss.omp_set_num_threads(CORES)
    result = {
        "sklearn_p50": p50(sk_times),
        "faiss_flat_p50": p50(flat_times),
        "faiss_index_p50": p50(index_times),
        "sklearn_batch_per_query": sk_batch,
        "faiss_flat_batch_per_query": fa_batch,
        "overlap": float(np.mean(overlap)),
        "reps": reps,
    }
    log.info("sklearn vs faiss at %d: %s", n, {k: round(v, 3) for k, v in result.items()})
    del nn
    gc.collect()
    return result


# --------------------------------------------------------------------------- the live service


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def insert_gallery(factory: sessionmaker[Session], model_id: int, syn: Synthetic) -> None:
    """The synthetic gallery as rows of the real schema: individuals, confirmed catalogue images
    (no files: the gallery is never re-embedded here), the model's embeddings, and the gallery
    change log entries a catalogue import writes."""
    n = len(syn.vectors)
    change_table = getattr(service_db, "GalleryChange", None)
    with transaction(factory) as session:
        session.execute(
            insert(Individual),
            [
                {"id": i + 1, "catalogue_id": f"ind-{i:07d}", "species": f"species-{s:02d}"}
                for i, s in enumerate(syn.species.tolist())
            ],
        )
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        with transaction(factory) as session:
            session.execute(
                insert(Image),
                [
                    {
                        "id": i + 1,
                        "content_hash": f"{i + 1:064x}",
                        "file_path": f"bench/{i + 1}.jpg",
                        "media_type": "image/jpeg",
                        "byte_size": 1_000_000,
                        "width": JPEG_SIZE[0],
                        "height": JPEG_SIZE[1],
                        "species": f"species-{int(syn.species[syn.owners[i]]):02d}",
                        "individual_id": int(syn.owners[i]) + 1,
                        "source": "catalogue",
                    }
                    for i in range(start, stop)
                ],
            )
            session.execute(
                insert(Embedding),
                [
                    {
                        "id": i + 1,
                        "image_id": i + 1,
                        "model_id": model_id,
                        "vector": syn.vectors[i].astype("<f4").tobytes(),
                    }
                    for i in range(start, stop)
                ],
            )
            if change_table is not None:
                session.execute(
                    insert(change_table),
                    [{"model_id": model_id, "image_id": i + 1} for i in range(start, stop)],
                )


@dataclass
class Service:
    """A data directory with the bench model active over a synthetic gallery, and (once
    started) ``whaleid serve`` on it in a subprocess."""

    root: Path
    settings: Settings
    key: str
    setup: dict[str, float]
    process: subprocess.Popen[bytes] | None = None
    url: str = ""

    @classmethod
    def create(cls, root: Path, model: Path, syn: Synthetic) -> Service:
        settings = Settings(data_dir=root / "data", _env_file=None)
        settings.ensure_dirs()
        migrate.upgrade(settings.sqlalchemy_url)
        engine = make_engine(settings.sqlalchemy_url)
        factory = make_sessionmaker(engine)
        setup: dict[str, float] = {}
        try:
            model_row = register_model(settings, factory, model)
            with stopwatch(f"insert {len(syn.vectors):,} gallery rows") as t:
                insert_gallery(factory, model_row.id, syn)
            setup["insert_s"] = t["s"]
            with stopwatch("activate_model (gallery index built from the database)") as t:
                # A search sets this thread's OpenMP count to 1: build as `whaleid models
                # add --activate` would, on a fresh thread's default of all cores.
                faiss.omp_set_num_threads(CORES)
                activate_model(settings, factory, model_row.id)
            setup["activate_s"] = t["s"]
            _, key = create_key(factory, "bench", "integration")
        finally:
            engine.dispose()
        return cls(root, settings, key, setup)

    def start(self, extra_env: dict[str, str] | None = None) -> None:
        port = free_port()
        env = {
            **os.environ,
            "WHALEID_DATA_DIR": str(self.settings.data_dir),
            "WHALEID_LOG_LEVEL": "WARNING",
            **(extra_env or {}),
        }
        env.pop("WHALEID_DATABASE_URL", None)
        logfile = (self.root / "server.log").open("ab")
        command = [sys.executable, "-m", "service.cli", "serve", "--no-migrate"]
        command += ["--port", str(port)]
        started = time.perf_counter()
        self.process = subprocess.Popen(
            command, cwd=self.root, env=env, stdout=logfile, stderr=subprocess.STDOUT
        )
        logfile.close()
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 900
        with httpx.Client(base_url=self.url, timeout=5) as client:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"the server exited; see {self.root / 'server.log'}")
                if time.monotonic() > deadline:
                    raise RuntimeError("the server did not become ready in 15 minutes")
                with contextlib.suppress(httpx.HTTPError):
                    if client.get("/ready").status_code == 200:
                        break
                time.sleep(0.2)
        self.setup["startup_s"] = time.perf_counter() - started
        log.info("server ready at %s in %.1f s", self.url, self.setup["startup_s"])

    def cpu_seconds(self) -> float:
        """CPU seconds the running server process has used so far."""
        if self.process is None or self.process.poll() is not None:
            return 0.0
        try:
            stat = Path(f"/proc/{self.process.pid}/stat").read_text()
        except OSError:
            return 0.0
        fields = stat.rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, timeout=120, headers={"Authorization": f"Bearer {self.key}"}
        )


_counter = 0
_counter_lock = threading.Lock()


def next_variant(jpeg: bytes) -> bytes:
    """The next fresh upload of ``jpeg`` (a new comment segment: a new photo, same pixels)."""
    global _counter
    with _counter_lock:
        _counter += 1
        n = _counter
    return unique_variant(jpeg, n)


def identify(client: httpx.Client, jpeg: bytes) -> tuple[float, dict[str, float]]:
    """One POST /identify of a fresh variant of ``jpeg``: (client-side ms, server stage ms)."""
    body = next_variant(jpeg)
    t0 = time.perf_counter()
    response = client.post("/identify", files={"photo": ("query.jpg", body, "image/jpeg")})
    elapsed = (time.perf_counter() - t0) * 1000
    response.raise_for_status()
    stages = {}
    for part in response.headers.get("server-timing", "").split(","):
        name, _, dur = part.strip().partition(";dur=")
        if name and dur:
            stages[name] = float(dur)
    return elapsed, stages


STAGES = ("decode", "preprocess", "embed", "search", "head", "database")


class BareEmbedder:
    """The model in the bench process, built as the service builds it: ``Embedder.embed`` of one
    preprocessed photo, and the work no service can skip (decode + preprocess + embed of a
    fresh upload, as the service decodes it), for timing next to the requests."""

    def __init__(self, model: Path, jpeg: bytes) -> None:
        defaults = Settings.model_fields
        self.embedder = Embedder(
            model,
            threads=defaults["onnx_threads"].default,
            max_batch_size=defaults["embed_batch_size"].default,
        )
        self.jpeg = jpeg
        self.max_pixels = defaults["max_image_pixels"].default
        self.spec = self.embedder.contract.preprocessing
        photo = decode_photo(jpeg, max_pixels=self.max_pixels, target_size=self.spec.input_size)
        self.pixels = to_model_input(photo.image, self.spec)[np.newaxis]
        for _ in range(3):
            self.embedder.embed(self.pixels)
            self.unavoidable(jpeg)

    def times(self, count: int) -> list[float]:
        out = []
        for _ in range(count):
            t0 = time.perf_counter()
            self.embedder.embed(self.pixels)
            out.append((time.perf_counter() - t0) * 1000)
        return out

    def unavoidable(self, upload: bytes) -> None:
        """Decode, preprocess and embed one upload, as ``Identifier`` does (same calls, same
        arguments), and nothing else."""
        photo = decode_photo(upload, max_pixels=self.max_pixels, target_size=self.spec.input_size)
        self.embedder.embed(to_model_input(photo.image, self.spec)[np.newaxis])

    def unavoidable_times(self, count: int) -> list[float]:
        """ms of ``unavoidable`` for ``count`` fresh variants of the photo (as the requests
        send them), one after another."""
        out = []
        for _ in range(count):
            upload = next_variant(self.jpeg)
            t0 = time.perf_counter()
            self.unavoidable(upload)
            out.append((time.perf_counter() - t0) * 1000)
        return out

    def unavoidable_throughput(self, clients: int, total: int) -> dict[str, float]:
        """``unavoidable`` from ``clients`` threads at once (one shared session, as in the
        service), ``total`` photos in all: photos per second and per-photo latency."""
        per_client = max(1, total // clients)
        uploads = [[next_variant(self.jpeg) for _ in range(per_client)] for _ in range(clients)]
        latencies: list[float] = []
        lock = threading.Lock()
        barrier = threading.Barrier(clients + 1)

        def worker(mine: list[bytes]) -> None:
            barrier.wait()
            for upload in mine:
                t0 = time.perf_counter()
                self.unavoidable(upload)
                with lock:
                    latencies.append((time.perf_counter() - t0) * 1000)

        wall = run_together([partial(worker, u) for u in uploads], barrier)
        return {
            "throughput": len(latencies) / wall,
            "p50": p50(latencies),
            "p99": pct(latencies, 99),
        }


def sequential(
    service: Service,
    jpeg: bytes,
    count: int,
    bare: BareEmbedder | None = None,
    block: int = 10,
) -> dict[str, Any]:
    """``count`` requests one after another. With ``bare``, blocks of ``block`` requests
    alternate with as many runs of the unavoidable work (decode + preprocess + embed of a fresh
    variant) and as many bare embeddings in the bench process (the server idle), so the ratio
    compares figures taken seconds apart."""
    totals: list[float] = []
    stages: dict[str, list[float]] = {s: [] for s in STAGES}
    health: list[float] = []
    bare_times: list[float] = []
    embed_times: list[float] = []
    round_ratios: list[float] = []
    load: dict[str, float] = {}
    with service.client() as client:
        for _ in range(3):  # warm-up (first requests pay for lazy imports and pools)
            identify(client, jpeg)
        with load_meter(load, "others", service):
            while len(totals) < count:
                size = min(block, count - len(totals))
                if bare is not None:
                    time.sleep(0.2)  # let the server's thread pools go idle
                    round_bare = bare.unavoidable_times(size)
                    bare_times += round_bare
                    embed_times += bare.times(size)
                round_totals = []
                for _ in range(size):
                    total, timing = identify(client, jpeg)
                    round_totals.append(total)
                    for s in STAGES:
                        stages[s].append(timing.get(s, math.nan))
                totals += round_totals
                if bare is not None:
                    round_ratios.append(p50(round_totals) / p50(round_bare))
        for _ in range(30):
            t0 = time.perf_counter()
            client.get("/health").raise_for_status()
            health.append((time.perf_counter() - t0) * 1000)
    server = [sum(v[i] for v in stages.values()) for i in range(count)]
    return {
        "total_p50": p50(totals),
        "total_p90": p90(totals),
        "total_p99": pct(totals, 99),
        "server_p50": p50(server),
        "outside_p50": p50([t - s for t, s in zip(totals, server, strict=True)]),
        "health_p50": p50(health),
        "stages": {s: {"p50": p50(v), "p90": p90(v)} for s, v in stages.items()},
        "requests": count,
        "others_cores": load["others"],
        # decode + preprocess + embed of the same photo, paired with the requests
        "bare_p50": p50(bare_times),
        "bare_embed_p50": p50(embed_times),
        "ratio": p50(totals) / p50(bare_times) if bare_times else math.nan,
        "round_ratio_min": min(round_ratios, default=math.nan),
        "round_ratio_max": max(round_ratios, default=math.nan),
    }


def concurrent(
    service: Service,
    jpeg: bytes,
    clients: int,
    total: int,
    bare: BareEmbedder | None = None,
    rounds: int = 3,
) -> dict[str, float]:
    """``clients`` threads, each with its own connection, sending ``total`` requests together,
    ``rounds`` times. With ``bare``, each round is paired with the unavoidable work run from as
    many threads in the bench process (the server idle) and with the bare pipeline one photo
    after another; the better of the two is the baseline throughput."""
    latencies: list[float] = []
    embeds: list[float] = []
    walls: list[float] = []
    served = 0
    paired: list[dict[str, float]] = []
    one_by_one: list[float] = []
    load: dict[str, float] = {}
    with load_meter(load, "others", service):
        for _ in range(rounds):
            if bare is not None:
                time.sleep(0.2)
                paired.append(bare.unavoidable_throughput(clients, total))
                one_by_one.append(1000 / p50(bare.unavoidable_times(max(8, total // 4))))
            round_latencies, round_embeds, wall = clients_round(service, jpeg, clients, total)
            latencies += round_latencies
            embeds += round_embeds
            walls.append(wall)
            served += len(round_latencies)
    result = {
        "clients": clients,
        "requests": served,
        "throughput": served / sum(walls),
        "p50": p50(latencies),
        "p90": p90(latencies),
        "p99": pct(latencies, 99),
        "embed_p50": p50(embeds),
        "others_cores": load["others"],
    }
    if paired:
        result["bare_threads_throughput"] = sum(x["throughput"] for x in paired) / len(paired)
        result["bare_threads_p50"] = p50([x["p50"] for x in paired])
        result["bare_threads_p99"] = max(x["p99"] for x in paired)
        result["bare_sequential_throughput"] = sum(one_by_one) / len(one_by_one)
        best = max(result["bare_threads_throughput"], result["bare_sequential_throughput"])
        result["bare_throughput"] = best
        result["throughput_ratio"] = result["throughput"] / best
    log.info("concurrency %d: %s", clients, {k: round(v, 2) for k, v in result.items()})
    return result


def clients_round(
    service: Service, jpeg: bytes, clients: int, total: int
) -> tuple[list[float], list[float], float]:
    per_client = max(1, total // clients)
    latencies: list[float] = []
    embeds: list[float] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)

    def worker() -> None:
        with service.client() as client:
            identify(client, jpeg)  # connect and warm up
            barrier.wait()
            for _ in range(per_client):
                elapsed, timing = identify(client, jpeg)
                with lock:
                    latencies.append(elapsed)
                    embeds.append(timing.get("embed", math.nan))

    return latencies, embeds, run_together([worker] * clients, barrier)


def run_together(workers: list[Callable[[], None]], barrier: threading.Barrier) -> float:
    """Run each of ``workers`` on its own thread; they wait at ``barrier`` (made for
    ``len(workers) + 1``) until all have started. Seconds from the barrier to the last join."""
    threads = [threading.Thread(target=w) for w in workers]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def bare_embedder(model: Path, jpeg: bytes, reps: int) -> dict[str, float]:
    """``Embedder.embed`` of one preprocessed photo (1x380x380x3), the way the service builds
    its embedder (default onnx_threads = all cores); plus in-process decode/preprocess."""
    defaults = Settings.model_fields
    embedder = Embedder(
        model,
        threads=defaults["onnx_threads"].default,
        max_batch_size=defaults["embed_batch_size"].default,
    )
    spec = embedder.contract.preprocessing
    max_pixels = defaults["max_image_pixels"].default
    decode, preprocess, embed = [], [], []

    def once() -> tuple[float, float, float]:
        t0 = time.perf_counter()
        photo = decode_photo(jpeg, max_pixels=max_pixels, target_size=spec.input_size)
        t1 = time.perf_counter()
        pixels = to_model_input(photo.image, spec)[np.newaxis]
        t2 = time.perf_counter()
        embedder.embed(pixels)
        t3 = time.perf_counter()
        return (t1 - t0) * 1000, (t2 - t1) * 1000, (t3 - t2) * 1000

    for _ in range(3):  # warm-up
        once()
    load: dict[str, float] = {}
    with load_meter(load, "others"):
        for _ in range(reps):
            d, p, e = once()
            decode.append(d)
            preprocess.append(p)
            embed.append(e)
    photo = decode_photo(jpeg, max_pixels=max_pixels, target_size=spec.input_size)
    result = {
        "others_cores": load["others"],
        "embed_p50": p50(embed),
        "embed_p90": p90(embed),
        "decode_p50": p50(decode),
        "preprocess_p50": p50(preprocess),
        "input_size": float(spec.input_size),
        "decoded_w": float(photo.image.width),
        "decoded_h": float(photo.image.height),
    }
    log.info("bare embedder: %s", {k: round(v, 2) for k, v in result.items()})
    return result


def thread_interplay(model: Path, syn: Synthetic, reps: int) -> list[dict[str, float]]:
    """The order of one request (12 ms of Python work standing for decode and preprocess, the
    inference, the gallery search, 5 ms of Python work standing for the database stage) in one
    process, with onnxruntime's pool threads spinning after a run (its default) or not, and
    faiss on all cores (its default) or one. p50 ms of each step."""
    import onnxruntime as ort

    ids = np.arange(1, len(syn.vectors) + 1, dtype=np.int64)
    faiss.omp_set_num_threads(CORES)
    index = GalleryIndex.build(ids, syn.vectors, DIM, IVF_THRESHOLD)
    size = int(Embedder(model).contract.preprocessing.input_size)
    pixels = np.random.default_rng(0).uniform(0, 255, (1, size, size, 3)).astype(np.float32)

    def python_work(ms: float) -> None:
        end = time.perf_counter() + ms / 1000
        while time.perf_counter() < end:
            pass

    sessions = {}
    for spinning in ("1", "0"):
        options = ort.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
        session = ort.InferenceSession(
            str(model), sess_options=options, providers=["CPUExecutionProvider"]
        )
        for _ in range(3):
            session.run(None, {session.get_inputs()[0].name: pixels})
        sessions[spinning] = session
    configs = [(spinning, threads) for spinning in ("1", "0") for threads in (CORES, 1)]
    laps: dict[tuple[str, int], dict[str, list[float]]] = {
        c: {"embed": [], "search": [], "after": []} for c in configs
    }
    # The configurations take turns, so the VM's drift in speed treats them alike.
    for j in range(reps):
        for spinning, threads in configs:
            session = sessions[spinning]
            _search_threads(index, threads)
            time.sleep(0.05)  # the previous configuration's threads go idle
            python_work(12)
            t0 = time.perf_counter()
            session.run(None, {session.get_inputs()[0].name: pixels})
            t1 = time.perf_counter()
            index.search(syn.queries[j % len(syn.queries)], K)
            t2 = time.perf_counter()
            python_work(5)
            t3 = time.perf_counter()
            lap = laps[(spinning, threads)]
            lap["embed"].append((t1 - t0) * 1000)
            lap["search"].append((t2 - t1) * 1000)
            lap["after"].append((t3 - t2) * 1000)
    faiss.omp_set_num_threads(CORES)
    rows = [
        {
            "spinning": float(spinning == "1"),
            "faiss_threads": float(threads),
            "embed_p50": p50(laps[(spinning, threads)]["embed"]),
            "search_p50": p50(laps[(spinning, threads)]["search"]),
            "after_p50": p50(laps[(spinning, threads)]["after"]),
        }
        for spinning, threads in configs
    ]
    for row in rows:
        log.info("thread interplay: %s", {k: round(v, 2) for k, v in row.items()})
    return rows


def decode_breakdown(jpeg: bytes, small: bytes, target: int, reps: int = 20) -> dict[str, float]:
    """Where ``decode_photo`` spends its time on the query JPEG (p50 ms, in process)."""
    import io

    from PIL import Image as PILImage
    from PIL import ImageOps

    max_pixels = Settings.model_fields["max_image_pixels"].default
    parts: dict[str, list[float]] = {
        "decode_photo": [],
        "open + DCT draft + load": [],
        "exif_transpose (copy)": [],
        "full-resolution load (no draft)": [],
        "decode_photo of the client-downscaled photo": [],
    }
    for i in range(reps + 2):
        t0 = time.perf_counter()
        decode_photo(jpeg, max_pixels=max_pixels, target_size=target)
        t1 = time.perf_counter()
        image = PILImage.open(io.BytesIO(jpeg))
        factor = target / min(image.size)
        image.draft("RGB", (math.ceil(image.width * factor), math.ceil(image.height * factor)))
        image.load()
        t2 = time.perf_counter()
        ImageOps.exif_transpose(image)
        t3 = time.perf_counter()
        PILImage.open(io.BytesIO(jpeg)).load()
        t4 = time.perf_counter()
        decode_photo(small, max_pixels=max_pixels, target_size=target)
        t5 = time.perf_counter()
        if i >= 2:
            laps = (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)
            for key, value in zip(parts, laps, strict=True):
                parts[key].append(value * 1000)
    return {k: p50(v) for k, v in parts.items()}


class _Probes:
    """Timers wrapped around functions of the service and Starlette, for an in-process server."""

    def __init__(self) -> None:
        self.times: dict[str, list[float]] = {}
        self._undo: list[tuple[Any, str, Any]] = []

    def wrap(self, owner: Any, name: str, label: str) -> None:
        original = getattr(owner, name)
        times = self.times.setdefault(label, [])
        if asyncio.iscoroutinefunction(original):

            async def async_probe(*args: Any, **kwargs: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    return await original(*args, **kwargs)
                finally:
                    times.append((time.perf_counter() - t0) * 1000)

            setattr(owner, name, async_probe)
        else:

            def probe(*args: Any, **kwargs: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    return original(*args, **kwargs)
                finally:
                    times.append((time.perf_counter() - t0) * 1000)

            setattr(owner, name, probe)
        self._undo.append((owner, name, original))

    def restore(self) -> None:
        for owner, name, original in reversed(self._undo):
            setattr(owner, name, original)
        self._undo.clear()


def measured_profile(
    service: Service, jpeg: bytes, count: int, search_threads: int | None
) -> dict[str, float]:
    load: dict[str, float] = {}
    with load_meter(load, "others"):
        result = profile_overhead(service, jpeg, count, search_threads)
    result["others_cores"] = load["others"]
    return result


def profile_overhead(
    service: Service, jpeg: bytes, count: int, search_threads: int | None = None
) -> dict[str, float]:
    """Serve the same data directory in process (uvicorn in a thread, as tests/conftest.py does)
    with timers around each part of a request, and return p50 ms per part."""
    import uvicorn
    from starlette.formparsers import MultiPartParser

    from service.api import guard
    from service.api.app import create_app
    from service.matching.identify import Identifier
    from service.matching.runtime import Runtime
    from service.store.photos import PhotoStore

    probes = _Probes()
    probes.wrap(guard, "principal_for", "auth: API key lookup (in the thread pool)")
    probes.wrap(Runtime, "current", "Runtime.current (side work, beside the decoding)")
    probes.wrap(MultiPartParser, "parse", "multipart parsing")
    probes.wrap(Identifier, "identify", "pipeline (the six stages)")
    probes.wrap(Embedder, "embed", "embed stage: Embedder.embed")
    probes.wrap(PhotoStore, "put", "side work: write the photo file")
    probes.wrap(Identifier, "_write", "database stage: the transaction")
    probes.wrap(Runtime, "identify", "Runtime.identify (the one hop)")
    asgi_times = probes.times.setdefault("ASGI app, request in to response out", [])
    if search_threads is not None:  # the service's choice, overridden for an A/B comparison
        saved_threads = getattr(GalleryIndex, "search_threads", None)
        GalleryIndex.search_threads = search_threads
    app = create_app(service.settings)

    async def timed_app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != "/identify":
            await app(scope, receive, send)
            return
        t0 = time.perf_counter()
        try:
            await app(scope, receive, send)
        finally:
            asgi_times.append((time.perf_counter() - t0) * 1000)

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(timed_app, host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 300
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the in-process server did not start")
            time.sleep(0.05)
        service.url = f"http://127.0.0.1:{port}"
        totals, encode = [], []
        stages: dict[str, list[float]] = {s: [] for s in STAGES}
        with service.client() as client:
            for _ in range(3):
                identify(client, jpeg)
            for times in probes.times.values():
                times.clear()
            for _ in range(count):
                t0 = time.perf_counter()
                client.build_request(
                    "POST", "/identify", files={"photo": ("q.jpg", jpeg, "image/jpeg")}
                ).read()
                encode.append((time.perf_counter() - t0) * 1000)
                total, timing = identify(client, jpeg)
                totals.append(total)
                for s in STAGES:
                    stages[s].append(timing.get(s, math.nan))
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        probes.restore()
        if search_threads is not None:
            if saved_threads is None:
                del GalleryIndex.search_threads
            else:
                GalleryIndex.search_threads = saved_threads
    result = {label: p50(times) for label, times in probes.times.items()}
    result.update({f"stage: {s}": p50(v) for s, v in stages.items()})
    result["client: build the multipart request"] = p50(encode)
    result["client total"] = p50(totals)
    # The derived parts per request, then their p50 (a difference of p50s can go negative).
    laps = probes.times
    asgi = laps["ASGI app, request in to response out"]
    if all(len(laps[k]) == count for k in PROFILED_PARTS) and len(asgi) == count:
        result["derived: framework"] = p50(
            [asgi[i] - sum(laps[k][i] for k in PROFILED_PARTS) for i in range(count)]
        )
        result["derived: transport"] = p50([totals[i] - encode[i] - asgi[i] for i in range(count)])
    log.info("request profile: %s", {k: round(v, 2) for k, v in result.items()})
    return result


@dataclass
class E2EResult:
    n: int
    setup: dict[str, float]
    sequential: dict[str, Any]
    concurrency: list[dict[str, float]] = field(default_factory=list)
    search_threads_ab: dict[str, dict[str, float]] = field(default_factory=dict)
    request_profile: dict[str, float] = field(default_factory=dict)
    downscaled: dict[str, Any] | None = None


def bench_e2e(
    syn: Synthetic,
    model: Path,
    jpeg: bytes,
    profile: Profile,
    work: Path,
    *,
    concurrency: bool,
    threads_ab: bool,
    request_profile: bool,
    bare: BareEmbedder | None = None,
    small_jpeg: bytes | None = None,
) -> E2EResult:
    n = len(syn.vectors)
    root = work / f"e2e-{n}"
    service = Service.create(root, model, syn)
    try:
        service.start()
        with stopwatch(f"{profile.requests} sequential /identify at {n:,}"):
            seq = guarded(
                f"/identify at {n:,}",
                lambda: sequential(service, jpeg, profile.requests, bare),
                lambda r: float(r["others_cores"]),
            )
        log.info(
            "e2e %d: total p50 %.1f ms (%.2f x the paired bare embedder), server %.1f ms, "
            "stages %s",
            n,
            seq["total_p50"],
            seq["ratio"],
            seq["server_p50"],
            {s: round(v["p50"], 2) for s, v in seq["stages"].items()},
        )
        result = E2EResult(n, dict(service.setup), seq)
        if concurrency:
            for clients in profile.concurrency:
                result.concurrency.append(
                    guarded(
                        f"{clients} concurrent clients",
                        partial(
                            concurrent, service, jpeg, clients, profile.requests_per_level, bare
                        ),
                        lambda r: r["others_cores"],
                    )
                )
        if small_jpeg is not None:
            with stopwatch("sequential /identify of the client-downscaled photo"):
                result.downscaled = guarded(
                    "/identify of the downscaled photo",
                    lambda: sequential(service, small_jpeg, profile.requests, bare),
                    lambda r: float(r["others_cores"]),
                )
        service.stop()
        if threads_ab:
            # In process: the service's search (on the calling thread) against faiss's default
            # of all cores, same data directory, one after the other.
            for label, threads in (("calling thread", None), ("all cores", CORES)):
                with stopwatch(f"in-process /identify, search on {label}"):
                    result.search_threads_ab[label] = guarded(
                        f"in-process /identify, search on {label}",
                        partial(measured_profile, service, jpeg, profile.requests, threads),
                        lambda r: r["others_cores"],
                    )
        if request_profile:
            with stopwatch("in-process request profile"):
                result.request_profile = profile_overhead(service, jpeg, profile.requests)
    finally:
        service.stop()
        shutil.rmtree(root, ignore_errors=True)
    return result


# --------------------------------------------------------------------------- environment


def environment(model: Path) -> dict[str, str]:
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = "unknown"
    with contextlib.suppress(OSError, ValueError, IndexError):
        kib = int(Path("/proc/meminfo").read_text().split("\n")[0].split()[1])
        memory = f"{kib / 2**20:.0f} GiB"
    versions = {}
    for package in (
        "faiss-cpu",
        "onnxruntime",
        "numpy",
        "scikit-learn",
        "pillow",
        "fastapi",
        "starlette",
        "python-multipart",
        "uvicorn",
        "sqlalchemy",
        "httpx",
    ):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    commit = "unknown"
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            check=True,
            text=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "service"],
            cwd=REPO,
            capture_output=True,
            check=True,
            text=True,
        ).stdout.strip()
        if dirty:
            commit += " + uncommitted changes in service/"
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": f"{cpu}, {CORES} cores",
        "memory": memory,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "versions": ", ".join(f"{k} {v}" for k, v in versions.items()),
        "faiss": faiss.get_compile_options().strip(),
        "commit": commit,
        "model": f"{model.name} ({model.stat().st_size / 2**20:.0f} MiB)",
    }


# The parts of a request, one after another (the rest is the framework's); Runtime.current
# runs inside the pipeline, beside the decoding.
PROFILED_PARTS = (
    "auth: API key lookup (in the thread pool)",
    "multipart parsing",
    "Runtime.identify (the one hop)",
)
