"""Registering ONNX models and switching the active one."""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from service.catalogue import embed_gallery
from service.db import Model, transaction
from service.embedder import Embedder, file_sha256
from service.galleries import Gallery
from service.identify import index_path
from service.modelfiles import local_model_file, model_key, publish_model
from service.settings import Settings
from service.storage import open_store

log = logging.getLogger(__name__)


def register_model(settings: Settings, factory: sessionmaker[Session], source: Path) -> Model:
    """Validate ``source`` against the model contract, publish it to the model store and add a
    row (status ``registered``). Registering the same file twice returns the existing row."""
    embedder = Embedder(source)  # refuses a file that breaks the contract, before any write
    digest = file_sha256(source)
    with factory() as session:
        existing = session.scalar(select(Model).where(Model.file_hash == digest))
        if existing is not None:
            return existing
    contract = embedder.contract
    relative = model_key(digest)
    objects = open_store(settings)
    created = publish_model(objects, source, digest)
    try:
        with transaction(factory) as session:
            model = Model(
                name=contract.name,
                version=contract.version,
                file_hash=digest,
                file_path=relative,
                embedding_dim=embedder.dim,
                preprocessing={
                    "input_size": contract.preprocessing.input_size,
                    "resize": contract.preprocessing.resize,
                    "pixel_range": contract.preprocessing.pixel_range,
                },
                k=contract.k,
                cutoff=contract.cutoff,
                ranking=contract.ranking,
                status="registered",
                metadata_props=dict(embedder.session.get_modelmeta().custom_metadata_map),
            )
            session.add(model)
        return model
    except BaseException:
        if created:
            objects.delete(relative)
        raise


def activate_model(settings: Settings, factory: sessionmaker[Session], model_id: int) -> int:
    """Embed the gallery with ``model_id``, write its index, then make it the active model in one
    transaction. ``/identify`` answers with the previous model until the switch. Returns how many
    photos were embedded."""
    with factory() as session:
        model = session.get_one(Model, model_id)
    embedder = Embedder(
        local_model_file(settings, model.file_path, model.file_hash),
        threads=settings.onnx_threads,
        max_batch_size=settings.embed_batch_size,
    )
    embedded = embed_gallery(settings, factory, embedder, model_id)
    gallery = Gallery(
        model_id, embedder.dim, index_path(settings, model_id), ivf_threshold=settings.ivf_threshold
    )
    gallery.open(factory)
    with transaction(factory) as session:
        session.execute(
            update(Model)
            .where(Model.status == "active", Model.id != model_id)
            .values(status="registered")
        )
        session.execute(update(Model).where(Model.id == model_id).values(status="active"))
    log.info(
        "model %s %s (id %s) is active; gallery of %d photos",
        model.name,
        model.version,
        model_id,
        gallery.size,
    )
    return embedded
