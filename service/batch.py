"""Batch identification on the job system: a job of kind ``identify_batch`` identifies many
photos (the entries of a ZIP archive, stored images, or URLs on the fetch allowlist) chunk by
chunk, like ``POST /identify`` one by one, and keeps each photo's answer on the job. Its last
chunk POSTs the result to the job's ``callback_url``, signed (``service.callbacks``).

An archive is checked before anything is kept: at most ``batch_max_items`` photos, each at most
``max_upload_bytes`` and all together at most ``batch_max_uncompressed_bytes`` once inflated,
whatever the archive's headers claim (every entry is read with a bounded read). Its photos wait
under ``batches/`` of the object store (the data directory, or the bucket) until the job ends.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import logging
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Any

import httpx
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.callbacks import deliver
from service.curation import Invalid
from service.db import Image, Job, transaction
from service.fetch import FetchRefused, check_url, fetch_photo
from service.identify import Identifier, Runtime
from service.jobs import ChunkHandler, Lease, LeaseLost, complete, create_job
from service.model_gallery import Filters
from service.photos import PhotoError
from service.photostore import PhotoStore
from service.settings import Settings
from service.slots import Busy

log = logging.getLogger(__name__)

IDENTIFY_BATCH = "identify_batch"
MAX_NAME_LENGTH = 500
_BUSY_TRIES = 5


@dataclass(frozen=True)
class Item:
    """One photo of a batch: ``kind`` is "archive" (ref: the kept file), "image" (ref: an image
    id) or "url"."""

    name: str
    kind: str
    ref: str | int

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "ref": self.ref}


def archive_store(settings: Settings) -> PhotoStore:
    return PhotoStore.open(settings, prefix="batches/")


def _wanted(info: zipfile.ZipInfo) -> bool:
    base = info.filename.rsplit("/", 1)[-1]
    return not info.is_dir() and not base.startswith(".") and "__MACOSX/" not in info.filename


def read_archive(settings: Settings, archive: IO[bytes]) -> list[Item]:
    """Check the ZIP and keep its photos; raise ``Invalid`` saying which limit it breaks."""
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise Invalid(f"the archive is not a readable ZIP file: {e}") from None
    with zf:
        entries = [i for i in zf.infolist() if _wanted(i)]
        if not entries:
            raise Invalid("the archive holds no photos")
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
        store = archive_store(settings)
        items: list[Item] = []
        total = 0
        try:
            for info in entries:
                name = info.filename[-MAX_NAME_LENGTH:].replace("\x00", "")
                limit = settings.max_upload_bytes
                if info.file_size > limit:
                    raise Invalid(f"{name!r} is {info.file_size} bytes, over the limit of {limit}")
                try:
                    with zf.open(info) as f:
                        data = f.read(limit + 1)  # headers can lie: never inflate past the limit
                except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError) as e:
                    raise Invalid(f"{name!r} cannot be read from the archive: {e}") from None
                total += len(data)
                if len(data) > limit or total > settings.batch_max_uncompressed_bytes:
                    raise Invalid(f"{name!r} inflates past its declared size and the limits")
                kept = store.put(data, "application/octet-stream")
                items.append(Item(name, "archive", kept.relative_path))
        except BaseException:
            for item in items:
                store.remove(str(item.ref))
            raise
    return items


def url_items(settings: Settings, urls: Sequence[str]) -> list[Item]:
    """Items for photo URLs; refuses at once a URL whose host is not on the allowlist (the
    address is checked again, resolved, when it is fetched)."""
    allowed = {h.lower().rstrip(".") for h in settings.fetch_hosts}
    items = []
    for url in urls:
        try:
            parts = httpx.URL(url)
        except (httpx.InvalidURL, ValueError) as e:
            raise Invalid(f"{url[:200]!r} is not a URL: {e}") from None
        if parts.scheme not in ("http", "https") or parts.host.rstrip(".") not in allowed:
            raise Invalid(
                f"{url[:200]!r}: only http(s) URLs on hosts in WHALEID_FETCH_HOSTS are fetched"
            )
        items.append(Item(url[-MAX_NAME_LENGTH:], "url", url))
    return items


def image_items(session: Session, image_ids: Sequence[int]) -> list[Item]:
    found = set(session.scalars(select(Image.id).where(Image.id.in_(list(image_ids)))))
    missing = [i for i in image_ids if i not in found]
    if missing:
        raise Invalid(f"images {missing[:20]} do not exist")
    return [Item(f"image-{i}", "image", i) for i in image_ids]


def submit(
    factory: sessionmaker[Session],
    settings: Settings,
    items: Sequence[Item],
    *,
    filters: Filters,
    callback_url: str | None,
    created_by: str,
) -> int:
    """Queue a batch job over ``items``; its id."""
    if not items:
        raise Invalid("the batch is empty")
    if len(items) > settings.batch_max_items:
        raise Invalid(f"{len(items)} photos is over the limit of {settings.batch_max_items}")
    if callback_url is not None:
        if not settings.callback_secret:
            raise Invalid("callbacks are off: WHALEID_CALLBACK_SECRET is not set")
        try:
            check_url(
                callback_url,
                settings.callback_hosts,
                allow_loopback=settings.unsafe_allow_loopback_for_tests,
            )
        except FetchRefused as e:
            raise Invalid(f"callback_url: {e}") from None
    size = max(1, settings.batch_chunk_size)
    indices = list(range(len(items)))
    with transaction(factory) as session:
        return create_job(
            session,
            kind=IDENTIFY_BATCH,
            model_id=None,
            params={
                "items": [i.as_dict() for i in items],
                "filters": filters.as_dict(),
                "callback_url": callback_url,
            },
            chunks=[indices[i : i + size] for i in range(0, len(indices), size)],
            created_by=created_by,
            finish=True,
        ).id


def _filters(data: dict[str, str]) -> Filters:
    return Filters(
        species=data.get("species"),
        location=data.get("location"),
        date_from=dt.date.fromisoformat(data["date_from"]) if "date_from" in data else None,
        date_to=dt.date.fromisoformat(data["date_to"]) if "date_to" in data else None,
        exclude_encounter=data.get("exclude_encounter"),
    )


def results(job: Job) -> list[dict[str, Any]]:
    """Each photo's answer (or error), in the order the photos were given."""
    done = (job.result or {}).get("items", {})
    out = []
    for index, item in enumerate(job.params.get("items", [])):
        entry = done.get(str(index))
        out.append(
            {"index": index, "image": item["name"], "state": "pending"}
            if entry is None
            else {"index": index, "image": item["name"], **entry}
        )
    return out


