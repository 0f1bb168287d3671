"""The worker's handler for batch identification chunks: each photo of a chunk identified like
``POST /identify``, its answer (or what went wrong) kept on the job; the last phase closes the
job (``service.jobs.batch.closing``)."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from typing import Any

import httpx
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.db.tables import Image, transaction
from service.errors import Busy, FetchRefused, PhotoError
from service.gallery.sync import Filters
from service.jobs.archives import ArchiveFiles
from service.jobs.batch.closing import close_succeeded
from service.jobs.batch.submit import IDENTIFY_BATCH
from service.jobs.queue import ChunkHandler, Lease, LeaseLost, complete
from service.matching.identify import Identifier
from service.matching.runtime import Runtime
from service.outbound.fetch import fetch_photo
from service.outbound.redact import public_text, without_secrets
from service.settings import Settings
from service.store.objects import MissingObject
from service.store.photos import PhotoStore

_BUSY_TRIES = 5


def _filters(data: dict[str, str]) -> Filters:
    return Filters(
        species=data.get("species"),
        location=data.get("location"),
        date_from=dt.date.fromisoformat(data["date_from"]) if "date_from" in data else None,
        date_to=dt.date.fromisoformat(data["date_to"]) if "date_to" in data else None,
        exclude_encounter=data.get("exclude_encounter"),
    )


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
        if lease.phase == 1:  # the last phase, once every photo has its answer
            close_succeeded(self.settings, self.factory, self.files, lease)
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


def batch_handlers(
    settings: Settings, factory: sessionmaker[Session], runtime: Runtime | None = None
) -> dict[str, ChunkHandler]:
    return {IDENTIFY_BATCH: BatchChunks(settings, factory, runtime)}
