"""Submitting a batch: its photos (an archive's entries, stored images, or URLs), the key's
quotas, and the queued job.

An archive is checked before anything is kept (``service.jobs.archives``): at most
``batch_max_items`` photos, each at most ``max_upload_bytes`` and all together at most
``batch_max_uncompressed_bytes`` once inflated, whatever the archive's headers claim; each entry
must be a photo. Its photos wait under ``batches/<token>/`` of the object store until the job
ends, in any state (``service.jobs.batch.closing``).
"""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO, Any

import httpx
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from service.access.auth import Principal
from service.access.tenancy import readable_images
from service.db.tables import ApiKey, Image, Job, transaction
from service.errors import FetchRefused, Invalid, OverQuota, PhotoError
from service.gallery.sync import Filters
from service.imaging import open_photo
from service.jobs.archives import ArchiveFiles, check_directory, is_encrypted
from service.jobs.queue import LIVE_STATES, create_job
from service.outbound.callbacks import trust_of
from service.outbound.fetch import check_url
from service.outbound.redact import without_query
from service.settings import Settings
from service.text import control_character, escape_controls

IDENTIFY_BATCH = "identify_batch"
MAX_NAME_LENGTH = 500


@dataclass(frozen=True)
class Item:
    """One photo of a batch: ``kind`` is "archive" (ref: the kept file), "image" (ref: an image
    id), "url", or "refused" (ref: why the archive's entry is not a photo; nothing was kept)."""

    name: str
    kind: str
    ref: str | int

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "ref": self.ref}


@dataclass
class Archive:
    """An archive's entries, its photos kept under ``batches/<token>/``."""

    token: str
    items: list[Item] = field(default_factory=list)
    kept: dict[str, int] = field(default_factory=dict)  # ref -> bytes

    @property
    def held_bytes(self) -> int:
        return sum(self.kept.values())


def _wanted(info: zipfile.ZipInfo) -> bool:
    base = info.filename.rsplit("/", 1)[-1]
    # Not ``info.is_dir()``: it fails on an empty name (IndexError), which a lying header gives.
    folder = info.filename.endswith("/")
    return not folder and not base.startswith(".") and "__MACOSX/" not in info.filename


def _entries(settings: Settings, zf: zipfile.ZipFile) -> list[zipfile.ZipInfo]:
    entries = [i for i in zf.infolist() if _wanted(i)]
    if not entries:
        raise Invalid("the archive holds no photos")
    for info in entries:  # a name is printed as it is in results, results.csv and logs
        char = control_character(info.filename)
        if char is not None:
            shown = escape_controls(info.filename)[-200:]
            raise Invalid(
                f"the archive's entry {shown!r} holds a control character ({char}) in its name: "
                "rename it without one and send the archive again"
            )
    if len(entries) > settings.batch_max_items:
        raise Invalid(
            f"the archive holds {len(entries)} files, over the limit of "
            f"{settings.batch_max_items} per batch"
        )
    declared = sum(i.file_size for i in entries)
    if declared > settings.batch_max_uncompressed_bytes:
        raise Invalid(
            f"the archive inflates to {declared} bytes, over the limit of "
            f"{settings.batch_max_uncompressed_bytes}"
        )
    return entries


def _member(settings: Settings, zf: zipfile.ZipFile, info: zipfile.ZipInfo, name: str) -> bytes:
    """The entry's bytes, read no further than the upload limit."""
    limit = settings.max_upload_bytes
    if info.file_size > limit:
        raise Invalid(f"{name!r} is {info.file_size} bytes, over the limit of {limit}")
    try:
        with zf.open(info) as f:
            data = f.read(limit + 1)  # headers can lie: never inflate past the limit
    except (
        zipfile.BadZipFile,
        OSError,
        ValueError,
        NotImplementedError,
        RuntimeError,
        EOFError,  # a truncated entry
        zlib.error,  # a corrupt deflate stream
    ) as e:
        raise Invalid(
            f"{name!r} cannot be read from the archive: {e or type(e).__name__}"
        ) from None
    if len(data) > limit:
        raise Invalid(f"{name!r} inflates past its declared size and the limit of {limit}")
    return data


