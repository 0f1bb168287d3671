"""What the routers read, as domain functions: individuals and their photos, the photos a key may
fetch, recorded identifications and the review queue. Routers turn the rows into responses; the
queries live here, once each."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import Session, selectinload, sessionmaker

from service.access.auth import Principal
from service.access.tenancy import (
    can_read_identification,
    own_identifications,
    readable_images,
)
from service.db.tables import Identification, Image, Individual
from service.errors import Invalid, NotFound
from service.matching.features import FeatureStore
from service.matching.verify import PairMatch, match_pair


def individuals_page(
    session: Session, species: str | None, offset: int, limit: int
) -> tuple[int, list[tuple[Individual, int]]]:
    """How many individuals (not merged away, of ``species`` if given) there are, and one page
    of them by catalogue id, each with its photo count."""
    where: list[ColumnElement[bool]] = [Individual.merged_into_id.is_(None)]
    if species:
        where.append(Individual.species == species)
    total = session.scalar(select(func.count()).select_from(Individual).where(*where)) or 0
    counts = (
        select(Image.individual_id, func.count().label("n"))
        .group_by(Image.individual_id)
        .subquery()
    )
    rows = session.execute(
        select(Individual, func.coalesce(counts.c.n, 0))
        .outerjoin(counts, counts.c.individual_id == Individual.id)
        .where(*where)
        .order_by(Individual.catalogue_id)
        .offset(offset)
        .limit(limit)
    ).all()
    return total, [(individual, int(n)) for individual, n in rows]


def individual_by_catalogue_id(session: Session, catalogue_id: str) -> Individual | None:
    return session.scalar(select(Individual).where(Individual.catalogue_id == catalogue_id))


def photos_of(session: Session, individual_id: int) -> Sequence[Image]:
    """An individual's photos, oldest first."""
    return session.scalars(
        select(Image).where(Image.individual_id == individual_id).order_by(Image.id)
    ).all()


def photo_count(session: Session, individual_id: int) -> int:
    return (
        session.scalar(
            select(func.count()).select_from(Image).where(Image.individual_id == individual_id)
        )
        or 0
    )


def readable_image(session: Session, caller: Principal, image_id: int) -> Image | None:
    """The photo, if ``caller`` may read it (a catalogue photo is everyone's, a query photo its
    sender's and curators')."""
    return session.scalar(select(Image).where(Image.id == image_id, readable_images(caller)))


def recorded_identification(session: Session, identification_id: int) -> Identification | None:
    """An identification with its candidates and model, as it was answered."""
    return session.scalar(
        select(Identification)
        .where(Identification.id == identification_id)
        .options(selectinload(Identification.candidates), selectinload(Identification.model))
    )


@dataclass(frozen=True)
class CandidateMatches:
    """The keypoint matches between a query photo and one candidate's best photo."""

    identification_id: int
    rank: int
    individual_id: str
    query_image_id: int
    candidate_image_id: int
    query_size: tuple[int, int]
    candidate_size: tuple[int, int]
    match: PairMatch


def candidate_matches(
    factory: sessionmaker[Session],
    features: FeatureStore,
    caller: Principal,
    identification_id: int,
    rank: int,
) -> CandidateMatches:
    """Match the query photo of an identification ``caller`` may read with the best photo of
    its candidate at ``rank`` (the same matching as verification; a photo without features has
    them extracted, in a transaction of their own, once this read is over)."""
    with factory() as session:
        ident = recorded_identification(session, identification_id)
        if ident is None or not can_read_identification(caller, ident):
            # Another partner's identification answers as one that does not exist.
            raise NotFound(f"identification {identification_id} does not exist")
        query_id, (label, best_id) = (
            ident.query_image_id,
            _matched_photo(session, ident, rank, caller),
        )
    # The read is over (SQLite holds no lock) before any features are extracted.
    found = features.get([query_id, best_id])
    query, other = found.get(query_id), found.get(best_id)
    if query is None or other is None:
        raise NotFound("a photo of this pair cannot be read: nothing to match")
    return CandidateMatches(
        identification_id,
        rank,
        label,
        query_id,
        best_id,
        (query.width, query.height),
        (other.width, other.height),
        match_pair(query, other),
    )


def _matched_photo(
    session: Session, ident: Identification, rank: int, caller: Principal
) -> tuple[str, int]:
    """The label and best photo of the candidate at ``rank``, both photos still kept and
    readable by ``caller`` (a confirmed query photo can become another partner's again)."""
    candidate = next((c for c in ident.candidates if c.rank == rank), None)
    if candidate is None:
        raise NotFound(
            f"identification {ident.id} has no candidate at rank {rank}: ranks run from 1 to "
            f"{len(ident.candidates)}"
        )
    if candidate.best_image_id is None:
        raise Invalid(
            f"candidate {rank} is {candidate.label}: it has no photo to match; ask for another rank"
        )
    pair = ((ident.query_image_id, "query"), (candidate.best_image_id, "candidate"))
    readable = select(Image).where(Image.id.in_([p for p, _ in pair]), readable_images(caller))
    photos = {i.id: i for i in session.scalars(readable)}
    for image_id, whose in pair:
        image = photos.get(image_id)
        if image is None or image.pruned_at is not None:
            raise NotFound(
                f"the {whose} photo {image_id} is no longer kept, or no longer shared: nothing "
                "to match"
            )
    return candidate.label, candidate.best_image_id


def identifications_page(
    session: Session,
    caller: Principal,
    *,
    status: str | None,
    species: str | None,
    model_id: int | None,
    offset: int,
    limit: int,
) -> tuple[int, Sequence[Identification]]:
    """The review queue as a key sees it (an integration key, its own): how many there are by
    status, species filter or model, and one page of them oldest first, with their candidates."""
    where: list[ColumnElement[bool]] = [own_identifications(caller)]
    if status:
        where.append(Identification.status == status)
    if model_id is not None:
        where.append(Identification.model_id == model_id)
    if species:
        where.append(Identification.filters["species"].as_string() == species)
    total = session.scalar(select(func.count()).select_from(Identification).where(*where)) or 0
    rows = session.scalars(
        select(Identification)
        .where(*where)
        .options(selectinload(Identification.candidates))
        .order_by(Identification.id)
        .offset(offset)
        .limit(limit)
    ).all()
    return total, rows


def review_queue(session: Session, status: str | None, limit: int = 200) -> list[Identification]:
    """The first ``limit`` identifications of ``status`` (any, if None), oldest first, with
    their candidates: the review page's queue."""
    where = [Identification.status == status] if status else []
    return list(
        session.scalars(
            select(Identification)
            .where(*where)
            .options(selectinload(Identification.candidates))
            .order_by(Identification.id)
            .limit(limit)
        )
    )
