"""ZIP archives of photos for batch jobs: checked before anything is read or kept, and kept
per upload, so that no job can remove another's files.

- The archive's end of central directory is read first, and an archive that declares more
  entries, or a larger directory, than a batch may hold is refused before ``zipfile`` parses a
  single entry (a directory of a million entries took 8 s and 450 MB to parse).
- Each entry is read with a bounded read (headers can lie), must not be encrypted, and must be a
  photo (its header read and checked) before it is kept; anything else is answered as a failed
  item and never stored.
- Kept photos live under ``batches/<token>/`` of the object store, one folder per upload, so two
  jobs holding the same photo each hold their own copy; a job removes only its own folder's
  files, when it ends in any state, and ``whaleid prune`` removes what a crash left behind.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import secrets
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING

from service.errors import Invalid
from service.store.objects import ObjectStore, open_store

if TYPE_CHECKING:
    from service.settings import Settings

log = logging.getLogger(__name__)

PREFIX = "batches/"
_EOCD = b"PK\x05\x06"
_EOCD_SIZE = 22
_ZIP64_LOCATOR = b"PK\x06\x07"
_ZIP64_EOCD = b"PK\x06\x06"
_MAX_COMMENT = 65535
# Room beside the photos for folders, resource forks and hidden files.
_EXTRA_ENTRIES = 64
# Bytes of central directory allowed per entry: 46 fixed, the rest for the name and extras.
_DIRECTORY_BYTES_PER_ENTRY = 1024
_ENCRYPTED = 0x1


@dataclass(frozen=True)
class Directory:
    """What the archive's end of central directory declares."""

    entries: int
    size: int


def declared_directory(archive: IO[bytes]) -> Directory:
    """Read the end of central directory record (ZIP64 included) without parsing any entry."""
    archive.seek(0, 2)
    size = archive.tell()
    length = min(size, _EOCD_SIZE + _MAX_COMMENT)
    archive.seek(size - length)
    tail = archive.read(length)
    at = tail.rfind(_EOCD)
    if at < 0 or len(tail) - at < _EOCD_SIZE:
        raise Invalid("the archive is not a readable ZIP file: it has no end of central directory")
    entries, directory_size, offset = struct.unpack("<HLL", tail[at + 10 : at + 20])
    if entries == 0xFFFF or 0xFFFFFFFF in (directory_size, offset):
        locator = tail[at - 20 : at] if at >= 20 else b""
        if locator[:4] == _ZIP64_LOCATOR:
            (zip64_at,) = struct.unpack("<Q", locator[8:16])
            if zip64_at > size - 56:  # a lie, and seeking to it can raise (2^63 overflows)
                raise Invalid(
                    "the archive is not a readable ZIP file: its ZIP64 locator points past its end"
                )
            archive.seek(zip64_at)
            record = archive.read(56)
            if record[:4] == _ZIP64_EOCD and len(record) == 56:
                entries, directory_size = struct.unpack("<QQ", record[32:48])
    archive.seek(0)
    return Directory(int(entries), int(directory_size))


def check_directory(archive: IO[bytes], max_photos: int) -> None:
    """Refuse, by what the archive declares, one with more entries than a batch may hold."""
    directory = declared_directory(archive)
    allowed = max_photos + _EXTRA_ENTRIES
    if directory.entries > allowed:
        raise Invalid(
            f"the archive declares {directory.entries} entries, over the limit of {allowed} "
            f"({max_photos} photos per batch, and folders): send fewer photos per archive"
        )
    if directory.size > allowed * _DIRECTORY_BYTES_PER_ENTRY:
        raise Invalid(
            f"the archive's central directory is {directory.size} bytes, over the limit of "
            f"{allowed * _DIRECTORY_BYTES_PER_ENTRY} for {allowed} entries: is it a ZIP of photos?"
        )


def is_encrypted(flag_bits: int) -> bool:
    return bool(flag_bits & _ENCRYPTED)


class ArchiveFiles:
    """The photos of archive uploads, each upload under ``batches/<token>/``."""

    def __init__(self, objects: ObjectStore) -> None:
        self.objects = objects

    @classmethod
    def open(cls, settings: Settings) -> ArchiveFiles:
        return cls(open_store(settings))

    @staticmethod
    def new_token() -> str:
        return secrets.token_hex(16)

    def keep(self, token: str, data: bytes) -> str:
        """Store one photo of upload ``token``; its reference (relative to ``batches/``)."""
        ref = f"{token}/{hashlib.sha256(data).hexdigest()}.bin"
        self.objects.put_new(PREFIX + ref, data)
        return ref

    def read(self, ref: str) -> bytes:
        return self.objects.read(PREFIX + ref)

    def remove(self, refs: Iterable[str]) -> None:
        for ref in set(refs):
            self.objects.delete(PREFIX + ref)

    def stale(self, live_tokens: set[str], older_than: dt.datetime) -> list[str]:
        """Files of uploads that no live job holds, written before ``older_than`` (an upload
        still being read has no job yet: the grace period keeps its files)."""
        return [
            o.key.removeprefix(PREFIX)
            for o in self.objects.list(PREFIX)
            if o.key.removeprefix(PREFIX).split("/", 1)[0] not in live_tokens
            and o.modified < older_than
        ]
