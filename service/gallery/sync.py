"""A model's gallery: the faiss index plus what each embedding stands for, kept in step with the
database (the source of truth). The gallery = embeddings of that model whose image has a
confirmed individual."""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import ScalarSelect, func, insert, select
from sqlalchemy.orm import Session, sessionmaker

from service.db.tables import Embedding, GalleryChange, Image, Individual, table_of
from service.gallery.index import (
    FLOAT32,
    GalleryFileError,
    GalleryIndex,
    IndexPlan,
    ids_digest,
    sidecar_path,
    stored_vectors,
)
from service.knn import Neighbour, shortfall
from service.settings import Settings

log = logging.getLogger(__name__)
_NO_DATE = np.iinfo(np.int64).min
_CHUNK = 2000


@dataclass(frozen=True)
class Filters:
    """The caller's candidate set: only gallery photos matching all given fields are searched.

    Both date bounds are inclusive. Under a date filter, a gallery photo without a date is left
    out: nothing says it was taken in the range."""

    species: str | None = None
    location: str | None = None
    date_from: dt.date | None = None
    date_to: dt.date | None = None
    exclude_encounter: str | None = None
    # Not a caller's filters: the shadow evaluation asks a confirmed photo without itself, and
    # the open-set fit (``models.openset``) asks a gallery photo without its whole individual.
    exclude_image: int | None = None
    exclude_individual: str | None = None

    def as_dict(self) -> dict[str, str]:
        return {k: str(v) for k, v in self.__dict__.items() if v is not None}

    @property
    def empty(self) -> bool:
        return not self.as_dict()


class _Vocabulary:
    """Strings as small integer codes, so filters are vectorised comparisons. Append-only: a
    code once given never changes, so older entry arrays stay valid."""

    def __init__(self) -> None:
        self.words: list[str | None] = [None]
        self.codes: dict[str | None, int] = {None: 0}

    def encode(self, values: Iterable[str | None]) -> np.ndarray:
        out = []
        for value in values:
            code = self.codes.get(value)
            if code is None:
                code = self.codes[value] = len(self.words)
                self.words.append(value)
            out.append(code)
        return np.array(out, dtype=np.int32)

    def code(self, value: str) -> int:
        return self.codes.get(value, -1)


_COLUMNS = ("labels", "species", "locations", "encounters")


