"""Curators' decisions and catalogue edits. Each change commits to the database first (with an
audit row and a gallery change-log entry); the caller then brings the in-memory gallery up to
date, so the next ``/identify`` sees it."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.db.tables import (
    Decision,
    Identification,
    Image,
    Individual,
    IndividualEvent,
    transaction,
)
from service.errors import Conflict, Invalid, NotFound
from service.gallery.sync import log_gallery_changes
from service.knn import NEW_INDIVIDUAL
from service.text import check_catalogue_id, is_reserved


class DecisionKind(StrEnum):
    CONFIRM = "confirm"
    NEW_INDIVIDUAL = "new_individual"
    REJECT = "reject"


class IdentificationStatus(StrEnum):
    """Where an identification stands in the review queue."""

    PENDING = "pending"
    CONFIRMED = "confirmed"
    NEW_INDIVIDUAL = "new_individual"
    REJECTED = "rejected"


STATUS_AFTER = {
    DecisionKind.CONFIRM: IdentificationStatus.CONFIRMED,
    DecisionKind.NEW_INDIVIDUAL: IdentificationStatus.NEW_INDIVIDUAL,
    DecisionKind.REJECT: IdentificationStatus.REJECTED,
}


@dataclass(frozen=True)
class DecisionRequest:
    decision: DecisionKind
    individual_id: str | None = None
    code: str | None = None
    name: str | None = None
    species: str | None = None
    comment: str | None = None
    supersede: bool = False


class DecisionRecord(BaseModel):
    """A curator's decision, as the API answers it and the review page shows it."""

    model_config = ConfigDict(frozen=True)

    decision_id: int
    identification_id: int
    decision: str
    individual_id: str | None
    candidate_rank: int | None
    curator: str
    comment: str | None
    created_at: dt.datetime
    superseded: bool
    replayed: bool = Field(
        default=False, description="True when this repeats an earlier, identical decision."
    )


def _audit(session: Session, individual: Individual, event: str, actor: str, **detail: Any) -> None:
    session.add(
        IndividualEvent(individual_id=individual.id, event=event, detail=detail, actor=actor)
    )


def _named(session: Session, catalogue_id: str) -> Individual:
    """The individual with this catalogue id itself, merged or not."""
    individual = session.scalar(select(Individual).where(Individual.catalogue_id == catalogue_id))
    if individual is None:
        raise NotFound(f"individual {catalogue_id!r} is not in the catalogue")
    return individual


def resolve(session: Session, catalogue_id: str) -> Individual:
    """The individual with this catalogue id, following merges to the one it now lives in."""
    individual = session.scalar(select(Individual).where(Individual.catalogue_id == catalogue_id))
    if individual is None:
        raise NotFound(
            f"individual {catalogue_id!r} is not in the catalogue: check the id, or declare a "
            "new individual"
        )
    seen = {individual.id}
    while individual.merged_into_id is not None:
        individual = session.get_one(Individual, individual.merged_into_id)
        if individual.id in seen:  # pragma: no cover - merges refuse cycles
            raise Conflict(f"merge cycle at individual {individual.catalogue_id!r}")
        seen.add(individual.id)
    return individual


def _record(session: Session, decision: Decision, replayed: bool = False) -> DecisionRecord:
    individual = (
        session.get_one(Individual, decision.individual_id) if decision.individual_id else None
    )
    created = decision.created_at  # stored in UTC; SQLite hands it back without a zone
    return DecisionRecord(
        decision_id=decision.id,
        identification_id=decision.identification_id,
        decision=decision.decision,
        individual_id=individual.catalogue_id if individual else None,
        candidate_rank=decision.candidate_rank,
        curator=decision.curator,
        comment=decision.comment,
        created_at=created if created.tzinfo else created.replace(tzinfo=dt.UTC),
        superseded=decision.superseded_by_id is not None,
        replayed=replayed,
    )


def current_decision(session: Session, identification_id: int) -> Decision | None:
    return session.scalar(
        select(Decision)
        .where(Decision.identification_id == identification_id, Decision.superseded_by_id.is_(None))
        .order_by(Decision.id.desc())
        .limit(1)
    )


def decision_history(session: Session, identification_id: int) -> list[DecisionRecord]:
    rows = session.scalars(
        select(Decision)
        .where(Decision.identification_id == identification_id)
        .order_by(Decision.id)
    )
    return [_record(session, d) for d in rows]


def _same(session: Session, current: Decision, request: DecisionRequest) -> bool:
    if current.decision != request.decision:
        return False
    if request.decision == DecisionKind.REJECT:
        return True
    assert current.individual_id is not None
    decided = session.get_one(Individual, current.individual_id)
    if request.decision == DecisionKind.CONFIRM:
        assert request.individual_id is not None
        return (
            resolve(session, request.individual_id).id == resolve(session, decided.catalogue_id).id
        )
    return request.code is None or request.code == decided.catalogue_id


