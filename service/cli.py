"""The ``whaleid`` command line."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.access.auth import COMMAND_LINE
from service.contract import ModelStatus
from service.db import migrate
from service.errors import Invalid, NotFound
from service.logs import escape_handlers
from service.settings import Settings

if TYPE_CHECKING:
    from service.matching.identify import Identifier

log = logging.getLogger("whaleid")


def _examples(*lines: str) -> str:
    return "example:\n" + "\n".join(f"  {line}" for line in lines)


def _sessions(settings: Settings):  # type: ignore[no-untyped-def]
    from service.db.tables import make_engine, make_sessionmaker

    settings.ensure_dirs()
    engine = make_engine(settings.sqlalchemy_url)
    if not migrate.is_current(engine):
        raise SystemExit("the database schema is not up to date: run `whaleid db upgrade` first")
    return make_sessionmaker(engine)


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from service.api.app import create_app

    settings.ensure_dirs()
    if not args.no_migrate:
        migrate.upgrade(settings.sqlalchemy_url)
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="info")
    return 0


def cmd_db_upgrade(args: argparse.Namespace, settings: Settings) -> int:
    settings.ensure_dirs()
    migrate.upgrade(settings.sqlalchemy_url, args.revision)
    log.info("database at revision %s", args.revision)
    return 0


def cmd_db_downgrade(args: argparse.Namespace, settings: Settings) -> int:
    migrate.downgrade(settings.sqlalchemy_url, args.revision)
    log.info("database at revision %s", args.revision)
    return 0


def cmd_models_add(args: argparse.Namespace, settings: Settings) -> int:
    from service.contract import BUILTIN_PREFIX, ModelContractError
    from service.errors import Conflict
    from service.models.registry import register_builtin, register_model
    from service.models.switch import activate_model

    factory = _sessions(settings)
    try:
        if args.model.startswith(BUILTIN_PREFIX):
            model = register_builtin(factory, args.model)
        else:
            model = register_model(settings, factory, Path(args.model))
    except (ModelContractError, OSError, Conflict) as e:
        log.error("%s", e)
        return 2
    log.info("registered model %s %s as id %s", model.name, model.version, model.id)
    if args.activate:
        embedded = activate_model(settings, factory, model.id)
        log.info("activated model id %s (%d gallery photos embedded)", model.id, embedded)
    return 0


def cmd_models_activate(args: argparse.Namespace, settings: Settings) -> int:
    from service.db.tables import Model
    from service.errors import Conflict, NotFound
    from service.models.reindex import Embedders
    from service.models.switch import ActivationRefused, HeadChoice, activate, activate_model

    factory = _sessions(settings)
    with factory() as session:
        model = session.get(Model, args.model_id)
        if model is None:
            log.error("model %s does not exist: see `whaleid models list`", args.model_id)
            return 2
    if model.status != ModelStatus.READY:
        # Not re-indexed in the background: embed here, then switch (no shadow evaluation).
        activate_model(settings, factory, args.model_id)
        return 0
    try:
        switch = activate(
            settings,
            factory,
            Embedders(settings, factory),
            args.model_id,
            head=HeadChoice(args.head),
            force=args.force,
            actor="cli",
        )
    except ActivationRefused as e:
        log.error("%s", e)
        sys.stdout.write(json.dumps(e.report, indent=2) + "\n")
        return 3
    except (Conflict, NotFound) as e:
        log.error("%s", e)
        return 2
    log.info(
        "model %s is active (was %s), head %s",
        args.model_id,
        switch.from_model_id,
        switch.head.as_dict(),
    )
    return 0


def cmd_models_rollback(args: argparse.Namespace, settings: Settings) -> int:
    from service.errors import Conflict
    from service.models.reindex import Embedders
    from service.models.switch import rollback

    factory = _sessions(settings)
    try:
        switch = rollback(settings, factory, Embedders(settings, factory), actor="cli")
    except Conflict as e:
        log.error("%s", e)
        return 2
    log.info(
        "rolled back: model %s is active again (was %s)", switch.to_model_id, switch.from_model_id
    )
    return 0


def cmd_models_retire(args: argparse.Namespace, settings: Settings) -> int:
    from service.errors import Conflict, NotFound
    from service.models.switch import retire

    try:
        retire(settings, _sessions(settings), args.model_id)
    except (Conflict, NotFound) as e:
        log.error("%s", e)
        return 2
    log.info("model %s is retired; its index files are deleted", args.model_id)
    return 0


def cmd_reindex(args: argparse.Namespace, settings: Settings) -> int:
    from service.contract import ModelContractError
    from service.errors import Conflict, NotFound
    from service.models.registry import register_model
    from service.models.reindex import start_reindex

    factory = _sessions(settings)
    if args.model.isdigit():
        model_id = int(args.model)
    else:
        try:
            model_id = register_model(settings, factory, Path(args.model)).id
        except (ModelContractError, OSError, Conflict) as e:
            log.error("%s", e)
            return 2
    try:
        job = start_reindex(
            settings, factory, model_id, include_queries=args.include_queries, actor="cli"
        )
    except (Conflict, NotFound) as e:
        log.error("%s", e)
        return 2
    log.info("re-index of model %s is job %s (%d photos)", model_id, job.id, job.total)
    sys.stdout.write(f"{job.id}\n")
    if args.wait:
        return _follow_job(factory, job.id, args.poll)
    return 0


def _follow_job(factory, job_id: int, poll: float) -> int:  # type: ignore[no-untyped-def]
    """A progress bar until the job ends; 0 if it succeeded."""
    import time

    from tqdm import tqdm

    from service.jobs.queue import get_job, progress

    with factory() as session:
        p = progress(session, get_job(session, job_id, COMMAND_LINE))
    bar = tqdm(total=p.total, desc=f"job {job_id} {p.kind}", unit="photo")
    try:
        while True:
            with factory() as session:
                p = progress(session, get_job(session, job_id, COMMAND_LINE))
            bar.update(p.done + p.failed - bar.n)
            bar.set_postfix(state=p.state, failed=p.failed)
            if p.finished:
                break
            time.sleep(poll)
    finally:
        bar.close()
    for error in p.errors:
        log.warning("job %s: %s", job_id, error)
    log.info("job %s %s", job_id, p.state)
    return 0 if p.state == "succeeded" else 1


def cmd_jobs_list(args: argparse.Namespace, settings: Settings) -> int:
    from service.jobs.queue import list_jobs, progress

    with _sessions(settings)() as session:
        for job in list_jobs(session, COMMAND_LINE, args.limit):
            p = progress(session, job)
            sys.stdout.write(
                f"{p.id}\t{p.kind}\t{p.state}\tmodel={p.model_id}\t{p.done + p.failed}/{p.total}"
                f"\tfailed={p.failed}\t{p.created_at:%Y-%m-%d %H:%M:%S}\n"
            )
    return 0


def cmd_jobs_show(args: argparse.Namespace, settings: Settings) -> int:
    from service.errors import NotFound
    from service.jobs.queue import get_job, progress

    factory = _sessions(settings)
    try:
        with factory() as session:
            p = progress(session, get_job(session, args.job_id, COMMAND_LINE))
    except NotFound as e:
        log.error("%s", e)
        return 2
    if args.follow and not p.finished:
        return _follow_job(factory, args.job_id, args.poll)
    body = {k: v.isoformat() if hasattr(v, "isoformat") else v for k, v in p.__dict__.items()}
    sys.stdout.write(json.dumps(body, indent=2) + "\n")
    return 0


def cmd_jobs_cancel(args: argparse.Namespace, settings: Settings) -> int:
    from service.errors import Conflict, NotFound
    from service.jobs.queue import cancel

    try:
        cancel(_sessions(settings), args.job_id, COMMAND_LINE)
    except (Conflict, NotFound) as e:
        log.error("%s", e)
        return 2
    log.info("job %s cancelled", args.job_id)
    return 0


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    import signal
    import threading

    from service.jobs.batch import JobCloser, batch_handlers
    from service.jobs.queue import Worker
    from service.matching.features import FeatureStore
    from service.models.reindex import ActiveGalleryKeeper, Embedders, worker_handlers

    factory = _sessions(settings)
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


def cmd_models_list(args: argparse.Namespace, settings: Settings) -> int:
    from service.models.registry import all_models

    with _sessions(settings)() as session:
        for m in all_models(session):
            sys.stdout.write(
                f"{m.id}\t{m.status}\t{m.name}\t{m.version}\tdim={m.embedding_dim}\t"
                f"k={m.k}\tcutoff={m.cutoff}\t{m.ranking}\t{m.kind}\t"
                f"verification={m.verification}\n"
            )
    return 0


def cmd_import(args: argparse.Namespace, settings: Settings) -> int:
    from service.catalogue.csv_file import CatalogueError
    from service.catalogue.imports import CatalogueImport, model_for_import
    from service.db.tables import Model
    from service.matching.features import extractor_for, uses_features
    from service.onnx.embedder import Embedder

    factory = _sessions(settings)
    with factory() as session:
        model: Model | None = model_for_import(session)
    embedder = None
    if model is None:
        log.warning(
            "no active model: photos are stored now and embedded when a model is added "
            "with `whaleid models add MODEL.onnx --activate`"
        )
    else:
        embedder = Embedder.for_model(settings, model.file_path)
    extractor = extractor_for(settings) if model is not None and uses_features(model) else None
    run = CatalogueImport(settings, factory, embedder, model.id if model else None, extractor)
    try:
        report = run.run(Path(args.catalogue), Path(args.images), batch_size=args.batch_size)
    except (CatalogueError, OSError) as e:
        log.error("%s", e)
        return 2
    log.info(
        "imported %d new photos, %d already present, %d embedded, %d rows with errors",
        report.imported,
        report.already_present,
        report.embedded,
        len(report.errors),
    )
    for line, message in report.errors:
        log.error("line %d: %s", line, message)
    return 1 if report.errors and args.strict else 0


def _identifier(settings: Settings, model_id: int | None, verification: str | None) -> Identifier:
    """The identifier of ``model_id`` (the active model by default), its verification set to
    ``verification`` if given, for a run that records nothing."""
    from dataclasses import replace

    from service.contract import ModelKind, Verification
    from service.db.tables import Model
    from service.matching.identify import Identifier, Runtime

    factory = _sessions(settings)
    if model_id is None:
        identifier = Runtime(settings, factory).current()
    else:
        with factory() as session:
            model = session.get(Model, model_id)
        if model is None:
            raise NotFound(f"model {model_id} does not exist: see `whaleid models list`")
        identifier = Identifier.load(settings, factory, model)
    if verification is not None:
        if identifier.model.kind == ModelKind.LOCAL_FEATURES and verification == "none":
            raise Invalid("the local-features matcher always verifies")
        identifier.model = replace(identifier.model, verification=Verification(verification))
    return identifier


def cmd_evaluate(args: argparse.Namespace, settings: Settings) -> int:
    from service.matching.identify import NoActiveModel
    from service.models.evaluation import evaluate

    try:
        identifier = _identifier(settings, args.model, args.verification)
    except (NoActiveModel, NotFound, Invalid) as e:
        log.error("%s", e)
        return 2
    result = evaluate(
        identifier,
        Path(args.queries),
        Path(args.images),
        predictions_csv=Path(args.predictions) if args.predictions else None,
        species_filter=args.species_filter,
    )
    if result.errors:
        log.warning(
            "MAP@5 covers only the scored queries (%d of %d rows): %d rows were skipped as "
            "errors (their lines are logged above)",
            result.scored,
            result.rows,
            len(result.errors),
        )
    sys.stdout.write(json.dumps(result.summary(), indent=2) + "\n")
    return 0


def cmd_models_verify(args: argparse.Namespace, settings: Settings) -> int:
    from service.models.calibration import set_verification

    try:
        model = set_verification(_sessions(settings), args.model_id, args.mode)
    except (NotFound, Invalid) as e:
        log.error("%s", e)
        return 2
    log.info("model %s now answers with verification %s", model.id, model.verification)
    return 0


def cmd_models_calibrate(args: argparse.Namespace, settings: Settings) -> int:
    from service.matching.identify import NoActiveModel
    from service.models.calibration import (
        pairs_from_confirmations,
        pairs_from_queries,
        store_calibration,
    )

    factory = _sessions(settings)
    try:
        if args.queries:
            if not args.images:
                raise Invalid("give the query photos' folder with --images")
            identifier = _identifier(settings, args.model_id, None)
            pairs = pairs_from_queries(identifier, Path(args.queries), Path(args.images))
            source = f"labelled queries {Path(args.queries).name}"
        else:
            with factory() as session:
                pairs = pairs_from_confirmations(session, args.model_id)
            source = "curators' confirmations"
        fitted = store_calibration(factory, args.model_id, pairs, source=source)
    except (NoActiveModel, NotFound, Invalid, OSError) as e:
        log.error("%s", e)
        return 2
    sys.stdout.write(json.dumps(fitted.as_dict(), indent=2) + "\n")
    return 0


def cmd_keys_create(args: argparse.Namespace, settings: Settings) -> int:
    from service.access.auth import create_key

    try:
        row, key = create_key(_sessions(settings), args.name, args.role)
    except ValueError as e:
        log.error("%s", e)
        return 2
    log.info(
        "created %s key %s for %s; it is shown once, on standard output", row.role, row.id, row.name
    )
    sys.stdout.write(key + "\n")
    return 0


def cmd_keys_list(args: argparse.Namespace, settings: Settings) -> int:
    from service.access.auth import all_keys

    with _sessions(settings)() as session:
        for k in all_keys(session):
            state = "revoked" if k.revoked_at else "active"
            sys.stdout.write(f"{k.id}\t{k.role}\t{k.name}\t{k.prefix}…\t{state}\n")
    return 0


def cmd_keys_revoke(args: argparse.Namespace, settings: Settings) -> int:
    from service.access.auth import revoke_key

    if not revoke_key(_sessions(settings), args.key_id):
        log.error("key %s does not exist", args.key_id)
        return 2
    return 0


def cmd_keys_callbacks(args: argparse.Namespace, settings: Settings) -> int:
    from service.access.auth import rotate_callback_secret, set_callback_hosts

    factory = _sessions(settings)
    try:
        if args.host is not None:
            row = set_callback_hosts(factory, args.key_id, [h for h in args.host if h.strip()])
            hosts = ", ".join(row.callback_hosts or []) or "nowhere"
            log.info("key %s may send callbacks to: %s", row.id, hosts)
        if args.rotate_secret:
            row, secret = rotate_callback_secret(factory, args.key_id)
            log.info("new callback secret of key %s; it is shown once, on standard output", row.id)
            sys.stdout.write(secret + "\n")
    except (LookupError, ValueError) as e:
        log.error("%s", e)
        return 2
    return 0


def cmd_prune(args: argparse.Namespace, settings: Settings) -> int:
    from service.jobs.batch import prune_batch_files
    from service.store.retention import prune_query_photos

    days = settings.query_photo_retention_days if args.days is None else args.days
    if days < 0:
        log.error("--days must be 0 or more, not %s", days)
        return 2
    factory = _sessions(settings)
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


@dataclass(frozen=True)
class Arg:
    """One ``add_argument`` call: its flags and keywords."""

    flags: tuple[str, ...]
    options: dict[str, Any]


def arg(*flags: str, **options: Any) -> Arg:
    return Arg(flags, options)


@dataclass(frozen=True)
class Command:
    """One ``whaleid`` command: where it sits (``("models", "add")``), what runs it, its help,
    examples and arguments."""

    path: tuple[str, ...]
    func: Callable[[argparse.Namespace, Settings], int]
    help: str
    examples: tuple[str, ...]
    args: tuple[Arg, ...] = ()
    description: str | None = None


# The command groups (``whaleid models ...``), in the order --help lists them among commands.
GROUPS = {
    "db": "database schema (Alembic)",
    "models": "embedding models",
    "jobs": "background jobs",
    "keys": "API keys",
}

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
        ("db", "upgrade"),
        cmd_db_upgrade,
        "apply migrations",
        ("whaleid db upgrade",),
        (arg("--revision", default="head"),),
    ),
    Command(
        ("db", "downgrade"),
        cmd_db_downgrade,
        "revert migrations",
        ("whaleid db downgrade base",),
        (arg("revision"),),
    ),
    Command(
        ("models", "add"),
        cmd_models_add,
        "register an ONNX model",
        ("whaleid models add effb5-arcface.onnx --activate",),
        (
            arg("model", help="ONNX file following the model contract"),
            arg(
                "--activate",
                action="store_true",
                help="embed the gallery with it and make it the active model",
            ),
        ),
    ),
    Command(
        ("models", "activate"),
        cmd_models_activate,
        "switch to a model (a ready one through the shadow evaluation's gate)",
        ("whaleid models activate 2",),
        (
            arg("model_id", type=int),
            arg(
                "--head",
                choices=["model", "paper", "best"],
                default="model",
                help="for a ready model: its own head, the paper's, or the best on the "
                "confirmations",
            ),
            arg(
                "--force",
                action="store_true",
                help="activate even if the shadow evaluation says no",
            ),
        ),
    ),
    Command(
        ("models", "rollback"),
        cmd_models_rollback,
        "go back to the model that was active before",
        ("whaleid models rollback",),
    ),
    Command(
        ("models", "retire"),
        cmd_models_retire,
        "retire a model that is not active (its index is deleted)",
        ("whaleid models retire 1",),
        (arg("model_id", type=int),),
    ),
    Command(
        ("reindex",),
        cmd_reindex,
        "re-embed the gallery with a model, as a background job",
        ("whaleid reindex 2 --wait", "whaleid reindex effb5-v2.onnx"),
        (
            arg("model", help="model id, or an ONNX file"),
            arg("--include-queries", action="store_true", help="also embed kept query photos"),
            arg("--wait", action="store_true", help="show a progress bar until it ends"),
            arg("--poll", type=float, default=1.0, help="seconds between progress reads"),
        ),
        description="Queues a job that embeds every gallery photo with MODEL (a model id, or an "
        "ONNX file to register first); workers (the API process, or `whaleid worker`) "
        "run it. When it ends the model is ready; its shadow evaluation is in `whaleid "
        "jobs show JOB`; then `whaleid models activate MODEL`.",
    ),
    Command(
        ("jobs", "list"),
        cmd_jobs_list,
        "newest jobs first",
        ("whaleid jobs list",),
        (arg("--limit", type=int, default=20),),
    ),
    Command(
        ("jobs", "show"),
        cmd_jobs_show,
        "a job's progress, errors and result",
        ("whaleid jobs show 4 --follow",),
        (
            arg("job_id", type=int),
            arg("--follow", action="store_true", help="a progress bar until the job ends"),
            arg("--poll", type=float, default=1.0),
        ),
    ),
    Command(
        ("jobs", "cancel"),
        cmd_jobs_cancel,
        "stop a job",
        ("whaleid jobs cancel 4",),
        (arg("job_id", type=int),),
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
        ("models", "list"),
        cmd_models_list,
        "list registered models",
        ("whaleid models list",),
    ),
    Command(
        ("models", "verify"),
        cmd_models_verify,
        "turn local-feature verification of a model's answers on (rerank) or off (none)",
        ("whaleid models verify 2 --mode rerank",),
        (arg("model_id", type=int), arg("--mode", choices=["none", "rerank"], required=True)),
    ),
    Command(
        ("models", "calibrate"),
        cmd_models_calibrate,
        "fit how distance and inliers become a match probability, and keep it with the model",
        (
            "whaleid models calibrate 2 labelled.csv --images photos/",
            "whaleid models calibrate 2",
        ),
        (
            arg("model_id", type=int),
            arg(
                "queries",
                nargs="?",
                help="a labelled CSV (import's columns); none: fit on "
                "the curators' confirmations of this model's verified answers",
            ),
            arg("--images", help="the folder of the CSV's photos"),
        ),
    ),
    Command(
        ("keys", "create"),
        cmd_keys_create,
        "create an API key (printed once)",
        ("whaleid keys create --role curator --name 'Ana Silva'",),
        (
            arg("--role", required=True, choices=["integration", "curator", "admin"]),
            arg("--name", required=True, help="who the key belongs to"),
        ),
        description="Roles: integration (identify, read), curator (+ decisions and "
        "individuals), admin (+ models, import, keys).",
    ),
    Command(("keys", "list"), cmd_keys_list, "list keys", ("whaleid keys list",)),
    Command(
        ("keys", "revoke"),
        cmd_keys_revoke,
        "revoke a key",
        ("whaleid keys revoke 3",),
        (arg("key_id", type=int),),
    ),
    Command(
        ("keys", "callbacks"),
        cmd_keys_callbacks,
        "a key's callback hosts and secret",
        ("whaleid keys callbacks 3 --host hooks.example.org --rotate-secret",),
        (
            arg("key_id", type=int),
            arg("--host", action="append", default=None, help="a host callbacks may go to"),
            arg("--rotate-secret", action="store_true", help="make a new callback secret"),
        ),
        description="Each integration key sends its jobs' callbacks only to its own hosts, "
        "signed with its own secret. --host replaces the key's hosts (repeat it; --host '' "
        "clears them); --rotate-secret prints a new secret, once, on standard output.",
    ),
    Command(
        ("import",),
        cmd_import,
        "import a catalogue CSV and its photos",
        ("whaleid import train.csv --images train_images/",),
        (
            arg("catalogue", help="the CSV file"),
            arg("--images", required=True, help="folder the image column is relative to"),
            arg("--batch-size", type=int, default=32),
            arg("--strict", action="store_true", help="exit 1 if any row failed"),
        ),
        description="CSV columns image,species,individual_id (Happywhale train.csv), optional "
        "encounter,location,date (YYYY-MM-DD). Re-running adds nothing twice and "
        "resumes an interrupted run.",
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
    Command(
        ("evaluate",),
        cmd_evaluate,
        "MAP@5 of a labelled query set",
        ("whaleid evaluate val.csv --images val_images/ --predictions sub.csv",),
        (
            arg("queries"),
            arg("--images", required=True),
            arg("--predictions", help="write a Kaggle-style image,predictions CSV"),
            arg(
                "--species-filter",
                action="store_true",
                help="restrict each query to gallery photos of its species",
            ),
            arg("--model", type=int, help="a registered model's id (default: the active one)"),
            arg(
                "--verification",
                choices=["none", "rerank"],
                help="answer with or without local-feature verification (default: the model's "
                "own setting)",
            ),
        ),
        description="Identifies every photo of QUERIES.csv (same columns as import) with the "
        "active model, records nothing, and prints MAP@5 overall, for individuals "
        "in the gallery and for unseen ones (whose right answer is new_individual; an "
        "individual_id of new_individual marks an animal outside the catalogue).",
    ),
)


def build_parser() -> argparse.ArgumentParser:
    """The ``whaleid`` parser, built from ``COMMANDS``: a group's subparsers appear when its
    first command does."""
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="whaleid",
        formatter_class=fmt,
        description="Photo-ID identification of whales and dolphins.",
        epilog=_examples("whaleid serve --host 127.0.0.1 --port 8000"),
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    groups: dict[str, Any] = {}
    for command in COMMANDS:
        where = sub
        if len(command.path) == 2:
            group = command.path[0]
            if group not in groups:
                parent = sub.add_parser(group, help=GROUPS[group])
                groups[group] = parent.add_subparsers(dest=f"{group}_command", required=True)
            where = groups[group]
        leaf = where.add_parser(
            command.path[-1],
            help=command.help,
            formatter_class=fmt,
            description=command.description,
            epilog=_examples(*command.examples),
        )
        for a in command.args:
            leaf.add_argument(*a.flags, **a.options)
        leaf.set_defaults(func=command.func)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = Settings()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    escape_handlers(logging.getLogger())  # no input can start a line of its own
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    # Alembic announces its context on every command; `whaleid -v` shows it.
    logging.getLogger("alembic").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    func: Callable[[argparse.Namespace, Settings], int] = args.func
    return func(args, settings)


if __name__ == "__main__":
    raise SystemExit(main())
