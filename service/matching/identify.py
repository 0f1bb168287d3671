"""The identification pipeline: decode, preprocess, embed, search, kNN head, record."""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import IO

import numpy as np
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from service.contract import Calibration, Head, ModelKind, ModelStatus, Verification
from service.db.tables import Candidate, Identification, Image, Individual, Model, transaction
from service.gallery.sync import Filters, Gallery, latest_change, log_gallery_changes
from service.imaging import Keepsake, Photo, decode_photo, keepsake, to_model_input
from service.knn import (
    NEW_INDIVIDUAL,
    Neighbour,
    RankedCandidate,
    aggregate,
    fill,
    order,
    rank_candidates,
)
from service.matching.features import Features, FeatureStore, add_features
from service.matching.local import LocalMatcher
from service.matching.slots import WorkSlots
from service.matching.verify import Evidence, rerank, verify
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
    """The model an answer came from, the head it answered with, and its verification."""

    id: int
    name: str
    version: str
    head: Head
    kind: ModelKind = ModelKind.ONNX
    verification: Verification = Verification.NONE
    calibration: Calibration | None = None

    @classmethod
    def of(cls, model: Model) -> ModelInfo:
        head = Head.of(model)
        return cls(
            model.id,
            model.name,
            model.version,
            head,
            ModelKind(model.kind or ModelKind.ONNX),
            Verification(model.verification or Verification.NONE),
            Calibration.from_dict(model.calibration, head.cutoff),
        )

    @property
    def scoring(self) -> Calibration:
        """The calibration verification scores with (fitted, or the defaults for its cutoff)."""
        return self.calibration or Calibration.default(self.head.cutoff)

    @property
    def uses_features(self) -> bool:
        return self.kind == ModelKind.LOCAL_FEATURES or self.verification == Verification.RERANK


@dataclass(frozen=True)
class AnsweredCandidate:
    rank: int
    individual_id: str
    species: str | None
    votes: int | None
    distance: float | None
    confidence: float | None
    best_image_id: int | None
    inliers: int | None = None
    score: float | None = None


