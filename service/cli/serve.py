"""Running the service: ``whaleid serve``, ``whaleid worker`` and ``whaleid prune``."""

from __future__ import annotations

import argparse
import datetime as dt
import logging

from service.cli.common import Command, arg, sessions_of
from service.db import migrate
from service.errors import Invalid
from service.settings import Settings

log = logging.getLogger("whaleid")


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from service.api.app import create_app

    settings.ensure_dirs()
    if not args.no_migrate:
        migrate.upgrade(settings.sqlalchemy_url)
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="info")
    return 0


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    import signal
    import threading

    from service.jobs.batch.chunks import batch_handlers
    from service.jobs.batch.closing import JobCloser
    from service.jobs.queue import Worker
    from service.matching.features import FeatureStore
    from service.models.reindex import ActiveGalleryKeeper, Embedders, worker_handlers

    factory = sessions_of(settings)
    embedders = Embedders(settings, factory)
    worker = Worker(
        factory,
        worker_handlers(settings, factory, embedders) | batch_handlers(settings, factory),
        lease_seconds=settings.job_lease_seconds,
        poll_seconds=settings.job_poll_seconds,
        idle=(
            ActiveGalleryKeeper(factory, embedders, FeatureStore(settings, factory)),
            JobCloser(settings, factory),
        ),
        name=args.name,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    worker.run(stop, exit_when_idle=args.exit_when_idle)
    return 0


def cmd_prune(args: argparse.Namespace, settings: Settings) -> int:
    from service.jobs.batch.closing import prune_batch_files
    from service.store.retention import prune_query_photos

    days = settings.query_photo_retention_days if args.days is None else args.days
    if days < 0:
        raise Invalid(f"--days must be 0 or more, not {days}")
    factory = sessions_of(settings)
    report = prune_query_photos(settings, factory, days)
    log.info(
        "pruned %d query photos never confirmed within %d days (%.1f MiB freed)",
        report.photos,
        days,
        report.bytes / 2**20,
    )
    grace = dt.timedelta(hours=settings.batch_orphan_grace_hours)
    orphans = prune_batch_files(settings, factory, grace)
    log.info("pruned %d archive photos that no open job holds", orphans)
    return 0


COMMANDS = (
    Command(
        ("serve",),
        cmd_serve,
        "run the HTTP service",
        ("whaleid serve --host 127.0.0.1 --port 8000",),
        (
            arg("--host", default="127.0.0.1"),
            arg("--port", type=int, default=8000),
            arg(
                "--no-migrate", action="store_true", help="do not run `db upgrade` before starting"
            ),
        ),
    ),
    Command(
        ("worker",),
        cmd_worker,
        "run background jobs (any number, on machines sharing the database and photos)",
        ("WHALEID_WORKER=false whaleid serve & whaleid worker",),
        (
            arg("--name", help="worker name in leases (default host:pid:random)"),
            arg(
                "--exit-when-idle", action="store_true", help="stop when no chunk is left to claim"
            ),
        ),
        description="Claims chunks of queued jobs and runs them. The API process runs one too "
        "unless WHALEID_WORKER=false. On SQLite, run one worker in all.",
    ),
    Command(
        ("prune",),
        cmd_prune,
        "remove query photos never confirmed within the retention period",
        ("whaleid prune", "whaleid prune --days 30"),
        (arg("--days", type=int, default=None, help="retention in days"),),
        description="Deletes the stored file and embeddings of every photo sent to /identify "
        "that is in no gallery and was not asked about for DAYS days (default: "
        "WHALEID_QUERY_PHOTO_RETENTION_DAYS, 90). Identifications keep their answers; a "
        "confirmed photo is never pruned. Run it from cron.",
    ),
)
