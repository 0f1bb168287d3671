"""Re-indexing the gallery with a new model in the background: registered → indexing → ready.

The re-index job embeds every gallery photo (and kept query photos if asked) that the new model
has not embedded yet, chunk by chunk; its last chunk catches up with the photos that joined the
gallery meanwhile, writes the new model's index, evaluates the old and the new model on the
curators' confirmations (``service.models.shadow``) and marks the model ready. ``/identify`` keeps
answering with the active model all along. The switch itself is ``service.models.switch``.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import numpy as np
from sqlalchemy import exists, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from service.contract import ModelStatus
from service.db.tables import (
    Embedding,
    GalleryChange,
    Image,
    Job,
    Model,
    insert_unless_there,
    table_of,
    transaction,
)
from service.errors import Conflict, NotFound, PhotoError
from service.gallery.sync import Gallery, log_gallery_changes
from service.imaging import decode_photo, to_model_input
from service.jobs.queue import ChunkHandler, JobState, Lease, LeaseLost, complete, create_job
from service.matching.features import FeatureStore, images_without_features
from service.matching.registry import uses_features
from service.models.openset import refit
from service.models.shadow import evaluate_shadow
from service.onnx.embedder import Embedder
from service.settings import Settings
from service.store.photos import PhotoStore

log = logging.getLogger(__name__)

REINDEX = "reindex"


def model_row(session: Session, model_id: int, *, lock: bool = False) -> Model:
    """The model's row (``lock``: held FOR UPDATE until the transaction ends); NotFound if none."""
    model = (
        session.scalar(select(Model).where(Model.id == model_id).with_for_update())
        if lock
        else session.get(Model, model_id)
    )
    if model is None:
        raise NotFound(f"model {model_id} does not exist: see GET /models")
    return model


def active_model_id(session: Session) -> int | None:
    return session.scalar(select(Model.id).where(Model.status == ModelStatus.ACTIVE))


def missing_images(
    session: Session, model_id: int, *, include_queries: bool = False, limit: int | None = None
) -> list[tuple[int, str]]:
    """(image id, file) of gallery photos (all kept photos with ``include_queries``) that
    ``model_id`` has not embedded."""
    embedded = exists().where(Embedding.image_id == Image.id, Embedding.model_id == model_id)
    stmt = select(Image.id, Image.file_path).where(~embedded).order_by(Image.id)
    if not include_queries:
        stmt = stmt.where(Image.individual_id.is_not(None))
    if limit is not None:
        stmt = stmt.limit(limit)
    return [(int(i), str(p)) for i, p in session.execute(stmt)]


@dataclass
class Embedded:
    image_ids: list[int] = field(default_factory=list)
    vectors: list[np.ndarray] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def matrix(self, dim: int) -> np.ndarray:
        return np.concatenate(self.vectors) if self.vectors else np.zeros((0, dim), np.float32)


