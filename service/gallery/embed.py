"""Embedding stored photos with a model: the batches of a catalogue import, and the gallery
photos a model has not embedded yet."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from tqdm import tqdm

from service.db.tables import Embedding, Image, transaction
from service.gallery.sync import log_gallery_changes
from service.imaging import Photo, decode_photo, to_model_input
from service.onnx.embedder import Embedder
from service.settings import Settings
from service.store.photos import PhotoStore
from service.store.records import add_embedding


def embed_photos(embedder: Embedder, photos: Sequence[Photo]) -> np.ndarray:
    """Embeddings of decoded photos, preprocessed as the model's contract says."""
    spec = embedder.contract.preprocessing
    return embedder.embed(np.stack([to_model_input(p.image, spec) for p in photos]))


def embed_gallery(
    settings: Settings,
    factory: sessionmaker[Session],
    embedder: Embedder,
    model_id: int,
    *,
    batch_size: int = 32,
) -> int:
    """Embed every gallery photo (confirmed individual) that ``model_id`` has not embedded yet.
    Resumable: each batch commits; a re-run picks up what is left."""
    store = PhotoStore.open(settings)
    with factory() as session:
        done = select(Embedding.image_id).where(Embedding.model_id == model_id)
        todo = session.execute(
            select(Image.id, Image.file_path)
            .where(Image.individual_id.is_not(None), Image.id.not_in(done))
            .order_by(Image.id)
        ).all()
    count = 0
    spec = embedder.contract.preprocessing
    batches = range(0, len(todo), batch_size)
    for start in tqdm(batches, desc="embed", unit="batch", disable=not batches):
        chunk = todo[start : start + batch_size]
        photos = [
            decode_photo(
                store.read(path),
                max_pixels=settings.max_image_pixels,
                target_size=spec.input_size,
            )
            for _, path in chunk
        ]
        vectors = embed_photos(embedder, photos)
        with transaction(factory) as session:
            for (image_id, _), vector in zip(chunk, vectors, strict=True):
                add_embedding(session, image_id, model_id, vector)
            log_gallery_changes(session, [image_id for image_id, _ in chunk], model_id)
        count += len(chunk)
    return count
