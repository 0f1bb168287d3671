"""The identification pipeline: decode, preprocess, embed, search, kNN head, record."""

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
from sqlalchemy import bindparam, insert, literal, select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from service.access.auth import KeyRevoked
from service.contract import Calibration, Head, ModelKind, ModelStatus, Verification
from service.db.tables import (
    ApiKey,
    Candidate,
    Embedding,
    Identification,
    Image,
    Individual,
    Model,
    transaction,
    utcnow,
)
from service.gallery.sync import Filters, Gallery, gallery_version, log_gallery_changes
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


# A decoded photo up to this size (12 MB of pixels) may still be being kept after its decode slot
# is let go; a larger one is kept before (docs/reliability.md: the memory bound).
KEPT_AFTER_SLOT_PIXELS = 4_000_000


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
class Recorded:
    """The rows an answer was recorded in."""

    id: int
    query_image_id: int
    created_at: dt.datetime


def _blob(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype="<f4").tobytes()


# The record's statements, built once (a statement built per request costs more than its
# round trip to SQLite); each runs with a dict of parameters.
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
    dialect: make(Image)
    .values({c: bindparam(c, type_=Image.__table__.c[c].type) for c in _IMAGE_COLUMNS})
    .on_conflict_do_nothing(index_elements=["content_hash"])
    .returning(Image.id)
    for dialect, make in (("postgresql", postgresql_insert), ("sqlite", sqlite_insert))
}
_NEW_EMBEDDING = insert(Embedding)
_NAMED_INDIVIDUALS = select(Individual.id, Individual.catalogue_id, Individual.species).where(
    Individual.catalogue_id.in_(bindparam("labels", expanding=True))
)
_IDENTIFICATION_COLUMNS = (
    "query_image_id",
    "model_id",
    "filters",
    "bbox",
    "k",
    "cutoff",
    "ranking",
    "gallery_size",
    "key_id",
    "created_at",
)
_NEW_IDENTIFICATION = (
    insert(Identification)
    .values(
        {c: bindparam(c, type_=Identification.__table__.c[c].type) for c in _IDENTIFICATION_COLUMNS}
    )
    .returning(Identification.id)
)
_NEW_CANDIDATES = insert(Candidate)