@dataclass
class GalleryEntries:
    """What each gallery embedding stands for, sorted by embedding id. Immutable once built:
    changes produce a new instance (``patched``), so a search never sees half an update."""

    ids: np.ndarray
    image_ids: np.ndarray
    days: np.ndarray
    codes: dict[str, np.ndarray]
    vocab: dict[str, _Vocabulary]
    label_species: dict[str, str | None] = field(default_factory=dict)

    @classmethod
    def from_rows(
        cls, rows: Sequence[tuple[Any, ...]], vocab: dict[str, _Vocabulary] | None = None
    ) -> GalleryEntries:
        rows = sorted(rows, key=lambda r: r[0])
        col: list[Sequence[Any]] = list(zip(*rows, strict=True)) if rows else [[]] * 7
        vocab = vocab or {name: _Vocabulary() for name in _COLUMNS}
        return cls(
            ids=np.array(col[0], dtype=np.int64),
            image_ids=np.array(col[1], dtype=np.int64),
            days=np.array(
                [d.toordinal() if d is not None else _NO_DATE for d in col[5]], dtype=np.int64
            ),
            codes={
                "labels": vocab["labels"].encode(col[2]),
                "species": vocab["species"].encode(col[3]),
                "locations": vocab["locations"].encode(col[4]),
                "encounters": vocab["encounters"].encode(col[6]),
            },
            vocab=vocab,
            label_species={r[2]: r[3] for r in rows},
        )

    def patched(self, image_ids: np.ndarray, rows: Sequence[tuple[Any, ...]]) -> GalleryEntries:
        """These entries with every embedding of ``image_ids`` replaced by ``rows``."""
        keep = ~np.isin(self.image_ids, image_ids)
        fresh = GalleryEntries.from_rows(rows, self.vocab)
        order = np.argsort(np.concatenate([self.ids[keep], fresh.ids]), kind="stable")

        def merge(a: np.ndarray, b: np.ndarray) -> np.ndarray:
            merged: np.ndarray = np.concatenate([a[keep], b])[order]
            return merged

        return GalleryEntries(
            ids=merge(self.ids, fresh.ids),
            image_ids=merge(self.image_ids, fresh.image_ids),
            days=merge(self.days, fresh.days),
            codes={k: merge(self.codes[k], fresh.codes[k]) for k in _COLUMNS},
            vocab=self.vocab,
            label_species={**self.label_species, **fresh.label_species},
        )

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def labels(self) -> set[str]:
        words = self.vocab["labels"].words
        return {str(words[c]) for c in np.unique(self.codes["labels"])}

    def _matches(self, column: str, value: str) -> np.ndarray:
        result: np.ndarray = self.codes[column] == self.vocab[column].code(value)
        return result

    @cached_property
    def label_of_image(self) -> dict[int, str]:
        """Image id -> catalogue id of every gallery photo (built once per instance: at 100k
        photos it took 28 ms, which the local matcher's vote paid per query). Read it only."""
        words = self.vocab["labels"].words
        return {
            int(image_id): str(words[code])
            for image_id, code in zip(
                self.image_ids.tolist(), self.codes["labels"].tolist(), strict=True
            )
        }

    def select(self, filters: Filters) -> np.ndarray | None:
        """Embedding ids within the filters; None when there is no filter (search everything)."""
        if filters.empty:
            return None
        selected: np.ndarray = self.ids[self._mask(filters)]
        return selected

    def select_others(self, filters: Filters, labels: Iterable[str]) -> np.ndarray:
        """Embedding ids within the filters whose individual is none of ``labels``."""
        codes = [self.vocab["labels"].code(label) for label in labels]
        mask = self._mask(filters) & ~np.isin(self.codes["labels"], codes)
        selected: np.ndarray = self.ids[mask]
        return selected

    def select_labels(self, filters: Filters, labels: Iterable[str]) -> np.ndarray:
        """Embedding ids within the filters whose individual is one of ``labels``."""
        codes = [self.vocab["labels"].code(label) for label in labels]
        mask = self._mask(filters) & np.isin(self.codes["labels"], codes)
        selected: np.ndarray = self.ids[mask]
        return selected

    def _mask(self, filters: Filters) -> np.ndarray:
        mask = np.ones(len(self.ids), dtype=bool)
        if filters.species is not None:
            mask &= self._matches("species", filters.species)
        if filters.location is not None:
            mask &= self._matches("locations", filters.location)
        if filters.date_from is not None:
            mask &= (self.days != _NO_DATE) & (self.days >= filters.date_from.toordinal())
        if filters.date_to is not None:
            mask &= (self.days != _NO_DATE) & (self.days <= filters.date_to.toordinal())
        if filters.exclude_encounter is not None:
            mask &= ~self._matches("encounters", filters.exclude_encounter)
        if filters.exclude_image is not None:
            mask &= self.image_ids != filters.exclude_image
        if filters.exclude_individual is not None:
            mask &= ~self._matches("labels", filters.exclude_individual)
        return mask

    def neighbours(self, distances: np.ndarray, ids: np.ndarray) -> list[Neighbour]:
        positions = np.searchsorted(self.ids, ids)
        words = self.vocab["labels"].words
        labels = self.codes["labels"]
        return [
            Neighbour(str(words[labels[p]]), float(d), int(self.image_ids[p]))
            for d, p in zip(distances, positions, strict=True)
        ]


