"""Benchmark of ``POST /identify`` and the gallery search behind it; writes docs/performance.md.

What is measured (the written document says it again, next to the figures):

1. Per-stage latency (decode, preprocess, embed, search, head, database: the ``Server-Timing``
   header) and the client-side total of ``POST /identify`` for a ~3-megapixel, ~1 MB JPEG, with
   galleries of 1k, 50k and 1M synthetic embeddings stored in the real database (SQLite) and
   loaded by the real service (``whaleid serve`` in a subprocess, over loopback).
2. Gallery search + kNN head straight on ``GalleryIndex.build``/``GalleryIndex.search`` and
   ``service.knn.rank_candidates``: p50 at 50k and 1M, recall@50 against exact search, the time to
   build the index, and an ``nprobe`` sweep at 1M.
3. faiss against scikit-learn ``NearestNeighbors(metric="cosine", algorithm="brute")``, k=50, on
   the same vectors in the same process.
4. ``/identify`` p50 against the bare embedder's p50 (``Embedder.embed`` of one preprocessed
   photo), then throughput with 1, 2 and 4 concurrent clients.

The embedding model only provides realistic compute: the bench EfficientNet-B5 has random weights
(``bench/make_effb5_onnx.py``), so the gallery vectors are synthetic (see ``synthetic_gallery``).

Usage::

    .venv/bin/python bench/identify.py --out docs/performance.md          # full run, ~15 min
    .venv/bin/python bench/identify.py --quick --out /tmp/performance.md  # smoke run, ~3 min
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("bench.identify")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import identify_measure  # noqa: E402
from bench.identify_measure import (  # noqa: E402
    DEFAULT_MODEL,
    FULL,
    QUICK,
    REPO,
    SMALL_SIZE,
    WAITED_S,
    BareEmbedder,
    Profile,
    Synthetic,
    bare_embedder,
    bench_e2e,
    bench_search,
    decode_breakdown,
    downscaled,
    environment,
    guarded,
    load_meter,
    make_jpeg,
    stopwatch,
    synthetic_gallery,
    thread_interplay,
    wait_for_idle,
)
from bench.identify_report import (  # noqa: E402
    _jsonable,
    load_results,
    render,
    reproduce_command,
    write_doc,
)

# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  .venv/bin/python bench/identify.py --out docs/performance.md\n"
        "  .venv/bin/python bench/identify.py --quick --out /tmp/performance.md",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, few requests (smoke)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "performance.md")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="ONNX model to time")
    parser.add_argument("--json", type=Path, help="also write the raw figures as JSON here")
    parser.add_argument("--work-dir", type=Path, help="scratch directory (default: a temp dir)")
    parser.add_argument("--no-stress", action="store_true", help="skip the isotropic gallery")
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="wait up to this long for other processes to leave the CPUs alone, first and "
        "before measuring a phase again that they disturbed",
    )
    parser.add_argument(
        "--render-from",
        type=Path,
        metavar="JSON",
        help="measure nothing: write --out from the figures a previous run saved with --json",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("faiss.loader", "alembic", "httpx", "service"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not args.model.is_file():
        log.error("no model at %s: build it with bench/make_effb5_onnx.py", args.model)
        return 2
    if args.render_from:
        write_doc(args.out, render(load_results(args.render_from), args))
        log.info("wrote %s from %s", args.out, args.render_from)
        return 0
    profile = QUICK if args.quick else FULL
    if args.wait_idle > 0:
        identify_measure.QUIET_WAIT_S = args.wait_idle  # what guarded() reads
        log.info("other processes use %.2f cores", wait_for_idle(args.wait_idle))
    started = time.perf_counter()
    work_parent = args.work_dir or Path(tempfile.gettempdir())
    work_parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="whaleid-bench-", dir=work_parent))
    results: dict[str, Any] = {
        "profile": profile,
        "environment": environment(args.model),
        "command": reproduce_command(args),
        "quick": args.quick,
    }
    try:
        run(args, profile, work, results)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["runtime_min"] = (time.perf_counter() - started) / 60
    results["waited_min"] = WAITED_S[0] / 60
    write_doc(args.out, render(results, args))
    log.info("wrote %s (run took %.1f min)", args.out, results["runtime_min"])
    if args.json:
        args.json.write_text(json.dumps(results, default=_jsonable, indent=2))
    return 0


def measured_interplay(
    model: Path, syn: Synthetic, profile: Profile
) -> tuple[list[dict[str, float]], float]:
    load: dict[str, float] = {}
    with load_meter(load, "others"):
        rows = thread_interplay(model, syn, 25 if profile is FULL else 10)
    return rows, load["others"]


def run(args: argparse.Namespace, profile: Profile, work: Path, results: dict[str, Any]) -> None:
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
        with stopwatch(f"synthetic lowrank gallery of {n:,}"):
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
        with stopwatch(f"synthetic isotropic gallery of {profile.stress_size:,}"):
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


if __name__ == "__main__":
    raise SystemExit(main())
