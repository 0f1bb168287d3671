"""Pure-ASGI middlewares around every request; none of them reads a body, so the request guard
(service/api/guard.py) still authenticates before a byte of one is read.

- ``RequestContext``: the request id (a sane incoming ``X-Request-ID``, else a new one), echoed
  in the response and put on every log line; the latency histogram per route template; the
  request timeout (504).
- ``RateLimit``: a per-key limit with the ``limits`` library (429 and ``Retry-After``); its
  ``KeyRate`` is on ``app.state.rate`` for the routes that charge more than one request."""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
import uuid

from fastapi.responses import JSONResponse
from limits import RateLimitItem, parse
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import logs
from service.access.auth import hash_key, key_hash_of_session
from service.api.collectors import UNMATCHED, ServiceMetrics
from service.api.deps import SESSION_COOKIE

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-ID"
# What a proxy's or a client's id may look like (UUIDs, trace ids); anything else is replaced.
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Probes and scrapes are never rate-limited.
UNLIMITED_PATHS = frozenset({"/health", "/ready", "/metrics"})


def request_id_of(headers: Headers) -> str:
    """The caller's ``X-Request-ID`` when it is short and plain, else a fresh one."""
    given = headers.get(REQUEST_ID_HEADER, "")
    return given if _SANE_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


def route_template(scope: Scope) -> str:
    """The matched route's template (``/identifications/{identification_id}``), a bounded label."""
    path = getattr(scope.get("route"), "path", None)
    return path if isinstance(path, str) else UNMATCHED


class RequestContext:
    """Request id, latency metrics and the request timeout (0: none)."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics, timeout_seconds: float) -> None:
        self.app = app
        self.metrics = metrics
        self.timeout = timeout_seconds or None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id_of(Headers(scope=scope))
        token = logs.request_id.set(rid)
        start = time.perf_counter()
        status, started = 500, False  # a failure before any response counts as a 500

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = rid
            await send(message)

        try:
            await asyncio.wait_for(self.app(scope, receive, send_with_id), self.timeout)
        except TimeoutError:
            if not started:  # once a response has started, all that can be done is to stop it
                status = await self._timed_out(scope, receive, send_with_id)
            log.warning("%s %s ran past %g s", scope["method"], scope["path"], self.timeout)
        finally:
            seconds = time.perf_counter() - start
            self.metrics.observe_request(scope["method"], route_template(scope), status, seconds)
            logs.request_id.reset(token)

    async def _timed_out(self, scope: Scope, receive: Receive, send: Send) -> int:
        # Work already handed to a thread runs on (a thread cannot be cancelled); its slot is
        # freed when it ends. The caller gets its answer now.
        response = JSONResponse(
            {"detail": f"the request took longer than {self.timeout:g} s; retry later"},
            status_code=504,
            headers={"Connection": "close"},
        )
        await response(scope, receive, send)
        return 504


class KeyRate:
    """The per-key rate (``limits`` notation, e.g. ``600/minute``), counted in this process's
    memory: with N replicas a key may make up to N times as many. Requests cost one each; a
    batch job costs one more per photo (``service.api.routes.batch``), so a job cannot do what
    the rate forbids one photo at a time."""

    def __init__(self, rate: str) -> None:
        self.item: RateLimitItem = parse(rate)
        self.limiter = MovingWindowRateLimiter(MemoryStorage())

    def hit(self, caller: str, cost: int = 1) -> bool:
        return self.limiter.hit(self.item, caller, cost=cost)

    def retry_after(self, caller: str) -> int:
        reset_at = self.limiter.get_window_stats(self.item, caller).reset_time
        return max(1, math.ceil(reset_at - time.time()))


class RateLimit:
    """At most ``rate`` requests per API key (429 with ``Retry-After`` beyond)."""

    def __init__(self, app: ASGIApp, rate: KeyRate) -> None:
        self.app = app
        self.rate = rate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNLIMITED_PATHS:
            await self.app(scope, receive, send)
            return
        caller = await caller_of(scope)
        if self.rate.hit(caller):
            await self.app(scope, receive, send)
            return
        retry_after = self.rate.retry_after(caller)
        response = JSONResponse(
            {
                "detail": f"rate limit of {self.rate.item} per key reached: retry after "
                f"{retry_after} s (the Retry-After header)"
            },
            status_code=429,
            headers={"Retry-After": str(retry_after)},
        )
        await response(scope, receive, send)


async def caller_of(scope: Scope) -> str:
    """Who a request counts against: its bearer key (hashed; never kept in clear), else the key
    of the review page's session (so signing in again does not earn a fresh allowance), else the
    client address."""
    headers = Headers(scope=scope)
    authorization = headers.get("authorization", "")
    secret = authorization[7:].strip() if authorization.lower().startswith("bearer ") else ""
    if secret:
        return "key:" + hash_key(secret)[:32]
    cookie = re.search(rf"(?:^|[;\s]){SESSION_COOKIE}=([^;\s]+)", headers.get("cookie", ""))
    if cookie:
        key_hash = await run_in_threadpool(_key_hash_of_session, scope, cookie.group(1))
        # An unknown session is refused later; until then it counts on its own.
        return "key:" + key_hash[:32] if key_hash else "session:" + hash_key(cookie.group(1))[:32]
    client = scope.get("client")
    return f"address:{client[0] if client else 'unknown'}"


def _key_hash_of_session(scope: Scope, token: str) -> str | None:
    sessions: sessionmaker[Session] = scope["app"].state.sessions
    with sessions() as session:
        return key_hash_of_session(session, token)