def _insert_new_image(
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


def _hash_and_check(
    raw: bytes | None, check: Callable[[], Identifier] | None
) -> tuple[str, Identifier | None]:
    """Side work beside the decoding: the upload's content hash (if it is to be kept), and the
    identifier ``check`` finds active."""
    digest = content_hash(raw) if raw is not None else ""
    return digest, check() if check is not None else None


@dataclass
class _Prepared:
    """What leaves the decode slot: the model input, the photo as kept, its local features."""

    pixels: np.ndarray | None = None
    keeping: Future[tuple[Keepsake, StoredPhoto]] | None = None
    features: Features | None = None


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
            assert pixels is not None
            model = self.model  # one model's settings for the rest of the answer
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
                if keeping is not None:
                    kept, stored = keeping.result()
                    ident, candidates = self._write(
                        model,
                        stored,
                        kept.data,
                        kept.photo,
                        vector,
                        ranked,
                        filters,
                        bbox,
                        Asker(original_name, key_id),
                        query_features,
                    )
                else:
                    ident, candidates = None, self._answer(ranked, None)
        except BaseException:
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
            verified if query_features is not None else [],
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
                # decoding) is waited for here, so its pixels go with the slot; so is the photo
                # whose local features come from it as kept.
                into.keeping = self.slots.side.submit(
                    self._keep, raw, photo, bbox is not None, checked
                )
            with watch.lap("preprocess"):
                into.pixels = to_model_input(photo.image, self.embedder.contract.preprocessing)
            current = checked.result()[1] or self
            if current is not self or current.model.uses_features != uses_features:
                return current
            pixels = photo.image.width * photo.image.height
            if into.keeping is not None and (uses_features or pixels > KEPT_AFTER_SLOT_PIXELS):
                into.keeping.result()
            if uses_features:
                kept = into.keeping.result()[0] if into.keeping is not None else None
                with watch.lap("features"):
                    # From the photo as kept, so the points are in the stored photo's pixels.
                    into.features = self.features.extractor.extract(
                        kept.photo.image if kept is not None else photo.image
                    )
            # The full-size pixels go with the slot.
        return None

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

    def _write(
        self,
        model: ModelInfo,
        stored: StoredPhoto,
        data: bytes,
        photo: Photo,
        vector: np.ndarray,
        ranked: list[_Line],
        filters: Filters,
        bbox: tuple[int, int, int, int] | None,
        asker: Asker,
        features: Features | None,
    ) -> tuple[Recorded, list[AnsweredCandidate]]:
        """The photo's row and embedding, the answer and its candidates, in one transaction.
        A new photo (the usual case) takes five statements, without the ORM's bookkeeping: the
        photo inserted unless its content is there (``ON CONFLICT DO NOTHING``), its embedding,
        the individuals named, the identification and its candidates."""
        for attempt in range(2):
            try:
                with transaction(self.factory) as session:
                    image_id = _insert_new_image(session, stored, data, photo, asker.original_name)
                    if image_id is None:  # the same photo was sent before
                        image = get_or_add_image(session, stored, data, photo, asker.original_name)
                        image_id, in_gallery = image.id, image.individual_id is not None
                        added = add_embedding(session, image.id, model.id, vector)
                    else:  # a new photo: nobody has embedded it, it is in no gallery
                        in_gallery, added = False, True
                        session.execute(
                            _NEW_EMBEDDING,
                            [{"image_id": image_id, "model_id": model.id, "vector": _blob(vector)}],
                        )
                    # Kept so that a confirmation puts the photo in the gallery at once. A crop
                    # (bbox) embeds a part of the photo: that embedding is the one to keep.
                    if features is not None:
                        # Kept with the photo: a confirmation puts them in the gallery with it.
                        add_features(session, self.features.extractor.name, {image_id: features})
                    labels = [c.label for c in ranked if not c.is_new]
                    individuals = {
                        label: (individual_id, species)
                        for individual_id, label, species in session.execute(
                            select(
                                Individual.id, Individual.catalogue_id, Individual.species
                            ).where(Individual.catalogue_id.in_(labels))
                        )
                    }
                    answer = self._answer(ranked, {k: v[1] for k, v in individuals.items()})
                    created_at = utcnow()
                    ident_id = session.execute(
                        _NEW_IDENTIFICATION,
                        {
                            "query_image_id": image_id,
                            "model_id": model.id,
                            "filters": filters.as_dict(),
                            "bbox": list(bbox) if bbox else None,
                            "k": model.head.k,
                            "cutoff": model.head.cutoff,
                            "ranking": model.head.ranking,
                            "gallery_size": self.gallery.size,
                            "key_id": asker.key_id,
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
                            for a in answer
                        ],
                    )
                    if added and in_gallery:
                        # A gallery photo this model had not embedded: its gallery grew.
                        log_gallery_changes(session, [image_id], model.id)
                    return Recorded(ident_id, image_id, created_at), answer
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

    def current(self, confirm_key: int | None = None) -> Identifier:
        """The active model's identifier, loading or syncing it first if the database moved.
        With ``confirm_key``: ``KeyRevoked`` unless that API key is live, read in the same
        statement."""
        live_key = (
            select(ApiKey.id)
            .where(ApiKey.id == confirm_key, ApiKey.revoked_at.is_(None))
            .scalar_subquery()
            if confirm_key is not None
            else literal(None)
        )
        with self.factory() as session:  # one statement: the model and its gallery's version
            found = session.execute(
                select(Model, gallery_version(Model.id), live_key).where(
                    Model.status == ModelStatus.ACTIVE
                )
            ).first()
            if found is None:
                raise NoActiveModel()
            if confirm_key is not None and found[2] is None:
                raise KeyRevoked()
            info, version = ModelInfo.of(found[0]), int(found[1])
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

    def identify(
        self,
        data: bytes | IO[bytes],
        *,
        filters: Filters,
        bbox: tuple[int, int, int, int] | None = None,
        original_name: str | None = None,
        key_id: int | None = None,
        confirm_key: int | None = None,
    ) -> IdentificationResult:
        """Identify one photo with the active model (``Identifier.identify``), recorded. Once a
        model is loaded, the check that it is still the active one, with its gallery up to date
        (``current``), runs beside the photo's decoding rather than before it; with
        ``confirm_key``, it also confirms that key is not revoked (``KeyRevoked``)."""
        loaded = self._identifier
        if loaded is None:
            return self.current(confirm_key).identify(
                data, filters=filters, bbox=bbox, original_name=original_name, key_id=key_id
            )
        return loaded.identify(
            data,
            filters=filters,
            bbox=bbox,
            original_name=original_name,
            key_id=key_id,
            check=partial(self.current, confirm_key),
        )

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
