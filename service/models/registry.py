"""Registering ONNX models: checked against the model contract, published to the store under
their sha256, recorded as registered (activation is ``service.models.switch``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from service.contract import ModelKind, ModelStatus, Verification
from service.db.tables import Model, transaction
from service.errors import Conflict, ModelContractError
from service.onnx.embedder import Embedder, ThumbnailEmbedder
from service.onnx.files import file_sha256, model_key, publish_model
from service.outbound.redact import public_text
from service.settings import Settings
from service.store.objects import open_store

log = logging.getLogger(__name__)


def register_model(settings: Settings, factory: sessionmaker[Session], source: Path) -> Model:
    """Validate ``source`` against the model contract, publish it to the model store and add a
    row (status ``registered``). Registering the same file twice returns the existing row."""
    return register_model_file(settings, factory, source)[0]


def register_upload(
    settings: Settings, factory: sessionmaker[Session], source: Path
) -> tuple[Model, bool]:
    """``register_model_file`` for a file sent over the API (``POST /models``): a refusal names it
    "the uploaded file", never the server's temporary path (onnxruntime's message quotes it)."""
    try:
        return register_model_file(settings, factory, source)
    except ModelContractError as e:
        message = public_text(str(e).replace(str(source), "the uploaded file"))
        raise ModelContractError(message) from None


def register_model_file(
    settings: Settings, factory: sessionmaker[Session], source: Path
) -> tuple[Model, bool]:
    """``register_model``, also saying whether the row is new."""
    embedder = Embedder(source)  # refuses a file that breaks the contract, before any write
    _probe(embedder)
    digest = file_sha256(source)
    with factory() as session:
        existing = session.scalar(select(Model).where(Model.file_hash == digest))
        if existing is not None:
            return existing, False
    contract = embedder.contract
    _check_names(contract.name, contract.version)
    with factory() as session:
        same_name = session.scalar(
            select(Model.id).where(Model.name == contract.name, Model.version == contract.version)
        )
    if same_name is not None:
        raise Conflict(
            f"model {contract.name} {contract.version} is registered already (id {same_name}) "
            "with another file: export the new one with another whaleid.version"
        )
    relative = model_key(digest)
    objects = open_store(settings)
    created = publish_model(objects, source, digest)
    try:
        with transaction(factory) as session:
            model = _new_row(
                embedder,
                digest,
                relative,
                metadata_props=dict(embedder.session.get_modelmeta().custom_metadata_map),
            )
            session.add(model)
        return model, True
    except IntegrityError as e:  # registered by a concurrent upload a moment ago
        if created:
            objects.delete(relative)
        raise Conflict(
            f"model {contract.name} {contract.version} was registered concurrently: list the "
            "models (GET /models) and use that one"
        ) from e
    except BaseException:
        if created:
            objects.delete(relative)
        raise


def _new_row(embedder: Embedder, digest: str, path: str, **columns: Any) -> Model:
    """A registered model's row, its preprocessing and head from the embedder's contract."""
    contract = embedder.contract
    return Model(
        name=contract.name,
        version=contract.version,
        file_hash=digest,
        file_path=path,
        embedding_dim=embedder.dim,
        preprocessing={
            "input_size": contract.preprocessing.input_size,
            "resize": contract.preprocessing.resize,
            "pixel_range": contract.preprocessing.pixel_range,
        },
        k=contract.head.k,
        cutoff=contract.head.cutoff,
        ranking=contract.head.ranking,
        status=ModelStatus.REGISTERED,
        **columns,
    )


def _probe(embedder: Embedder) -> None:
    """Embed a grey photo: the model must run at its input size and give one finite vector of
    its declared dimension."""
    size = embedder.contract.preprocessing.input_size
    try:
        out = embedder.embed(np.full((1, size, size, 3), 127.0, dtype=np.float32))
    except Exception as e:  # onnxruntime raises its own types for a graph that cannot run
        raise ModelContractError(f"the model cannot embed a {size}x{size} photo: {e}") from e
    if out.shape != (1, embedder.dim) or not np.isfinite(out).all() or not out.any():
        raise ModelContractError(
            f"the probe embedding is {out.shape}, not (1, {embedder.dim}), or not finite and "
            "non-zero: check the export"
        )


def _check_names(name: str, version: str) -> None:
    for key, value, limit in (("whaleid.name", name, 200), ("whaleid.version", version, 100)):
        if not value or len(value) > limit or "\x00" in value:
            raise ModelContractError(
                f"{key} must be 1 to {limit} characters without NUL bytes, not {value[:40]!r}"
            )


def all_models(session: Session) -> list[Model]:
    """Every registered model, oldest first (what `GET /models` and `whaleid models list` show)."""
    return list(session.scalars(select(Model).order_by(Model.id)))


def register_builtin(factory: sessionmaker[Session], name: str) -> Model:
    """Register a built-in matcher (``builtin:local-features``): no file, no training. Its
    gallery is indexed and switched to like any model's. Registering it twice returns the row."""
    embedder = ThumbnailEmbedder.builtin(name)  # refuses an unknown built-in
    with factory() as session:
        existing = session.scalar(select(Model).where(Model.file_hash == name))
        if existing is not None:
            return existing
    try:
        with transaction(factory) as session:
            model = _new_row(
                embedder,
                name,
                name,
                metadata_props={},
                kind=ModelKind.LOCAL_FEATURES,
                verification=Verification.RERANK,
            )
            session.add(model)
        return model
    except IntegrityError as e:
        raise Conflict(
            f"{name} was registered concurrently: list the models (GET /models) and use that one"
        ) from e