class PhotoEmbedder:
    """Embeds stored photos through a bounded pipeline, photo by photo: ``readers`` threads read
    them from the store (an S3 read is mostly waiting), ``decoders`` threads decode and
    preprocess them, and the calling thread embeds them in order, in batches of the embedder's
    ``max_batch_size``, while the next photos are read and decoded (Pillow and onnxruntime
    release the GIL). At most ``ahead`` photos (their bytes and their model input) are read or
    decoded beyond the batch being embedded, so memory holds at most ``batch_size + ahead``.

    One decoder by default: onnxruntime's threads already use every core while a batch runs, and
    on two quiet cores a second decoder was slower (docs/operations.md, "Figures")."""

    def __init__(
        self,
        settings: Settings,
        embedder: Embedder,
        *,
        decoders: int = 1,
        readers: int = 4,
        ahead: int | None = None,
    ) -> None:
        self.settings = settings
        self.embedder = embedder
        self.store = PhotoStore.open(settings)
        self.batch_size = max(1, embedder.max_batch_size)
        self.decoders = max(1, decoders)
        self.readers = max(1, readers)
        # Enough to keep every reader and decoder busy while a batch is embedded.
        self.ahead = max(1, ahead if ahead is not None else self.batch_size + 2 * self.readers)

    def _prepare(self, raw: Future[bytes]) -> np.ndarray:
        """One photo's model input, from its bytes once they are read."""
        spec = self.embedder.contract.preprocessing
        photo = decode_photo(
            raw.result(), max_pixels=self.settings.max_image_pixels, target_size=spec.input_size
        )
        return to_model_input(photo.image, spec)

    def embed(
        self, rows: Sequence[tuple[int, str]], alive: Callable[[], bool] = lambda: True
    ) -> Embedded:
        """Embeddings of ``rows`` (image id, file), in their order; unreadable photos are
        reported, not raised. ``LeaseLost`` as soon as ``alive()`` is false before a batch."""
        out = Embedded()
        todo = iter(rows)
        pending: deque[_InFlight] = deque()
        ids: list[int] = []
        pixels: list[np.ndarray] = []
        with (
            ThreadPoolExecutor(self.readers, thread_name_prefix="read") as reads,
            ThreadPoolExecutor(self.decoders, thread_name_prefix="decode") as decodes,
        ):

            def start(row: tuple[int, str]) -> None:
                raw = reads.submit(self.store.read, row[1])
                pending.append(_InFlight(row, raw, decodes.submit(self._prepare, raw)))

            try:
                for row in islice(todo, self.ahead):
                    start(row)
                while pending:
                    photo = pending.popleft()
                    if (following := next(todo, None)) is not None:
                        start(following)
                    try:
                        pixels.append(photo.decoded.result())
                        ids.append(photo.row[0])
                    except (OSError, PhotoError) as e:
                        out.errors.append(f"image {photo.row[0]} ({photo.row[1]}): {e}")
                    if ids and (len(ids) == self.batch_size or not pending):
                        if not alive():
                            raise LeaseLost("the lease was lost while embedding")
                        out.vectors.append(self.embedder.embed(np.stack(pixels)))
                        out.image_ids.extend(ids)
                        ids, pixels = [], []
            finally:
                for photo in pending:  # on LeaseLost or an error: stop what has not started
                    photo.raw.cancel()
                    photo.decoded.cancel()
        return out


@dataclass(frozen=True)
class _InFlight:
    """A photo on its way through the pipeline: its row, its bytes, its model input."""

    row: tuple[int, str]
    raw: Future[bytes]
    decoded: Future[np.ndarray]


# One statement for a chunk's embeddings: those already there (a chunk done again after its
# lease was lost) are skipped, and the ids of the rows added come back.
_ADD_EMBEDDINGS = {
    dialect: statement.returning(table_of(Embedding).c.image_id)
    for dialect, statement in insert_unless_there(Embedding, ["image_id", "model_id"]).items()
}


def store_embeddings(
    session: Session, model_id: int, image_ids: Sequence[int], vectors: np.ndarray
) -> int:
    """Add the embeddings that are not there yet, and log the gallery photos among them."""
    if not image_ids:
        return 0
    rows = [
        {"image_id": i, "model_id": model_id, "vector": np.ascontiguousarray(v, "<f4").tobytes()}
        for i, v in zip(image_ids, vectors, strict=True)
    ]
    statement = _ADD_EMBEDDINGS[session.get_bind().dialect.name]
    added = list(session.scalars(statement, rows))
    if added:
        in_gallery = session.scalars(
            select(Image.id).where(Image.id.in_(added), Image.individual_id.is_not(None))
        ).all()
        log_gallery_changes(session, in_gallery, model_id)
    return len(added)


class Embedders:
    """One loaded embedder per model, for a worker's lifetime."""

    def __init__(self, settings: Settings, factory: sessionmaker[Session]) -> None:
        self.settings = settings
        self.factory = factory
        self._loaded: dict[int, PhotoEmbedder] = {}
        self._lock = threading.Lock()

    def __call__(self, model_id: int) -> PhotoEmbedder:
        with self._lock:
            if model_id not in self._loaded:
                with self.factory() as session:
                    file_path = model_row(session, model_id).file_path
                embedder = Embedder.for_model(self.settings, file_path, spinning=False)
                if len(self._loaded) >= 3:
                    self._loaded.pop(next(iter(self._loaded)))
                self._loaded[model_id] = PhotoEmbedder(self.settings, embedder)
            return self._loaded[model_id]


