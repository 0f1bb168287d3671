"""A model's gallery: the faiss index plus what each embedding stands for, kept in step with the
database (the source of truth). The gallery = embeddings of that model whose image has a
confirmed individual."""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from service.db import Embedding, Image, Individual, Model
from service.gallery import GalleryFileError, GalleryIndex, IndexPlan, ids_digest
from service.knn import Neighbour

log = logging.getLogger(__name__)
_NO_DATE = np.iinfo(np.int64).min
_CHUNK = 2000


@dataclass(frozen=True)
class Filters:
    """The caller's candidate set: only gallery photos matching all given fields are searched."""

    species: str | None = None
    location: str | None = None
    date_from: dt.date | None = None
    date_to: dt.date | None = None
    exclude_encounter: str | None = None

    def as_dict(self) -> dict[str, str]:
        return {k: str(v) for k, v in self.__dict__.items() if v is not None}

    @property
    def empty(self) -> bool:
        return not self.as_dict()


class _Vocabulary:
    """Strings as small integer codes, so filters are vectorised comparisons."""

    def __init__(self, values: Iterable[str | None]) -> None:
        self.words: list[str | None] = [None]
        self.codes: dict[str | None, int] = {None: 0}
        self.array = np.array([self._code(v) for v in values], dtype=np.int32)

    def _code(self, value: str | None) -> int:
        code = self.codes.get(value)
        if code is None:
            code = self.codes[value] = len(self.words)
            self.words.append(value)
        return code

    def matches(self, value: str) -> np.ndarray:
        code = self.codes.get(value)
        return self.array == code if code is not None else np.zeros(len(self.array), bool)


@dataclass
class GalleryEntries:
    """What each gallery embedding stands for, sorted by embedding id."""

    ids: np.ndarray
    image_ids: np.ndarray
    labels: _Vocabulary
    species: _Vocabulary
    locations: _Vocabulary
    encounters: _Vocabulary
    days: np.ndarray
    label_species: dict[str, str | None] = field(default_factory=dict)

    @classmethod
    def from_rows(cls, rows: Sequence[tuple[Any, ...]]) -> GalleryEntries:
        rows = sorted(rows, key=lambda r: r[0])
        col: list[Sequence[Any]] = list(zip(*rows, strict=True)) if rows else [[]] * 7
        days = np.array(
            [d.toordinal() if d is not None else _NO_DATE for d in col[5]], dtype=np.int64
        )
        labels = _Vocabulary(col[2])
        return cls(
            ids=np.array(col[0], dtype=np.int64),
            image_ids=np.array(col[1], dtype=np.int64),
            labels=labels,
            species=_Vocabulary(col[3]),
            locations=_Vocabulary(col[4]),
            encounters=_Vocabulary(col[6]),
            days=days,
            label_species={r[2]: r[3] for r in rows},
        )

    def __len__(self) -> int:
        return len(self.ids)

    def select(self, filters: Filters) -> np.ndarray | None:
        """Embedding ids within the filters; None when there is no filter (search everything)."""
        if filters.empty:
            return None
        mask = np.ones(len(self.ids), dtype=bool)
        if filters.species is not None:
            mask &= self.species.matches(filters.species)
        if filters.location is not None:
            mask &= self.locations.matches(filters.location)
        if filters.date_from is not None:
            mask &= (self.days != _NO_DATE) & (self.days >= filters.date_from.toordinal())
        if filters.date_to is not None:
            mask &= (self.days != _NO_DATE) & (self.days <= filters.date_to.toordinal())
        if filters.exclude_encounter is not None:
            mask &= ~self.encounters.matches(filters.exclude_encounter)
        selected: np.ndarray = self.ids[mask]
        return selected

    def neighbours(self, distances: np.ndarray, ids: np.ndarray) -> list[Neighbour]:
        positions = np.searchsorted(self.ids, ids)
        return [
            Neighbour(
                str(self.labels.words[self.labels.array[p]]), float(d), int(self.image_ids[p])
            )
            for d, p in zip(distances, positions, strict=True)
        ]


def gallery_rows(session: Session, model_id: int) -> list[tuple[Any, ...]]:
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


def bump_gallery_version(session: Session, model_id: int) -> None:
    """Tell every replica that this model's gallery changed (the database is the log)."""
    session.execute(
        update(Model).where(Model.id == model_id).values(gallery_version=Model.gallery_version + 1)
    )


class Gallery:
    """The gallery of one model, searched by ``/identify`` and kept in step by ``sync``."""

    def __init__(
        self, model_id: int, dim: int, path: Path, *, ivf_threshold: int = 200_000
    ) -> None:
        self.model_id = model_id
        self.dim = dim
        self.path = path
        self.ivf_threshold = ivf_threshold
        self.index = GalleryIndex.build(np.zeros(0, np.int64), np.zeros((0, dim), np.float32), dim)
        self.entries = GalleryEntries.from_rows([])
        self.version = -1
        self._lock = threading.RLock()

    @property
    def size(self) -> int:
        return len(self.entries)

    def open(self, factory: sessionmaker[Session]) -> None:
        """Load the index file, or rebuild it from stored embeddings if missing or corrupt; then
        repair whatever the database changed since it was written, and save if anything did."""
        with factory() as session:
            version = session.get_one(Model, self.model_id).gallery_version
            rows = gallery_rows(session, self.model_id)
            entries = GalleryEntries.from_rows(rows)
            try:
                index, sidecar = GalleryIndex.load(self.path)
                if sidecar.get("model_id") != self.model_id or index.dim != self.dim:
                    raise GalleryFileError(f"{self.path} belongs to another model")
            except GalleryFileError as e:
                log.warning(
                    "gallery of model %s: %s; rebuilding from stored embeddings", self.model_id, e
                )
                index = self._rebuild(session, entries)
                sidecar = {}
            with self._lock:
                self.index = index
            changed = self._apply(session, entries) or not sidecar
            self.version = version
        if changed:
            self.save()

    def _rebuild(self, session: Session, entries: GalleryEntries) -> GalleryIndex:
        vectors = load_vectors(session, entries.ids.tolist(), self.dim)
        return GalleryIndex.build(entries.ids, vectors, self.dim, self.ivf_threshold)

    def _apply(self, session: Session, entries: GalleryEntries) -> bool:
        """Make the index hold exactly ``entries``; True if it had to change."""
        have = self.index.ids()
        if ids_digest(have) == ids_digest(entries.ids):
            with self._lock:
                self.entries = entries
            return False
        wanted_kind = IndexPlan.for_size(len(entries), self.ivf_threshold).kind
        if wanted_kind != self.index.plan.kind:
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
        log.info("gallery of model %s: +%d -%d embeddings", self.model_id, len(missing), len(extra))
        return True

    def sync(self, factory: sessionmaker[Session], *, save: bool = True) -> bool:
        """Catch up with the database if this model's gallery changed; True if it did."""
        with factory() as session:
            version = session.execute(
                select(Model.gallery_version).where(Model.id == self.model_id)
            ).scalar_one()
            if version == self.version:
                return False
            changed = self._apply(
                session, GalleryEntries.from_rows(gallery_rows(session, self.model_id))
            )
            self.version = version
        if changed and save:
            self.save()
        return changed

    def save(self) -> None:
        with self._lock:
            self.index.save(self.path, {"model_id": self.model_id, "gallery_version": self.version})

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
