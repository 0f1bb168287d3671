"""Batch identification on the job system: a job of kind ``identify_batch`` identifies many
photos (the entries of a ZIP archive, stored images, or URLs on the fetch allowlist) chunk by
chunk, like ``POST /identify`` one by one, and keeps each photo's answer on the job. Its last
chunk POSTs the result to the job's ``callback_url``, signed with the key's own secret
(``service.outbound.callbacks``); a job that fails or is cancelled reports that too.

Several partners share one service, so a job belongs to the key that made it (another
integration key never sees it), and each key is held to quotas: jobs queued or running, photos
waiting in them, and bytes of archive photos held in the store. The worker takes chunks key by
key in turn (``service.jobs.queue.lease_next``), so one partner's thousand photos do not starve
another's ten.

An archive is checked before anything is kept (``service.jobs.archives``): at most
``batch_max_items`` photos, each at most ``max_upload_bytes`` and all together at most
``batch_max_uncompressed_bytes`` once inflated, whatever the archive's headers claim; each entry
must be a photo. Its photos wait under ``batches/<token>/`` of the object store until the job
ends, in any state.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import logging
import time
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

import httpx
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from service.access.auth import Principal
from service.access.tenancy import readable_images
from service.db.tables import ApiKey, Image, Job, transaction, utcnow
from service.errors import Invalid
from service.gallery.sync import Filters
from service.imaging import PhotoError, open_photo
from service.jobs.archives import ArchiveFiles, check_directory, is_encrypted
from service.jobs.queue import (
    LIVE_STATES,
    ChunkHandler,
    JobState,
    Lease,
    LeaseLost,
    complete,
    create_job,
)
from service.matching.identify import Identifier, Runtime
from service.matching.slots import Busy
from service.outbound.callbacks import CallbackTrust, deliver, trust_of
from service.outbound.fetch import FetchRefused, check_url, fetch_photo
from service.redact import public_text, without_query, without_secrets
from service.settings import Settings
from service.store.objects import MissingObject
from service.store.photos import PhotoStore
from service.text import control_character, escape_controls

log = logging.getLogger(__name__)

IDENTIFY_BATCH = "identify_batch"
MAX_NAME_LENGTH = 500
_BUSY_TRIES = 5
# Spreadsheets run a cell that starts with one of these as a formula (OWASP: CSV injection).
_FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


class OverQuota(Exception):
    """The key already holds as many jobs, waiting photos or stored bytes as it may."""


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


def _filters(data: dict[str, str]) -> Filters:
    return Filters(
        species=data.get("species"),
        location=data.get("location"),
        date_from=dt.date.fromisoformat(data["date_from"]) if "date_from" in data else None,
        date_to=dt.date.fromisoformat(data["date_to"]) if "date_to" in data else None,
        exclude_encounter=data.get("exclude_encounter"),
    )


def results(job: Job, offset: int = 0, limit: int | None = None) -> list[dict[str, Any]]:
    """Each photo's answer (or error), in the order the photos were given, from ``offset``."""
    done = (job.result or {}).get("items", {})
    items = job.params.get("items", [])
    end = len(items) if limit is None else min(len(items), offset + limit)
    out = []
    for index in range(offset, end):
        entry = done.get(str(index))
        name = items[index]["name"]
        out.append(
            {"index": index, "image": name, "state": "pending"}
            if entry is None
            else {"index": index, "image": name, **entry}
        )
    return out


def spreadsheet_safe(cell: str) -> str:
    """A cell a spreadsheet shows as text: one that starts like a formula gets a quote."""
    return "'" + cell if cell.startswith(_FORMULA_PREFIXES) else cell


