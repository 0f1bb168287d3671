"""Writing an identification: the photo's row and embedding, the answer and its candidates, in
one transaction, with statements built once (a statement built per request costs more than its
round trip to SQLite); each runs with a dict of parameters."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
from sqlalchemy import bindparam, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from service.db.tables import (
    Candidate,
    Embedding,
    Identification,
    Image,
    Individual,
    insert_unless_there,
    table_of,
    transaction,
    utcnow,
)
from service.gallery.sync import Filters, log_gallery_changes
from service.imaging import Photo
from service.matching.features import Features, add_features
from service.store.photos import StoredPhoto
from service.store.records import add_embedding, get_or_add_image

if TYPE_CHECKING:
    from service.matching.identify import AnsweredCandidate, ModelInfo


@dataclass(frozen=True)
class Recorded:
    """The rows an answer was recorded in."""

    id: int
    query_image_id: int
    created_at: dt.datetime


@dataclass(frozen=True)
class Asker:
    """Who sent a recorded photo: its file name, and the API key (it alone, with curators,
    reads the identification and the query photo afterwards)."""

    original_name: str | None = None
    key_id: int | None = None


class Line(Protocol):
    """One line of an answer before its individual's row is looked up."""

    @property
    def label(self) -> str: ...

    @property
    def is_new(self) -> bool: ...


def _blob(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype="<f4").tobytes()


_IMAGE_COLUMNS = (
    "content_hash",
    "file_path",
    "media_type",
    "byte_size",
    "width",
    "height",
    "original_name",
    "source",
    "created_at",
)
_NEW_IMAGE = {
    dialect: statement.values(
        {c: bindparam(c, type_=table_of(Image).c[c].type) for c in _IMAGE_COLUMNS}
    ).returning(table_of(Image).c.id)
    for dialect, statement in insert_unless_there(Image, ["content_hash"]).items()
}
_NEW_EMBEDDING = insert(table_of(Embedding))
_IDENTIFICATION_COLUMNS = (
    "query_image_id",
    "model_id",
    "filters",
    "bbox",
    "k",
    "cutoff",
    "ranking",
    "verification",
    "calibration_version",
    "gallery_size",
    "key_id",
    "created_at",
)
_NEW_IDENTIFICATION = (
    insert(table_of(Identification))
    .values(
        {c: bindparam(c, type_=table_of(Identification).c[c].type) for c in _IDENTIFICATION_COLUMNS}
    )
    .returning(table_of(Identification).c.id)
)
_NEW_CANDIDATES = insert(table_of(Candidate))


def insert_new_image(
    session: Session, stored: StoredPhoto, data: bytes, photo: Photo, original_name: str | None
) -> int | None:
    """Insert the photo's row unless a row holds its content: the new row's id, else None."""
    statement = _NEW_IMAGE[session.get_bind().dialect.name]
    new_id = session.execute(
        statement,
        {
            "content_hash": stored.content_hash,
            "file_path": stored.relative_path,
            "media_type": photo.media_type,
            "byte_size": len(data),
            "width": photo.width,
            "height": photo.height,
            "original_name": original_name,
            "source": "query",
            "created_at": utcnow(),
        },
    ).scalar()
    return None if new_id is None else int(new_id)


@dataclass(frozen=True)
class Asked:
    """What was asked and answered, to be written: the model, the photo as kept and its
    embedding and local features, the filters and crop, who asked, the gallery's size."""

    model: ModelInfo
    stored: StoredPhoto
    data: bytes
    photo: Photo
    vector: np.ndarray
    features: Features | None
    extractor: str
    filters: Filters
    bbox: tuple[int, int, int, int] | None
    asker: Asker
    gallery_size: int


def write_identification(
    factory: sessionmaker[Session],
    asked: Asked,
    ranked: Sequence[Line],
    answer: Callable[[dict[str, str | None]], list[AnsweredCandidate]],
) -> tuple[Recorded, list[AnsweredCandidate]]:
    """The photo's row and embedding, the answer and its candidates, in one transaction.
    A new photo (the usual case) takes five statements, without the ORM's bookkeeping: the
    photo inserted unless its content is there (``ON CONFLICT DO NOTHING``), its embedding,
    the individuals named, the identification and its candidates. ``answer`` makes the
    answer's lines from the species of the individuals named, as the database has them."""
    model, stored, data, photo = asked.model, asked.stored, asked.data, asked.photo
    for attempt in range(2):
        try:
            with transaction(factory) as session:
                original_name = asked.asker.original_name
                image_id = insert_new_image(session, stored, data, photo, original_name)
                if image_id is None:  # the same photo was sent before
                    image = get_or_add_image(session, stored, data, photo, original_name)
                    image_id, in_gallery = image.id, image.individual_id is not None
                    added = add_embedding(session, image.id, model.id, asked.vector)
                else:  # a new photo: nobody has embedded it, it is in no gallery
                    in_gallery, added = False, True
                    session.execute(
                        _NEW_EMBEDDING,
                        [
                            {
                                "image_id": image_id,
                                "model_id": model.id,
                                "vector": _blob(asked.vector),
                            }
                        ],
                    )
                # Kept so that a confirmation puts the photo in the gallery at once. A crop
                # (bbox) embeds a part of the photo: that embedding is the one to keep.
                if asked.features is not None:
                    # Kept with the photo: a confirmation puts them in the gallery with it.
                    add_features(session, asked.extractor, {image_id: asked.features})
                labels = [c.label for c in ranked if not c.is_new]
                individuals = {
                    label: (individual_id, species)
                    for individual_id, label, species in session.execute(
                        select(Individual.id, Individual.catalogue_id, Individual.species).where(
                            Individual.catalogue_id.in_(labels)
                        )
                    )
                }
                lines = answer({k: v[1] for k, v in individuals.items()})
                created_at = utcnow()
                ident_id = session.execute(
                    _NEW_IDENTIFICATION,
                    {
                        "query_image_id": image_id,
                        "model_id": model.id,
                        "filters": asked.filters.as_dict(),
                        "bbox": list(asked.bbox) if asked.bbox else None,
                        "k": model.head.k,
                        "cutoff": model.head.cutoff,
                        "ranking": model.head.ranking,
                        "verification": str(model.verification),
                        "calibration_version": model.calibration_version,
                        "gallery_size": asked.gallery_size,
                        "key_id": asked.asker.key_id,
                        "created_at": created_at,
                    },
                ).scalar_one()
                session.execute(
                    _NEW_CANDIDATES,
                    [
                        {
                            "identification_id": ident_id,
                            "rank": a.rank,
                            "label": a.individual_id,
                            "individual_id": individuals.get(a.individual_id, (None,))[0],
                            "species": a.species,
                            "votes": a.votes,
                            "distance": a.distance,
                            "best_image_id": a.best_image_id,
                            "inliers": a.inliers,
                            "score": a.score,
                        }
                        for a in lines
                    ],
                )
                if added and in_gallery:
                    # A gallery photo this model had not embedded: its gallery grew.
                    log_gallery_changes(session, [image_id], model.id)
                return Recorded(ident_id, image_id, created_at), lines
        except IntegrityError:
            # Two uploads of the same new photo raced for its row: the retry finds it.
            if attempt:
                raise
    raise AssertionError("unreachable")