def _candidate_rank(ident: Identification, label: str) -> int | None:
    return next((c.rank for c in ident.candidates if c.label == label), None)


def decide(
    factory: sessionmaker[Session], identification_id: int, request: DecisionRequest, curator: str
) -> DecisionRecord:
    """Record a curator's decision. The same decision again returns the first one unchanged; a
    different one is a ``Conflict`` unless ``supersede`` is set, and then the history keeps both."""
    if request.decision == DecisionKind.CONFIRM and not request.individual_id:
        raise Invalid("a confirmation needs individual_id: the catalogue id of the individual")
    if request.decision == DecisionKind.CONFIRM and is_reserved(request.individual_id or ""):
        raise Invalid(
            f"{NEW_INDIVIDUAL} is not an individual to confirm: send decision new_individual"
        )
    if request.code is not None:
        check_catalogue_id(request.code)
    with transaction(factory) as session:
        ident = session.scalar(
            select(Identification).where(Identification.id == identification_id).with_for_update()
        )
        if ident is None:
            raise NotFound(f"identification {identification_id} does not exist")
        current = current_decision(session, identification_id)
        if current is not None and _same(session, current, request):
            return _record(session, current, replayed=True)
        if current is not None and not request.supersede:
            before = _record(session, current)
            raise Conflict(
                f"identification {identification_id} was already decided by {before.curator}: "
                f"{before.decision} {before.individual_id or ''}".rstrip()
                + "; send supersede=true to replace that decision"
            )
        image = session.get_one(Image, ident.query_image_id, with_for_update=True)
        if image.pruned_at is not None and request.decision != DecisionKind.REJECT:
            raise Conflict(
                f"the photo of identification {identification_id} was pruned on "
                f"{image.pruned_at:%Y-%m-%d} (never confirmed within the retention period): "
                "identify the photo again to decide on it"
            )
        undone = _undo(session, current, image, curator) if current is not None else None
        individual, rank = _apply(session, ident, image, request, curator, undone)
        decision = Decision(
            identification_id=ident.id,
            decision=request.decision,
            individual_id=individual.id if individual else None,
            candidate_rank=rank,
            curator=curator,
            comment=request.comment,
        )
        session.add(decision)
        session.flush()
        if current is not None:
            current.superseded_by_id = decision.id
        ident.status = STATUS_AFTER[request.decision]
        log_gallery_changes(session, [image.id])
        return _record(session, decision)


def _undo(session: Session, current: Decision, image: Image, actor: str) -> int | None:
    """Take back the photo a superseded decision put into an individual."""
    if current.individual_id is None or image.individual_id is None:
        return None
    owner = session.get_one(Individual, image.individual_id)
    _audit(
        session,
        owner,
        "photo_removed",
        actor,
        image_id=image.id,
        identification_id=current.identification_id,
    )
    image.individual_id = None
    return owner.id


def _apply(
    session: Session,
    ident: Identification,
    image: Image,
    request: DecisionRequest,
    actor: str,
    undone: int | None,
) -> tuple[Individual | None, int | None]:
    if request.decision == DecisionKind.REJECT:
        return None, None
    if request.decision == DecisionKind.CONFIRM:
        assert request.individual_id is not None
        individual = resolve(session, request.individual_id)
        rank = _candidate_rank(ident, individual.catalogue_id) or _candidate_rank(
            ident, request.individual_id
        )
    else:
        code = request.code or f"whaleid-{ident.id}"
        existing = session.scalar(select(Individual).where(Individual.catalogue_id == code))
        if existing is not None and existing.id != undone:
            raise Conflict(
                f"individual {code!r} already exists: confirm it instead, or choose another code"
            )
        individual = existing or Individual(
            catalogue_id=code,
            species=request.species or image.species,
            display_name=request.name,
        )
        if existing is None:
            session.add(individual)
            session.flush()
            _audit(
                session,
                individual,
                "created",
                actor,
                identification_id=ident.id,
                species=individual.species,
                name=individual.display_name,
            )
        rank = _candidate_rank(ident, NEW_INDIVIDUAL)
    if image.individual_id is not None and image.individual_id != individual.id:
        other = session.get_one(Individual, image.individual_id)
        raise Conflict(
            f"this photo is already in the catalogue as individual {other.catalogue_id!r}: "
            "split it from there first"
        )
    image.individual_id = individual.id
    if image.species is None:
        image.species = individual.species
    _audit(session, individual, "photo_added", actor, image_id=image.id, identification_id=ident.id)
    return individual, rank


def create_individual(
    factory: sessionmaker[Session], code: str, species: str | None, name: str | None, actor: str
) -> Individual:
    check_catalogue_id(code)
    with transaction(factory) as session:
        if session.scalar(select(Individual.id).where(Individual.catalogue_id == code)):
            raise Conflict(f"individual {code!r} already exists")
        individual = Individual(catalogue_id=code, species=species, display_name=name)
        session.add(individual)
        session.flush()
        _audit(session, individual, "created", actor, species=species, name=name)
        return individual


