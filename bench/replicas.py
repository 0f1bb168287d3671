"""Two whaleid replicas sharing one PostgreSQL under identifying, deciding and editing clients:
requests, latency (p50/p95), 5xx, and whether each replica's live gallery equals the database
after every round (``GET /gallery/digest`` against a digest computed from the tables).

Everything runs over loopback: two ``whaleid serve`` processes, the toy 64-d model, a catalogue of
12 individuals x 3 photos, in a database created on the given server and dropped afterwards.
Bounded: at most 20 rounds of 30 s and 16 clients. Writes its section into docs/reliability.md.

    .venv/bin/python bench/replicas.py \\
        --postgres postgresql+psycopg://postgres@127.0.0.1:55432/postgres --rounds 6 --seconds 5
"""

from __future__ import annotations

import datetime as dt
import itertools
import logging
import sys
import tempfile
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import bench_parser, marks, replace_section, setup_logging, within  # noqa: E402
from service.db import migrate  # noqa: E402
from service.settings import Settings  # noqa: E402
from tests.conftest import free_port, load_catalogue, make_keys, serve_process  # noqa: E402
from tests.replica_load import Mix, check_replicas, run_round  # noqa: E402
from tests.toy import build_toy_model  # noqa: E402

log = logging.getLogger("bench.replicas")
MARK_BEGIN, MARK_END = marks("replicas")
DECISIONS = ("confirm", "new_individual", "reject", "supersede")


@dataclass
class Totals:
    statuses: Counter[str] = field(default_factory=Counter)
    latencies: defaultdict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: list[str] = field(default_factory=list)
    checks: int = 0
    differences: list[str] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return sum(self.statuses.values())

    @property
    def server_errors(self) -> int:
        return sum(n for k, n in self.statuses.items() if int(k.rsplit(" ", 1)[1]) >= 500)

    def percentiles(self, kinds: tuple[str, ...]) -> tuple[int, float, float]:
        values = [v for k in kinds for v in self.latencies.get(k, [])]
        if not values:
            return 0, float("nan"), float("nan")
        p50, p95 = np.percentile(values, [50, 95])
        return len(values), float(p50), float(p95)


@contextmanager
def scratch_database(server: str) -> Iterator[str]:
    """A new database on ``server`` (a SQLAlchemy URL), dropped afterwards."""
    name = f"whaleid_bench_{uuid.uuid4().hex[:12]}"
    admin = server.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield server.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def measure(server: str, rounds: int, seconds: float, mix: Mix) -> Totals:
    totals = Totals()
    with tempfile.TemporaryDirectory() as tmp, scratch_database(server) as url:
        settings = Settings(data_dir=Path(tmp) / "data", database_url=url, _env_file=None)
        settings.ensure_dirs()
        migrate.upgrade(settings.sqlalchemy_url)
        catalogue = load_catalogue(
            settings, Path(tmp) / "catalogue", build_toy_model(Path(tmp) / "toy.onnx")
        )
        keys = make_keys(settings)
        ports = [free_port(), free_port()]
        replicas = [
            serve_process(settings, p, wait_for="/ready", WHALEID_LOG_LEVEL="WARNING")
            for p in ports
        ]
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        shots = itertools.count()
        try:
            for round_ in range(rounds):
                load = run_round(urls, keys, seconds, round_, shots, mix)
                totals.statuses.update(load.statuses)
                for kind, values in load.latencies.items():
                    totals.latencies[kind] += values
                totals.errors += load.errors
                found = check_replicas(urls, keys["admin"], url, catalogue.model_id)
                totals.checks += len(urls)
                totals.differences += [f"round {round_} {d}" for d in found]
                log.info(
                    "round %d: %d requests, %d differing digest fields",
                    round_,
                    sum(load.statuses.values()),
                    len(found),
                )
        finally:
            for process in replicas:
                process.terminate()
                process.wait(timeout=30)
    return totals


def report(totals: Totals, command: str, mix: Mix) -> list[str]:
    differing = len({d.split(": ", 1)[0] for d in totals.differences})
    lines = [
        MARK_BEGIN,
        f"Measured {dt.date.today()} by `{command}`:",
        "two `whaleid serve` processes over loopback on one PostgreSQL 15, "
        f"{mix.identifiers} identifying,",
        f"{mix.deciders} deciding and {mix.editors} editing clients, each request sent to either "
        "replica at random; after",
        "each round, both replicas' digests are compared with the database's.",
        "",
        "| requests | count | p50 | p95 |",
        "|---|---:|---:|---:|",
    ]
    for label, kinds in (
        ("`/identify`", ("identify",)),
        ("decisions (confirm, new individual, reject, supersede)", DECISIONS),
        ("merges and splits", ("merge", "split")),
    ):
        n, p50, p95 = totals.percentiles(kinds)
        lines.append(f"| {label} | {n} | {p50:.1f} ms | {p95:.1f} ms |")
    lines += [
        "",
        f"All requests: {totals.requests}. 5xx: {totals.server_errors}. Transport errors: "
        f"{len(totals.errors)}.",
        f"Index checks (replica x round): {totals.checks}, differing from the database: "
        f"{differing}.",
        MARK_END,
    ]
    return lines


def main() -> None:
    parser = bench_parser(__doc__, postgres=True)
    parser.add_argument("--rounds", type=within(1, 20), default=6)
    parser.add_argument("--seconds", type=within(1, 30), default=5)
    parser.add_argument("--identifiers", type=within(0, 8), default=2)
    parser.add_argument("--deciders", type=within(1, 6), default=3)
    parser.add_argument("--editors", type=within(0, 2), default=1)
    parser.add_argument("--out", type=Path, help="fill the replicas block of this file")
    args = parser.parse_args()
    setup_logging("%(message)s")
    mix = Mix(args.identifiers, args.deciders, args.editors)
    rounds, seconds = args.rounds, args.seconds
    totals = measure(args.postgres, rounds, seconds, mix)
    command = "bench/replicas.py " + " ".join(
        f"--{k} {v}" for k, v in vars(args).items() if k not in ("postgres", "out")
    )
    lines = report(totals, command, mix)
    log.info("%s", "\n".join(lines))
    log.info("statuses: %s", dict(sorted(totals.statuses.items())))
    for line in (totals.errors + totals.differences)[:20]:
        log.warning("%s", line)
    if args.out:
        replace_section(args.out, "\n".join(lines), "replicas", new_doc=None, required=True)


if __name__ == "__main__":
    main()
