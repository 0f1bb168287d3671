"""How the API answers an error: ``PROBLEMS``, the one table from a domain error
(``service/errors.py``) to its status and extra headers, installed by ``install``; a 503 with
Retry-After, a 401 naming the Bearer scheme, a 500 that closes its connection cleanly, and a 405
whose Allow names every method of the path. Routers raise domain errors, never HTTPException."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.routing import Match

from service.errors import (
    Busy,
    Conflict,
    DomainError,
    Forbidden,
    Invalid,
    NoActiveModel,
    NotAuthenticated,
    NotFound,
    OverQuota,
    OverRate,
    TooLarge,
    UnsupportedPhoto,
)

METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def _retry_after(exc: DomainError) -> dict[str, str]:
    after = getattr(exc, "retry_after", None)
    return {} if after is None else {"Retry-After": str(after)}


def _bearer(_exc: DomainError) -> dict[str, str]:
    return {"WWW-Authenticate": "Bearer"}


@dataclass(frozen=True)
class Answer:
    """The status a domain error is answered with, and the headers it adds."""

    status: int
    headers: Callable[[DomainError], Mapping[str, str]] = field(default=lambda _exc: {})


# An error is answered by its nearest class in this table (so ``PhotoTooLarge`` is 413, any
# other ``Invalid`` 422); one in none of them (a corrupt model file) is an internal error.
PROBLEMS: dict[type[DomainError], Answer] = {
    NotFound: Answer(404),
    Conflict: Answer(409),
    Invalid: Answer(422),
    UnsupportedPhoto: Answer(415),
    TooLarge: Answer(413),
    NotAuthenticated: Answer(401, _bearer),
    Forbidden: Answer(403),
    OverQuota: Answer(429),
    OverRate: Answer(429, _retry_after),
    NoActiveModel: Answer(503),
    Busy: Answer(503, _retry_after),
}


def answer_of(exc: DomainError) -> Answer | None:
    """The table's answer to ``exc`` (None: an internal error)."""
    for cls in type(exc).__mro__:
        if cls in PROBLEMS:
            return PROBLEMS[cls]
    return None


async def domain_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, DomainError)
    answer = answer_of(exc)
    if answer is None:
        raise exc  # to the 500 handler, which logs it
    return JSONResponse(
        {"detail": str(exc)}, status_code=answer.status, headers=dict(answer.headers(exc))
    )


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


def install(app: FastAPI) -> None:
    """Every error handler of the app: the domain errors' table, validation, 405 and 500."""
    app.add_exception_handler(DomainError, domain_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(405, method_not_allowed)
    app.add_exception_handler(Exception, internal_error)