def results_csv(job: Job) -> str:
    """Kaggle-style: ``image,predictions`` with the five ids, best first, space-separated."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["image", "predictions"])
    for row in results(job):
        ids = [c["individual_id"] for c in row.get("candidates", [])][:5]
        writer.writerow([row["image"], " ".join(ids)])
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
        "results": results(job),
    }


class BatchChunks:
    """The worker's handler for batch identification chunks."""

    def __init__(
        self, settings: Settings, factory: sessionmaker[Session], runtime: Runtime | None = None
    ) -> None:
        self.settings = settings
        self.factory = factory
        self.runtime = runtime or Runtime(settings, factory)
        self.store = archive_store(settings)
        self.photos = PhotoStore.open(settings)

    def _bytes(self, item: dict[str, Any]) -> bytes:
        if item["kind"] == "archive":
            return self.store.read(str(item["ref"]))
        if item["kind"] == "image":
            with self.factory() as session:
                path = session.scalar(select(Image.file_path).where(Image.id == int(item["ref"])))
            if path is None:
                raise FileNotFoundError(f"image {item['ref']} no longer exists")
            return self.photos.read(path)
        return fetch_photo(
            str(item["ref"]),
            self.settings.fetch_hosts,
            allow_loopback=self.settings.unsafe_allow_loopback_for_tests,
            timeout=self.settings.fetch_timeout_seconds,
            max_bytes=self.settings.max_upload_bytes,
        )

    def _identify(self, identifier: Identifier, data: bytes, filters: Filters) -> dict[str, Any]:
        for attempt in range(_BUSY_TRIES):
            try:
                result = identifier.identify(data, filters=filters)
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
                answers[str(index)] = self._identify(identifier, self._bytes(item), filters)
            except (FetchRefused, httpx.HTTPError, PhotoError, OSError, Busy) as e:
                answers[str(index)] = {"error": str(e)[:500]}
                errors.append(f"{item['name'][:200]}: {str(e)[:300]}")
        with transaction(self.factory) as session:
            job = complete(
                session, lease, done=len(answers) - len(errors), failed=len(errors), errors=errors
            )
            result = dict(job.result or {})
            result["items"] = {**result.get("items", {}), **answers}
            job.result = result

    def finish(self, lease: Lease) -> None:
        """Remove the archive's photos and deliver the callback."""
        with self.factory() as session:
            job = session.get_one(Job, lease.job_id)
            body = payload(job, "succeeded")
            url = job.params.get("callback_url")
        for item in lease.params["items"]:
            if item["kind"] == "archive":
                self.store.remove(str(item["ref"]))
        delivery = deliver(self.settings, url, body, str(lease.job_id)) if url else None
        with transaction(self.factory) as session:
            job = complete(session, lease, done=0)
            job.result = {**(job.result or {}), "callback": delivery}


def batch_handlers(
    settings: Settings, factory: sessionmaker[Session], runtime: Runtime | None = None
) -> dict[str, ChunkHandler]:
    return {IDENTIFY_BATCH: BatchChunks(settings, factory, runtime)}