def gallery_rows(
    session: Session, model_id: int, image_ids: Sequence[int] | None = None
) -> list[tuple[Any, ...]]:
    """(embedding id, image id, catalogue id, species, location, date, encounter) per embedding
    of ``model_id`` whose image has a confirmed individual; merged individuals resolve to the
    individual they were merged into."""
    merged: dict[int, int] = {
        a: b
        for a, b in session.execute(
            select(Individual.id, Individual.merged_into_id).where(
                Individual.merged_into_id.is_not(None)
            )
        )
        if b is not None
    }
    names = (
        dict(session.execute(select(Individual.id, Individual.catalogue_id)).all())
        if merged
        else {}
    )
    stmt = (
        select(
            Embedding.id,
            Image.id,
            Individual.id,
            Individual.catalogue_id,
            Image.species,
            Individual.species,
            Image.location,
            Image.taken_on,
            Image.encounter,
        )
        .join(Image, Image.id == Embedding.image_id)
        .join(Individual, Individual.id == Image.individual_id)
        .where(Embedding.model_id == model_id)
    )
    if image_ids is not None:
        stmt = stmt.where(Image.id.in_(list(image_ids)))
    rows = []
    for emb_id, image_id, ind_id, catalogue_id, img_sp, ind_sp, loc, day, enc in session.execute(
        stmt
    ):
        target = ind_id
        while target in merged:
            target = merged[target]
        label = catalogue_id if target == ind_id else names[target]
        rows.append((emb_id, image_id, label, img_sp or ind_sp, loc, day, enc))
    return rows


def load_vectors(session: Session, ids: Sequence[int], dim: int) -> np.ndarray:
    """Stored vectors of the given embedding ids, in that order."""
    found: dict[int, bytes] = {}
    for start in range(0, len(ids), _CHUNK):
        chunk = list(ids[start : start + _CHUNK])
        found.update(
            session.execute(
                select(Embedding.id, Embedding.vector).where(Embedding.id.in_(chunk))
            ).all()
        )
    out = np.empty((len(ids), dim), dtype=np.float32)
    for row, i in enumerate(ids):
        out[row] = np.frombuffer(found[int(i)], dtype=np.float32)
    return out


# The key of the PostgreSQL advisory lock that orders gallery change-log writes ("whaleid").
CHANGE_LOG_LOCK = 0x7768616C656964


def log_gallery_changes(
    session: Session, image_ids: Iterable[int], model_id: int | None = None
) -> None:
    """Record that these photos' place in the gallery changed (added, relabelled, removed), for
    ``model_id`` or for every model that has embedded them. Replicas replay this log (the
    database is the log) to keep their in-memory index in step.

    Call it last in the change's transaction: on PostgreSQL it holds the change-log lock until
    the commit."""
    ids = sorted(set(image_ids))
    if not ids:
        return
    session.flush()  # the change itself, before the lock: the lock is held only to the commit
    if model_id is not None:
        pairs = [(model_id, i) for i in ids]
    else:
        pairs = list(
            session.execute(
                select(Embedding.model_id, Embedding.image_id).where(Embedding.image_id.in_(ids))
            )
        )
    if pairs:
        _lock_change_log(session)
        # The table, not the class: a Core insert, without the ORM's per-row bookkeeping.
        session.execute(
            insert(table_of(GalleryChange)),
            [{"model_id": m, "image_id": i} for m, i in pairs],
        )


def _lock_change_log(session: Session) -> None:
    """Make change-log ids commit in the order they are given, so that a replay of "ids above
    the last one I saw" never skips one.

    A sequence hands out ids at insert time, not at commit: without this, a transaction that
    took id 10 can commit after one that took id 11, and a replica that replayed up to 11 in
    between never reads 10 (issue 7: a confirmed photo missing from a running server). The
    lock is a transaction-level advisory lock, taken just before the insert and released by
    PostgreSQL after the commit is visible; so when 11 is visible, 10 already is (or was rolled
    back). Chosen over the alternatives because it keeps replay a plain id comparison and needs
    no schema change: tracking gaps in a recent window is only right if no transaction outlives
    the window, and a commit-ordered key (``pg_current_xact_id`` with snapshots) needs a new
    column and snapshot arithmetic in every replica. Its cost: change-writing transactions are
    serialised from this insert to their commit (one insert and the commit's WAL flush), about
    a millisecond each (docs/reliability.md). Nothing that waits on another transaction's row
    locks may follow it, or two writers could deadlock (PostgreSQL would detect it and abort
    one); the insert's foreign-key checks take only KEY SHARE locks, which our updates do not
    block. SQLite needs nothing: its writers are serialised by BEGIN IMMEDIATE already."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(func.pg_advisory_xact_lock(CHANGE_LOG_LOCK)))


def gallery_version(model_id: Any) -> ScalarSelect[int]:
    """The newest gallery change of ``model_id`` (0 if none), as a scalar subquery: the gallery's
    version. ``model_id`` may be a column, to read it in the same statement as its model."""
    return (
        select(func.coalesce(func.max(GalleryChange.id), 0))
        .where(GalleryChange.model_id == model_id)
        .scalar_subquery()
    )


def latest_change(session: Session, model_id: int) -> int:
    """The newest gallery change of ``model_id`` (0 if none): the gallery's version."""
    return int(session.scalar(select(gallery_version(model_id))) or 0)


