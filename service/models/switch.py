"""Switching the active model: ready → active (through the shadow evaluation's gate), rollback to
the one before, retirement.

Activation catches up once more while gallery writes are held, then switches in one
transaction; every replica follows at its next request.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.contract import PAPER_HEAD, Head, ModelStatus
from service.db.tables import Model, ModelSwitch, transaction
from service.errors import ActivationRefused, Conflict
from service.gallery.embed import embed_gallery
from service.gallery.index import sidecar_path
from service.gallery.sync import Gallery, index_path
from service.matching.features import FeatureStore
from service.matching.registry import uses_features, verifies
from service.models.openset import refit
from service.models.reindex import (
    Embedders,
    PhotoEmbedder,
    active_model_id,
    catch_up,
    latest_report,
    missing_images,
    model_row,
    store_embeddings,
)
from service.models.shadow import ShadowReport, confirmed_queries, evaluate_shadow
from service.settings import Settings

log = logging.getLogger(__name__)

# Photos embedded while the switch holds gallery writes; more than this are caught up outside it
# first, so decisions wait at most about a second.
_CATCH_UP_IN_LOCK = 100


class HeadChoice(StrEnum):
    """Which kNN head to answer with once active."""

    MODEL = "model"  # the head exported with the model
    PAPER = "paper"  # k 50, cutoff 0.62, vote
    BEST = "best"  # the best cell of the grid on this catalogue's confirmations


def shadow_report(
    settings: Settings, factory: sessionmaker[Session], model_id: int
) -> ShadowReport:
    """The report against the model active now: the stored one, or a fresh evaluation if the
    active model or the confirmations changed since (or none was stored)."""
    with factory() as session:
        model_row(session, model_id)
        stored = latest_report(session, model_id)
        active = active_model_id(session)
        confirmations = len(confirmed_queries(session))
    if (
        stored is not None
        and stored.get("baseline_model_id") == active
        and stored.get("confirmations") == confirmations
    ):
        return ShadowReport(stored)
    return evaluate_shadow(settings, factory, model_id)


def head_of(report: ShadowReport, model: Model, choice: HeadChoice) -> Head:
    if choice == HeadChoice.MODEL:
        return Head.of(model)
    if choice == HeadChoice.PAPER:
        return PAPER_HEAD
    best = report.best_head()
    if best is None:
        raise Conflict(
            "no calibrated head: there are no curator-confirmed identifications to calibrate on; "
            "activate with head=model or head=paper"
        )
    return best


def gate(report: ShadowReport, choice: HeadChoice, force: bool) -> None:
    """Refuse a model that scores worse than the active one, or that cannot be judged."""
    if force or report.baseline_model_id is None:
        return
    if not report.sufficient:
        raise ActivationRefused(
            f"only {report.evaluated} curator-confirmed identifications can be evaluated "
            f"(at least {report.min_confirmations} are needed to judge the new model): confirm "
            "more, or activate with force=true",
            report.data,
        )
    old, new = report.baseline_map5(), report.candidate_map5(choice)
    if new < old:
        raise ActivationRefused(
            f"the new model scores MAP@5 {new:.4f} with the {choice} head on "
            f"{report.evaluated} confirmed identifications; the active model scores {old:.4f}. "
            "Keep the active model, or activate with force=true",
            report.data,
        )


@dataclass(frozen=True)
class Switch:
    from_model_id: int | None
    to_model_id: int
    action: str
    head: Head
    caught_up: int
    report: dict[str, Any] | None = None


def _hold_gallery_writes(session: Session) -> None:
    # Decisions, imports, merges and splits write images: holding that table for the switch
    # means none can land between the last catch-up and the status change. SQLite transactions
    # are BEGIN IMMEDIATE and already exclusive.
    if session.get_bind().dialect.name == "postgresql":
        session.connection().exec_driver_sql("LOCK TABLE images IN SHARE ROW EXCLUSIVE MODE")


def switch_to(
    settings: Settings,
    factory: sessionmaker[Session],
    photos: PhotoEmbedder,
    model_id: int,
    *,
    action: str,
    head: Head | None,
    actor: str,
    forced: bool = False,
) -> Switch:
    """Make ``model_id`` active in one transaction, after embedding every gallery photo it
    lacks; the model active before becomes ready again (its index stays for a rollback)."""
    added = 0
    for _attempt in range(3):
        added += catch_up(factory, photos, model_id)[0]
        try:
            return _switch_now(photos, factory, model_id, action, head, actor, forced, added)
        except _TooManyLate:
            continue
    raise Conflict("gallery photos keep arriving faster than the switch catches up: try again")


class _TooManyLate(Exception):
    pass


def _switch_now(
    photos: PhotoEmbedder,
    factory: sessionmaker[Session],
    model_id: int,
    action: str,
    head: Head | None,
    actor: str,
    forced: bool,
    added: int,
) -> Switch:
    with transaction(factory) as session:
        _hold_gallery_writes(session)
        late = missing_images(session, model_id, limit=_CATCH_UP_IN_LOCK + 1)
        if len(late) > _CATCH_UP_IN_LOCK:
            raise _TooManyLate()
        result = photos.embed(late)
        added += store_embeddings(
            session, model_id, result.image_ids, result.matrix(photos.embedder.dim)
        )
        previous = session.scalar(
            select(Model)
            .where(Model.status == ModelStatus.ACTIVE, Model.id != model_id)
            .with_for_update()
        )
        target = session.get_one(Model, model_id)
        if target.status == ModelStatus.ACTIVE and previous is None:
            return Switch(None, model_id, "unchanged", Head.of(target), added)
        if previous is not None:
            previous.status = ModelStatus.READY
        if head is not None:
            target.k, target.cutoff, target.ranking = head.k, head.cutoff, str(head.ranking)
        target.status = ModelStatus.ACTIVE
        chosen = Head.of(target)
        session.add(
            ModelSwitch(
                from_model_id=previous.id if previous else None,
                to_model_id=model_id,
                action=action,
                head=chosen.as_dict(),
                actor=actor,
                forced=forced,
            )
        )
    log.info(
        "%s: model %s is active (was %s), head %s, %d photos caught up",
        action,
        model_id,
        previous.id if previous else None,
        chosen.as_dict(),
        added,
    )
    return Switch(previous.id if previous else None, model_id, action, chosen, added)


def activate(
    settings: Settings,
    factory: sessionmaker[Session],
    embedders: Embedders,
    model_id: int,
    *,
    head: HeadChoice = HeadChoice.MODEL,
    force: bool = False,
    actor: str = "admin",
    before_switch: Callable[[int], None] | None = None,
) -> Switch:
    """Activate a ready model, through the shadow evaluation's gate. ``before_switch`` runs once
    the gate has passed (the API loads the model there, so the switch itself loads nothing)."""
    with factory() as session:
        model = model_row(session, model_id)
    if model.status == ModelStatus.ACTIVE:
        raise Conflict(f"model {model_id} is already the active model")
    if model.status != ModelStatus.READY:
        raise Conflict(
            f"model {model_id} is {model.status}, not ready: re-index it first "
            f"(POST /models/{model_id}/reindex or `whaleid reindex {model_id}`)"
        )
    report = shadow_report(settings, factory, model_id)
    gate(report, head, force)
    chosen = head_of(report, model, head)
    if before_switch is not None:
        before_switch(model_id)
    done = switch_to(
        settings,
        factory,
        embedders(model_id),
        model_id,
        action="activate",
        head=chosen,
        actor=actor,
        forced=force,
    )
    if head == HeadChoice.MODEL or verifies(model):
        # Fitted again on the gallery it now answers from (photos may have come since its
        # re-index); a head chosen on the confirmations (paper, best) keeps its cutoff.
        refit(settings, factory, model_id, trigger="activate")
    else:
        with transaction(factory) as session:
            row = model_row(session, model_id)
            if row.open_set and row.open_set.get("mode") == "cutoff":
                # The cutoff fitted at its re-index no longer answers: say what replaced it.
                row.open_set = {**row.open_set, "superseded_by": f"head {head}"}
    with factory() as session:
        answering = Head.of(model_row(session, model_id))
    return Switch(done.from_model_id, model_id, done.action, answering, done.caught_up, report.data)


def previous_model_id(factory: sessionmaker[Session]) -> int | None:
    """The model that was active before the active one (what a rollback goes back to)."""
    with factory() as session:
        active = active_model_id(session)
        if active is None:
            return None
        return session.scalar(
            select(ModelSwitch.from_model_id)
            .where(ModelSwitch.to_model_id == active)
            .order_by(ModelSwitch.id.desc())
            .limit(1)
        )


def rollback(
    settings: Settings,
    factory: sessionmaker[Session],
    embedders: Embedders,
    actor: str = "admin",
    before_switch: Callable[[int], None] | None = None,
) -> Switch:
    """Go back to the model that was active before the active one, with the head it had."""
    previous_id = previous_model_id(factory)
    if previous_id is None:
        raise Conflict("there is no previous model to roll back to")
    with factory() as session:
        previous = model_row(session, previous_id)
        if previous.status != ModelStatus.READY:
            raise Conflict(
                f"the previous model {previous.id} is {previous.status}: it can no longer be "
                "rolled back to; re-index it first"
            )
        head = Head.of(previous)
    if before_switch is not None:
        before_switch(previous.id)
    return switch_to(
        settings,
        factory,
        embedders(previous.id),
        previous.id,
        action="rollback",
        head=head,
        actor=actor,
        forced=True,
    )


def retire(settings: Settings, factory: sessionmaker[Session], model_id: int) -> Model:
    """Retire a model that is not active: its index files are deleted (embeddings stay, so a
    re-index of it only embeds what is new)."""
    with transaction(factory) as session:
        model = model_row(session, model_id, lock=True)
        if model.status == ModelStatus.ACTIVE:
            raise Conflict(f"model {model_id} is active: activate another one first")
        if model.status == ModelStatus.INDEXING:
            raise Conflict(f"model {model_id} is being indexed: cancel its job first")
        model.status = ModelStatus.RETIRED
    path = index_path(settings, model_id)
    for file in (path, sidecar_path(path)):
        file.unlink(missing_ok=True)
    return model


def activate_model(settings: Settings, factory: sessionmaker[Session], model_id: int) -> int:
    """Embed the gallery with ``model_id`` in this process, write its index, then make it the
    active model (no shadow evaluation: the CLI's direct path; the API re-indexes in the
    background and gates the switch). ``/identify`` answers with the previous model until the
    switch, and can roll back to it. Returns how many photos were embedded."""
    embedders = Embedders(settings, factory)
    photos = embedders(model_id)
    embedded = embed_gallery(settings, factory, photos.embedder, model_id)
    with factory() as session:
        wanted = uses_features(model_row(session, model_id))
    if wanted:
        extracted = FeatureStore(settings, factory).catch_up()
        log.info("model id %s: local features of %d gallery photos", model_id, extracted)
    gallery = Gallery.for_model(settings, model_id, photos.embedder.dim)
    gallery.open(factory)
    switch = switch_to(
        settings, factory, photos, model_id, action="activate", head=None, actor="cli", forced=True
    )
    refit(settings, factory, model_id, trigger="activate")
    log.info("model id %s is active; gallery of %d photos", model_id, gallery.size)
    return embedded + switch.caught_up
