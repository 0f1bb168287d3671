"""Rows that several workflows add: photos, individuals, embeddings (get-or-add, idempotent)."""

from __future__ import annotations

from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db.tables import Embedding, Image, Individual
from service.imaging import Photo
from service.store.photos import StoredPhoto
from service.text import check_catalogue_id


def get_or_add_image(
    session: Session,
    stored: StoredPhoto,
    data: bytes,
    photo: Photo,
    original_name: str | None,
    **fields: Any,
) -> Image:
    """The row of this photo's content, added if it is new."""
    image = session.scalar(select(Image).where(Image.content_hash == stored.content_hash))
    if image is not None and image.pruned_at is not None:
        # The same photo again after its file was pruned: it is kept once more.
        image.file_path = stored.relative_path
        image.media_type = photo.media_type
        image.byte_size = len(data)
        image.width, image.height = photo.width, photo.height
        image.pruned_at = None
    if image is not None:
        return image
    image = Image(
        content_hash=stored.content_hash,
        file_path=stored.relative_path,
        media_type=photo.media_type,
        byte_size=len(data),
        width=photo.width,
        height=photo.height,
        original_name=original_name,
        source=fields.pop("source", "query"),
        **fields,
    )
    session.add(image)
    session.flush()
    return image


def get_or_add_individual(session: Session, catalogue_id: str, species: str | None) -> Individual:
    check_catalogue_id(catalogue_id)
    individual = session.scalar(select(Individual).where(Individual.catalogue_id == catalogue_id))
    if individual is None:
        individual = Individual(catalogue_id=catalogue_id, species=species or None)
        session.add(individual)
        session.flush()
    return individual


def add_embedding(session: Session, image_id: int, model_id: int, vector: np.ndarray) -> bool:
    """Store the photo's embedding by ``model_id`` unless it has one; True if it was added."""
    exists = session.scalar(
        select(Embedding.id).where(Embedding.image_id == image_id, Embedding.model_id == model_id)
    )
    if exists is None:
        session.add(
            Embedding(
                image_id=image_id,
                model_id=model_id,
                vector=np.ascontiguousarray(vector, dtype="<f4").tobytes(),
            )
        )
    return exists is None