def read_archive(settings: Settings, archive: IO[bytes]) -> Archive:
    """Check the ZIP and keep its photos; raise ``Invalid`` saying which limit it breaks (and
    then nothing is kept). An entry that is not a photo becomes a refused item."""
    check_directory(archive, settings.batch_max_items)
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError, EOFError) as e:
        raise Invalid(f"the archive is not a readable ZIP file: {e}") from None
    files = ArchiveFiles.open(settings)
    result = Archive(ArchiveFiles.new_token())
    total = 0
    try:
        with zf:
            for info in _entries(settings, zf):
                name = info.filename[-MAX_NAME_LENGTH:].replace("\x00", "")
                if is_encrypted(info.flag_bits):
                    result.items.append(Item(name, "refused", "the entry is encrypted"))
                    continue
                data = _member(settings, zf, info, name)
                total += len(data)
                if total > settings.batch_max_uncompressed_bytes:
                    raise Invalid(f"{name!r} inflates the archive past its declared size")
                try:
                    open_photo(data, max_pixels=settings.max_image_pixels)
                except PhotoError as e:
                    result.items.append(Item(name, "refused", str(e)))
                    continue
                ref = files.keep(result.token, data)
                result.kept[ref] = len(data)
                result.items.append(Item(name, "archive", ref))
        if not result.kept:
            reasons = "; ".join(f"{i.name!r}: {i.ref}" for i in result.items[:3])
            raise Invalid(f"the archive holds no photos we can read ({reasons})")
    except BaseException:
        files.remove(result.kept)
        raise
    return result


def url_items(settings: Settings, urls: Sequence[str]) -> list[Item]:
    """Items for photo URLs; refuses at once a URL whose host is not on the allowlist (the
    address is checked again, resolved, when it is fetched). The name shown in results is the
    URL without its query: a signed URL's token is never shown or kept past the job."""
    allowed = {h.lower().rstrip(".") for h in settings.fetch_hosts}
    items = []
    for url in urls:
        try:
            parts = httpx.URL(url)
        except (httpx.InvalidURL, ValueError) as e:
            raise Invalid(f"{without_query(url)[:200]!r} is not a URL: {e}") from None
        if parts.scheme not in ("http", "https") or parts.host.rstrip(".") not in allowed:
            raise Invalid(
                f"{without_query(url)[:200]!r}: only http(s) URLs on hosts in "
                "WHALEID_FETCH_HOSTS are fetched"
            )
        items.append(Item(without_query(url)[-MAX_NAME_LENGTH:], "url", url))
    return items


def image_items(session: Session, image_ids: Sequence[int], viewer: Principal) -> list[Item]:
    """Items for stored images ``viewer`` may read (another partner's query photo is as
    missing as one that does not exist)."""
    found = set(
        session.scalars(
            select(Image.id).where(Image.id.in_(list(image_ids)), readable_images(viewer))
        )
    )
    missing = [i for i in image_ids if i not in found]
    if missing:
        raise Invalid(f"images {missing[:20]} do not exist")
    return [Item(f"image-{i}", "image", i) for i in image_ids]


def _owner_key(session: Session, caller: Principal) -> ApiKey | None:
    """The caller's key row, locked: a key's submissions are checked against its quotas one
    at a time."""
    if caller.key_id is None:
        return None
    return session.scalar(select(ApiKey).where(ApiKey.id == caller.key_id).with_for_update())


def _check_callback(settings: Settings, key: ApiKey | None, caller: Principal, url: str) -> None:
    trust = trust_of(key)
    if trust is None:
        where = f"/keys/{caller.key_id}" if caller.key_id is not None else "/keys/ID"
        raise Invalid(
            f"callbacks are off for the key of {caller.name!r}: it needs its own callback secret "
            f"and callback hosts (an admin sets them with POST {where}/callback-secret and PUT "
            f"{where}/callback-hosts, or `whaleid keys callbacks`)"
        )
    try:
        check_url(url, trust.hosts, allow_loopback=settings.unsafe_allow_loopback_for_tests)
    except FetchRefused as e:
        raise Invalid(f"callback_url: {e}") from None


