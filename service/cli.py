"""The ``whaleid`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from sqlalchemy import select

from service import migrate
from service.settings import Settings

log = logging.getLogger("whaleid")


def _examples(*lines: str) -> str:
    return "example:\n" + "\n".join(f"  {line}" for line in lines)


def _sessions(settings: Settings):  # type: ignore[no-untyped-def]
    from service.db import make_engine, make_sessionmaker

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
    from service.embedder import ModelContractError
    from service.registry import activate_model, register_model

    factory = _sessions(settings)
    try:
        model = register_model(settings, factory, Path(args.model))
    except (ModelContractError, OSError) as e:
        log.error("%s", e)
        return 2
    log.info("registered model %s %s as id %s", model.name, model.version, model.id)
    if args.activate:
        embedded = activate_model(settings, factory, model.id)
        log.info("activated model id %s (%d gallery photos embedded)", model.id, embedded)
    return 0


def cmd_models_activate(args: argparse.Namespace, settings: Settings) -> int:
    from service.registry import activate_model

    activate_model(settings, _sessions(settings), args.model_id)
    return 0


def cmd_models_list(args: argparse.Namespace, settings: Settings) -> int:
    from service.db import Model

    with _sessions(settings)() as session:
        for m in session.scalars(select(Model).order_by(Model.id)):
            sys.stdout.write(
                f"{m.id}\t{m.status}\t{m.name}\t{m.version}\tdim={m.embedding_dim}\t"
                f"k={m.k}\tcutoff={m.cutoff}\t{m.ranking}\n"
            )
    return 0


def cmd_import(args: argparse.Namespace, settings: Settings) -> int:
    from service.catalogue import CatalogueError, CatalogueImport, model_for_import
    from service.db import Model
    from service.embedder import Embedder
    from service.modelfiles import local_model_file

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
        embedder = Embedder(
            local_model_file(settings, model.file_path, model.file_hash),
            threads=settings.onnx_threads,
            max_batch_size=settings.embed_batch_size,
        )
    run = CatalogueImport(settings, factory, embedder, model.id if model else None)
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


def cmd_evaluate(args: argparse.Namespace, settings: Settings) -> int:
    from service.evaluation import evaluate
    from service.identify import NoActiveModel, Runtime

    runtime = Runtime(settings, _sessions(settings))
    try:
        identifier = runtime.current()
    except NoActiveModel as e:
        log.error("%s", e)
        return 2
    result = evaluate(
        identifier,
        Path(args.queries),
        Path(args.images),
        predictions_csv=Path(args.predictions) if args.predictions else None,
        species_filter=args.species_filter,
    )
    sys.stdout.write(json.dumps(result.summary(), indent=2) + "\n")
    return 0


def cmd_keys_create(args: argparse.Namespace, settings: Settings) -> int:
    from service.auth import create_key
    from service.db import transaction

    with transaction(_sessions(settings)) as session:
        try:
            row, key = create_key(session, args.name, args.role)
        except ValueError as e:
            log.error("%s", e)
            return 2
    log.info(
        "created %s key %s for %s; it is shown once, on standard output", row.role, row.id, row.name
    )
    sys.stdout.write(key + "\n")
    return 0


def cmd_keys_list(args: argparse.Namespace, settings: Settings) -> int:
    from service.db import ApiKey

    with _sessions(settings)() as session:
        for k in session.scalars(select(ApiKey).order_by(ApiKey.id)):
            state = "revoked" if k.revoked_at else "active"
            sys.stdout.write(f"{k.id}\t{k.role}\t{k.name}\t{k.prefix}…\t{state}\n")
    return 0


def cmd_keys_revoke(args: argparse.Namespace, settings: Settings) -> int:
    from service.auth import revoke_key
    from service.db import transaction

    with transaction(_sessions(settings)) as session:
        if not revoke_key(session, args.key_id):
            log.error("key %s does not exist", args.key_id)
            return 2
    return 0


def cmd_prune(args: argparse.Namespace, settings: Settings) -> int:
    from service.retention import prune_query_photos

    days = settings.query_photo_retention_days if args.days is None else args.days
    if days < 0:
        log.error("--days must be 0 or more, not %s", days)
        return 2
    report = prune_query_photos(settings, _sessions(settings), days)
    log.info(
        "pruned %d query photos never confirmed within %d days (%.1f MiB freed)",
        report.photos,
        days,
        report.bytes / 2**20,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="whaleid",
        formatter_class=fmt,
        description="Photo-ID identification of whales and dolphins.",
        epilog=_examples("whaleid serve --host 127.0.0.1 --port 8000"),
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser(
        "serve",
        help="run the HTTP service",
        formatter_class=fmt,
        epilog=_examples("whaleid serve --host 127.0.0.1 --port 8000"),
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--no-migrate", action="store_true", help="do not run `db upgrade` before starting"
    )
    serve.set_defaults(func=cmd_serve)

    db = sub.add_parser("db", help="database schema (Alembic)")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    up = db_sub.add_parser(
        "upgrade",
        help="apply migrations",
        formatter_class=fmt,
        epilog=_examples("whaleid db upgrade"),
    )
    up.add_argument("--revision", default="head")
    up.set_defaults(func=cmd_db_upgrade)
    down = db_sub.add_parser(
        "downgrade",
        help="revert migrations",
        formatter_class=fmt,
        epilog=_examples("whaleid db downgrade base"),
    )
    down.add_argument("revision")
    down.set_defaults(func=cmd_db_downgrade)

    models = sub.add_parser("models", help="embedding models")
    m_sub = models.add_subparsers(dest="models_command", required=True)
    add = m_sub.add_parser(
        "add",
        help="register an ONNX model",
        formatter_class=fmt,
        epilog=_examples("whaleid models add effb5-arcface.onnx --activate"),
    )
    add.add_argument("model", help="ONNX file following the model contract")
    add.add_argument(
        "--activate",
        action="store_true",
        help="embed the gallery with it and make it the active model",
    )
    add.set_defaults(func=cmd_models_add)
    act = m_sub.add_parser(
        "activate",
        help="embed the gallery and switch to a model",
        formatter_class=fmt,
        epilog=_examples("whaleid models activate 2"),
    )
    act.add_argument("model_id", type=int)
    act.set_defaults(func=cmd_models_activate)
    ls = m_sub.add_parser(
        "list",
        help="list registered models",
        formatter_class=fmt,
        epilog=_examples("whaleid models list"),
    )
    ls.set_defaults(func=cmd_models_list)

    keys = sub.add_parser("keys", help="API keys")
    k_sub = keys.add_subparsers(dest="keys_command", required=True)
    kc = k_sub.add_parser(
        "create",
        help="create an API key (printed once)",
        formatter_class=fmt,
        description="Roles: integration (identify, read), curator (+ decisions and "
        "individuals), admin (+ models, import, keys).",
        epilog=_examples("whaleid keys create --role curator --name 'Ana Silva'"),
    )
    kc.add_argument("--role", required=True, choices=["integration", "curator", "admin"])
    kc.add_argument("--name", required=True, help="who the key belongs to")
    kc.set_defaults(func=cmd_keys_create)
    kl = k_sub.add_parser(
        "list", help="list keys", formatter_class=fmt, epilog=_examples("whaleid keys list")
    )
    kl.set_defaults(func=cmd_keys_list)
    kr = k_sub.add_parser(
        "revoke",
        help="revoke a key",
        formatter_class=fmt,
        epilog=_examples("whaleid keys revoke 3"),
    )
    kr.add_argument("key_id", type=int)
    kr.set_defaults(func=cmd_keys_revoke)

    imp = sub.add_parser(
        "import",
        help="import a catalogue CSV and its photos",
        formatter_class=fmt,
        description="CSV columns image,species,individual_id (Happywhale train.csv), optional "
        "encounter,location,date (YYYY-MM-DD). Re-running adds nothing twice and "
        "resumes an interrupted run.",
        epilog=_examples("whaleid import train.csv --images train_images/"),
    )
    imp.add_argument("catalogue", help="the CSV file")
    imp.add_argument("--images", required=True, help="folder the image column is relative to")
    imp.add_argument("--batch-size", type=int, default=32)
    imp.add_argument("--strict", action="store_true", help="exit 1 if any row failed")
    imp.set_defaults(func=cmd_import)

    pr = sub.add_parser(
        "prune",
        help="remove query photos never confirmed within the retention period",
        formatter_class=fmt,
        description="Deletes the stored file and embeddings of every photo sent to /identify "
        "that is in no gallery and was not asked about for DAYS days (default: "
        "WHALEID_QUERY_PHOTO_RETENTION_DAYS, 90). Identifications keep their answers; a "
        "confirmed photo is never pruned. Run it from cron.",
        epilog=_examples("whaleid prune", "whaleid prune --days 30"),
    )
    pr.add_argument("--days", type=int, default=None, help="retention in days")
    pr.set_defaults(func=cmd_prune)

    ev = sub.add_parser(
        "evaluate",
        help="MAP@5 of a labelled query set",
        formatter_class=fmt,
        description="Identifies every photo of QUERIES.csv (same columns as import) with the "
        "active model, records nothing, and prints MAP@5 overall, for individuals "
        "in the gallery and for unseen ones (whose right answer is new_individual).",
        epilog=_examples("whaleid evaluate val.csv --images val_images/ --predictions sub.csv"),
    )
    ev.add_argument("queries")
    ev.add_argument("--images", required=True)
    ev.add_argument("--predictions", help="write a Kaggle-style image,predictions CSV")
    ev.add_argument(
        "--species-filter",
        action="store_true",
        help="restrict each query to gallery photos of its species",
    )
    ev.set_defaults(func=cmd_evaluate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = Settings()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    # Alembic announces its context on every command; `whaleid -v` shows it.
    logging.getLogger("alembic").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    func: Callable[[argparse.Namespace, Settings], int] = args.func
    return func(args, settings)


if __name__ == "__main__":
    raise SystemExit(main())
