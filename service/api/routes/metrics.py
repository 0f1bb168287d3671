"""``GET /metrics``: Prometheus' text format. It needs an API key of any role (the figures tell
traffic and catalogue sizes), unless ``WHALEID_METRICS_PUBLIC=true`` opens it for a scraper on a
private network. Prometheus sends a key with ``authorization: {credentials: KEY}`` in its scrape
config; an integration key is enough, never hand it an admin one."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from service.api.collectors import CONTENT_TYPE, ServiceMetrics
from service.api.deps import Integration

DESCRIPTION = "Prometheus metrics of this worker process (per replica, per worker)."


def _render(request: Request) -> Response:
    metrics: ServiceMetrics = request.app.state.metrics
    return Response(metrics.render(), media_type=CONTENT_TYPE)


def router_for(public: bool) -> APIRouter:
    """The ``/metrics`` route, open or behind a key."""
    router = APIRouter(tags=["health"])
    if public:

        @router.get("/metrics", response_class=Response, description=DESCRIPTION)
        def open_metrics(request: Request) -> Response:
            return _render(request)

    else:

        @router.get("/metrics", response_class=Response, description=DESCRIPTION)
        def keyed_metrics(request: Request, caller: Integration) -> Response:
            return _render(request)

    return router