@dataclass(frozen=True)
class _Line:
    """One line of an answer before its individual's row is looked up."""

    label: str
    votes: int | None
    distance: float | None
    best_image_id: int | None
    inliers: int | None = None
    score: float | None = None

    @property
    def is_new(self) -> bool:
        return self.label == NEW_INDIVIDUAL

    @classmethod
    def of(cls, c: RankedCandidate | Evidence) -> _Line:
        if isinstance(c, RankedCandidate):
            return cls(c.label, c.votes, c.distance, c.best_image_id)
        return cls(c.label, c.votes, c.distance, c.best_image_id, c.inliers, c.score)


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
    # With verification: every candidate verified (not only the five answered), as evidence
    # for fitting the calibration (``models.calibration``).
    verified: list[Evidence] = field(default_factory=list)


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
        self.features = FeatureStore(settings, factory)
        # The gallery's descriptor index: the local matcher's search, and a verifying model's
        # second shortlist. Built when first needed (verification can be turned on any time).
        self.local: LocalMatcher | None = None
        self._local_lock = threading.Lock()
        if self.model.uses_features:
            self.descriptors()

    def descriptors(self) -> LocalMatcher:
        """The gallery's descriptor index, built (from the stored features) on first use."""
        with self._local_lock:
            if self.local is None:
                local = LocalMatcher(self.features, self.settings.local_ivf_threshold)
                local.sync(self.gallery.entries)
                self.local = local
            return self.local

    def sync(self, factory: sessionmaker[Session]) -> None:
        """Replay the gallery's change log (and the local matcher's index after it)."""
        self.gallery.sync(factory)
        if self.local is not None:
            self.local.sync(self.gallery.entries)

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
        size = self.embedder.contract.preprocessing.input_size
        if self.model.uses_features:  # decoded big enough for the local features too
            size = max(size, self.settings.features_max_side)
        return decode_photo(
            data, max_pixels=self.settings.max_image_pixels, target_size=size, bbox=bbox
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
        model = self.model  # one model's settings for the whole answer
        query_features: Features | None = None
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
            if model.uses_features:
                with watch.lap("features"):
                    # From the photo as kept, so the points are in the stored photo's pixels.
                    query_features = self.features.extractor.extract(
                        kept.photo.image if kept is not None else photo.image
                    )
            del raw, photo  # the full-size pixels go with the slot
        with self.slots.embed.hold(), watch.lap("embed"):
            vector = self.embedder.embed(pixels[np.newaxis])[0]
        with watch.lap("search"):
            neighbours, searched = self.gallery.search(vector, model.head.k, filters)
            beyond = self.gallery.search_beyond(vector, filters, neighbours)
        if query_features is None:
            with watch.lap("head"):
                ranked = [
                    _Line.of(c)
                    for c in rank_candidates(
                        neighbours,
                        cutoff=model.head.cutoff,
                        ranking=model.head.ranking,
                        beyond=beyond,
                    )
                ]
        else:
            with self.slots.embed.hold(), watch.lap("verify"):
                verified = self._verified(
                    model, query_features, vector, neighbours, beyond, filters
                )
                ranked = [
                    _Line.of(c)
                    for c in rerank(verified, model.scoring, Evidence(NEW_INDIVIDUAL, None, ()))
                ]
        with watch.lap("database"):
            if kept is not None:
                ident, candidates = self._record(
                    kept,
                    digest,
                    vector,
                    ranked,
                    filters,
                    bbox,
                    Asker(original_name, key_id),
                    query_features,
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
            verified if query_features is not None else [],
        )

    def _verified(
        self,
        model: ModelInfo,
        query: Features,
        vector: np.ndarray,
        neighbours: list[Neighbour],
        beyond: list[Neighbour],
        filters: Filters,
    ) -> list[Evidence]:
        """The candidates of a model that verifies: the first candidates of the kNN head and of
        the LNBNN vote over the gallery's descriptors (the local-features matcher: the vote's
        alone) matched with the query's local features, each with its calibrated probability
        (the caller re-ranks them). A candidate the vote adds carries the distance of its
        nearest photo, so both kinds of evidence weigh on every candidate."""
        top = self.settings.rerank_individuals
        per = self.settings.rerank_photos
        calibration = model.scoring
        shortlist = self.descriptors().candidates(
            query, self.gallery.entries, filters, top=top, photos=per
        )
        if model.kind == ModelKind.LOCAL_FEATURES:
            verified = verify(query, shortlist, self.features.get, calibration, use_distance=False)
        else:
            ordered = order(aggregate(neighbours), model.head.ranking)[:top]
            ordered += fill(beyond, {c.label for c in ordered}, top - len(ordered))
            photos: dict[str, list[int]] = {}
            for n in sorted(neighbours, key=lambda n: n.distance):
                if len(photos.setdefault(n.label, [])) < per:
                    photos[n.label].append(n.image_id)
            evidence = [
                Evidence(
                    c.label,
                    c.distance,
                    tuple(photos.get(c.label) or ([c.best_image_id] if c.best_image_id else [])),
                    c.votes,
                )
                for c in ordered
            ]
            named = {e.label for e in evidence}
            extra = [e for e in shortlist if e.label not in named]
            nearest = self.gallery.nearest_of(vector, [e.label for e in extra], filters)
            evidence += [
                replace(
                    e, distance=nearest[e.label].distance if e.label in nearest else None, votes=0
                )
                for e in extra
            ]
            verified = verify(query, evidence, self.features.get, calibration)
        named = {c.label for c in verified}
        if len(named) < 4 and model.kind == ModelKind.LOCAL_FEATURES:
            # Too few individuals share features with the query: name more, unverified.
            more = fill([*neighbours, *beyond], named, 4 - len(named))
            verified += [Evidence(c.label, None, (), 0, 0, 0.0, c.best_image_id) for c in more]
        return verified

    def _answer(
        self, ranked: list[_Line], individuals: dict[str, Individual] | None
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
                    confidence=_confidence(c),
                    best_image_id=c.best_image_id,
                    inliers=c.inliers,
                    score=None if c.score is None else round(c.score, 6),
                )
            )
        return out

    def _record(
        self,
        kept: Keepsake,
        digest: str,
        vector: np.ndarray,
        ranked: list[_Line],
        filters: Filters,
        bbox: tuple[int, int, int, int] | None,
        asker: Asker,
        features: Features | None,
    ) -> tuple[Identification, list[AnsweredCandidate]]:
        stored = self.store.put(kept.data, kept.photo.media_type, digest)
        try:
            return self._write(
                stored, kept.data, kept.photo, vector, ranked, filters, bbox, asker, features
            )
        except BaseException:
            self._discard_if_unreferenced(stored)
            raise

    def _write(
        self,
        stored: StoredPhoto,
        data: bytes,
        photo: Photo,
        vector: np.ndarray,
        ranked: list[_Line],
        filters: Filters,
        bbox: tuple[int, int, int, int] | None,
        asker: Asker,
        features: Features | None,
    ) -> tuple[Identification, list[AnsweredCandidate]]:
        for attempt in range(2):
            try:
                with transaction(self.factory) as session:
                    image = get_or_add_image(session, stored, data, photo, asker.original_name)
                    # Kept so that a confirmation puts the photo in the gallery at once. A crop
                    # (bbox) embeds a part of the photo: that embedding is the one to keep.
                    added = add_embedding(session, image.id, self.model.id, vector)
                    if features is not None:
                        # Kept with the photo: a confirmation puts them in the gallery with it.
                        add_features(session, self.features.extractor.name, {image.id: features})
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
                            inliers=a.inliers,
                            score=a.score,
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


def _confidence(c: _Line) -> float | None:
    """``1 - distance`` (the contract); the local-features matcher, which has no distance,
    gives its match probability."""
    if c.distance is not None:
        return round(1.0 - c.distance, 6)
    return None if c.score is None else round(c.score, 6)


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
        self.features = FeatureStore(settings, factory)  # what GET .../matches reads

    @property
    def loaded(self) -> Identifier | None:
        return self._identifier

    def current(self) -> Identifier:
        """The active model's identifier, loading or syncing it first if the database moved."""
        with self.factory() as session:
            active = session.scalar(select(Model).where(Model.status == ModelStatus.ACTIVE))
            if active is None:
                raise NoActiveModel()
            info = ModelInfo.of(active)
            version = latest_change(session, active.id)
        identifier = self._identifier
        if identifier is None or identifier.model.id != info.id:
            with self._lock:
                identifier = self._switch()
        else:
            if identifier.model != info:  # its head, verification or calibration was changed
                identifier.model = info
            if identifier.gallery.version != version:
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
            standby.sync(self.factory)
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
                identifier.sync(self.factory)
