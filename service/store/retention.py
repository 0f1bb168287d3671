"""Retention of query photos: a photo sent to ``/identify`` and never confirmed is kept for a
while for curators, then its file and embeddings are removed (``whaleid prune``). Its row stays,
so every identification keeps its answer; a photo in a gallery is never pruned."""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass

from sqlalchemy import delete, exists, select
from sqlalchemy.orm import Session, sessionmaker

from service.db.tables import Embedding, Feature, Identification, Image, transaction, utcnow
from service.settings import Settings
from service.store.photos import PhotoStore

log = logging.getLogger(__name__)
_BATCH = 500


@dataclass
class PruneReport:
    photos: int = 0
    bytes: int = 0


def _prunable(session: Session, cutoff: dt.datetime) -> list[Image]:
    """Query photos not in any gallery, stored before ``cutoff`` and not asked about since."""
    asked_since = exists().where(
        Identification.query_image_id == Image.id, Identification.created_at >= cutoff
    )
    return list(
        session.scalars(
            select(Image)
            .where(
                Image.source == "query",
                Image.individual_id.is_(None),
                Image.pruned_at.is_(None),
                Image.created_at < cutoff,
                ~asked_since,
            )
            .order_by(Image.id)
            .limit(_BATCH)
            .with_for_update(skip_locked=True)
        )
    )


def prune_query_photos(
    settings: Settings,
    factory: sessionmaker[Session],
    days: int,
    *,
    now: dt.datetime | None = None,
) -> PruneReport:
    """Remove the files, embeddings and local features of query photos never confirmed within
    ``days`` days.
    Each batch commits before its files are deleted, so a crash leaves at worst a file that a
    re-run does not need."""
    now = now or utcnow()
    cutoff = now - dt.timedelta(days=days)
    store = PhotoStore.open(settings)
    report = PruneReport()
    while True:
        with transaction(factory) as session:
            images = _prunable(session, cutoff)
            ids = [i.id for i in images]
            if ids:
                session.execute(delete(Embedding).where(Embedding.image_id.in_(ids)))
                session.execute(delete(Feature).where(Feature.image_id.in_(ids)))
            paths = []
            for image in images:
                image.pruned_at = now
                paths.append(image.file_path)
                report.bytes += image.byte_size
        for path in paths:
            store.remove(path)
        report.photos += len(paths)
        if len(images) < _BATCH:
            return report
