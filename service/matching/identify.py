"""The identification pipeline: decode, preprocess, embed, search, kNN head, record."""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO

import numpy as np
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from service.contract import Head, ModelStatus
from service.db.tables import Candidate, Identification, Image, Individual, Model, transaction
from service.gallery.sync import Filters, Gallery, latest_change, log_gallery_changes
from service.imaging import Keepsake, Photo, decode_photo, keepsake, to_model_input
from service.knn import RankedCandidate, rank_candidates
from service.matching.slots import WorkSlots
from service.onnx.embedder import Embedder
from service.settings import Settings
from service.store.photos import PhotoStore, StoredPhoto, content_hash
from service.store.records import add_embedding, get_or_add_image

log = logging.getLogger(__name__)


class NoActiveModel(RuntimeError):
    """No model is active yet."""

    def __init__(self) -> None:
        super().__init__(
            "no active model: register one with `whaleid models add MODEL.onnx --activate`"
        )


@dataclass(frozen=True)
class ModelInfo:
    """The model an answer came from, and the head it answered with."""

    id: int
    name: str
    version: str
    head: Head

    @classmethod
    def of(cls, model: Model) -> ModelInfo:
        return cls(model.id, model.name, model.version, Head.of(model))


@dataclass(frozen=True)
class AnsweredCandidate:
    rank: int
    individual_id: str
    species: str | None
    votes: int | None
    distance: float | None
    confidence: float | None
    best_image_id: int | None


@dataclass
class IdentificationResult:
    identification_id: int | None
    candidates: list[AnsweredCandidate]
    model: ModelInfo
    gallery_size: int
    filters: dict[str, str]
    searched: int
    timings: dict[str, float] = field(default_factory=dict)
    query_image_id: int | None = None
    created_at: dt.datetime | None = None


