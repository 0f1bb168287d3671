"""Local features of a photo: keypoints and RootSIFT descriptors (OpenCV), and their store.

An extractor turns a photo into ``Features``; its ``name`` spells its settings, so features of
other settings are other rows (``db.tables.Feature``), never mixed. Keypoints are kept in the
stored photo's pixels (what ``GET /images/{id}/file`` serves), so a curator's view can draw them.
A learned extractor (ALIKED, DISK) is another class with the same ``name`` and ``extract``.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

import cv2
import numpy as np
from PIL import Image as PILImage
from sqlalchemy import exists, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from service.db.tables import Feature, Image, transaction
from service.errors import PhotoError
from service.imaging import decode_photo
from service.settings import Settings
from service.store.photos import PhotoStore

log = logging.getLogger(__name__)

DIM = 128
# RootSIFT components lie in [0, 1] and are mostly small: x 512, rounded, clipped to a byte.
_SCALE = 512.0


@dataclass(frozen=True)
class Features:
    """``points``: float32 (n, 2) x, y in the photo's pixels; ``descriptors``: uint8 (n, 128);
    ``width``/``height``: the photo the points refer to."""

    points: np.ndarray
    descriptors: np.ndarray
    width: int
    height: int

    def __len__(self) -> int:
        return len(self.points)

    @cached_property
    def unit(self) -> np.ndarray:
        """The descriptors as float32 unit vectors (RootSIFT is L2-normalised)."""
        d = self.descriptors.astype(np.float32) / _SCALE
        norms = np.linalg.norm(d, axis=1, keepdims=True)
        result: np.ndarray = d / np.maximum(norms, 1e-12)
        return result

    def pack(self) -> tuple[bytes, bytes]:
        """The row's ``keypoints`` (width and height, then the points) and ``descriptors``."""
        head = np.array([self.width, self.height], dtype="<f4")
        points = np.ascontiguousarray(self.points, dtype="<f4").ravel()
        return np.concatenate([head, points]).tobytes(), self.descriptors.tobytes()

    @classmethod
    def unpack(cls, keypoints: bytes, descriptors: bytes) -> Features:
        raw = np.frombuffer(keypoints, dtype="<f4")
        if raw.size < 2 or raw.size % 2:
            raise ValueError("a features row with a damaged keypoint list")
        points = raw[2:].reshape(-1, 2)
        desc = np.frombuffer(descriptors, dtype=np.uint8)
        if desc.size != len(points) * DIM:
            raise ValueError("a features row whose descriptors do not match its keypoints")
        return cls(points, desc.reshape(-1, DIM), int(raw[0]), int(raw[1]))


class Extractor(Protocol):
    """What verification needs of an extractor."""

    name: str

    def extract(self, image: PILImage.Image, size: tuple[int, int] | None = None) -> Features: ...


class RootSift:
    """SIFT keypoints on the photo's grey levels at a bounded resolution (its longer side at
    most ``max_side``), the ``n_features`` strongest, described by RootSIFT (each SIFT vector
    L1-normalised, then its square root: Arandjelović & Zisserman 2012), stored as bytes."""

    def __init__(self, max_side: int = 640, n_features: int = 400) -> None:
        self.max_side = max_side
        self.n_features = n_features
        self.name = f"rootsift-v1-{max_side}px-{n_features}"

    def extract(self, image: PILImage.Image, size: tuple[int, int] | None = None) -> Features:
        """The features of ``image``, their points in the pixels of ``size`` (the photo the
        image was reduced from, if it was; the image's own size by default)."""
        width, height = size or image.size
        grey = np.asarray(image.convert("L"))
        from_image = width / max(image.size[0], 1)  # image pixels -> photo pixels
        scale = min(1.0, self.max_side / max(image.size[0], image.size[1], 1))
        if scale < 1.0:
            reduced = (max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale)))
            grey = cv2.resize(grey, reduced, interpolation=cv2.INTER_AREA)
        # One detector per call: cheap to make, and OpenCV's objects are not shared across threads.
        sift = cv2.SIFT.create(nfeatures=self.n_features)
        keypoints, descriptors = sift.detectAndCompute(grey, None)
        if descriptors is None or not keypoints:
            return Features(
                np.zeros((0, 2), np.float32), np.zeros((0, DIM), np.uint8), width, height
            )
        keypoints, descriptors = keypoints[: self.n_features], descriptors[: self.n_features]
        root = np.sqrt(descriptors / np.maximum(descriptors.sum(axis=1, keepdims=True), 1e-7))
        quantised = np.clip(np.rint(root * _SCALE), 0, 255).astype(np.uint8)
        points = np.array([k.pt for k in keypoints], dtype=np.float32) * (from_image / scale)
        return Features(points, quantised, width, height)


def extractor_for(settings: Settings) -> RootSift:
    """The service's extractor, with the settings' resolution and keypoint bound."""
    return RootSift(settings.features_max_side, settings.features_count)


def add_features(session: Session, extractor: str, found: dict[int, Features]) -> int:
    """Add the features rows of ``found`` (image id -> features) that are not there yet."""
    if not found:
        return 0
    have = _with_features(session, extractor, list(found))
    rows = []
    for image_id, features in found.items():
        if image_id in have:
            continue
        keypoints, descriptors = features.pack()
        rows.append(
            {
                "image_id": image_id,
                "extractor": extractor,
                "count": len(features),
                "keypoints": keypoints,
                "descriptors": descriptors,
            }
        )
    if rows:
        session.execute(insert(Feature), rows)
    return len(rows)