def results_csv(job: Job) -> str:
    """Kaggle-style: ``image,predictions`` with the five ids, best first, space-separated."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["image", "predictions"])
    for row in results(job):
        ids = [c["individual_id"] for c in row.get("candidates", [])][:5]
        writer.writerow([spreadsheet_safe(row["image"]), spreadsheet_safe(" ".join(ids))])
    return buffer.getvalue()


def payload(job: Job, state: str) -> dict[str, Any]:
    """What the callback carries."""
    return {
        "job_id": job.id,
        "kind": job.kind,
        "state": state,
        "total": job.total,
        "done": job.done,
        "failed": job.failed,
        "errors": list(job.errors),
        "results": results(job),
    }


def item_error(e: Exception, url: str | None = None) -> str:
    """What a partner reads of a photo that failed: never a server path or a signed query
    (``url``, the photo's URL if it has one, is redacted as parsed, wherever the error shows
    it)."""
    if isinstance(e, MissingObject):
        return "the photo is no longer stored"
    if isinstance(e, (FetchRefused, httpx.HTTPError, PhotoError, Busy)):
        text = str(e) if url is None else without_secrets(str(e), url)
        return public_text(text)[:500]
    return f"the photo could not be read ({type(e).__name__})"


def _archive_refs(params: dict[str, Any]) -> list[str]:
    return [str(i["ref"]) for i in params.get("items", []) if i["kind"] == "archive"]


def _forget_urls(params: dict[str, Any]) -> dict[str, Any]:
    """The job's parameters without the signed query strings of its photo URLs."""
    items = [
        {**i, "ref": without_query(str(i["ref"]))} if i["kind"] == "url" else i
        for i in params.get("items", [])
    ]
    return {**params, "items": items}


def _undelivered(url: str, why: str) -> dict[str, Any]:
    return {"url": url, "delivered": False, "attempts": [], "error": why}


def report_end(
    settings: Settings, factory: sessionmaker[Session], job_id: int, state: str
) -> dict[str, Any] | None:
    """POST the job's end to its callback (signed with its key's secret, read now, so a rotated
    secret applies); what happened, or None when it has no callback."""
    with factory() as session:
        job = session.get_one(Job, job_id)
        url = job.params.get("callback_url")
        if not url:
            return None
        body = payload(job, state)
        key = session.get(ApiKey, job.key_id) if job.key_id is not None else None
        trust: CallbackTrust | None = trust_of(key)
    if trust is None:
        return _undelivered(url, "the key was revoked, or has no callback secret or hosts")
    return deliver(settings, trust, url, body, str(job_id))


class BatchChunks:
    """The worker's handler for batch identification chunks."""

    def __init__(
        self, settings: Settings, factory: sessionmaker[Session], runtime: Runtime | None = None
    ) -> None:
        self.settings = settings
        self.factory = factory
        self.runtime = runtime or Runtime(settings, factory)
        self.files = ArchiveFiles.open(settings)
        self.photos = PhotoStore.open(settings)

    def _bytes(self, item: dict[str, Any]) -> bytes:
        if item["kind"] == "refused":
            raise PhotoError(f"not a photo we can read: {item['ref']}")
        if item["kind"] == "archive":
            return self.files.read(str(item["ref"]))
        if item["kind"] == "image":
            with self.factory() as session:
                path = session.scalar(select(Image.file_path).where(Image.id == int(item["ref"])))
            if path is None:
                raise MissingObject(f"image {item['ref']} no longer exists")
            return self.photos.read(path)
        return fetch_photo(
            str(item["ref"]),
            self.settings.fetch_hosts,
            allow_loopback=self.settings.unsafe_allow_loopback_for_tests,
            timeout=self.settings.fetch_timeout_seconds,
            max_bytes=self.settings.max_upload_bytes,
        )

    def _identify(
        self, identifier: Identifier, data: bytes, filters: Filters, key_id: int | None
    ) -> dict[str, Any]:
        for attempt in range(_BUSY_TRIES):
            try:
                result = identifier.identify(data, filters=filters, key_id=key_id)
                break
            except Busy as e:  # the API's requests hold the slots: wait a little, once more
                if attempt == _BUSY_TRIES - 1:
                    raise
                time.sleep(e.retry_after)
        return {
            "identification_id": result.identification_id,
            "model_id": result.model.id,
            "candidates": [
                {
                    "rank": c.rank,
                    "individual_id": c.individual_id,
                    "distance": c.distance,
                    "confidence": c.confidence,
                    "votes": c.votes,
                }
                for c in result.candidates
            ],
        }

    def __call__(self, lease: Lease, alive: Callable[[], bool]) -> None:
        if lease.phase == 1:
            self.finish(lease)
            return
        identifier = self.runtime.current()
        items = lease.params["items"]
        filters = _filters(lease.params.get("filters", {}))
        answers: dict[str, dict[str, Any]] = {}
        errors: list[str] = []
        for index in lease.items:
            if not alive():
                raise LeaseLost("the lease was lost")
            item = items[index]
            try:
                data = self._bytes(item)
                answers[str(index)] = self._identify(
                    identifier, data, filters, lease.params.get("key_id")
                )
            except (FetchRefused, httpx.HTTPError, PhotoError, OSError, Busy) as e:
                message = item_error(e, str(item["ref"]) if item["kind"] == "url" else None)
                answers[str(index)] = {"error": message}
                errors.append(f"{item['name'][:200]}: {message[:300]}")
        with transaction(self.factory) as session:
            job = complete(
                session, lease, done=len(answers) - len(errors), failed=len(errors), errors=errors
            )
            result = dict(job.result or {})
            result["items"] = {**result.get("items", {}), **answers}
            job.result = result

    def finish(self, lease: Lease) -> None:
        """Remove the archive's photos, deliver the callback, and close the job."""
        self.files.remove(_archive_refs(lease.params))
        delivery = report_end(self.settings, self.factory, lease.job_id, JobState.SUCCEEDED)
        with transaction(self.factory) as session:
            job = complete(session, lease, done=0)
            job.result = {**(job.result or {}), "callback": delivery}
            job.params = _forget_urls(job.params)
            job.closed_at = utcnow()