def _photos_of(session: Session, individual: Individual) -> list[Image]:
    return list(session.scalars(select(Image).where(Image.individual_id == individual.id)))


def update_individual(
    factory: sessionmaker[Session],
    code: str,
    actor: str,
    *,
    new_code: str | None = None,
    name: str | None = None,
    species: str | None = None,
) -> Individual:
    """Rename (catalogue id or display name) or change the species; the gallery follows."""
    with transaction(factory) as session:
        individual = _named(session, code)
        if individual.merged_into_id is not None:
            target = resolve(session, code).catalogue_id
            raise Conflict(
                f"individual {code!r} was merged into {target!r}: edit {target!r} instead "
                f"(PATCH /individuals/{target})"
            )
        photos = _photos_of(session, individual)
        if new_code is not None and new_code != individual.catalogue_id:
            check_catalogue_id(new_code)
            if session.scalar(select(Individual.id).where(Individual.catalogue_id == new_code)):
                raise Conflict(f"individual {new_code!r} already exists: merge instead")
            _audit(session, individual, "renamed", actor, old=individual.catalogue_id, new=new_code)
            individual.catalogue_id = new_code
        if name is not None and name != individual.display_name:
            _audit(
                session, individual, "name_changed", actor, old=individual.display_name, new=name
            )
            individual.display_name = name
        if species is not None and species != individual.species:
            _audit(
                session, individual, "species_changed", actor, old=individual.species, new=species
            )
            individual.species = species
            for photo in photos:  # the photos show the same animal
                photo.species = species
        log_gallery_changes(session, [p.id for p in photos])
        return individual


def merge_individuals(
    factory: sessionmaker[Session], source: str, target: str, actor: str
) -> Individual:
    """Merge ``source`` into ``target``: every photo moves, ``source`` redirects to ``target``."""
    with transaction(factory) as session:
        a = _named(session, source)
        if a.merged_into_id is not None:
            raise Conflict(f"individual {source!r} was already merged")
        b = resolve(session, target)
        if a.id == b.id:
            raise Invalid("an individual cannot be merged into itself")
        photos = _photos_of(session, a)
        for photo in photos:
            photo.individual_id = b.id
        for earlier in session.scalars(select(Individual).where(Individual.merged_into_id == a.id)):
            earlier.merged_into_id = b.id
        a.merged_into_id = b.id
        ids = [p.id for p in photos]
        _audit(session, a, "merged_into", actor, into=b.catalogue_id, image_ids=ids)
        _audit(session, b, "merged_from", actor, source=a.catalogue_id, image_ids=ids)
        log_gallery_changes(session, ids)
        return b


def split_individual(
    factory: sessionmaker[Session],
    source: str,
    image_ids: Sequence[int],
    actor: str,
    *,
    into: str | None = None,
    new_code: str | None = None,
    name: str | None = None,
) -> Individual:
    """Move the chosen photos of ``source`` to ``into`` (an existing individual) or to a new one
    (``new_code``)."""
    if not image_ids:
        raise Invalid("name the photos to split off in image_ids")
    if (into is None) == (new_code is None):
        raise Invalid("give either into (an existing individual) or new_individual_id")
    if new_code is not None:
        check_catalogue_id(new_code)
    with transaction(factory) as session:
        a = resolve(session, source)
        photos = list(session.scalars(select(Image).where(Image.id.in_(list(image_ids)))))
        strangers = sorted(set(image_ids) - {p.id for p in photos if p.individual_id == a.id})
        if strangers:
            raise Invalid(f"photos {strangers} are not photos of individual {source!r}")
        if into is not None:
            b = resolve(session, into)
            if b.id == a.id:
                raise Invalid("split into the same individual changes nothing")
        else:
            assert new_code is not None
            if session.scalar(select(Individual.id).where(Individual.catalogue_id == new_code)):
                raise Conflict(f"individual {new_code!r} already exists: split into it instead")
            b = Individual(catalogue_id=new_code, species=a.species, display_name=name)
            session.add(b)
            session.flush()
            _audit(session, b, "created", actor, split_from=a.catalogue_id)
        for photo in photos:
            photo.individual_id = b.id
        ids = sorted(p.id for p in photos)
        _audit(session, a, "split", actor, into=b.catalogue_id, image_ids=ids)
        _audit(session, b, "photos_from_split", actor, source=a.catalogue_id, image_ids=ids)
        log_gallery_changes(session, ids)
        return b


def individual_history(session: Session, code: str) -> list[IndividualEvent]:
    individual = _named(session, code)
    return list(
        session.scalars(
            select(IndividualEvent)
            .where(IndividualEvent.individual_id == individual.id)
            .order_by(IndividualEvent.id)
        )
    )
