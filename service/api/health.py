"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from service.api.deps import RuntimeDep
from service.api.schemas import Health, ModelOut, Readiness
from service.identify import NoActiveModel

router = APIRouter(tags=["health"])


@router.get("/health", response_model=Health)
def health() -> Health:
    """The process is alive."""
    return Health(status="ok")


@router.get("/ready", response_model=Readiness, responses={503: {"model": Readiness}})
async def ready(runtime: RuntimeDep) -> Readiness | JSONResponse:
    """Ready when the active model and its gallery index are loaded."""
    try:
        identifier = await run_in_threadpool(runtime.current)
    except NoActiveModel as e:
        body = Readiness(status="not ready", detail=str(e))
        return JSONResponse(body.model_dump(), status_code=503)
    return Readiness(
        status="ready",
        model=ModelOut.of(identifier.model),
        gallery_size=identifier.gallery.size,
    )
