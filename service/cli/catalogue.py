"""``whaleid import``: a catalogue CSV and its photos."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from service.cli.common import Command, arg, reading_files, sessions_of
from service.settings import Settings

log = logging.getLogger("whaleid")


def cmd_import(args: argparse.Namespace, settings: Settings) -> int:
    from service.catalogue.imports import CatalogueImport, model_for_import
    from service.db.tables import Model
    from service.matching.features import extractor_for
    from service.matching.registry import uses_features
    from service.onnx.embedder import Embedder

    factory = sessions_of(settings)
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
    with reading_files():
        report = run.run(Path(args.catalogue), Path(args.images), batch_size=args.batch_size)
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


COMMANDS = (
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
)
