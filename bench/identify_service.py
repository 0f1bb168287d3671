"""``POST /identify`` end to end for ``bench/identify.py``: a data directory with the bench model
active over a synthetic gallery (real rows, real index), ``whaleid serve`` on it in a subprocess,
requests one after another and from several clients, each paired with the work no service can
skip (``BareEmbedder``: decode + preprocess + embed in the bench process)."""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import faiss
import httpx
import numpy as np
from sqlalchemy import insert
from sqlalchemy.orm import Session, sessionmaker

from bench._common import NotReady, free_port, p50, p90, pct, stop, stopwatch, wait_ready
from bench.identify_data import Synthetic, next_variant
from bench.identify_machine import load_meter
from bench.identify_records import CORES, JPEG_SIZE, STAGES
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
from service.imaging import decode_photo, to_model_input
from service.models.registry import register_model
from service.models.switch import activate_model
from service.onnx.embedder import Embedder
from service.settings import Settings

log = logging.getLogger("bench.identify")


def service_embedder(model: Path) -> Embedder:
    """The model's ``Embedder`` built as the service builds it (default settings)."""
    defaults = Settings.model_fields
    return Embedder(
        model,
        threads=defaults["onnx_threads"].default,
        max_batch_size=defaults["embed_batch_size"].default,
    )


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
            with stopwatch(f"insert {len(syn.vectors):,} gallery rows", log) as t:
                insert_gallery(factory, model_row.id, syn)
            setup["insert_s"] = t["s"]
            with stopwatch("activate_model (gallery index built from the database)", log) as t:
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
        try:
            wait_ready(self.process, self.url, 900)
        except NotReady as e:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited; see {self.root / 'server.log'}") from e
            raise RuntimeError("the server did not become ready in 15 minutes") from e
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
        stop(self.process)
        self.process = None

    def client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, timeout=120, headers={"Authorization": f"Bearer {self.key}"}
        )


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


class BareEmbedder:
    """The model in the bench process, built as the service builds it: ``Embedder.embed`` of one
    preprocessed photo, and the work no service can skip (decode + preprocess + embed of a
    fresh upload, as the service decodes it), for timing next to the requests."""

    def __init__(self, model: Path, jpeg: bytes) -> None:
        defaults = Settings.model_fields
        self.embedder = service_embedder(model)
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
