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

The measuring (``identify_measure`` and its parts) returns records (``identify_records``), which
``--json`` saves; the report (``identify_report``, ``identify_sections``, ``identify_reading``)
renders them, and ``--render-from`` renders a saved run again without measuring.

Usage::

    .venv/bin/python bench/identify.py --out docs/performance.md          # full run, ~15 min
    .venv/bin/python bench/identify.py --quick --out /tmp/performance.md  # smoke run, ~3 min
    .venv/bin/python bench/identify.py --json run.json ...                # also keep the figures
    .venv/bin/python bench/identify.py --render-from run.json --out docs/performance.md
"""

from __future__ import annotations

import argparse
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

from bench import identify_machine  # noqa: E402
from bench._common import PERFORMANCE_DOC, setup_logging  # noqa: E402
from bench.identify_machine import WAITED_S, wait_for_idle  # noqa: E402
from bench.identify_measure import environment, run  # noqa: E402
from bench.identify_records import (  # noqa: E402
    DEFAULT_MODEL,
    FULL,
    QUICK,
    load_results,
    save_results,
)
from bench.identify_report import render, reproduce_command, write_doc  # noqa: E402

# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  .venv/bin/python bench/identify.py --out docs/performance.md\n"
        "  .venv/bin/python bench/identify.py --quick --out /tmp/performance.md",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, few requests (smoke)")
    parser.add_argument("--out", type=Path, default=PERFORMANCE_DOC)
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
    setup_logging(verbose=args.verbose, quiet=("faiss.loader", "alembic", "httpx", "service"))
    if args.render_from:
        write_doc(args.out, render(load_results(args.render_from), args))
        log.info("wrote %s from %s", args.out, args.render_from)
        return 0
    if not args.model.is_file():
        log.error("no model at %s: build it with bench/make_effb5_onnx.py", args.model)
        return 2
    profile = QUICK if args.quick else FULL
    if args.wait_idle > 0:
        identify_machine.QUIET_WAIT_S = args.wait_idle  # what guarded() reads
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
        save_results(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