def batch_handlers(
    settings: Settings, factory: sessionmaker[Session], runtime: Runtime | None = None
) -> dict[str, ChunkHandler]:
    return {IDENTIFY_BATCH: BatchChunks(settings, factory, runtime)}


class JobCloser:
    """Closes jobs that ended (failed or cancelled, in any process): removes their archive's
    photos, forgets their photo URLs' query strings, and reports the end to the callback. Runs
    in the worker's idle time; each job is closed once (its ``closed_at`` is claimed first)."""

    def __init__(self, settings: Settings, factory: sessionmaker[Session]) -> None:
        self.settings = settings
        self.factory = factory
        self.files = ArchiveFiles.open(settings)

    def __call__(self) -> None:
        with self.factory() as session:
            ended = session.scalars(
                select(Job.id)
                .where(Job.closed_at.is_(None), Job.state.not_in(LIVE_STATES))
                .order_by(Job.id)
                .limit(20)
            ).all()
        for job_id in ended:
            self.close(job_id)

    def close(self, job_id: int) -> bool:
        """Close one ended job; False if it is live or another worker closed it."""
        with transaction(self.factory) as session:
            claimed = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.closed_at.is_(None), Job.state.not_in(LIVE_STATES))
                .values(closed_at=utcnow())
            ).rowcount  # type: ignore[attr-defined]
            if not claimed:
                return False
            job = session.get_one(Job, job_id)
            state, kind, params = job.state, job.kind, dict(job.params)
            job.params = _forget_urls(params) if kind == IDENTIFY_BATCH else params
        if kind != IDENTIFY_BATCH:
            return True
        self.files.remove(_archive_refs(params))
        delivery = report_end(self.settings, self.factory, job_id, state)
        if delivery is not None:
            with transaction(self.factory) as session:
                job = session.get_one(Job, job_id)
                job.result = {**(job.result or {}), "callback": delivery}
        log.info("job %s (%s) closed: its files removed", job_id, state)
        return True


def prune_batch_files(
    settings: Settings, factory: sessionmaker[Session], grace: dt.timedelta
) -> int:
    """Remove archive photos that no open job holds (a crash between keeping them and queuing
    the job, or between a job's end and its closing), older than ``grace``; how many."""
    with factory() as session:
        params = session.scalars(select(Job.params).where(Job.closed_at.is_(None))).all()
    live = {str(p.get("archive_token")) for p in params if p.get("archive_token")}
    files = ArchiveFiles.open(settings)
    stale = files.stale(live, utcnow() - grace)
    files.remove(stale)
    return len(stale)