def catch_up(
    factory: sessionmaker[Session],
    photos: PhotoEmbedder,
    model_id: int,
    *,
    batch: int = 256,
    alive: Callable[[], bool] = lambda: True,
) -> tuple[int, list[str]]:
    """Embed the gallery photos ``model_id`` lacks (confirmed, imported or split while it was
    being indexed), batch by batch until none is left; unreadable photos are reported."""
    added, errors, failed = 0, list[str](), set[int]()
    while True:
        with factory() as session:
            todo = [
                r
                for r in missing_images(session, model_id, limit=batch + len(failed))
                if r[0] not in failed
            ][:batch]
        if not todo:
            return added, errors
        result = photos.embed(todo, alive)
        failed.update(i for i, _ in todo if i not in set(result.image_ids))
        errors.extend(result.errors)
        try:
            with transaction(factory) as session:
                added += store_embeddings(
                    session, model_id, result.image_ids, result.matrix(photos.embedder.dim)
                )
        except IntegrityError:  # another worker stored the same photos first: look again
            continue


def start_reindex(
    settings: Settings,
    factory: sessionmaker[Session],
    model_id: int,
    *,
    include_queries: bool = False,
    actor: str = "admin",
) -> Job:
    """Queue the re-index of ``model_id``: one chunk per ``reindex_chunk_size`` photos it has not
    embedded, then the finishing chunk. The model becomes ``indexing``."""
    with transaction(factory) as session:
        model = model_row(session, model_id, lock=True)
        if model.status == ModelStatus.ACTIVE:
            raise Conflict(f"model {model_id} is the active model: its gallery is kept up to date")
        if model.status == ModelStatus.INDEXING:
            job_id = session.scalar(
                select(Job.id)
                .where(Job.model_id == model_id, Job.state.in_(["queued", "running"]))
                .order_by(Job.id.desc())
            )
            raise Conflict(
                f"model {model_id} is already being indexed by job {job_id}: follow it with "
                f"GET /jobs/{job_id}"
            )
        ids = [i for i, _ in missing_images(session, model_id, include_queries=include_queries)]
        size = max(1, settings.reindex_chunk_size)
        chunks = [ids[i : i + size] for i in range(0, len(ids), size)]
        job = create_job(
            session,
            kind=REINDEX,
            model_id=model_id,
            params={"include_queries": include_queries},
            chunks=chunks,
            created_by=actor,
            finish=True,
        )
        model.status = ModelStatus.INDEXING
        log.info(
            "re-index of model %s queued as job %s: %d photos in %d chunks",
            model_id,
            job.id,
            len(ids),
            len(chunks),
        )
        return job


