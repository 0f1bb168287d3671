"""Photos stored content-addressed in the object store (the data directory by default), so
identical uploads are stored once and a new model can re-embed every photo."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from service.store.objects import ObjectStore, open_store

if TYPE_CHECKING:
    from service.settings import Settings

_PREFIX = "photos/"  # the key prefix, so a bucket mirrors the data directory

_EXTENSIONS = {
    "image/jpeg": ".jpg",
    "image/png": ".png",
    "image/webp": ".webp",
    "image/heic": ".heic",
}


@dataclass(frozen=True)
class StoredPhoto:
    content_hash: str
    relative_path: str
    created: bool


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class PhotoStore:
    """Photos in the object store (``settings.storage_url``) under ``photos/`` (or another
    ``prefix``: batch archives keep their photos under ``batches/``)."""

    def __init__(self, objects: ObjectStore, prefix: str = _PREFIX) -> None:
        self.objects = objects
        self.prefix = prefix

    @classmethod
    def open(cls, settings: Settings, prefix: str = _PREFIX) -> PhotoStore:
        return cls(open_store(settings), prefix)

    def relative_path(self, digest: str, media_type: str) -> str:
        return f"{digest[:2]}/{digest[2:4]}/{digest}{_EXTENSIONS.get(media_type, '.bin')}"

    def put(self, data: bytes, media_type: str, digest: str | None = None) -> StoredPhoto:
        """Store ``data`` (atomically) unless a file with the same content is already there.
        ``digest`` names the file by the upload it came from when ``data`` is what is kept of
        it (a re-encoded query photo), so an identical upload still finds it."""
        digest = digest or content_hash(data)
        rel = self.relative_path(digest, media_type)
        created = self.objects.put_new(self.prefix + rel, data)
        return StoredPhoto(digest, rel, created=created)

    def read(self, relative_path: str) -> bytes:
        """The stored photo's bytes; raises ``MissingObject``."""
        return self.objects.read(self.prefix + relative_path)

    def remove(self, relative_path: str) -> None:
        """Delete a stored file (a pruned query photo)."""
        self.objects.delete(self.prefix + relative_path)

    def discard(self, stored: StoredPhoto) -> None:
        """Undo a ``put`` whose database row was not written (no orphan files)."""
        if stored.created:
            self.objects.delete(self.prefix + stored.relative_path)
