"""Re-indexing the gallery with a new model in the background, and the model lifecycle:
registered → indexing → ready → active → retired.

The re-index job embeds every gallery photo (and kept query photos if asked) that the new model
has not embedded yet, chunk by chunk; its last chunk catches up with the photos that joined the
gallery meanwhile, writes the new model's index, evaluates the old and the new model on the
curators' confirmations (``service.models.shadow``) and marks the model ready. ``/identify`` keeps
answering with the active model all along. Activation catches up once more while gallery writes
are held, then switches in one transaction; every replica follows at its next request.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np
from sqlalchemy import exists, func, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from service.contract import PAPER_HEAD, Head, ModelStatus
from service.db.tables import Embedding, GalleryChange, Image, Job, Model, ModelSwitch, transaction
from service.errors import Conflict, NotFound
from service.gallery.index import sidecar_path
from service.gallery.sync import Gallery, index_path, log_gallery_changes
from service.imaging import PhotoError, decode_photo, to_model_input
from service.jobs.queue import ChunkHandler, JobState, Lease, LeaseLost, complete, create_job
from service.models.shadow import ShadowReport, confirmed_queries, evaluate_shadow
from service.onnx.embedder import Embedder
from service.settings import Settings
from service.store.photos import PhotoStore

log = logging.getLogger(__name__)

REINDEX = "reindex"
# Photos embedded while the switch holds gallery writes; more than this are caught up outside it
# first, so decisions wait at most about a second.
_CATCH_UP_IN_LOCK = 100


class HeadChoice(StrEnum):
    """Which kNN head to answer with once active."""

    MODEL = "model"  # the head exported with the model
    PAPER = "paper"  # k 50, cutoff 0.62, vote
    BEST = "best"  # the best cell of the grid on this catalogue's confirmations


class ActivationRefused(Conflict):
    """The shadow evaluation says no (or cannot say): ``report`` holds the figures."""

    def __init__(self, message: str, report: dict[str, Any]) -> None:
        super().__init__(message)
        self.report = report


def _model(session: Session, model_id: int) -> Model:
    model = session.get(Model, model_id)
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
    """Embeds stored photos in batches, decoding the next batches on other threads while the
    current one is in onnxruntime (both release the GIL)."""

    def __init__(self, settings: Settings, embedder: Embedder, *, prefetch: int = 2) -> None:
        self.settings = settings
        self.embedder = embedder
        self.store = PhotoStore.open(settings)
        self.prefetch = prefetch
        self.batch_size = max(1, embedder.max_batch_size)

    def _decode(self, rows: Sequence[tuple[int, str]]) -> tuple[list[int], np.ndarray, list[str]]:
        spec = self.embedder.contract.preprocessing
        ids, arrays, errors = [], [], []
        for image_id, path in rows:
            try:
                photo = decode_photo(
                    self.store.read(path),
                    max_pixels=self.settings.max_image_pixels,
                    target_size=spec.input_size,
                )
            except (OSError, PhotoError) as e:
                errors.append(f"image {image_id} ({path}): {e}")
                continue
            ids.append(image_id)
            arrays.append(to_model_input(photo.image, spec))
        size = spec.input_size
        pixels = np.stack(arrays) if arrays else np.zeros((0, size, size, 3), np.float32)
        return ids, pixels, errors

    def embed(
        self, rows: Sequence[tuple[int, str]], alive: Callable[[], bool] = lambda: True
    ) -> Embedded:
        """Embeddings of ``rows``; unreadable photos are reported, not raised."""
        out = Embedded()
        batches = [rows[i : i + self.batch_size] for i in range(0, len(rows), self.batch_size)]
        with ThreadPoolExecutor(max_workers=self.prefetch, thread_name_prefix="decode") as pool:
            pending: deque[Future[tuple[list[int], np.ndarray, list[str]]]] = deque()
            for batch in batches[: self.prefetch]:
                pending.append(pool.submit(self._decode, batch))
            for nxt in range(self.prefetch, len(batches) + self.prefetch):
                ids, pixels, errors = pending.popleft().result()
                if nxt < len(batches):
                    pending.append(pool.submit(self._decode, batches[nxt]))
                if not alive():
                    for f in pending:
                        f.cancel()
                    raise LeaseLost("the lease was lost while embedding")
                out.errors.extend(errors)
                if ids:
                    out.image_ids.extend(ids)
                    out.vectors.append(self.embedder.embed(pixels))
        return out


def store_embeddings(
    session: Session, model_id: int, image_ids: Sequence[int], vectors: np.ndarray
) -> int:
    """Add the embeddings that are not there yet, and log the gallery photos among them."""
    if not image_ids:
        return 0
    have = set(
        session.scalars(
            select(Embedding.image_id).where(
                Embedding.model_id == model_id, Embedding.image_id.in_(list(image_ids))
            )
        )
    )
    rows = [
        {"image_id": i, "model_id": model_id, "vector": np.ascontiguousarray(v, "<f4").tobytes()}
        for i, v in zip(image_ids, vectors, strict=True)
        if i not in have
    ]
    if rows:
        session.execute(insert(Embedding), rows)
        in_gallery = session.scalars(
            select(Image.id).where(
                Image.id.in_([r["image_id"] for r in rows]), Image.individual_id.is_not(None)
            )
        ).all()
        log_gallery_changes(session, in_gallery, model_id)
    return len(rows)


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
                    file_path = _model(session, model_id).file_path
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
        model = session.scalar(select(Model).where(Model.id == model_id).with_for_update())
        if model is None:
            raise NotFound(f"model {model_id} does not exist: see GET /models")
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
        gallery = Gallery.for_model(self.settings, lease.model_id, photos.embedder.dim)
        gallery.open(self.factory)  # writes the index file the replicas load at the switch
        if not alive():
            raise LeaseLost("the lease was lost while writing the index")
        report = evaluate_shadow(self.settings, self.factory, lease.model_id)
        with transaction(self.factory) as session:
            job = complete(session, lease, done=0, failed=len(errors), errors=errors)
            job.result = {"caught_up": added, "gallery_size": gallery.size, "shadow": report.data}
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


def shadow_report(
    settings: Settings, factory: sessionmaker[Session], model_id: int
) -> ShadowReport:
    """The report against the model active now: the stored one, or a fresh evaluation if the
    active model or the confirmations changed since (or none was stored)."""
    with factory() as session:
        _model(session, model_id)
        stored = latest_report(session, model_id)
        active = active_model_id(session)
        confirmations = len(confirmed_queries(session))
    if (
        stored is not None
        and stored.get("baseline_model_id") == active
        and stored.get("confirmations") == confirmations
    ):
        return ShadowReport(stored)
    return evaluate_shadow(settings, factory, model_id)


def head_of(report: ShadowReport, model: Model, choice: HeadChoice) -> Head:
    if choice == HeadChoice.MODEL:
        return Head.of(model)
    if choice == HeadChoice.PAPER:
        return PAPER_HEAD
    best = report.best_head()
    if best is None:
        raise Conflict(
            "no calibrated head: there are no curator-confirmed identifications to calibrate on; "
            "activate with head=model or head=paper"
        )
    return best


def gate(report: ShadowReport, choice: HeadChoice, force: bool) -> None:
    """Refuse a model that scores worse than the active one, or that cannot be judged."""
    if force or report.baseline_model_id is None:
        return
    if not report.sufficient:
        raise ActivationRefused(
            f"only {report.evaluated} curator-confirmed identifications can be evaluated "
            f"(at least {report.min_confirmations} are needed to judge the new model): confirm "
            "more, or activate with force=true",
            report.data,
        )
    old, new = report.baseline_map5(), report.candidate_map5(choice)
    if new < old:
        raise ActivationRefused(
            f"the new model scores MAP@5 {new:.4f} with the {choice} head on "
            f"{report.evaluated} confirmed identifications; the active model scores {old:.4f}. "
            "Keep the active model, or activate with force=true",
            report.data,
        )


@dataclass(frozen=True)
class Switch:
    from_model_id: int | None
    to_model_id: int
    action: str
    head: Head
    caught_up: int
    report: dict[str, Any] | None = None


def _hold_gallery_writes(session: Session) -> None:
    # Decisions, imports, merges and splits write images: holding that table for the switch
    # means none can land between the last catch-up and the status change. SQLite transactions
    # are BEGIN IMMEDIATE and already exclusive.
    if session.get_bind().dialect.name == "postgresql":
        session.connection().exec_driver_sql("LOCK TABLE images IN SHARE ROW EXCLUSIVE MODE")


def switch_to(
    settings: Settings,
    factory: sessionmaker[Session],
    photos: PhotoEmbedder,
    model_id: int,
    *,
    action: str,
    head: Head | None,
    actor: str,
    forced: bool = False,
) -> Switch:
    """Make ``model_id`` active in one transaction, after embedding every gallery photo it
    lacks; the model active before becomes ready again (its index stays for a rollback)."""
    added = 0
    for _attempt in range(3):
        added += catch_up(factory, photos, model_id)[0]
        try:
            return _switch_now(photos, factory, model_id, action, head, actor, forced, added)
        except _TooManyLate:
            continue
    raise Conflict("gallery photos keep arriving faster than the switch catches up: try again")


class _TooManyLate(Exception):
    pass


def _switch_now(
    photos: PhotoEmbedder,
    factory: sessionmaker[Session],
    model_id: int,
    action: str,
    head: Head | None,
    actor: str,
    forced: bool,
    added: int,
) -> Switch:
    with transaction(factory) as session:
        _hold_gallery_writes(session)
        late = missing_images(session, model_id, limit=_CATCH_UP_IN_LOCK + 1)
        if len(late) > _CATCH_UP_IN_LOCK:
            raise _TooManyLate()
        result = photos.embed(late)
        added += store_embeddings(
            session, model_id, result.image_ids, result.matrix(photos.embedder.dim)
        )
        previous = session.scalar(
            select(Model)
            .where(Model.status == ModelStatus.ACTIVE, Model.id != model_id)
            .with_for_update()
        )
        target = session.get_one(Model, model_id)
        if target.status == ModelStatus.ACTIVE and previous is None:
            return Switch(None, model_id, "unchanged", Head.of(target), added)
        if previous is not None:
            previous.status = ModelStatus.READY
        if head is not None:
            target.k, target.cutoff, target.ranking = head.k, head.cutoff, str(head.ranking)
        target.status = ModelStatus.ACTIVE
        chosen = Head.of(target)
        session.add(
            ModelSwitch(
                from_model_id=previous.id if previous else None,
                to_model_id=model_id,
                action=action,
                head=chosen.as_dict(),
                actor=actor,
                forced=forced,
            )
        )
    log.info(
        "%s: model %s is active (was %s), head %s, %d photos caught up",
        action,
        model_id,
        previous.id if previous else None,
        chosen.as_dict(),
        added,
    )
    return Switch(previous.id if previous else None, model_id, action, chosen, added)


def activate(
    settings: Settings,
    factory: sessionmaker[Session],
    embedders: Embedders,
    model_id: int,
    *,
    head: HeadChoice = HeadChoice.MODEL,
    force: bool = False,
    actor: str = "admin",
    before_switch: Callable[[int], None] | None = None,
) -> Switch:
    """Activate a ready model, through the shadow evaluation's gate. ``before_switch`` runs once
    the gate has passed (the API loads the model there, so the switch itself loads nothing)."""
    with factory() as session:
        model = _model(session, model_id)
    if model.status == ModelStatus.ACTIVE:
        raise Conflict(f"model {model_id} is already the active model")
    if model.status != ModelStatus.READY:
        raise Conflict(
            f"model {model_id} is {model.status}, not ready: re-index it first "
            f"(POST /models/{model_id}/reindex or `whaleid reindex {model_id}`)"
        )
    report = shadow_report(settings, factory, model_id)
    gate(report, head, force)
    chosen = head_of(report, model, head)
    if before_switch is not None:
        before_switch(model_id)
    done = switch_to(
        settings,
        factory,
        embedders(model_id),
        model_id,
        action="activate",
        head=chosen,
        actor=actor,
        forced=force,
    )
    return Switch(done.from_model_id, model_id, done.action, done.head, done.caught_up, report.data)


def previous_model_id(factory: sessionmaker[Session]) -> int | None:
    """The model that was active before the active one (what a rollback goes back to)."""
    with factory() as session:
        active = active_model_id(session)
        if active is None:
            return None
        return session.scalar(
            select(ModelSwitch.from_model_id)
            .where(ModelSwitch.to_model_id == active)
            .order_by(ModelSwitch.id.desc())
            .limit(1)
        )


def rollback(
    settings: Settings,
    factory: sessionmaker[Session],
    embedders: Embedders,
    actor: str = "admin",
    before_switch: Callable[[int], None] | None = None,
) -> Switch:
    """Go back to the model that was active before the active one, with the head it had."""
    previous_id = previous_model_id(factory)
    if previous_id is None:
        raise Conflict("there is no previous model to roll back to")
    with factory() as session:
        previous = _model(session, previous_id)
        if previous.status != ModelStatus.READY:
            raise Conflict(
                f"the previous model {previous.id} is {previous.status}: it can no longer be "
                "rolled back to; re-index it first"
            )
        head = Head.of(previous)
    if before_switch is not None:
        before_switch(previous.id)
    return switch_to(
        settings,
        factory,
        embedders(previous.id),
        previous.id,
        action="rollback",
        head=head,
        actor=actor,
        forced=True,
    )


def retire(settings: Settings, factory: sessionmaker[Session], model_id: int) -> Model:
    """Retire a model that is not active: its index files are deleted (embeddings stay, so a
    re-index of it only embeds what is new)."""
    with transaction(factory) as session:
        model = session.scalar(select(Model).where(Model.id == model_id).with_for_update())
        if model is None:
            raise NotFound(f"model {model_id} does not exist: see GET /models")
        if model.status == ModelStatus.ACTIVE:
            raise Conflict(f"model {model_id} is active: activate another one first")
        if model.status == ModelStatus.INDEXING:
            raise Conflict(f"model {model_id} is being indexed: cancel its job first")
        model.status = ModelStatus.RETIRED
    path = index_path(settings, model_id)
    for file in (path, sidecar_path(path)):
        file.unlink(missing_ok=True)
    return model


class ActiveGalleryKeeper:
    """The worker's idle task: embed gallery photos the active model lacks. A photo confirmed
    after a switch from an identification the previous model answered has only the previous
    model's embedding; this puts it into the active model's gallery."""

    def __init__(self, factory: sessionmaker[Session], embedders: Embedders) -> None:
        self.factory = factory
        self.embedders = embedders
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
        if not missing:
            return
        added, _ = catch_up(self.factory, self.embedders(active), active)
        if added:
            log.info("active model %s: %d gallery photos embedded", active, added)


def worker_handlers(
    settings: Settings, factory: sessionmaker[Session], embedders: Embedders
) -> dict[str, ChunkHandler]:
    return {REINDEX: ReindexChunks(settings, factory, embedders)}
