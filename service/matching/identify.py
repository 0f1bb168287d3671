"""One identification: decode, preprocess, embed, search, the model's matchers
(``matching.fusion``), record (``matching.record``). The active model per process, and
switching it, is ``matching.runtime``."""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from typing import IO

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.contract import Calibration, Head, ModelKind, Verification
from service.db.tables import Image, Model
from service.gallery.sync import Filters, Gallery
from service.imaging import Keepsake, Photo, decode_photo, keepsake, kept_size, to_model_input
from service.knn import NEW_INDIVIDUAL, RankedCandidate
from service.matching.features import Features, FeatureStore
from service.matching.fusion import Fusion
from service.matching.local import LocalMatcher, local_index_path
from service.matching.matcher import Need, Query
from service.matching.record import Asked, Asker, write_identification
from service.matching.registry import check_verification, fusion_for
from service.matching.slots import WorkSlots
from service.matching.verify import Evidence
from service.onnx.embedder import Embedder
from service.settings import Settings
from service.store.photos import PhotoStore, StoredPhoto, content_hash

log = logging.getLogger(__name__)


# A decoded photo up to this size (12 MB of pixels) may still be being kept after its decode slot
# is let go; a larger one is kept before (docs/reliability.md: the memory bound).
KEPT_AFTER_SLOT_PIXELS = 4_000_000


@dataclass(frozen=True)
class ModelInfo:
    """The model an answer came from, the head it answered with, and its verification."""

    id: int
    name: str
    version: str
    head: Head
    kind: str = ModelKind.ONNX  # a name of ``matching.registry``'s kinds
    verification: str = Verification.NONE  # a name of its verification modes
    calibration: Calibration | None = None

    @classmethod
    def of(cls, model: Model) -> ModelInfo:
        head = Head.of(model)
        return cls(
            model.id,
            model.name,
            model.version,
            head,
            str(model.kind or ModelKind.ONNX),
            str(model.verification or Verification.NONE),
            Calibration.from_dict(model.calibration, head.cutoff),
        )

    def verifying(self, mode: str) -> ModelInfo:
        """This model answering with verification ``mode`` (``Invalid`` if its kind may not)."""
        return replace(self, verification=check_verification(self.kind, mode))

    @property
    def fusion(self) -> Fusion:
        """The matchers that answer for it (``matching.registry``)."""
        return fusion_for(self.kind, self.verification)

    @property
    def scoring(self) -> Calibration:
        """The calibration verification scores with (fitted, or the defaults for its cutoff)."""
        return self.calibration or Calibration.default(self.head.cutoff)

    @property
    def calibration_version(self) -> str | None:
        """The version of the calibration its answers are scored with (None: the kNN head
        alone, uncalibrated), recorded with each identification."""
        return self.scoring.version if self.fusion.calibrated else None

    @property
    def uses_features(self) -> bool:
        return Need.LOCAL_FEATURES in self.fusion.needs


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


def _hash_and_check(
    raw: bytes | None, check: Callable[[], Identifier] | None
) -> tuple[str, Identifier | None]:
    """Side work beside the decoding: the upload's content hash (if it is to be kept), and the
    identifier ``check`` finds active."""
    digest = content_hash(raw) if raw is not None else ""
    return digest, check() if check is not None else None