def _with_features(session: Session, extractor: str, image_ids: list[int]) -> set[int]:
    """Those of ``image_ids`` that have features of ``extractor``."""
    return set(
        session.scalars(
            select(Feature.image_id).where(
                Feature.extractor == extractor, Feature.image_id.in_(image_ids)
            )
        )
    )


def images_without_features(
    session: Session, extractor: str, image_ids: Iterable[int]
) -> list[tuple[int, str]]:
    """(image id, file) of those ``image_ids`` with a kept file and no features yet."""
    ids = list(image_ids)
    if not ids:
        return []
    have = _with_features(session, extractor, ids)
    todo = [i for i in ids if i not in have]
    if not todo:
        return []
    rows = session.execute(
        select(Image.id, Image.file_path).where(Image.id.in_(todo), Image.pruned_at.is_(None))
    )
    return [(int(i), str(p)) for i, p in rows]


def gallery_without_features(session: Session, extractor: str, limit: int) -> list[tuple[int, str]]:
    """(image id, file) of up to ``limit`` gallery photos without features of ``extractor``."""
    has = exists().where(Feature.image_id == Image.id, Feature.extractor == extractor)
    rows = session.execute(
        select(Image.id, Image.file_path)
        .where(Image.individual_id.is_not(None), Image.pruned_at.is_(None), ~has)
        .order_by(Image.id)
        .limit(limit)
    )
    return [(int(i), str(p)) for i, p in rows]


class FeatureStore:
    """Features of stored photos for one extractor: read from the database, kept in a bounded
    in-process cache (rows never change), and extracted from the stored photo, then added, when
    a photo has none yet (a photo imported before verification was turned on)."""

    def __init__(
        self,
        settings: Settings,
        factory: sessionmaker[Session],
        extractor: Extractor | None = None,
        cache_size: int = 4096,
    ) -> None:
        self.settings = settings
        self.factory = factory
        self.extractor: Extractor = extractor or extractor_for(settings)
        self.photos = PhotoStore.open(settings)
        self.cache_size = cache_size
        self._cache: OrderedDict[int, Features] = OrderedDict()
        self._lock = threading.Lock()

    def extract_stored(
        self, rows: Sequence[tuple[int, str]]
    ) -> tuple[dict[int, Features], list[str]]:
        """Features of stored photos (image id, file); an unreadable photo is reported."""
        found: dict[int, Features] = {}
        errors: list[str] = []
        for image_id, path in rows:
            try:
                photo = decode_photo(
                    self.photos.read(path), max_pixels=self.settings.max_image_pixels
                )
            except (OSError, PhotoError) as e:
                errors.append(f"image {image_id}: {e}")
                continue
            found[image_id] = self.extractor.extract(photo.image)
        return found, errors

    def get(self, image_ids: Iterable[int]) -> dict[int, Features]:
        """The features of ``image_ids`` (those whose photo can be read)."""
        wanted = list(dict.fromkeys(image_ids))
        out: dict[int, Features] = {}
        with self._lock:
            for i in wanted:
                if i in self._cache:
                    self._cache.move_to_end(i)
                    out[i] = self._cache[i]
        missing = [i for i in wanted if i not in out]
        if missing:
            with self.factory() as session:
                rows = session.execute(
                    select(Feature.image_id, Feature.keypoints, Feature.descriptors).where(
                        Feature.extractor == self.extractor.name, Feature.image_id.in_(missing)
                    )
                )
                for image_id, keypoints, descriptors in rows:
                    out[int(image_id)] = Features.unpack(keypoints, descriptors)
                absent = [i for i in missing if i not in out]
                todo = images_without_features(session, self.extractor.name, absent)
            if todo:
                out.update(self.ensure(todo))
            self.remember({i: out[i] for i in missing if i in out})
        return out

    def remember(self, found: dict[int, Features]) -> None:
        with self._lock:
            for i, f in found.items():
                self._cache[i] = f
                self._cache.move_to_end(i)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    def catch_up(self, alive: Callable[[], bool] = lambda: True, batch: int = 64) -> int:
        """Extract the features every gallery photo lacks, batch by batch; how many were added.
        Photos that cannot be read are logged and skipped."""
        added, failed = 0, set[int]()
        while alive():
            with self.factory() as session:
                todo = [
                    r
                    for r in gallery_without_features(
                        session, self.extractor.name, batch + len(failed)
                    )
                    if r[0] not in failed
                ][:batch]
            if not todo:
                break
            found = self.ensure(todo)
            failed.update(i for i, _ in todo if i not in found)
            added += len(found)
        return added

    def ensure(self, rows: Sequence[tuple[int, str]]) -> dict[int, Features]:
        """Extract and add the features of these stored photos (image id, file), which have
        none yet; unreadable photos are logged and left out."""
        found, errors = self.extract_stored(rows)
        for e in errors:
            log.warning("no local features: %s", e)
        if found:
            try:
                with transaction(self.factory) as session:
                    add_features(session, self.extractor.name, found)
            except IntegrityError:  # a concurrent request added them first: the same features
                log.debug("features of %d photos were added concurrently", len(found))
        return found
