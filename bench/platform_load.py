"""Load as a platform sees it: a Locust headless run against two whaleid replicas on one
PostgreSQL, over loopback; identifying clients, curators deciding, and batch jobs (ZIP archives)
polled to the end, interleaved. Afterwards: 5xx count, acknowledged decisions missing from the
database, and each replica's live gallery against the database (``GET /gallery/digest``).

Not part of CI. Needs the bench extra (``pip install -e '.[bench]'``: locust). Bounded: at most
300 s and 40 users. Writes p50/p95/p99 and throughput into docs/performance.md:

    .venv/bin/python bench/platform_load.py \\
        --postgres postgresql+psycopg://postgres@127.0.0.1:55432/postgres --seconds 150 \\
        --out docs/performance.md
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from sqlalchemy import text

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import bench_parser, marks, replace_section, setup_logging, within  # noqa: E402
from bench.replicas import scratch_database  # noqa: E402
from service.db import migrate  # noqa: E402
from service.db.tables import make_engine  # noqa: E402
from service.settings import Settings  # noqa: E402
from tests.conftest import free_port, load_catalogue, make_keys, serve_process  # noqa: E402
from tests.replica_load import check_replicas  # noqa: E402
from tests.toy import build_toy_model  # noqa: E402

log = logging.getLogger("bench.platform_load")
MARK_BEGIN, MARK_END = marks("platform-load")
LOCUSTFILE = Path(__file__).with_name("locustfile.py")


def lost_decisions(url: str, acknowledged: list[dict[str, Any]]) -> list[str]:
    """Acknowledged decisions the database does not hold as the identification's current one."""
    engine = make_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT d.identification_id, d.decision, i.catalogue_id FROM decisions d "
                "LEFT JOIN individuals i ON i.id = d.individual_id "
                "WHERE d.superseded_by_id IS NULL"
            )
        ).all()
    engine.dispose()
    current = {int(r[0]): (str(r[1]), r[2]) for r in rows}
    lost = []
    for ack in acknowledged:
        held = current.get(int(ack["identification_id"]))
        target = ack.get("individual_id") or ack.get("code")
        if held is None or held[0] != ack["decision"] or (target and held[1] != target):
            lost.append(f"{ack} -> {held}")
    return lost


def run(server: str, seconds: int, users: int, tmp: Path) -> dict[str, Any]:
    with scratch_database(server) as url:
        settings = Settings(data_dir=tmp / "data", database_url=url, _env_file=None)
        settings.ensure_dirs()
        migrate.upgrade(settings.sqlalchemy_url)
        catalogue = load_catalogue(settings, tmp / "catalogue", build_toy_model(tmp / "toy.onnx"))
        keys = make_keys(settings)
        ports = [free_port(), free_port()]
        replicas = [
            serve_process(settings, p, wait_for="/ready", WHALEID_LOG_LEVEL="WARNING")
            for p in ports
        ]
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        out = tmp / "load.json"
        try:
            command = [
                *(sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless"),
                *("-u", str(users), "-r", str(users), "-t", f"{seconds}s", "--host", urls[0]),
                *("--csv", str(tmp / "stats"), "--only-summary", "--stop-timeout", "60"),
            ]
            env = {
                **os.environ,
                "WHALEID_LOAD_URLS": ",".join(urls),
                "WHALEID_LOAD_KEYS": json.dumps(keys),
                "WHALEID_LOAD_OUT": str(out),
            }
            subprocess.run(command, env=env, check=False, timeout=seconds + 180)
            seen = json.loads(out.read_text())
            differences = check_replicas(urls, keys["admin"], url, catalogue.model_id)
            lost = lost_decisions(url, seen["acknowledged"])
        finally:
            for process in replicas:
                process.terminate()
                process.wait(timeout=30)
    with (tmp / "stats_stats.csv").open() as f:
        stats = list(csv.DictReader(f))
    return {"seen": seen, "differences": differences, "lost": lost, "stats": stats}


def report(result: dict[str, Any], seconds: int, users: int) -> list[str]:
    seen = result["seen"]
    server_errors = sum(n for k, n in seen["statuses"].items() if int(k.rsplit(" ", 1)[1]) >= 500)
    transport = sum(n for k, n in seen["statuses"].items() if k.endswith(" 0"))
    jobs = seen["jobs"]
    lines = [
        MARK_BEGIN,
        "## A platform's load: two replicas, identifications, decisions and batch jobs",
        "",
        f"Measured {dt.date.today()} by `bench/platform_load.py --seconds {seconds} --users "
        f"{users}`: a Locust headless run over loopback against two `whaleid serve` processes "
        "on one PostgreSQL 15 (the toy 64-d model, 12 individuals x 3 photos), each request "
        "sent to either replica at random. Users (weights 4:4:1): identifying catalogue photos; "
        "curators identifying a new photo then confirming, declaring a new individual or "
        "rejecting; a platform submitting a ZIP of 8 photos as a batch job and polling "
        "`GET /jobs/{id}` to the end. The machine's 2 cores are shared with other work.",
        "",
        "| requests | count | failures | p50 | p95 | p99 | per second |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["stats"]:
        lines.append(
            f"| `{row['Name']}` | {row['Request Count']} | {row['Failure Count']} | "
            f"{row['50%']} ms | {row['95%']} ms | {row['99%']} ms | "
            f"{float(row['Requests/s']):.1f} |"
        )
    finished = [j for j in jobs if j["state"] == "succeeded"]
    lines += [
        "",
        f"Batch jobs: {len(jobs)} submitted and followed, {len(finished)} succeeded "
        f"({sum(j['done'] or 0 for j in jobs)} photos identified, "
        f"{sum(j['failed'] or 0 for j in jobs)} failed); median time from submission to the "
        f"end: {sorted(j['seconds'] for j in jobs)[len(jobs) // 2] if jobs else 'n/a'} s.",
        f"5xx: {server_errors}. Transport errors: {transport}. Acknowledged decisions: "
        f"{len(seen['acknowledged'])}, missing from the database: {len(result['lost'])}. "
        f"Replica galleries differing from the database afterwards: "
        f"{len({d.split(': ', 1)[0] for d in result['differences']})} of 2.",
        MARK_END,
    ]
    return lines


def main() -> None:
    parser = bench_parser(__doc__, postgres=True)
    parser.add_argument("--seconds", type=within(10, 300), default=150)
    parser.add_argument("--users", type=within(1, 40), default=9)
    parser.add_argument("--out", type=Path, help="write the section into this file")
    args = parser.parse_args()
    setup_logging("%(message)s", quiet=())
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args.postgres, args.seconds, args.users, Path(tmp))
    lines = report(result, args.seconds, args.users)
    log.info("%s", "\n".join(lines))
    for line in (result["lost"] + result["differences"])[:20]:
        log.warning("%s", line)
    if args.out:
        replace_section(args.out, "\n".join(lines), "platform-load", new_doc=None)
    failed = result["lost"] or result["differences"]
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
