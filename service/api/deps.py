"""Dependencies shared by the routers, as ``Annotated`` aliases.

The database is reached one way: ``SessionsDep``, the app's sessionmaker. Routes read through
``SessionDep`` (a session from it for the request) and never commit; every write is a domain
function that takes the sessionmaker and owns its transaction
(``service.db.tables.transaction``).

The dependencies that only read the app's state are ``async``: FastAPI runs a plain ``def``
dependency on the thread pool, and each such hop costs a request about as much as a database
round trip."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from service.access.auth import ANONYMOUS_ADMIN, Principal, authenticate, session_principal
from service.api.collectors import ServiceMetrics
from service.errors import Forbidden, NotAuthenticated
from service.matching.runtime import Runtime
from service.models.reindex import Embedders
from service.settings import Settings

# The review page's cookie: a random session id (service.access.auth.open_review_session),
# never a key.
SESSION_COOKIE = "whaleid_session"
# Where the page kept the raw key before review sessions; sign-in and logout clear it.
LEGACY_KEY_COOKIE = "whaleid_key"


def sessions_of(request: Request) -> sessionmaker[Session]:
    sessions: sessionmaker[Session] = request.app.state.sessions
    return sessions


async def get_sessions(request: Request) -> sessionmaker[Session]:
    return sessions_of(request)


def get_session(
    sessions: Annotated[sessionmaker[Session], Depends(get_sessions)],
) -> Iterator[Session]:
    with sessions() as session:
        yield session


async def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


async def get_metrics(request: Request) -> ServiceMetrics:
    metrics: ServiceMetrics = request.app.state.metrics
    return metrics


async def get_embedders(request: Request) -> Embedders:
    """The models' embedders this process has loaded for background work (re-index, switch)."""
    embedders: Embedders = request.app.state.embedders
    return embedders


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def settings_dep(request: Request) -> Settings:
    return get_settings(request)


@dataclass(frozen=True)
class Credential:
    """What a request presents: an API key (bearer) or a review session id (cookie)."""

    kind: Literal["key", "session"]
    secret: str


def presented_credential(request: Request) -> Credential | None:
    """The bearer key, or the review page's session cookie. A cookie only counts for reads and
    for requests a page's script sends (X-Requested-With), so other sites cannot forge writes."""
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        key = header[7:].strip()
        return Credential("key", key) if key else None
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie and (request.method == "GET" or request.headers.get("x-requested-with")):
        return Credential("session", cookie)
    return None


def principal_for(request: Request, role: str) -> Principal:
    """The caller, who must hold at least ``role``; 401 or 403 saying what is missing."""
    settings: Settings = request.app.state.settings
    if not settings.auth:
        return ANONYMOUS_ADMIN
    known: Principal | None = request.scope.get("state", {}).get("principal")
    if known is not None:  # authenticated before the body was read (service.api.guard)
        principal = known
    else:
        principal = request.scope.setdefault("state", {})["principal"] = _principal_presented(
            request, role
        )
    if not principal.can(role):
        raise Forbidden(
            f"this needs the {role} role; the key of {principal.name!r} has the "
            f"{principal.role} role"
        )
    return principal


def _principal_presented(request: Request, role: str) -> Principal:
    credential = presented_credential(request)
    how = (
        "send Authorization: Bearer <key>; an admin creates keys with "
        "`whaleid keys create --role ROLE --name NAME`"
    )
    if credential is None:
        raise NotAuthenticated(f"this needs an API key with the {role} role: {how}")
    with sessions_of(request)() as session:
        if credential.kind == "key":
            principal = authenticate(session, credential.secret)
        else:
            principal = session_principal(session, credential.secret)
    if principal is None:
        problem = (
            f"the API key is unknown or revoked: {how}"
            if credential.kind == "key"
            else "the review session has ended (signed out, expired, or its key revoked): "
            f"sign in again at /review/login, or {how}"
        )
        raise NotAuthenticated(problem)
    return principal


# Declares the bearer scheme in the OpenAPI description (Swagger UI's Authorize button); the
# key itself is checked by principal_for, which also accepts the review page's session.
bearer = HTTPBearer(
    auto_error=False,
    scheme_name="apiKey",
    description="An API key: `whaleid keys create --role ROLE --name NAME` prints one.",
)


class Require:
    """The dependency "the caller holds ``role``"; the request guard reads ``role`` to check the
    key before a body is read."""

    def __init__(self, role: str) -> None:
        self.role = role

    async def __call__(
        self,
        request: Request,
        _: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)] = None,
    ) -> Principal:
        settings: Settings = request.app.state.settings
        if not settings.auth or request.scope.get("state", {}).get("principal") is not None:
            return principal_for(request, self.role)  # known: nothing to look up
        return await run_in_threadpool(principal_for, request, self.role)


def require(role: str) -> Require:
    return Require(role)


SessionsDep = Annotated[sessionmaker[Session], Depends(get_sessions)]
SessionDep = Annotated[Session, Depends(get_session)]
RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
EmbeddersDep = Annotated[Embedders, Depends(get_embedders)]
SettingsDep = Annotated[Settings, Depends(settings_dep)]
MetricsDep = Annotated[ServiceMetrics, Depends(get_metrics)]
Integration = Annotated[Principal, Depends(require("integration"))]
Curator = Annotated[Principal, Depends(require("curator"))]
Admin = Annotated[Principal, Depends(require("admin"))]
