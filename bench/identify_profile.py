"""The in-process looks of ``bench/identify.py``: the bare embedder alone, onnxruntime's and
faiss's threads side by side, where decoding the query JPEG spends its time, and a request's
parts timed inside an in-process server (uvicorn in a thread, timers wrapped around the service's
functions)."""

from __future__ import annotations

import asyncio
import io
import logging
import math
import threading
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from bench._common import free_port, p50, p90
from bench.identify_data import Synthetic
from bench.identify_machine import load_meter
from bench.identify_records import CORES, DIM, IVF_THRESHOLD, PROFILED_PARTS, STAGES, K
from bench.identify_search import _search_threads
from bench.identify_service import Service, identify, service_embedder
from service.gallery.index import GalleryIndex
from service.imaging import decode_photo, to_model_input
from service.onnx.embedder import Embedder
from service.settings import Settings

log = logging.getLogger("bench.identify")


def bare_embedder(model: Path, jpeg: bytes, reps: int) -> dict[str, float]:
    """``Embedder.embed`` of one preprocessed photo (1x380x380x3), the way the service builds
    its embedder (default onnx_threads = all cores); plus in-process decode/preprocess."""
    defaults = Settings.model_fields
    embedder = service_embedder(model)
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
    from service.matching import identify as identify_module
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
    probes.wrap(identify_module, "write_identification", "database stage: the transaction")
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
