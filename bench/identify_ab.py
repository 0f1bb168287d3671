"""Server settings side by side: ``/identify`` against its unavoidable work (decode + preprocess +
embed of the same photo) one request at a time, and throughput with several clients against the
bare pipeline from as many threads, for each set of ``WHALEID_*`` variables given, the sets
taking turns round after round (one server at a time, restarted for each) so that the machine's
drift treats them alike. Prints one line per round and set, then the medians.

    .venv/bin/python bench/identify_ab.py '{}' '{"WHALEID_EMBED_SLOTS": "2"}' \\
        --clients 4 --rounds 3

What docs/performance.md quotes as A/B runs came from this loop.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import p50, pct, setup_logging  # noqa: E402
from bench.identify_data import make_jpeg, synthetic_gallery  # noqa: E402
from bench.identify_records import DEFAULT_MODEL  # noqa: E402
from bench.identify_service import (  # noqa: E402
    BareEmbedder,
    Service,
    clients_round,
    identify,
    sequential,
)

log = logging.getLogger("bench.identify_ab")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("settings", nargs="+", help='JSON objects of WHALEID_* variables, "{}"')
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--gallery", type=int, default=1000, help="synthetic gallery size")
    parser.add_argument("--clients", type=int, default=0, help="0: one request at a time")
    parser.add_argument("--requests", type=int, default=20, help="per round and set")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    setup_logging(
        "%(asctime)s %(name)s: %(message)s",
        quiet=("faiss.loader", "alembic", "httpx", "service", "bench.identify"),
    )
    sets: list[dict[str, str]] = [json.loads(s) for s in args.settings]
    jpeg = make_jpeg()
    bare = BareEmbedder(args.model, jpeg)
    work = Path(tempfile.mkdtemp(prefix="whaleid-ab-"))
    ratios: list[list[float]] = [[] for _ in sets]
    try:
        service = Service.create(
            work, args.model, synthetic_gallery(args.gallery, 1, structure="lowrank", seed=1)
        )
        for round_ in range(args.rounds):
            for i, env in enumerate(sets):
                service.start(env)
                try:
                    line = _measure(service, bare, jpeg, args)
                finally:
                    service.stop()
                ratios[i].append(line["ratio"])
                log.info("round %d %s: %s", round_, env, {k: round(v, 3) for k, v in line.items()})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for env, values in zip(sets, ratios, strict=True):
        log.info(
            "%s: median ratio %.3f (rounds %s)",
            env,
            sorted(values)[len(values) // 2],
            ", ".join(f"{v:.3f}" for v in values),
        )
    return 0


def _measure(
    service: Service, bare: BareEmbedder, jpeg: bytes, args: argparse.Namespace
) -> dict[str, Any]:
    """One round of one set: the latency ratio (``--clients 0``) or the throughput ratio."""
    if not args.clients:
        s = sequential(service, jpeg, args.requests, bare)
        return {"ratio": s["ratio"], "total_p50": s["total_p50"], "bare_p50": s["bare_p50"]}
    with service.client() as client:
        for _ in range(3):
            identify(client, jpeg)
    baseline = bare.unavoidable_throughput(args.clients, args.requests)
    latencies, embeds, wall = clients_round(service, jpeg, args.clients, args.requests)
    throughput = len(latencies) / wall
    return {
        "peak_rss_mib": _peak_rss_mib(service),
        "ratio": throughput / baseline["throughput"],
        "throughput": throughput,
        "bare_throughput": baseline["throughput"],
        "p50": p50(latencies),
        "p99": pct(latencies, 99),
        "embed_p50": p50(embeds),
    }


def _peak_rss_mib(service: Service) -> float:
    """The server process's peak resident memory so far (VmHWM), in MiB."""
    if service.process is None:
        return math.nan
    for line in Path(f"/proc/{service.process.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return math.nan


if __name__ == "__main__":
    raise SystemExit(main())
