"""The application factory: ``create_app(settings)`` builds the app; the lifespan opens the
database, checks the schema and loads the active model and its gallery once."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.concurrency import run_in_threadpool

from service import __version__
from service.access.auth import KeyCache
from service.api import errors
from service.api.accesslog import redacted_access_log
from service.api.collectors import ServiceMetrics
from service.api.guard import RequestGuard
from service.api.observability import KeyRate, RateLimit, RequestContext
from service.api.routes import (
    admin,
    catalogue,
    curation,
    encounters,
    health,
    identify,
    metrics,
    review,
)
from service.api.routes import batch as batch_api
from service.api.routes import jobs as jobs_api
from service.api.routes import models as model_routes
from service.api.routes.docs import install_docs
from service.db.migrate import is_current
from service.db.tables import make_engine, make_sessionmaker
from service.errors import NoActiveModel, SchemaNotCurrent
from service.jobs.batch.chunks import batch_handlers
from service.jobs.batch.closing import JobCloser
from service.jobs.queue import Worker
from service.logs import json_logs, text_logs
from service.matching.runtime import Runtime
from service.models.reindex import ActiveGalleryKeeper, Embedders, worker_handlers
from service.settings import Settings

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the whaleid app for ``settings`` (default: from the environment)."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.ensure_dirs()
        engine = make_engine(settings.sqlalchemy_url)
        try:
            if not is_current(engine):
                raise SchemaNotCurrent(
                    "the database schema is not up to date: run `whaleid db upgrade` first"
                )
            app.state.settings = settings
            app.state.engine = engine
            app.state.sessions = make_sessionmaker(engine)
            app.state.runtime = Runtime(settings, app.state.sessions)
            app.state.metrics.watch(app.state.runtime, engine)
            if not settings.auth:
                log.warning("authentication is OFF (WHALEID_AUTH=false): anyone can curate")
            _warn_of_retired_settings()
            app.state.embedders = Embedders(settings, app.state.sessions)
            try:
                loaded = await run_in_threadpool(app.state.runtime.current)
                log.info("ready: gallery of %d photos", loaded.gallery.size)
            except NoActiveModel as e:
                log.warning("%s", e)
            stop = threading.Event()
            worker = _start_worker(settings, app, stop) if settings.worker else None
            try:
                async with AsyncExitStack() as stack:
                    stack.enter_context(redacted_access_log())
                    # Text lines escape control characters; JSON escapes them on its own.
                    json_format = settings.log_format == "json"
                    stack.enter_context(json_logs() if json_format else text_logs())
                    yield
            finally:
                stop.set()
                if worker is not None:
                    await run_in_threadpool(worker.join)
        finally:
            engine.dispose()

    app = FastAPI(
        title="whaleid",
        version=__version__,
        summary="Photo-ID of individual whales and dolphins: top-5 candidates for a photo.",
        description="Every call but `/health` and `/ready` needs an API key, sent as "
        "`Authorization: Bearer <key>` (here: **Authorize**). An admin creates one with "
        "`whaleid keys create --role ROLE --name NAME`; roles: integration (identify and read), "
        "curator (+ decisions and individuals), admin (+ models, keys).",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.metrics = ServiceMetrics()
    app.state.key_cache = KeyCache(settings.key_cache_seconds)
    install_docs(app)
    for router in (
        identify.router,
        encounters.router,
        curation.router,
        catalogue.router,
        admin.router,
        review.router,
        health.router,
        jobs_api.router,
        batch_api.router,
        model_routes.router,
    ):
        app.include_router(router)
    app.include_router(metrics.router_for(settings.metrics_public))

    errors.install(app)
    # The key is checked and the body limited before anything reads it; the middlewares around
    # the guard (the last added is the outermost) read no body.
    add_observability(app, settings)
    return app


def add_observability(app: FastAPI, settings: Settings) -> None:
    """From the outside in: CORS (when configured), the request id, metrics and timeout, the
    rate limit, the request guard."""
    app.add_middleware(RequestGuard, settings=settings, keys=app.state.key_cache)
    app.state.rate = KeyRate(settings.rate_limit) if settings.rate_limit else None
    if app.state.rate is not None:
        app.add_middleware(RateLimit, rate=app.state.rate)
    app.add_middleware(
        RequestContext,
        metrics=app.state.metrics,
        timeout_seconds=settings.request_timeout_seconds,
    )
    origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
    if origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["*"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID", "X-Requested-With"],
            expose_headers=["X-Request-ID", "Retry-After", "Server-Timing"],
        )


RETIRED_SETTINGS = {
    "WHALEID_CALLBACK_SECRET": "each key has its own callback secret now",
    "WHALEID_CALLBACK_HOSTS": "each key has its own callback hosts now",
}


def _warn_of_retired_settings() -> None:
    """Say so when a setting this version no longer reads is still set (it would be ignored)."""
    for name, why in RETIRED_SETTINGS.items():
        if os.environ.get(name):
            log.warning(
                "%s is set but no longer used: %s; set them per key with `whaleid keys "
                "callbacks KEY_ID --host HOST --rotate-secret` (docs/integration.md)",
                name,
                why,
            )


def _start_worker(settings: Settings, app: FastAPI, stop: threading.Event) -> threading.Thread:
    """The in-process job worker (switch off with WHALEID_WORKER=false and run `whaleid worker`)."""
    worker = Worker(
        app.state.sessions,
        worker_handlers(settings, app.state.sessions, app.state.embedders)
        | batch_handlers(settings, app.state.sessions, app.state.runtime),
        lease_seconds=settings.job_lease_seconds,
        poll_seconds=settings.job_poll_seconds,
        idle=(
            ActiveGalleryKeeper(
                app.state.sessions, app.state.embedders, app.state.runtime.features
            ),
            JobCloser(settings, app.state.sessions),
        ),
    )
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True, name="job-worker")
    thread.start()
    return thread
