"""What happens before a route reads a byte of its body: the caller is authenticated, and the
body is limited while it streams (chunked included), so a caller without a key, or with too
much to say, costs neither memory nor disk."""

from __future__ import annotations

import re
from collections.abc import Mapping

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.access.auth import KeyCache
from service.api.deps import Require, presented_credential, principal_for
from service.api.errors import answer_of
from service.errors import DomainError
from service.settings import Settings

# Room for the multipart framing and the form fields around an uploaded photo.
FORM_ALLOWANCE = 64 * 1024
UPLOAD_PATHS = ("/identify",)
# Set in the scope when the guard admitted the key from its cache: the route must confirm it
# (``Runtime.identify(confirm_key=...)``) before it stores anything.
UNCONFIRMED_KEY = "key_unconfirmed"
ENCOUNTER_PATHS = ("/encounters/identify",)
MODEL_UPLOAD_PATH = "/models"  # an ONNX file, streamed to disk by its route
ARCHIVE_PATH = "/jobs/identify/archive"  # a ZIP of photos for a batch job


class Refused(HTTPException):
    """Raised from ``receive``, so no body is read: a caller without the key the route needs, or
    a body over its limit. The connection closes afterwards (the rest of the body stays unread)."""

    def __init__(self, status: int, detail: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(status, detail, headers={**(headers or {}), "Connection": "close"})


def required_role(scope: Scope) -> str | None:
    """The role the matched route requires (None: no key needed). The router has put the
    route in the scope by the time the route reads its body."""
    dependant = getattr(scope.get("route"), "dependant", None)
    pending = list(dependant.dependencies) if dependant else []
    while pending:
        dependency = pending.pop()
        if isinstance(dependency.call, Require):
            return dependency.call.role
        pending.extend(dependency.dependencies)
    return None


def _has_body(headers: Headers) -> bool:
    return "transfer-encoding" in headers or headers.get("content-length", "0") not in ("", "0")


PHOTO_HINT = "send a smaller photo (or fewer items)"
MODEL_HINT = "raise WHALEID_MAX_MODEL_BYTES, or register it with `whaleid models add`"
ARCHIVE_HINT = "send fewer photos per archive, or raise WHALEID_BATCH_MAX_ARCHIVE_BYTES"


def _too_large(limit: int, hint: str, size: str | None = None) -> Refused:
    said = f" is {size} bytes," if size else " is"
    return Refused(413, f"the request body{said} over the limit of {limit} bytes: {hint}")


class RequestGuard:
    """Pure ASGI middleware: it wraps ``receive``, so whatever reads a body goes through it."""

    def __init__(self, app: ASGIApp, settings: Settings, keys: KeyCache | None = None) -> None:
        self.app = app
        self.settings = settings
        # Keys /identify admits without a lookup (the route confirms them before it stores).
        self.keys = keys or KeyCache(0)

    def limit_for(self, method: str, path: str) -> tuple[int, str]:
        """The byte limit of a request's body, and what to do when it is over."""
        if path in UPLOAD_PATHS:
            return self.settings.max_upload_bytes + FORM_ALLOWANCE, PHOTO_HINT
        if path in ENCOUNTER_PATHS:
            photos = self.settings.encounter_max_photos
            return photos * self.settings.max_upload_bytes + FORM_ALLOWANCE, PHOTO_HINT
        if method == "POST" and path == MODEL_UPLOAD_PATH:
            return self.settings.max_model_bytes, MODEL_HINT
        if method == "POST" and path == ARCHIVE_PATH:
            return self.settings.batch_max_archive_bytes + FORM_ALLOWANCE, ARCHIVE_HINT
        return self.settings.max_body_bytes, PHOTO_HINT

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, hint = self.limit_for(scope["method"], scope["path"])
        received = 0
        # Without a body there is nothing to guard (a response may still listen on receive for
        # a disconnect, while its route holds a database session).
        admitted = not _has_body(Headers(scope=scope))
        started = False

        async def guarded_receive() -> Message:
            nonlocal received, admitted
            if not admitted:  # the first read of the body: check the caller first
                await self._admit(scope, limit, hint)
                admitted = True
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _too_large(limit, hint)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, guarded_receive, tracking_send)
        except Refused as e:  # raised where no exception handler saw it
            if started:
                raise
            response = JSONResponse({"detail": e.detail}, e.status_code, headers=e.headers)
            await response(scope, receive, send)

    async def _admit(self, scope: Scope, limit: int, hint: str) -> None:
        """Authenticate for the matched route, then refuse a declared length over the limit."""
        role = required_role(scope) if self.settings.auth else None
        known = scope.get("state", {}).get("principal")
        if role is not None and known is None:
            request = Request(scope)
            credential = presented_credential(request) if scope["path"] in UPLOAD_PATHS else None
            cached = (
                self.keys.get(credential.secret)
                if credential and credential.kind == "key"
                else None
            )
            if cached is not None and cached.can(role):
                # Seen valid moments ago: the route confirms it beside the decoding.
                scope.setdefault("state", {})[UNCONFIRMED_KEY] = True
                principal = cached
            else:
                try:
                    principal = await run_in_threadpool(principal_for, request, role)
                except DomainError as e:
                    answer = answer_of(e)
                    if answer is None:
                        raise
                    raise Refused(answer.status, str(e), answer.headers(e)) from None
                if credential is not None and credential.kind == "key":
                    self.keys.put(credential.secret, principal)
            scope.setdefault("state", {})["principal"] = principal
        length = Headers(scope=scope).get("content-length", "")
        if re.fullmatch(r"\d{1,30}", length) and int(length) > limit:
            raise _too_large(limit, hint, length)
