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
from typing import Any, Literal

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
    """What each method sends; the two clients only differ in how."""

    @staticmethod
    def job_results(job_id: int, offset: int, limit: int) -> _Call:
        return _Call("GET", f"/jobs/{job_id}/results", params={"offset": offset, "limit": limit})

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
    def decide(identification_id: int, decision: JSON) -> _Call:
        path = f"/identifications/{identification_id}/decision"
        return _Call("POST", path, json=decision)

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
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(
            base_url=base_url, headers=headers, timeout=timeout, transport=transport
        )

    def __enter__(self) -> WhaleidClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, call: _Call) -> Any:
        response = self._http.request(
            call.method,
            call.path,
            params=call.params,
            json=call.json,
            data=call.data,
            files=call.files,
            content=call.content,
            headers=call.headers,
        )
        return _answer(response, call.text)

    # identification
    def identify(self, photo: Photo, **filters: Any) -> JSON:
        """One photo: the top five candidates. ``filters``: species, location, date_from,
        date_to, exclude_encounter, bbox."""
        result: JSON = self._send(_Calls.identify(photo, filters))
        return result

    def identify_encounter(self, photos: Sequence[Photo], **filters: Any) -> JSON:
        """Several photos of one encounter (``POST /encounters/identify``, the multipart field
        ``photos`` repeated): one fused ranking plus each photo's own."""
        result: JSON = self._send(_Calls.identify_encounter(photos, filters))
        return result

    def identification(self, identification_id: int) -> JSON:
        result: JSON = self._send(_Call("GET", f"/identifications/{identification_id}"))
        return result

    # curation
    def decide(
        self,
        identification_id: int,
        decision: Literal["confirm", "new_individual", "reject"],
        **fields: Any,
    ) -> JSON:
        """A curator's decision: ``individual_id`` to confirm; ``code``, ``name``, ``species``
        for a new individual; ``comment``; ``supersede``."""
        result: JSON = self._send(
            _Calls.decide(identification_id, {"decision": decision, **fields})
        )
        return result

    def individuals(self, *, species: str | None = None, offset: int = 0, limit: int = 50) -> JSON:
        params = _form(species=species, offset=offset, limit=limit)
        result: JSON = self._send(_Call("GET", "/individuals", params=params))
        return result

    def individual(self, individual_id: str) -> JSON:
        result: JSON = self._send(_Call("GET", f"/individuals/{individual_id}"))
        return result

    # models
    def upload_model(self, onnx: bytes) -> JSON:
        call = _Call(
            "POST", "/models", content=onnx, headers={"Content-Type": "application/octet-stream"}
        )
        result: JSON = self._send(call)
        return result

    def models(self) -> list[JSON]:
        result: list[JSON] = self._send(_Call("GET", "/models"))
        return result

    def reindex(self, model_id: int, *, include_queries: bool = False) -> JSON:
        body = {"include_queries": include_queries}
        result: JSON = self._send(_Call("POST", f"/models/{model_id}/reindex", json=body))
        return result

    def activate(self, model_id: int, *, head: str = "model", force: bool = False) -> JSON:
        body = {"head": head, "force": force}
        result: JSON = self._send(_Call("POST", f"/models/{model_id}/activate", json=body))
        return result

    def rollback(self) -> JSON:
        result: JSON = self._send(_Call("POST", "/models/rollback"))
        return result

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
        result: JSON = self._send(_Calls.identify_batch(image_ids, urls, callback_url, filters))
        return result

    def identify_archive(
        self, archive: bytes, *, callback_url: str | None = None, **filters: Any
    ) -> JSON:
        """A batch job over the photos of a ZIP archive."""
        result: JSON = self._send(_Calls.identify_archive(archive, callback_url, filters))
        return result

    def job(self, job_id: int) -> JSON:
        result: JSON = self._send(_Call("GET", f"/jobs/{job_id}"))
        return result

    def cancel_job(self, job_id: int) -> JSON:
        result: JSON = self._send(_Call("POST", f"/jobs/{job_id}/cancel"))
        return result

    def job_results(self, job_id: int, *, page: int = RESULTS_PAGE) -> list[JSON]:
        """Every photo's answer, read a page at a time."""
        rows: list[JSON] = []
        while True:
            got: list[JSON] = self._send(_Calls.job_results(job_id, len(rows), page))
            rows += got
            if len(got) < page:
                return rows

    def job_results_csv(self, job_id: int) -> str:
        result: str = self._send(_Call("GET", f"/jobs/{job_id}/results.csv", text=True))
        return result

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
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(
            base_url=base_url, headers=headers, timeout=timeout, transport=transport
        )

    async def __aenter__(self) -> AsyncWhaleidClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, call: _Call) -> Any:
        response = await self._http.request(
            call.method,
            call.path,
            params=call.params,
            json=call.json,
            data=call.data,
            files=call.files,
            content=call.content,
            headers=call.headers,
        )
        return _answer(response, call.text)

    async def identify(self, photo: Photo, **filters: Any) -> JSON:
        result: JSON = await self._send(_Calls.identify(photo, filters))
        return result

    async def identify_encounter(self, photos: Sequence[Photo], **filters: Any) -> JSON:
        """Several photos of one encounter: one fused ranking plus each photo's own."""
        result: JSON = await self._send(_Calls.identify_encounter(photos, filters))
        return result

    async def identification(self, identification_id: int) -> JSON:
        result: JSON = await self._send(_Call("GET", f"/identifications/{identification_id}"))
        return result

    async def decide(
        self,
        identification_id: int,
        decision: Literal["confirm", "new_individual", "reject"],
        **fields: Any,
    ) -> JSON:
        call = _Calls.decide(identification_id, {"decision": decision, **fields})
        result: JSON = await self._send(call)
        return result

    async def individuals(
        self, *, species: str | None = None, offset: int = 0, limit: int = 50
    ) -> JSON:
        params = _form(species=species, offset=offset, limit=limit)
        result: JSON = await self._send(_Call("GET", "/individuals", params=params))
        return result

    async def individual(self, individual_id: str) -> JSON:
        result: JSON = await self._send(_Call("GET", f"/individuals/{individual_id}"))
        return result

    async def upload_model(self, onnx: bytes) -> JSON:
        call = _Call(
            "POST", "/models", content=onnx, headers={"Content-Type": "application/octet-stream"}
        )
        result: JSON = await self._send(call)
        return result

    async def models(self) -> list[JSON]:
        result: list[JSON] = await self._send(_Call("GET", "/models"))
        return result

    async def reindex(self, model_id: int, *, include_queries: bool = False) -> JSON:
        body = {"include_queries": include_queries}
        result: JSON = await self._send(_Call("POST", f"/models/{model_id}/reindex", json=body))
        return result

    async def activate(self, model_id: int, *, head: str = "model", force: bool = False) -> JSON:
        body = {"head": head, "force": force}
        result: JSON = await self._send(_Call("POST", f"/models/{model_id}/activate", json=body))
        return result

    async def rollback(self) -> JSON:
        result: JSON = await self._send(_Call("POST", "/models/rollback"))
        return result

    async def identify_batch(
        self,
        *,
        image_ids: Sequence[int] | None = None,
        urls: Sequence[str] | None = None,
        callback_url: str | None = None,
        **filters: Any,
    ) -> JSON:
        call = _Calls.identify_batch(image_ids, urls, callback_url, filters)
        result: JSON = await self._send(call)
        return result

    async def identify_archive(
        self, archive: bytes, *, callback_url: str | None = None, **filters: Any
    ) -> JSON:
        result: JSON = await self._send(_Calls.identify_archive(archive, callback_url, filters))
        return result

    async def job(self, job_id: int) -> JSON:
        result: JSON = await self._send(_Call("GET", f"/jobs/{job_id}"))
        return result

    async def cancel_job(self, job_id: int) -> JSON:
        result: JSON = await self._send(_Call("POST", f"/jobs/{job_id}/cancel"))
        return result

    async def job_results(self, job_id: int, *, page: int = RESULTS_PAGE) -> list[JSON]:
        rows: list[JSON] = []
        while True:
            got: list[JSON] = await self._send(_Calls.job_results(job_id, len(rows), page))
            rows += got
            if len(got) < page:
                return rows

    async def job_results_csv(self, job_id: int) -> str:
        result: str = await self._send(_Call("GET", f"/jobs/{job_id}/results.csv", text=True))
        return result

    async def wait_job(self, job_id: int, *, timeout: float = 600.0, poll: float = 1.0) -> JSON:
        deadline = time.monotonic() + timeout
        while True:
            job = await self.job(job_id)
            if job["state"] in FINAL_STATES:
                return job
            if time.monotonic() > deadline:
                raise JobTimeout(job)
            await asyncio.sleep(poll)