class _Stopwatch:
    def __init__(self) -> None:
        self.laps: dict[str, float] = {}

    @contextmanager
    def lap(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.laps[name] = (time.perf_counter() - start) * 1000.0


@dataclass(frozen=True)
class Asker:
    """Who sent a recorded photo: its file name, and the API key (it alone, with curators,
    reads the identification and the query photo afterwards)."""

    original_name: str | None = None
    key_id: int | None = None


class Identifier:
    """Everything ``/identify`` needs for one model, loaded once."""

    def __init__(
        self,
        settings: Settings,
        factory: sessionmaker[Session],
        model: Model,
        embedder: Embedder,
        gallery: Gallery,
        slots: WorkSlots | None = None,
    ) -> None:
        self.settings = settings
        self.slots = slots or WorkSlots(settings)
        self.factory = factory
        self.model = ModelInfo.of(model)
        self.embedder = embedder
        self.gallery = gallery
        self.store = PhotoStore.open(settings)

    @classmethod
    def load(
        cls,
        settings: Settings,
        factory: sessionmaker[Session],
        model: Model,
        slots: WorkSlots | None = None,
    ) -> Identifier:
        """Open the model's ONNX file and its gallery (rebuilding the index if need be)."""
        embedder = Embedder.for_model(settings, model.file_path)
        gallery = Gallery.for_model(settings, model.id, embedder.dim)
        gallery.open(factory)
        return cls(settings, factory, model, embedder, gallery, slots)

    def decode(self, data: bytes, bbox: tuple[int, int, int, int] | None) -> Photo:
        return decode_photo(
            data,
            max_pixels=self.settings.max_image_pixels,
            target_size=self.embedder.contract.preprocessing.input_size,
            bbox=bbox,
        )

    def identify(
        self,
        data: bytes | IO[bytes],
        *,
        filters: Filters,
        bbox: tuple[int, int, int, int] | None = None,
        record: bool = True,
        original_name: str | None = None,
        key_id: int | None = None,
    ) -> IdentificationResult:
        """Identify one photo. With ``record``, the photo, the answer and what was used are
        written to the database in one transaction (and the photo file removed if that fails).

        The upload is read, decoded and reduced to what is kept inside a decode slot, and
        embedded inside an embed slot: no more than the slots hold is ever decoded at once."""
        watch = _Stopwatch()
        with self.slots.decode.hold():
            raw = data if isinstance(data, bytes) else data.read()
            digest = content_hash(raw) if record else ""
            with watch.lap("decode"):
                photo = self.decode(raw, bbox)
            with watch.lap("preprocess"):
                pixels = to_model_input(photo.image, self.embedder.contract.preprocessing)
            kept = (
                keepsake(
                    raw,
                    photo,
                    max_side=self.settings.stored_photo_max_side,
                    cropped=bbox is not None,
                )
                if record
                else None
            )
            del raw, photo  # the full-size pixels go with the slot
        with self.slots.embed.hold(), watch.lap("embed"):
            vector = self.embedder.embed(pixels[np.newaxis])[0]
        with watch.lap("search"):
            neighbours, searched = self.gallery.search(vector, self.model.head.k, filters)
            beyond = self.gallery.search_beyond(vector, filters, neighbours)
        with watch.lap("head"):
            ranked = rank_candidates(
                neighbours,
                cutoff=self.model.head.cutoff,
                ranking=self.model.head.ranking,
                beyond=beyond,
            )
        with watch.lap("database"):
            if kept is not None:
                ident, candidates = self._record(
                    kept, digest, vector, ranked, filters, bbox, Asker(original_name, key_id)
                )
            else:
                ident, candidates = None, self._answer(ranked, None)
        return IdentificationResult(
            ident.id if ident else None,
            candidates,
            self.model,
            self.gallery.size,
            filters.as_dict(),
            searched,
            watch.laps,
            ident.query_image_id if ident else None,
            ident.created_at if ident else None,
        )

    def _answer(
        self, ranked: list[RankedCandidate], individuals: dict[str, Individual] | None
    ) -> list[AnsweredCandidate]:
        species = self.gallery.entries.label_species
        out = []
        for rank, c in enumerate(ranked, start=1):
            row = individuals.get(c.label) if individuals else None
            out.append(
                AnsweredCandidate(
                    rank=rank,
                    individual_id=c.label,
                    species=None if c.is_new else (row.species if row else species.get(c.label)),
                    votes=c.votes,
                    distance=None if c.distance is None else round(c.distance, 6),
                    confidence=None if c.confidence is None else round(c.confidence, 6),
                    best_image_id=c.best_image_id,
                )
            )
        return out

    def _record(
        self,
        kept: Keepsake,
        digest: str,
        vector: np.ndarray,
        ranked: list[RankedCandidate],
        filters: Filters,
        bbox: tuple[int, int, int, int] | None,
        asker: Asker,
    ) -> tuple[Identification, list[AnsweredCandidate]]:
        stored = self.store.put(kept.data, kept.photo.media_type, digest)
        try:
            return self._write(stored, kept.data, kept.photo, vector, ranked, filters, bbox, asker)
        except BaseException:
            self._discard_if_unreferenced(stored)
            raise

    def _write(
        self,
        stored: StoredPhoto,
        data: bytes,
        photo: Photo,
        vector: np.ndarray,
        ranked: list[RankedCandidate],
        filters: Filters,
        bbox: tuple[int, int, int, int] | None,
        asker: Asker,
    ) -> tuple[Identification, list[AnsweredCandidate]]:
        for attempt in range(2):
            try:
                with transaction(self.factory) as session:
                    image = get_or_add_image(session, stored, data, photo, asker.original_name)
                    # Kept so that a confirmation puts the photo in the gallery at once. A crop
                    # (bbox) embeds a part of the photo: that embedding is the one to keep.
                    added = add_embedding(session, image.id, self.model.id, vector)
                    labels = [c.label for c in ranked if not c.is_new]
                    individuals = {
                        i.catalogue_id: i
                        for i in session.scalars(
                            select(Individual).where(Individual.catalogue_id.in_(labels))
                        )
                    }
                    answer = self._answer(ranked, individuals)
                    ident = Identification(
                        query_image_id=image.id,
                        model_id=self.model.id,
                        filters=filters.as_dict(),
                        bbox=list(bbox) if bbox else None,
                        k=self.model.head.k,
                        cutoff=self.model.head.cutoff,
                        ranking=self.model.head.ranking,
                        gallery_size=self.gallery.size,
                        key_id=asker.key_id,
                    )
                    ident.candidates = [
                        Candidate(
                            rank=a.rank,
                            label=a.individual_id,
                            individual_id=(
                                individuals[a.individual_id].id
                                if a.individual_id in individuals
                                else None
                            ),
                            species=a.species,
                            votes=a.votes,
                            distance=a.distance,
                            best_image_id=a.best_image_id,
                        )
                        for a in answer
                    ]
                    session.add(ident)
                    session.flush()
                    if added and image.individual_id is not None:
                        # A gallery photo this model had not embedded: its gallery grew.
                        log_gallery_changes(session, [image.id], self.model.id)
                    return ident, answer
            except IntegrityError:
                # Two uploads of the same new photo raced for its row: the retry finds it.
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _discard_if_unreferenced(self, stored: StoredPhoto) -> None:
        if not stored.created:
            return
        with self.factory() as session:
            exists = session.scalar(
                select(Image.id).where(Image.content_hash == stored.content_hash)
            )
        if exists is None:
            self.store.discard(stored)


class Runtime:
    """The identifier of the active model, kept in step with the database on each request: a
    model activated or a gallery changed by another process is picked up at the next call."""

    def __init__(self, settings: Settings, factory: sessionmaker[Session]) -> None:
        self.settings = settings
        self.factory = factory
        self._identifier: Identifier | None = None
        # A model loaded ahead of its activation (``prepare``), so the switch costs no load.
        self._standby: Identifier | None = None
        self._lock = threading.Lock()
        self.slots = WorkSlots(settings)  # shared by every model this process loads
        self.photos = PhotoStore.open(settings)  # what GET /images/{id}/file reads

    @property
    def loaded(self) -> Identifier | None:
        return self._identifier

    def current(self) -> Identifier:
        """The active model's identifier, loading or syncing it first if the database moved."""
        with self.factory() as session:
            active_id = session.scalar(select(Model.id).where(Model.status == ModelStatus.ACTIVE))
            if active_id is None:
                raise NoActiveModel()
            version = latest_change(session, active_id)
        identifier = self._identifier
        if identifier is None or identifier.model.id != active_id:
            with self._lock:
                identifier = self._switch()
        elif identifier.gallery.version != version:
            self.sync(identifier)
        return identifier

    def _switch(self) -> Identifier:
        """Under the lock: the active model's identifier, loaded unless it is already. The active
        id is read again here: a request that read it before a switch must not load the old
        model back."""
        with self.factory() as session:
            model = session.scalar(select(Model).where(Model.status == ModelStatus.ACTIVE))
        if model is None:
            raise NoActiveModel()
        identifier = self._identifier
        if identifier is not None and identifier.model.id == model.id:
            return identifier
        standby, self._standby = self._standby, None
        if standby is not None and standby.model.id == model.id:
            log.info(
                "switching to prepared model %s %s (id %s)", model.name, model.version, model.id
            )
            standby.model = ModelInfo.of(model)
            standby.gallery.sync(self.factory)
            self._identifier = standby
            return standby
        log.info("loading model %s %s (id %s)", model.name, model.version, model.id)
        identifier = self._identifier = Identifier.load(
            self.settings, self.factory, model, self.slots
        )
        return identifier

    def prepare(self, model_id: int) -> None:
        """Load a model that is about to be activated, so that the switch itself loads nothing.
        Its head (k, cutoff, ranking) is read again if the activation changes it."""
        with self.factory() as session:
            model = session.get_one(Model, model_id)
        identifier = Identifier.load(self.settings, self.factory, model, self.slots)
        with self._lock:
            self._standby = identifier

    def drop_prepared(self) -> None:
        with self._lock:
            self._standby = None

    def sync(self, identifier: Identifier | None = None) -> None:
        """Bring the loaded gallery up to the database's change log, now."""
        identifier = identifier or self._identifier
        if identifier is not None:
            with self._lock:
                identifier.gallery.sync(self.factory)
