"""What happens before a route reads a byte of its body: the caller is authenticated, and the
body is limited while it streams (chunked included), so a caller without a key, or with too
much to say, costs neither memory nor disk."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.settings import Settings

log = logging.getLogger(__name__)
# Room for the multipart framing and the form fields around an uploaded photo.
FORM_ALLOWANCE = 64 * 1024
UPLOAD_PATHS = ("/identify",)


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` once a body passes its limit."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            413,
            f"the request body is over the limit of {limit} bytes: send a smaller "
            "photo (or fewer items)",
            headers={"Connection": "close"},
        )


def required_role(scope: Scope) -> str | None:
    """The role the route matching ``scope`` requires (None: no key needed, or no route)."""
    from service.api.deps import Require

    for route in scope["app"].router.routes:
        match, _ = route.matches(scope)
        if match is Match.FULL:
            dependant = getattr(route, "dependant", None)
            pending = list(dependant.dependencies) if dependant else []
            while pending:
                dependency = pending.pop()
                if isinstance(dependency.call, Require):
                    return dependency.call.role
                pending.extend(dependency.dependencies)
            return None
    return None


def _has_body(headers: Headers) -> bool:
    return "transfer-encoding" in headers or headers.get("content-length", "0") not in ("", "0")


def _problem(status: int, detail: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


class RequestGuard:
    """Pure ASGI middleware (it must see ``receive`` itself, which ``@app.middleware`` hides)."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    def limit_for(self, path: str) -> int:
        if path in UPLOAD_PATHS:
            return self.settings.max_upload_bytes + FORM_ALLOWANCE
        return self.settings.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if _has_body(headers):
            refusal = await self._refusal(scope, headers)
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        limit = self.limit_for(scope["path"])
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge as e:
            if started:
                raise
            await _problem(413, e.detail, e.headers)(scope, receive, send)

    async def _refusal(self, scope: Scope, headers: Headers) -> JSONResponse | None:
        """401/403 for a caller who may not send this body, 413 for a declared length over the
        limit; None to go on."""
        role = required_role(scope) if self.settings.auth else None
        if role is not None:
            from service.api.deps import principal_for

            request = Request(scope)
            try:
                principal = await run_in_threadpool(principal_for, request, role)
            except HTTPException as e:
                return _problem(e.status_code, e.detail, {**(e.headers or {}), **_CLOSE})
            scope.setdefault("state", {})["principal"] = principal
        limit = self.limit_for(scope["path"])
        length = headers.get("content-length", "")
        if re.fullmatch(r"\d{1,30}", length) and int(length) > limit:
            return _problem(
                413,
                f"the request body is {length} bytes, over the limit of {limit}: send a smaller "
                "photo (or fewer items)",
                _CLOSE,
            )
        return None


_CLOSE: dict[str, Any] = {"Connection": "close"}