def _owned_by(caller: Principal) -> Any:
    if caller.key_id is None:
        return Job.key_id.is_(None)
    return Job.key_id == caller.key_id


def check_quota(
    session: Session, settings: Settings, caller: Principal, *, photos: int, held_bytes: int
) -> None:
    """Raise ``OverQuota`` if a job of ``photos`` holding ``held_bytes`` would take the key past
    its jobs, waiting photos or stored bytes."""
    live, waiting = session.execute(
        select(func.count(), func.coalesce(func.sum(Job.total - Job.done - Job.failed), 0)).where(
            _owned_by(caller), Job.state.in_(LIVE_STATES)
        )
    ).one()
    held = session.scalar(
        select(func.coalesce(func.sum(Job.held_bytes), 0)).where(
            _owned_by(caller), Job.closed_at.is_(None)
        )
    )
    who = f"the key of {caller.name!r}"
    wait = "wait for one of its jobs to end (GET /jobs), or cancel one"
    if live + 1 > settings.key_max_live_jobs:
        raise OverQuota(
            f"{who} has {live} jobs queued or running, the most it may "
            f"(WHALEID_KEY_MAX_LIVE_JOBS={settings.key_max_live_jobs}): {wait}"
        )
    if int(waiting) + photos > settings.key_max_waiting_photos:
        raise OverQuota(
            f"{who} has {int(waiting)} photos waiting in its jobs; {photos} more is over its "
            f"limit of {settings.key_max_waiting_photos} (WHALEID_KEY_MAX_WAITING_PHOTOS): {wait}"
        )
    if int(held or 0) + held_bytes > settings.key_max_held_bytes:
        raise OverQuota(
            f"{who} holds {int(held or 0)} bytes of archive photos; {held_bytes} more is over "
            f"its limit of {settings.key_max_held_bytes} (WHALEID_KEY_MAX_HELD_BYTES): {wait}"
        )


def submit(
    factory: sessionmaker[Session],
    settings: Settings,
    items: Sequence[Item],
    *,
    filters: Filters,
    callback_url: str | None,
    caller: Principal,
    archive: Archive | None = None,
) -> int:
    """Queue a batch job over ``items`` for ``caller``'s key; its id. Refused (``Invalid``,
    ``OverQuota``) with nothing written; the caller removes what ``archive`` kept."""
    if not items:
        raise Invalid("the batch is empty")
    if len(items) > settings.batch_max_items:
        raise Invalid(f"{len(items)} photos is over the limit of {settings.batch_max_items}")
    size = max(1, settings.batch_chunk_size)
    indices = list(range(len(items)))
    with transaction(factory) as session:
        key = _owner_key(session, caller)
        if callback_url is not None:
            _check_callback(settings, key, caller, callback_url)
        held = archive.held_bytes if archive else 0
        check_quota(session, settings, caller, photos=len(items), held_bytes=held)
        return create_job(
            session,
            kind=IDENTIFY_BATCH,
            model_id=None,
            params={
                "items": [i.as_dict() for i in items],
                "filters": filters.as_dict(),
                "callback_url": callback_url,
                "archive_token": archive.token if archive else None,
                "key_id": caller.key_id,  # the identifications are the key's
            },
            chunks=[indices[i : i + size] for i in range(0, len(indices), size)],
            created_by=caller.name,
            key_id=caller.key_id,
            held_bytes=held,
            finish=True,
        ).id


def submit_archive(
    factory: sessionmaker[Session],
    settings: Settings,
    archive: Archive,
    *,
    filters: Filters,
    callback_url: str | None,
    caller: Principal,
) -> int:
    """Queue the job of an archive already read; if it is refused, its photos are removed."""
    try:
        return submit(
            factory,
            settings,
            archive.items,
            filters=filters,
            callback_url=callback_url,
            caller=caller,
            archive=archive,
        )
    except BaseException:
        ArchiveFiles.open(settings).remove(archive.kept)
        raise
