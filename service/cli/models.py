"""``whaleid models``: registering, switching and calibrating models; ``whaleid reindex``
and ``whaleid evaluate``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from service.cli.common import Command, arg, reading_files, sessions_of
from service.cli.jobs import follow_job
from service.contract import AGGREGATIONS, ModelStatus, calibration_shown
from service.errors import Invalid, NotFound
from service.matching.registry import VERIFICATION_NAMES, kind_of
from service.settings import Settings

if TYPE_CHECKING:
    from service.matching.identify import Identifier

log = logging.getLogger("whaleid")


def cmd_models_add(args: argparse.Namespace, settings: Settings) -> int:
    from service.contract import BUILTIN_PREFIX
    from service.models.registry import register_builtin, register_model
    from service.models.switch import activate_model

    factory = sessions_of(settings)
    with reading_files():
        if args.model.startswith(BUILTIN_PREFIX):
            model = register_builtin(factory, args.model)
        else:
            model = register_model(settings, factory, Path(args.model))
    log.info("registered model %s %s as id %s", model.name, model.version, model.id)
    if args.activate:
        embedded = activate_model(settings, factory, model.id)
        log.info("activated model id %s (%d gallery photos embedded)", model.id, embedded)
    return 0


def cmd_models_activate(args: argparse.Namespace, settings: Settings) -> int:
    from service.db.tables import Model
    from service.models.reindex import Embedders
    from service.models.switch import HeadChoice, activate, activate_model

    factory = sessions_of(settings)
    with factory() as session:
        model = session.get(Model, args.model_id)
        if model is None:
            raise NotFound(f"model {args.model_id} does not exist: see `whaleid models list`")
    if model.status != ModelStatus.READY:
        # Not re-indexed in the background: embed here, then switch (no shadow evaluation).
        activate_model(settings, factory, args.model_id)
        return 0
    # A refusal (ActivationRefused) exits 3 with the shadow evaluation's figures on stdout.
    switch = activate(
        settings,
        factory,
        Embedders(settings, factory),
        args.model_id,
        head=HeadChoice(args.head),
        force=args.force,
        actor="cli",
    )
    log.info(
        "model %s is active (was %s), head %s",
        args.model_id,
        switch.from_model_id,
        switch.head.as_dict(),
    )
    return 0


def cmd_models_rollback(args: argparse.Namespace, settings: Settings) -> int:
    from service.models.reindex import Embedders
    from service.models.switch import rollback

    factory = sessions_of(settings)
    switch = rollback(settings, factory, Embedders(settings, factory), actor="cli")
    log.info(
        "rolled back: model %s is active again (was %s)", switch.to_model_id, switch.from_model_id
    )
    return 0


def cmd_models_retire(args: argparse.Namespace, settings: Settings) -> int:
    from service.models.switch import retire

    retire(settings, sessions_of(settings), args.model_id)
    log.info("model %s is retired; its index files are deleted", args.model_id)
    return 0


def cmd_reindex(args: argparse.Namespace, settings: Settings) -> int:
    from service.models.registry import register_model
    from service.models.reindex import start_reindex

    factory = sessions_of(settings)
    if args.model.isdigit():
        model_id = int(args.model)
    else:
        with reading_files():
            model_id = register_model(settings, factory, Path(args.model)).id
    job = start_reindex(
        settings, factory, model_id, include_queries=args.include_queries, actor="cli"
    )
    log.info("re-index of model %s is job %s (%d photos)", model_id, job.id, job.total)
    sys.stdout.write(f"{job.id}\n")
    if args.wait:
        return follow_job(factory, job.id, args.poll)
    return 0


def cmd_models_list(args: argparse.Namespace, settings: Settings) -> int:
    from service.models.registry import all_models

    with sessions_of(settings)() as session:
        for m in all_models(session):
            sys.stdout.write(
                f"{m.id}\t{m.status}\t{m.name}\t{m.version}\tdim={m.embedding_dim}\t"
                f"k={m.k}\tcutoff={m.cutoff}\t{m.ranking}\t{m.kind}\t"
                f"verification={m.verification}\n"
            )
    return 0


def _identifier(settings: Settings, model_id: int | None, verification: str | None) -> Identifier:
    """The identifier of ``model_id`` (the active model by default), its verification set to
    ``verification`` if given, for a run that records nothing."""
    from service.db.tables import Model
    from service.matching.identify import Identifier
    from service.matching.runtime import Runtime

    factory = sessions_of(settings)
    if model_id is None:
        identifier = Runtime(settings, factory).current()
    else:
        with factory() as session:
            model = session.get(Model, model_id)
        if model is None:
            raise NotFound(f"model {model_id} does not exist: see `whaleid models list`")
        identifier = Identifier.load(settings, factory, model)
    if verification is not None:
        identifier.model = identifier.model.verifying(verification)
    return identifier


def cmd_evaluate(args: argparse.Namespace, settings: Settings) -> int:
    from service.models.evaluation import evaluate

    identifier = _identifier(settings, args.model, args.verification)
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

    model = set_verification(sessions_of(settings), args.model_id, args.mode)
    log.info("model %s now answers with verification %s", model.id, model.verification)
    return 0


def cmd_models_calibrate(args: argparse.Namespace, settings: Settings) -> int:
    from service.db.tables import Model
    from service.models.calibration import (
        pairs_from_confirmations,
        pairs_from_queries,
        store_calibration,
    )

    factory = sessions_of(settings)
    if args.queries and args.confirmations:
        raise Invalid("give a labelled CSV or --confirmations, not both")
    gallery_only = args.p_new is not None or args.aggregation is not None
    if gallery_only and (args.queries or args.confirmations):
        raise Invalid(
            "--p-new and --aggregation are for the fit on the gallery (no CSV, no --confirmations)"
        )
    if not args.queries and not args.confirmations:
        from service.models.openset import AUTO, fit_model

        stored = fit_model(
            settings,
            factory,
            args.model_id,
            trigger="calibrate",
            p_new=args.p_new,
            aggregation=args.aggregation or AUTO,
        )
        sys.stdout.write(json.dumps(stored, indent=2) + "\n")
        return 0
    with reading_files():
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
    with factory() as session:
        kind = session.get_one(Model, args.model_id).kind
    # Only the curves of the evidence the model's matchers give (no distance, no global curve).
    shown = calibration_shown(fitted.as_dict(), distance=kind_of(kind).grid, inliers=True)
    sys.stdout.write(json.dumps(shown, indent=2) + "\n")
    return 0


COMMANDS = (
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
        (arg("model_id", type=int), arg("--mode", choices=VERIFICATION_NAMES, required=True)),
    ),
    Command(
        ("models", "calibrate"),
        cmd_models_calibrate,
        "fit where new_individual goes on the model's gallery, or its calibration on labelled "
        "queries or confirmations, and keep it with the model",
        (
            "whaleid models calibrate 2",
            "whaleid models calibrate 2 --p-new 0.3",
            "whaleid models calibrate 2 labelled.csv --images photos/",
            "whaleid models calibrate 2 --confirmations",
        ),
        (
            arg("model_id", type=int),
            arg(
                "queries",
                nargs="?",
                help="a labelled CSV (import's columns): fit how distance and inliers become a "
                "match probability on it; none: fit the open-set decision on the gallery",
            ),
            arg("--images", help="the folder of the CSV's photos"),
            arg(
                "--confirmations",
                action="store_true",
                help="fit the calibration on the curators' confirmations of this model's "
                "verified answers instead",
            ),
            arg(
                "--p-new",
                type=float,
                help="the share of new animals to expect among queries (default: the "
                "curators' decisions once there are 30, else WHALEID_OPEN_SET_P_NEW, 0.2)",
            ),
            arg(
                "--aggregation",
                choices=("auto", *AGGREGATIONS),
                help="a verifying model's fit on the gallery: how an individual's photos count "
                "(max: its best photo; best-two: its best two summed; mix: a logistic learned on "
                "the gallery's pairs; auto, the default: each, the best expected MAP@5 kept)",
            ),
        ),
        description="With no CSV: asks a seeded sample of the gallery's photos as known queries "
        "(without their encounter) and unseen ones (without their individual), and keeps the "
        "head's cutoff (or, for a model that verifies, its calibration fitted on the candidate "
        "pairs those queries give, then the new_individual threshold) with the "
        "best expected MAP@5; prints its figures (also in GET /models/ID's open_set). Needs "
        "5 known and 5 unseen animals.",
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
                choices=VERIFICATION_NAMES,
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
