"""Error responses that need more than a status and a message: 503 with Retry-After, a 500 that
closes its connection cleanly, and a 405 whose Allow names every method of the path."""

from __future__ import annotations

import math
from typing import Any

from fastapi import Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.routing import Match

from service.matching.slots import Busy

METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


async def busy(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Busy)
    headers = {"Retry-After": str(exc.retry_after)}
    return JSONResponse({"detail": str(exc)}, status_code=503, headers=headers)


def _json_safe(value: Any) -> Any:
    """``value`` with every non-finite float written as text: JSON has no ``inf`` or ``nan``."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


async def invalid_request(_request: Request, exc: Exception) -> Response:
    """FastAPI's 422 for a request that fails validation, with the offending input echoed even
    when it is ``Infinity`` or ``NaN`` (which Python's JSON reader accepts in a body)."""
    assert isinstance(exc, RequestValidationError)
    return JSONResponse({"detail": _json_safe(jsonable_encoder(exc.errors()))}, status_code=422)


async def internal_error(_request: Request, _exc: Exception) -> Response:
    # The server logs the exception and closes the connection after a 500; saying so keeps a
    # keep-alive client from sending its next request into a socket that is going away.
    return JSONResponse(
        {"detail": "internal error: the service logged it; retry, or report it if it persists"},
        status_code=500,
        headers={"Connection": "close"},
    )


def allowed_methods(request: Request) -> list[str]:
    """Every method some route of the app accepts at this path (a path may have several)."""
    allowed = []
    for method in METHODS:
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] is Match.FULL for route in request.app.router.routes):
            allowed.append(method)
    return allowed


async def method_not_allowed(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    allow = ", ".join(allowed_methods(request)) or (exc.headers or {}).get("Allow", "")
    return JSONResponse(
        {"detail": f"{request.method} is not allowed on {request.url.path}: use {allow}"},
        status_code=405,
        headers={"Allow": allow},
    )