@dataclass
class _Prepared:
    """What leaves the decode slot: the model input, the photo as kept, its local features
    (decoded and extracted for ``model``)."""

    pixels: np.ndarray | None = None
    keeping: Future[tuple[Keepsake, StoredPhoto]] | None = None
    features: Features | None = None
    # With local features: the embedding, made on another thread while this one extracts them.
    embedding: Future[np.ndarray] | None = None
    model: ModelInfo | None = None  # the model (and verification) it was prepared for


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
                local = LocalMatcher(
                    self.features,
                    self.settings.local_ivf_threshold,
                    self.settings.local_compressed_photos,
                    path=local_index_path(self.settings, self.features.extractor.name),
                    extractor=self.features.extractor.name,
                )
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
        check: Callable[[], Identifier] | None = None,
    ) -> IdentificationResult:
        """Identify one photo. With ``record``, the photo, the answer and what was used are
        written to the database in one transaction (and the photo file removed if that fails).

        The upload is read, decoded and reduced to what is kept inside a decode slot, and
        embedded inside an embed slot: no more than the slots hold is ever decoded at once.
        While this thread decodes and preprocesses (one core), the side work runs on another:
        ``check`` (``Runtime.current``: the active model, its gallery synced) and the
        photo as kept (re-encoded if need be, hashed, written to the object store). If
        ``check`` names another model, or verification was turned on or off, that identifier
        answers instead, from the start."""
        watch = _Stopwatch()
        prepared = _Prepared()
        try:
            restart = self._prepare(data, bbox, record, check, watch, prepared)
            if restart is not None:
                self._discard(prepared.keeping)
                prepared.keeping = None
                if not isinstance(data, bytes):
                    data.seek(0)
                return restart.identify(
                    data,
                    filters=filters,
                    bbox=bbox,
                    record=record,
                    original_name=original_name,
                    key_id=key_id,
                )
            pixels, keeping, query_features = prepared.pixels, prepared.keeping, prepared.features
            model = prepared.model  # one model's settings for the rest of the answer
            assert pixels is not None and model is not None
            if prepared.embedding is not None:
                vector = prepared.embedding.result()
            else:
                vector = self._embed(pixels, watch)
            with watch.lap("search"):
                neighbours, searched = self.gallery.search(vector, model.head.k, filters)
                beyond = self.gallery.search_beyond(vector, filters, neighbours)
            fusion = model.fusion
            query = Query(
                vector, query_features, neighbours, beyond, filters, model.head, model.scoring
            )
            if not fusion.calibrated:
                with watch.lap("head"):
                    answer = fusion.answer(query, self)
            else:
                with self.slots.embed.hold(), watch.lap("verify"):
                    answer = fusion.answer(query, self)
            ranked = [_Line.of(c) for c in answer.ranked]
            with watch.lap("database"):
                if keeping is not None:
                    kept, stored = keeping.result()
                    asked = Asked(
                        model,
                        stored,
                        kept.data,
                        kept.photo,
                        vector,
                        query_features,
                        self.features.extractor.name,
                        filters,
                        bbox,
                        Asker(original_name, key_id),
                        self.gallery.size,
                    )
                    ident, candidates = write_identification(
                        self.factory, asked, ranked, partial(self._answer, ranked)
                    )
                else:
                    ident, candidates = None, self._answer(ranked, None)
        except BaseException:
            if prepared.embedding is not None:  # not needed any more (if not begun yet)
                prepared.embedding.cancel()
            self._discard(prepared.keeping)
            raise
        return IdentificationResult(
            ident.id if ident else None,
            candidates,
            model,
            self.gallery.size,
            filters.as_dict(),
            searched,
            watch.laps,
            ident.query_image_id if ident else None,
            ident.created_at if ident else None,
            answer.scored,
        )

    def _prepare(
        self,
        data: bytes | IO[bytes],
        bbox: tuple[int, int, int, int] | None,
        record: bool,
        check: Callable[[], Identifier] | None,
        watch: _Stopwatch,
        into: _Prepared,
    ) -> Identifier | None:
        """In a decode slot: read, decode and preprocess the upload, and (side work) keep it;
        ``into`` receives what the answer needs. Returns None, or the identifier that must
        answer from the start instead: the one ``check`` found active, or this one when
        verification was turned on or off meanwhile (the photo is decoded otherwise)."""
        uses_features = self.model.uses_features
        with self.slots.decode.hold():
            raw = data if isinstance(data, bytes) else data.read()
            # While this thread decodes: the upload's hash, and the active model checked.
            checked = self.slots.side.submit(_hash_and_check, raw if record else None, check)
            with watch.lap("decode"):
                try:
                    photo = self.decode(raw, bbox)
                except Exception:
                    checked.result()  # the key's confirmation (KeyRevoked) wins over a bad photo
                    raise
            if record:
                # Kept while this thread preprocesses, and on into the embedding: it is waited
                # for when the answer is written. A large decoded photo (a PNG has no reduced
                # decoding) is waited for here, so its pixels go with the slot.
                into.keeping = self.slots.side.submit(
                    self._keep, raw, photo, bbox is not None, checked
                )
            with watch.lap("preprocess"):
                into.pixels = to_model_input(photo.image, self.embedder.contract.preprocessing)
            current = checked.result()[1] or self
            model = current.model
            if current is not self or model.uses_features != uses_features:
                return current
            into.model = model
            pixels = photo.image.width * photo.image.height
            if into.keeping is not None and pixels > KEPT_AFTER_SLOT_PIXELS:
                into.keeping.result()
            if uses_features:
                # The embedding meanwhile, on another thread (SIFT and the model each leave
                # gaps in their parallel loops that the other fills).
                into.embedding = self.slots.embedding.submit(self._embed, into.pixels, watch)
                with watch.lap("features"):
                    # From the photo as decoded (no second decode, no wait for the photo as
                    # kept), its points in the pixels of the photo as kept (when recorded).
                    size = photo.image.size
                    if record:
                        size = kept_size(size, self.settings.stored_photo_max_side)
                    into.features = self.features.extractor.extract(photo.image, size)
            # The full-size pixels go with the slot.
        return None

    def _embed(self, pixels: np.ndarray, watch: _Stopwatch) -> np.ndarray:
        """The embedding of one preprocessed photo, inside an embed slot."""
        with self.slots.embed.hold(), watch.lap("embed"):
            vector: np.ndarray = self.embedder.embed(pixels[np.newaxis])[0]
        return vector

    def _keep(
        self,
        raw: bytes,
        photo: Photo,
        cropped: bool,
        hashed: Future[tuple[str, Identifier | None]],
    ) -> tuple[Keepsake, StoredPhoto]:
        """The photo as kept, written to the object store under the upload's hash (side work)."""
        kept = keepsake(raw, photo, max_side=self.settings.stored_photo_max_side, cropped=cropped)
        return kept, self.store.put(kept.data, kept.photo.media_type, hashed.result()[0])

    def _discard(self, keeping: Future[tuple[Keepsake, StoredPhoto]] | None) -> None:
        """After a failure: the photo file this request wrote, unless a row refers to it."""
        if keeping is None:
            return
        try:
            _, stored = keeping.result()
        except BaseException:  # nothing was written
            return
        self._discard_if_unreferenced(stored)

    def _answer(
        self, ranked: list[_Line], recorded: dict[str, str | None] | None
    ) -> list[AnsweredCandidate]:
        """The answer's lines; ``recorded``: the species of the individuals named, as the
        database has them (else the gallery's)."""
        species = self.gallery.entries.label_species
        out = []
        for rank, c in enumerate(ranked, start=1):
            known = recorded is not None and c.label in recorded
            out.append(
                AnsweredCandidate(
                    rank=rank,
                    individual_id=c.label,
                    species=(
                        None
                        if c.is_new
                        else (recorded[c.label] if known and recorded else species.get(c.label))
                    ),
                    votes=c.votes,
                    distance=None if c.distance is None else round(c.distance, 6),
                    confidence=_confidence(c),
                    best_image_id=c.best_image_id,
                    inliers=c.inliers,
                    score=None if c.score is None else round(c.score, 6),
                )
            )
        return out

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
