"""Photos stored content-addressed under the data directory, so identical uploads are stored
once and a new model can re-embed every photo."""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

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
    def __init__(self, root: Path) -> None:
        self.root = root

    def relative_path(self, digest: str, media_type: str) -> str:
        return f"{digest[:2]}/{digest[2:4]}/{digest}{_EXTENSIONS.get(media_type, '.bin')}"

    def path(self, relative_path: str) -> Path:
        return self.root / relative_path

    def put(self, data: bytes, media_type: str, digest: str | None = None) -> StoredPhoto:
        """Store ``data`` (atomically) unless a file with the same content is already there.
        ``digest`` names the file by the upload it came from when ``data`` is what is kept of
        it (a re-encoded query photo), so an identical upload still finds it."""
        digest = digest or content_hash(data)
        rel = self.relative_path(digest, media_type)
        target = self.path(rel)
        if target.exists():
            return StoredPhoto(digest, rel, created=False)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".upload.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return StoredPhoto(digest, rel, created=True)

    def remove(self, relative_path: str) -> None:
        """Delete a stored file (a pruned query photo)."""
        self.path(relative_path).unlink(missing_ok=True)

    def discard(self, stored: StoredPhoto) -> None:
        """Undo a ``put`` whose database row was not written (no orphan files)."""
        if stored.created:
            self.path(stored.relative_path).unlink(missing_ok=True)