class ReindexChunks:
    """The worker's handler for re-index chunks."""

    def __init__(
        self, settings: Settings, factory: sessionmaker[Session], embedders: Embedders
    ) -> None:
        self.settings = settings
        self.factory = factory
        self.embedders = embedders
        self.features = FeatureStore(settings, factory)

    def _extract(self, model_id: int, image_ids: Sequence[int]) -> None:
        """The local features of these photos, for a model whose answers need them."""
        with self.factory() as session:
            if not uses_features(model_row(session, model_id)):
                return
            todo = images_without_features(session, self.features.extractor.name, image_ids)
        self.features.ensure(todo)

    def __call__(self, lease: Lease, alive: Callable[[], bool]) -> None:
        assert lease.model_id is not None
        if lease.phase == 1:
            self.finish(lease, alive)
            return
        photos = self.embedders(lease.model_id)
        with self.factory() as session:
            rows = [
                (int(i), str(p))
                for i, p in session.execute(
                    select(Image.id, Image.file_path)
                    .where(Image.id.in_(lease.items))
                    .order_by(Image.id)
                )
            ]
        result = photos.embed(rows, alive)
        self._extract(lease.model_id, result.image_ids)
        gone = len(lease.items) - len(rows)  # deleted since the job was queued: nothing to do
        with transaction(self.factory) as session:
            store_embeddings(
                session, lease.model_id, result.image_ids, result.matrix(photos.embedder.dim)
            )
            complete(
                session,
                lease,
                done=len(result.image_ids) + gone,
                failed=len(result.errors),
                errors=result.errors,
            )

    def finish(self, lease: Lease, alive: Callable[[], bool]) -> None:
        """Catch up, write the index, evaluate, and mark the model ready."""
        assert lease.model_id is not None
        photos = self.embedders(lease.model_id)
        added, errors = catch_up(self.factory, photos, lease.model_id, alive=alive)
        if added:
            log.info("model %s: caught up with %d new gallery photos", lease.model_id, added)
        with self.factory() as session:
            wanted = uses_features(model_row(session, lease.model_id))
        if wanted:
            extracted = self.features.catch_up(alive)
            log.info("model %s: local features of %d photos", lease.model_id, extracted)
        gallery = Gallery.for_model(self.settings, lease.model_id, photos.embedder.dim)
        gallery.open(self.factory)  # writes the index file the replicas load at the switch
        if not alive():
            raise LeaseLost("the lease was lost while writing the index")
        # The open-set decision fitted on the new gallery first: the shadow evaluation scores
        # the model with it (its own head's cutoff, or its calibration's threshold).
        open_set = refit(self.settings, self.factory, lease.model_id, trigger="reindex")
        report = evaluate_shadow(self.settings, self.factory, lease.model_id)
        with transaction(self.factory) as session:
            job = complete(session, lease, done=0, failed=len(errors), errors=errors)
            job.result = {
                "caught_up": added,
                "gallery_size": gallery.size,
                "shadow": report.data,
                "open_set": open_set,
            }
            model = session.get_one(Model, lease.model_id)
            if job.state == JobState.SUCCEEDED and model.status == ModelStatus.INDEXING:
                model.status = ModelStatus.READY
        log.info("model %s is ready: gallery of %d photos", lease.model_id, gallery.size)


def latest_report(session: Session, model_id: int) -> dict[str, Any] | None:
    """The shadow report of the newest finished re-index of ``model_id``."""
    result = session.scalar(
        select(Job.result)
        .where(Job.model_id == model_id, Job.kind == REINDEX, Job.state == JobState.SUCCEEDED)
        .order_by(Job.id.desc())
        .limit(1)
    )
    if not result or "shadow" not in result:
        return None
    shadow: dict[str, Any] = result["shadow"]
    return shadow


class ActiveGalleryKeeper:
    """The worker's idle task: embed gallery photos the active model lacks. A photo confirmed
    after a switch from an identification the previous model answered has only the previous
    model's embedding; this puts it into the active model's gallery."""

    def __init__(
        self,
        factory: sessionmaker[Session],
        embedders: Embedders,
        features: FeatureStore | None = None,
    ) -> None:
        self.factory = factory
        self.embedders = embedders
        self.features = features
        self._seen: tuple[int | None, int] = (None, -1)

    def __call__(self) -> None:
        with self.factory() as session:
            active = active_model_id(session)
            # Only a new gallery change (of any model) or a switch can leave a photo missing.
            seen = (active, int(session.scalar(select(func.max(GalleryChange.id))) or 0))
            if active is None or seen == self._seen:
                return
            missing = missing_images(session, active, limit=1)
        self._seen = seen
        if missing:
            added, _ = catch_up(self.factory, self.embedders(active), active)
            if added:
                log.info("active model %s: %d gallery photos embedded", active, added)
        if self.features is not None:
            with self.factory() as session:
                wanted = uses_features(model_row(session, active))
            if wanted and (extracted := self.features.catch_up()):
                log.info("active model %s: local features of %d photos", active, extracted)


def worker_handlers(
    settings: Settings, factory: sessionmaker[Session], embedders: Embedders
) -> dict[str, ChunkHandler]:
    return {REINDEX: ReindexChunks(settings, factory, embedders)}
