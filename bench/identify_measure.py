"""The measuring half of ``bench/identify.py``: every phase of a run, one after another, into a
dict of records (``identify_records``) that ``bench/identify_report.py`` renders and ``--json``
saves. The phases live in their parts: synthetic inputs (``identify_data``), search
(``identify_search``), the live service and its requests (``identify_service``), the in-process
looks (``identify_profile``), and the machine's load (``identify_machine``)."""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import platform
import shutil
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any

import faiss

from bench._common import cpu_name, git_commit, stopwatch, utc_now
from bench.identify_data import Synthetic, downscaled, make_jpeg, synthetic_gallery
from bench.identify_machine import guarded, load_meter
from bench.identify_profile import (
    bare_embedder,
    decode_breakdown,
    measured_profile,
    profile_overhead,
    thread_interplay,
)
from bench.identify_records import CORES, FULL, SMALL_SIZE, E2EResult, Profile
from bench.identify_search import bench_search
from bench.identify_service import BareEmbedder, Service, concurrent, sequential

log = logging.getLogger("bench.identify")


def measured_interplay(
    model: Path, syn: Synthetic, profile: Profile
) -> tuple[list[dict[str, float]], float]:
    load: dict[str, float] = {}
    with load_meter(load, "others"):
        rows = thread_interplay(model, syn, 25 if profile is FULL else 10)
    return rows, load["others"]


def run(args: argparse.Namespace, profile: Profile, work: Path, results: dict[str, Any]) -> None:
    """Every phase of a run, in order, its records stored into ``results``."""
    jpeg = make_jpeg()
    results["bare"] = bare = guarded(
        "bare embedder",
        lambda: bare_embedder(args.model, jpeg, profile.embed_reps),
        lambda r: r["others_cores"],
    )
    results["jpeg"] = {
        "bytes": len(jpeg),
        "decoded": f"{bare['decoded_w']:.0f}×{bare['decoded_h']:.0f}",
        "input_size": int(bare["input_size"]),
    }
    small = downscaled(jpeg, SMALL_SIZE)
    results["jpeg"]["small_bytes"] = len(small)
    results["decode"] = decode_breakdown(jpeg, small, int(bare["input_size"]))

    # Search benchmarks, smallest first; the galleries that the end-to-end part also uses are
    # kept (the largest one is 2 GB).
    results["search"] = []
    results["e2e"] = []
    keep: dict[int, Synthetic] = {}
    for n in profile.search_sizes:
        with stopwatch(f"synthetic lowrank gallery of {n:,}", log):
            syn = synthetic_gallery(n, profile.queries, structure="lowrank", seed=n)
        results["search"].append(
            bench_search(
                syn,
                profile,
                sweep=profile.sweep,
                with_sklearn=n in profile.sklearn_sizes,
            )
        )
        if n == profile.search_sizes[0]:
            results["interplay"] = guarded(
                "thread interplay",
                lambda s=syn: measured_interplay(args.model, s, profile),  # type: ignore[misc]
                lambda r: r[-1],
            )[0]
        if n in profile.e2e_sizes:
            keep[n] = syn
        del syn
        gc.collect()
    if profile.stress_size and not args.no_stress:
        with stopwatch(f"synthetic isotropic gallery of {profile.stress_size:,}", log):
            syn = synthetic_gallery(
                profile.stress_size, profile.queries // 2, structure="isotropic", seed=1
            )
        results["stress"] = bench_search(
            syn, profile, sweep=profile.sweep[-3:] + (profile.sweep[-1] * 2,), timed=False
        )
        del syn
        gc.collect()

    paired = BareEmbedder(args.model, jpeg)
    for i, n in enumerate(profile.e2e_sizes):
        syn = keep.pop(n) if n in keep else synthetic_gallery(n, 1, structure="lowrank", seed=n)
        results["e2e"].append(
            bench_e2e(
                syn,
                args.model,
                jpeg,
                profile,
                work,
                concurrency=i == min(1, len(profile.e2e_sizes) - 1),
                threads_ab=i == min(1, len(profile.e2e_sizes) - 1),
                request_profile=i == 0,
                bare=paired,
                small_jpeg=small if i == 0 else None,
            )
        )
        del syn
        gc.collect()
    results["bare_after"] = guarded(
        "bare embedder",
        lambda: bare_embedder(args.model, jpeg, profile.embed_reps),
        lambda r: r["others_cores"],
    )


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
        with stopwatch(f"{profile.requests} sequential /identify at {n:,}", log):
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
            with stopwatch("sequential /identify of the client-downscaled photo", log):
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
                with stopwatch(f"in-process /identify, search on {label}", log):
                    result.search_threads_ab[label] = guarded(
                        f"in-process /identify, search on {label}",
                        partial(measured_profile, service, jpeg, profile.requests, threads),
                        lambda r: r["others_cores"],
                    )
        if request_profile:
            with stopwatch("in-process request profile", log):
                result.request_profile = profile_overhead(service, jpeg, profile.requests)
    finally:
        service.stop()
        shutil.rmtree(root, ignore_errors=True)
    return result


def environment(model: Path) -> dict[str, str]:
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
    return {
        "date": utc_now(),
        "cpu": f"{cpu_name()}, {CORES} cores",
        "memory": memory,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "versions": ", ".join(f"{k} {v}" for k, v in versions.items()),
        "faiss": faiss.get_compile_options().strip(),
        "commit": git_commit(dirty_under="service"),
        "model": f"{model.name} ({model.stat().st_size / 2**20:.0f} MiB)",
    }