@dataclass(frozen=True)
class GalleryDigest:
    """A fingerprint of what a gallery holds: which embeddings, their vectors (float32 bytes in
    ascending id order) and the label each one votes for (``id<TAB>label`` lines). Two
    galleries with equal digests answer every search alike; the live index of a replica and
    the database must have equal digests."""

    model_id: int
    count: int
    ids_sha256: str
    vectors_sha256: str
    labels_sha256: str
    vectors: str = FLOAT32  # how the index holds them: float32, or float16 (rounded alike)

    @classmethod
    def of(
        cls,
        model_id: int,
        ids: np.ndarray,
        vectors: np.ndarray,
        labels: Sequence[str],
        precision: str = FLOAT32,
    ) -> GalleryDigest:
        """The digest of ``ids`` with their ``vectors`` (as an index of ``precision`` holds
        them) and ``labels`` (row for row, any order)."""
        order = np.argsort(ids, kind="stable")
        sha = hashlib.sha256()
        for start in range(0, len(order), _CHUNK):  # no second copy of a large index
            sha.update(np.ascontiguousarray(vectors[order[start : start + _CHUNK]], "<f4").data)
        lines = "".join(f"{ids[i]}\t{labels[i]}\n" for i in order.tolist())
        return cls(
            model_id=model_id,
            count=len(ids),
            ids_sha256=ids_digest(ids),
            vectors_sha256=sha.hexdigest(),
            labels_sha256=hashlib.sha256(lines.encode()).hexdigest(),
            vectors=precision,
        )

    @classmethod
    def of_database(
        cls, session: Session, model_id: int, dim: int, precision: str = FLOAT32
    ) -> GalleryDigest:
        """The digest of the gallery the database describes for ``model_id``, its vectors held
        at ``precision`` (a replica's digest says which)."""
        rows = gallery_rows(session, model_id)
        ids = np.array([r[0] for r in rows], dtype=np.int64)
        vectors = stored_vectors(load_vectors(session, ids.tolist(), dim), precision)
        return cls.of(model_id, ids, vectors, [r[2] for r in rows], precision)


def index_path(settings: Settings, model_id: int) -> Path:
    """Where the faiss index of ``model_id`` is kept (its sidecar lies beside it)."""
    return settings.indexes_dir / f"model-{model_id}.faiss"


