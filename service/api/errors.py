"""Error responses that need more than a status and a message: 503 with Retry-After, a 500 that
closes its connection cleanly, and a 405 whose Allow names every method of the path."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.routing import Match

from service.matching.slots import Busy

METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


async def busy(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Busy)
    headers = {"Retry-After": str(exc.retry_after)}
    return JSONResponse({"detail": str(exc)}, status_code=503, headers=headers)


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
