"""A typed Python client for the whaleid API (httpx; ``WhaleidClient`` and
``AsyncWhaleidClient`` have the same methods), and ``verify_callback`` for the receiving end of
a batch job's callback. See the README, "Integrating a Flukebook-style platform".

    with WhaleidClient("https://whaleid.example.org", api_key) as client:
        answer = client.identify(open("fluke.jpg", "rb").read(), species="humpback_whale")
        job = client.identify_batch(urls=[...], callback_url="https://platform/hooks/whaleid")
        done = client.wait_job(job["id"])
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import httpx

from service.outbound.callbacks import DEFAULT_TOLERANCE, BadSignature, verify

JSON = dict[str, Any]
Photo = bytes | tuple[str, bytes]  # the bytes, or (file name, bytes)
FINAL_STATES = ("succeeded", "failed", "cancelled")
RESULTS_PAGE = 500  # photos per page of a batch job's results

__all__ = [
    "AsyncWhaleidClient",
    "BadSignature",
    "JobTimeout",
    "WhaleidClient",
    "WhaleidError",
    "verify_callback",
]


class WhaleidError(RuntimeError):
    """The API answered an error; ``status`` and ``detail`` say which."""

    def __init__(self, status: int, detail: Any, retry_after: str | None = None) -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail
        self.retry_after = retry_after


class JobTimeout(TimeoutError):
    """``wait_job`` gave up; ``job`` is its last poll."""

    def __init__(self, job: JSON) -> None:
        super().__init__(f"job {job.get('id')} is still {job.get('state')}")
        self.job = job


def verify_callback(
    secret: str,
    headers: Mapping[str, str],
    body: bytes,
    tolerance: float = DEFAULT_TOLERANCE,
) -> int:
    """Check a callback's ``X-Whaleid-Signature`` over the raw ``body``; return its timestamp,
    or raise ``BadSignature``. Also refuse a signature already seen (keep them for
    ``tolerance`` seconds): that is a replay."""
    return verify(secret, headers, body, tolerance)


@dataclass(frozen=True)
class _Call:
    method: str
    path: str
    params: Mapping[str, Any] | None = None
    json: Any = None
    data: Mapping[str, Any] | None = None
    files: Sequence[tuple[str, tuple[str, bytes]]] | None = None
    content: bytes | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    text: bool = False


def _file(photo: Photo, default: str) -> tuple[str, bytes]:
    return photo if isinstance(photo, tuple) else (default, photo)


def _form(**fields: Any) -> dict[str, str]:
    out = {}
    for key, value in fields.items():
        if value is None:
            continue
        out[key] = value.isoformat() if isinstance(value, dt.date) else str(value)
    return out


def _answer(response: httpx.Response, text: bool) -> Any:
    if response.status_code >= 400:
        try:
            detail = response.json().get("detail")
        except ValueError:
            detail = response.text
        raise WhaleidError(response.status_code, detail, response.headers.get("retry-after"))
    if text:
        return response.text
    return response.json() if response.content else None


class _Calls:
    """What each method sends, built once; the two clients only differ in how they send it."""

    @staticmethod
    def identify(photo: Photo, filters: Mapping[str, Any]) -> _Call:
        return _Call(
            "POST", "/identify", data=_form(**filters), files=[("photo", _file(photo, "photo"))]
        )

    @staticmethod
    def identify_encounter(photos: Sequence[Photo], filters: Mapping[str, Any]) -> _Call:
        files = [("photos", _file(p, f"photo-{i}")) for i, p in enumerate(photos)]
        return _Call("POST", "/encounters/identify", data=_form(**filters), files=files)

    @staticmethod
    def identification(identification_id: int) -> _Call:
        return _Call("GET", f"/identifications/{identification_id}")

    @staticmethod
    def decide(identification_id: int, decision: str, fields: Mapping[str, Any]) -> _Call:
        path = f"/identifications/{identification_id}/decision"
        return _Call("POST", path, json={"decision": decision, **fields})

    @staticmethod
    def individuals(species: str | None, offset: int, limit: int) -> _Call:
        params = _form(species=species, offset=offset, limit=limit)
        return _Call("GET", "/individuals", params=params)

    @staticmethod
    def individual(individual_id: str) -> _Call:
        return _Call("GET", f"/individuals/{individual_id}")

    @staticmethod
    def upload_model(onnx: bytes) -> _Call:
        headers = {"Content-Type": "application/octet-stream"}
        return _Call("POST", "/models", content=onnx, headers=headers)

    @staticmethod
    def models() -> _Call:
        return _Call("GET", "/models")

    @staticmethod
    def reindex(model_id: int, include_queries: bool) -> _Call:
        body = {"include_queries": include_queries}
        return _Call("POST", f"/models/{model_id}/reindex", json=body)

    @staticmethod
    def activate(model_id: int, head: str, force: bool) -> _Call:
        return _Call("POST", f"/models/{model_id}/activate", json={"head": head, "force": force})

    @staticmethod
    def rollback() -> _Call:
        return _Call("POST", "/models/rollback")

    @staticmethod
    def identify_batch(
        image_ids: Sequence[int] | None,
        urls: Sequence[str] | None,
        callback_url: str | None,
        filters: Mapping[str, Any],
    ) -> _Call:
        body: JSON = dict(_form(**filters).items())
        if image_ids is not None:
            body["image_ids"] = list(image_ids)
        if urls is not None:
            body["urls"] = list(urls)
        if callback_url is not None:
            body["callback_url"] = callback_url
        return _Call("POST", "/jobs/identify", json=body)

    @staticmethod
    def identify_archive(
        archive: bytes, callback_url: str | None, filters: Mapping[str, Any]
    ) -> _Call:
        return _Call(
            "POST",
            "/jobs/identify/archive",
            data=_form(callback_url=callback_url, **filters),
            files=[("archive", ("photos.zip", archive))],
        )

    @staticmethod
    def job(job_id: int) -> _Call:
        return _Call("GET", f"/jobs/{job_id}")

    @staticmethod
    def cancel_job(job_id: int) -> _Call:
        return _Call("POST", f"/jobs/{job_id}/cancel")

    @staticmethod
    def job_results(job_id: int, offset: int, limit: int) -> _Call:
        return _Call("GET", f"/jobs/{job_id}/results", params={"offset": offset, "limit": limit})

    @staticmethod
    def job_results_csv(job_id: int) -> _Call:
        return _Call("GET", f"/jobs/{job_id}/results.csv", text=True)

    @staticmethod
    def request(http: httpx.Client | httpx.AsyncClient, call: _Call) -> Any:
        """The request ``call`` describes, sent with ``http`` (for an ``AsyncClient``, an
        awaitable)."""
        return http.request(
            call.method,
            call.path,
            params=call.params,
            json=call.json,
            data=call.data,
            files=call.files,
            content=call.content,
            headers=call.headers,
        )


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


class WhaleidClient:
    """Synchronous client; ``api_key`` is sent as a bearer token."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._http = httpx.Client(
            base_url=base_url, headers=_headers(api_key), timeout=timeout, transport=transport
        )

    def __enter__(self) -> WhaleidClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, call: _Call) -> Any:
        return _answer(_Calls.request(self._http, call), call.text)

    # identification
    def identify(self, photo: Photo, **filters: Any) -> JSON:
        """One photo: the top five candidates. ``filters``: species, location, date_from,
        date_to, exclude_encounter, bbox."""
        return cast(JSON, self._send(_Calls.identify(photo, filters)))

    def identify_encounter(self, photos: Sequence[Photo], **filters: Any) -> JSON:
        """Several photos of one encounter (``POST /encounters/identify``, the multipart field
        ``photos`` repeated): one fused ranking plus each photo's own."""
        return cast(JSON, self._send(_Calls.identify_encounter(photos, filters)))

    def identification(self, identification_id: int) -> JSON:
        return cast(JSON, self._send(_Calls.identification(identification_id)))

    # curation
    def decide(
        self,
        identification_id: int,
        decision: Literal["confirm", "new_individual", "reject"],
        **fields: Any,
    ) -> JSON:
        """A curator's decision: ``individual_id`` to confirm; ``code``, ``name``, ``species``
        for a new individual; ``comment``; ``supersede``."""
        return cast(JSON, self._send(_Calls.decide(identification_id, decision, fields)))

    def individuals(self, *, species: str | None = None, offset: int = 0, limit: int = 50) -> JSON:
        return cast(JSON, self._send(_Calls.individuals(species, offset, limit)))

    def individual(self, individual_id: str) -> JSON:
        return cast(JSON, self._send(_Calls.individual(individual_id)))

    # models
    def upload_model(self, onnx: bytes) -> JSON:
        return cast(JSON, self._send(_Calls.upload_model(onnx)))

    def models(self) -> list[JSON]:
        return cast(list[JSON], self._send(_Calls.models()))

    def reindex(self, model_id: int, *, include_queries: bool = False) -> JSON:
        return cast(JSON, self._send(_Calls.reindex(model_id, include_queries)))

    def activate(self, model_id: int, *, head: str = "model", force: bool = False) -> JSON:
        return cast(JSON, self._send(_Calls.activate(model_id, head, force)))

    def rollback(self) -> JSON:
        return cast(JSON, self._send(_Calls.rollback()))

    # jobs
    def identify_batch(
        self,
        *,
        image_ids: Sequence[int] | None = None,
        urls: Sequence[str] | None = None,
        callback_url: str | None = None,
        **filters: Any,
    ) -> JSON:
        """A batch job over stored images or photo URLs (one of the two)."""
        call = _Calls.identify_batch(image_ids, urls, callback_url, filters)
        return cast(JSON, self._send(call))

    def identify_archive(
        self, archive: bytes, *, callback_url: str | None = None, **filters: Any
    ) -> JSON:
        """A batch job over the photos of a ZIP archive."""
        return cast(JSON, self._send(_Calls.identify_archive(archive, callback_url, filters)))

    def job(self, job_id: int) -> JSON:
        return cast(JSON, self._send(_Calls.job(job_id)))

    def cancel_job(self, job_id: int) -> JSON:
        return cast(JSON, self._send(_Calls.cancel_job(job_id)))

    def job_results(self, job_id: int, *, page: int = RESULTS_PAGE) -> list[JSON]:
        """Every photo's answer, read a page at a time."""
        rows: list[JSON] = []
        while True:
            got: list[JSON] = self._send(_Calls.job_results(job_id, len(rows), page))
            rows += got
            if len(got) < page:
                return rows

    def job_results_csv(self, job_id: int) -> str:
        return cast(str, self._send(_Calls.job_results_csv(job_id)))

    def wait_job(self, job_id: int, *, timeout: float = 600.0, poll: float = 1.0) -> JSON:
        """Poll until the job is succeeded, failed or cancelled; ``JobTimeout`` after
        ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job["state"] in FINAL_STATES:
                return job
            if time.monotonic() > deadline:
                raise JobTimeout(job)
            time.sleep(poll)


class AsyncWhaleidClient:
    """The same methods as ``WhaleidClient``, awaitable."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._http = httpx.AsyncClient(
            base_url=base_url, headers=_headers(api_key), timeout=timeout, transport=transport
        )

    async def __aenter__(self) -> AsyncWhaleidClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, call: _Call) -> Any:
        return _answer(await _Calls.request(self._http, call), call.text)

    async def identify(self, photo: Photo, **filters: Any) -> JSON:
        return cast(JSON, await self._send(_Calls.identify(photo, filters)))

    async def identify_encounter(self, photos: Sequence[Photo], **filters: Any) -> JSON:
        """Several photos of one encounter: one fused ranking plus each photo's own."""
        return cast(JSON, await self._send(_Calls.identify_encounter(photos, filters)))

    async def identification(self, identification_id: int) -> JSON:
        return cast(JSON, await self._send(_Calls.identification(identification_id)))

    async def decide(
        self,
        identification_id: int,
        decision: Literal["confirm", "new_individual", "reject"],
        **fields: Any,
    ) -> JSON:
        return cast(JSON, await self._send(_Calls.decide(identification_id, decision, fields)))

    async def individuals(
        self, *, species: str | None = None, offset: int = 0, limit: int = 50
    ) -> JSON:
        return cast(JSON, await self._send(_Calls.individuals(species, offset, limit)))

    async def individual(self, individual_id: str) -> JSON:
        return cast(JSON, await self._send(_Calls.individual(individual_id)))

    async def upload_model(self, onnx: bytes) -> JSON:
        return cast(JSON, await self._send(_Calls.upload_model(onnx)))

    async def models(self) -> list[JSON]:
        return cast(list[JSON], await self._send(_Calls.models()))

    async def reindex(self, model_id: int, *, include_queries: bool = False) -> JSON:
        return cast(JSON, await self._send(_Calls.reindex(model_id, include_queries)))

    async def activate(self, model_id: int, *, head: str = "model", force: bool = False) -> JSON:
        return cast(JSON, await self._send(_Calls.activate(model_id, head, force)))

    async def rollback(self) -> JSON:
        return cast(JSON, await self._send(_Calls.rollback()))

    async def identify_batch(
        self,
        *,
        image_ids: Sequence[int] | None = None,
        urls: Sequence[str] | None = None,
        callback_url: str | None = None,
        **filters: Any,
    ) -> JSON:
        call = _Calls.identify_batch(image_ids, urls, callback_url, filters)
        return cast(JSON, await self._send(call))

    async def identify_archive(
        self, archive: bytes, *, callback_url: str | None = None, **filters: Any
    ) -> JSON:
        call = _Calls.identify_archive(archive, callback_url, filters)
        return cast(JSON, await self._send(call))

    async def job(self, job_id: int) -> JSON:
        return cast(JSON, await self._send(_Calls.job(job_id)))

    async def cancel_job(self, job_id: int) -> JSON:
        return cast(JSON, await self._send(_Calls.cancel_job(job_id)))

    async def job_results(self, job_id: int, *, page: int = RESULTS_PAGE) -> list[JSON]:
        rows: list[JSON] = []
        while True:
            got: list[JSON] = await self._send(_Calls.job_results(job_id, len(rows), page))
            rows += got
            if len(got) < page:
                return rows

    async def job_results_csv(self, job_id: int) -> str:
        return cast(str, await self._send(_Calls.job_results_csv(job_id)))

    async def wait_job(self, job_id: int, *, timeout: float = 600.0, poll: float = 1.0) -> JSON:
        deadline = time.monotonic() + timeout
        while True:
            job = await self.job(job_id)
            if job["state"] in FINAL_STATES:
                return job
            if time.monotonic() > deadline:
                raise JobTimeout(job)
            await asyncio.sleep(poll)