class Gallery:
    """The gallery of one model, searched by ``/identify`` and kept in step by ``sync``."""

    def __init__(
        self,
        model_id: int,
        dim: int,
        path: Path,
        *,
        ivf_threshold: int = 200_000,
        float16: bool = Settings.model_fields["gallery_float16"].default,
    ) -> None:
        self.model_id = model_id
        self.dim = dim
        self.path = path
        self.ivf_threshold = ivf_threshold
        self.float16 = float16
        self.index = GalleryIndex.build(
            np.zeros(0, np.int64), np.zeros((0, dim), np.float32), dim, float16=float16
        )
        self.entries = GalleryEntries.from_rows([])
        self.version = -1
        self._lock = threading.RLock()

    @classmethod
    def for_model(cls, settings: Settings, model_id: int, dim: int) -> Gallery:
        """The gallery of ``model_id`` at its place in the data directory (not opened yet)."""
        return cls(
            model_id,
            dim,
            index_path(settings, model_id),
            ivf_threshold=settings.ivf_threshold,
            float16=settings.gallery_float16,
        )

    @property
    def size(self) -> int:
        return len(self.entries)

    def open(self, factory: sessionmaker[Session]) -> None:
        """Load the index file, or rebuild it from stored embeddings if missing or corrupt; then
        repair whatever the database changed since it was written, and save if anything did."""
        with factory() as session:
            version = latest_change(session, self.model_id)
            rows = gallery_rows(session, self.model_id)
            entries = GalleryEntries.from_rows(rows)
            try:
                index, sidecar = GalleryIndex.load(self.path)
                if sidecar.get("model_id") != self.model_id or index.dim != self.dim:
                    raise GalleryFileError(f"{self.path} belongs to another model")
                wanted = self._plan(len(entries)).vectors
                if index.plan.vectors != wanted:
                    raise GalleryFileError(
                        f"{self.path} holds {index.plan.vectors} vectors; "
                        f"WHALEID_GALLERY_FLOAT16 asks for {wanted}"
                    )
            except GalleryFileError as e:
                # A first start has no file yet: nothing is wrong, so only say so at DEBUG.
                first = not self.path.exists() and not sidecar_path(self.path).exists()
                log.log(
                    logging.DEBUG if first else logging.WARNING,
                    "gallery of model %s: %s; rebuilding from stored embeddings",
                    self.model_id,
                    e,
                )
                index = self._rebuild(session, entries)
                sidecar = {}
            with self._lock:
                self.index = index
            changed = self._apply(session, entries) or not sidecar
            self.version = version
        if changed:
            self.save()

    def _plan(self, size: int) -> IndexPlan:
        return IndexPlan.for_size(size, self.ivf_threshold, self.float16)

    def _rebuild(self, session: Session, entries: GalleryEntries) -> GalleryIndex:
        vectors = load_vectors(session, entries.ids.tolist(), self.dim)
        return GalleryIndex.build(
            entries.ids, vectors, self.dim, self.ivf_threshold, float16=self.float16
        )

    def _apply(self, session: Session, entries: GalleryEntries) -> bool:
        """Make the index hold exactly ``entries``; True if it had to change."""
        have = self.index.ids()
        if ids_digest(have) == ids_digest(entries.ids):
            with self._lock:
                self.entries = entries
            return False
        wanted = self._plan(len(entries))
        if (wanted.kind, wanted.vectors) != (self.index.plan.kind, self.index.plan.vectors):
            rebuilt = self._rebuild(session, entries)
            with self._lock:
                self.index, self.entries = rebuilt, entries
            return True
        missing = np.setdiff1d(entries.ids, have)
        extra = np.setdiff1d(have, entries.ids)
        vectors = load_vectors(session, missing.tolist(), self.dim)
        with self._lock:
            self.index.remove(extra)
            self.index.add(missing, vectors)
            self.entries = entries
        log.debug(
            "gallery of model %s: +%d -%d embeddings", self.model_id, len(missing), len(extra)
        )
        return True

    def sync(self, factory: sessionmaker[Session]) -> bool:
        """Replay the gallery changes logged since the last sync; True if any were."""
        with factory() as session:
            latest = latest_change(session, self.model_id)
            if latest == self.version:
                return False
            if latest < self.version:
                # The log lost its newest rows (deleted, or a restored backup): ids this gallery
                # counts as replayed may come again, so it reloads in full.
                log.warning(
                    "gallery of model %s: change log at %s, behind this gallery's %s; reloading",
                    self.model_id,
                    latest,
                    self.version,
                )
                self._apply(session, GalleryEntries.from_rows(gallery_rows(session, self.model_id)))
                self.version = latest
                return True
            image_ids = np.array(
                session.scalars(
                    select(GalleryChange.image_id)
                    .where(
                        GalleryChange.model_id == self.model_id,
                        GalleryChange.id > self.version,
                        GalleryChange.id <= latest,
                    )
                    .distinct()
                ).all(),
                dtype=np.int64,
            )
            if self.version < 0 or len(image_ids) > max(1000, self.size // 10):
                self._apply(session, GalleryEntries.from_rows(gallery_rows(session, self.model_id)))
            else:
                self._patch(session, image_ids)
            self.version = latest
        return True

    def _patch(self, session: Session, image_ids: np.ndarray) -> None:
        """Re-read just these photos' gallery entries and vectors."""
        rows = gallery_rows(session, self.model_id, image_ids.tolist())
        entries = self.entries.patched(image_ids, rows)
        if self._plan(len(entries)).kind != self.index.plan.kind:
            self._apply(session, entries)
            return
        old = self.entries.ids[np.isin(self.entries.image_ids, image_ids)]
        new = np.array(sorted(r[0] for r in rows), dtype=np.int64)
        vectors = load_vectors(session, new.tolist(), self.dim)
        with self._lock:
            self.index.remove(old)
            self.index.add(new, vectors)
            self.entries = entries

    def save(self) -> None:
        with self._lock:
            self.index.save(self.path, {"model_id": self.model_id, "last_change": self.version})

    def digest(self) -> GalleryDigest:
        """The digest of what this replica searches now: the index's ids and vectors, and the
        labels its entries give them (if entries and index disagree, so does the digest).
        Searches wait meanwhile (the flat index's vectors are read in place): 1.8 s for 250k
        512-d embeddings on a 2-core machine, so several seconds at a million."""
        with self._lock:
            ids, vectors = self.index.contents()
            words = self.entries.vocab["labels"].words
            by_id = dict(
                zip(self.entries.ids.tolist(), self.entries.codes["labels"].tolist(), strict=True)
            )
            labels = [str(words[by_id[i]]) if i in by_id else "" for i in ids.tolist()]
            return GalleryDigest.of(self.model_id, ids, vectors, labels, self.index.plan.vectors)

    def search(self, query: np.ndarray, k: int, filters: Filters) -> tuple[list[Neighbour], int]:
        """The ``min(k, n)`` nearest gallery photos within ``filters``, and n."""
        with self._lock:
            entries = self.entries
            allowed = entries.select(filters)
            n = len(entries) if allowed is None else len(allowed)
            if n == 0:
                return [], 0
            distances, ids = self.index.search(query, min(k, n), allowed)
            return entries.neighbours(distances, ids), n

    def nearest_of(
        self, query: np.ndarray, labels: Iterable[str], filters: Filters
    ) -> dict[str, Neighbour]:
        """The nearest photo of each of ``labels`` within ``filters`` (those it has)."""
        with self._lock:
            entries = self.entries
            allowed = entries.select_labels(filters, labels)
            if not len(allowed):
                return {}
            distances, ids = self.index.search(query, len(allowed), allowed)
            found = entries.neighbours(distances, ids)
        best: dict[str, Neighbour] = {}
        for n in found:
            if n.label not in best or n.distance < best[n.label].distance:
                best[n.label] = n
        return best

    def search_beyond(
        self, query: np.ndarray, filters: Filters, neighbours: Sequence[Neighbour]
    ) -> list[Neighbour]:
        """Photos past the k ``neighbours`` that name the next-nearest individuals within
        ``filters``, as many as the answer needs to hold five entries (DESIGN.md step 6); none
        when the neighbours already name enough. Nearest first; the head picks from them."""
        count = shortfall(neighbours)
        if count == 0:
            return []
        with self._lock:
            entries = self.entries
            allowed = entries.select_others(filters, {n.label for n in neighbours})
            # An individual's nearest photo is what counts: search wider until the results name
            # enough individuals (or hold every photo left), since one may fill many places.
            k = 4 * count
            while True:
                k = min(k, len(allowed))
                if k == 0:
                    return []
                distances, ids = self.index.search(query, k, allowed)
                found = entries.neighbours(distances, ids)
                if len({n.label for n in found}) >= count or k == len(allowed):
                    return found
                k *= 4
