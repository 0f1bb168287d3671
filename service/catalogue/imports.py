"""Catalogue import (Happywhale ``train.csv`` + an image folder) and embedding of gallery photos.

Each batch of rows is committed on its own, so an interrupted run resumes where it stopped, and a
photo already stored (same content) is never added twice.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from tqdm import tqdm

from service.catalogue.csv_file import CatalogueRow, read_catalogue
from service.contract import ModelStatus
from service.db.tables import Embedding, Image, Individual, Model, transaction
from service.errors import PhotoError
from service.gallery.embed import embed_photos
from service.gallery.sync import Gallery, log_gallery_changes
from service.imaging import Photo, decode_photo
from service.matching.features import Extractor, add_features
from service.onnx.embedder import Embedder
from service.settings import Settings
from service.store.photos import PhotoStore, StoredPhoto, content_hash
from service.store.records import add_embedding, get_or_add_image, get_or_add_individual

log = logging.getLogger(__name__)


@dataclass
class ImportReport:
    imported: int = 0
    already_present: int = 0
    embedded: int = 0
    errors: list[tuple[int, str]] = field(default_factory=list)


@dataclass
class _Ready:
    row: CatalogueRow
    data: bytes
    digest: str
    photo: Photo


def _batches(
    items: Iterator[CatalogueRow | tuple[int, str]], size: int
) -> Iterator[list[CatalogueRow | tuple[int, str]]]:
    batch: list[CatalogueRow | tuple[int, str]] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


class CatalogueImport:
    """One import run into the database (and the active model's gallery)."""

    def __init__(
        self,
        settings: Settings,
        factory: sessionmaker[Session],
        embedder: Embedder | None,
        model_id: int | None,
        features: Extractor | None = None,
    ) -> None:
        """``features``: the extractor whose local features each photo gets at once (when the
        active model verifies or is the local-features matcher)."""
        self.settings = settings
        self.features = features
        self.factory = factory
        self.embedder = embedder
        self.model_id = model_id
        self.store = PhotoStore.open(settings)
        self.max_pixels = settings.max_image_pixels
        self.target = embedder.contract.preprocessing.input_size if embedder else None
        if features is not None:  # decoded big enough for the features too
            self.target = max(self.target or 0, settings.features_max_side)

    def run(self, csv_path: Path, images_dir: Path, *, batch_size: int = 32) -> ImportReport:
        report = ImportReport()
        with csv_path.open(encoding="utf-8-sig") as f:
            total = max(sum(1 for _ in f) - 1, 0)
        bar = tqdm(total=total, desc="import", unit="photo")
        try:
            for batch in _batches(read_catalogue(csv_path), batch_size):
                self._import_batch(batch, images_dir, report)
                bar.update(len(batch))
                bar.set_postfix(new=report.imported, errors=len(report.errors))
        finally:
            bar.close()
        if self.embedder is not None and self.model_id is not None:
            Gallery.for_model(self.settings, self.model_id, self.embedder.dim).open(self.factory)
        return report

    def _read(self, row: CatalogueRow, images_dir: Path) -> tuple[bytes, str] | str:
        path = images_dir / row.image
        if not path.is_file():
            return f"image {row.image!r} not found in {images_dir}"
        try:
            data = path.read_bytes()
        except OSError as e:
            return f"image {row.image!r} cannot be read: {e}"
        return data, content_hash(data)

    def _known(self, session: Session, digest: str, row: CatalogueRow) -> str | None | bool:
        """True if this row is already fully imported; a message if it conflicts; else None."""
        image = session.scalar(select(Image).where(Image.content_hash == digest))
        if image is None or image.individual_id is None:
            return None
        owner = session.get_one(Individual, image.individual_id)
        if owner.catalogue_id != row.individual_id:
            return (
                f"image {row.image!r} is already in the catalogue as individual "
                f"{owner.catalogue_id!r}, not {row.individual_id!r}: correct the CSV or merge"
            )
        if self.model_id is None:
            return True
        embedded = session.scalar(
            select(Embedding.id).where(
                Embedding.image_id == image.id, Embedding.model_id == self.model_id
            )
        )
        return True if embedded is not None else None

    def _import_batch(
        self, batch: list[CatalogueRow | tuple[int, str]], images_dir: Path, report: ImportReport
    ) -> None:
        ready: list[_Ready] = []
        seen: set[str] = set()
        with self.factory() as session:
            for item in batch:
                if isinstance(item, tuple):
                    self._error(report, *item)
                    continue
                read = self._read(item, images_dir)
                if isinstance(read, str):
                    self._error(report, item.line, read)
                    continue
                data, digest = read
                known = self._known(session, digest, item)
                if known is True or digest in seen:
                    report.already_present += 1
                    continue
                if isinstance(known, str):
                    self._error(report, item.line, known)
                    continue
                try:
                    photo = decode_photo(data, max_pixels=self.max_pixels, target_size=self.target)
                except PhotoError as e:
                    self._error(report, item.line, f"image {item.image!r}: {e}")
                    continue
                seen.add(digest)
                ready.append(_Ready(item, data, digest, photo))
        if ready:
            self._write(ready, report)

    def _error(self, report: ImportReport, line: int, message: str) -> None:
        report.errors.append((line, message))
        log.warning("line %d: %s", line, message)

    def _write(self, ready: list[_Ready], report: ImportReport) -> None:
        vectors = embed_photos(self.embedder, [r.photo for r in ready]) if self.embedder else None
        extracted = (
            [self.features.extract(r.photo.image, (r.photo.width, r.photo.height)) for r in ready]
            if self.features is not None
            else None
        )
        stored: list[StoredPhoto] = []
        try:
            for r in ready:
                stored.append(self.store.put(r.data, r.photo.media_type))
            with transaction(self.factory) as session:
                image_ids = []
                for i, (r, s) in enumerate(zip(ready, stored, strict=True)):
                    individual = get_or_add_individual(session, r.row.individual_id, r.row.species)
                    image = get_or_add_image(
                        session,
                        s,
                        r.data,
                        r.photo,
                        r.row.image,
                        source="catalogue",
                        species=r.row.species or None,
                        encounter=r.row.encounter,
                        location=r.row.location,
                        taken_on=r.row.taken_on,
                    )
                    new_image = image.individual_id is None
                    image.individual_id = individual.id
                    image_ids.append(image.id)
                    if vectors is not None and self.model_id is not None:
                        add_embedding(session, image.id, self.model_id, vectors[i])
                        report.embedded += 1
                    if extracted is not None and self.features is not None:
                        add_features(session, self.features.name, {image.id: extracted[i]})
                    report.imported += 1 if new_image else 0
                    report.already_present += 0 if new_image else 1
                if self.model_id is not None:
                    log_gallery_changes(session, image_ids, self.model_id)
        except BaseException:
            for s in stored:
                self.store.discard(s)
            raise


def model_for_import(session: Session) -> Model | None:
    return session.scalar(select(Model).where(Model.status == ModelStatus.ACTIVE))
