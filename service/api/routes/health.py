"""Liveness and readiness. Both answer anyone (probes carry no key); which model is active and
how large its gallery is, ``/ready`` tells only a caller with a valid key."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from service.access.auth import ROLES
from service.api.deps import RuntimeDep, principal_for
from service.api.schemas import Health, ModelOut, Readiness
from service.errors import DomainError, NoActiveModel

router = APIRouter(tags=["health"])


@router.get("/health", response_model=Health)
def health() -> Health:
    """The process is alive."""
    return Health(status="ok")


def has_valid_key(request: Request) -> bool:
    """Whether the caller holds a valid key of any role (with auth off, anyone does). Never
    refuses: a probe without a key, or with a wrong one, is still answered."""
    try:
        principal_for(request, ROLES[0])
    except DomainError:
        return False
    return True


@router.get("/ready", response_model=Readiness, responses={503: {"model": Readiness}})
async def ready(request: Request, runtime: RuntimeDep) -> Readiness | JSONResponse:
    """Ready when the active model and its gallery index are loaded. Without a valid key the
    answer is the status alone; with one of any role, also the model and the gallery size (or
    why it is not ready)."""
    known = await run_in_threadpool(has_valid_key, request)
    try:
        identifier = await run_in_threadpool(runtime.current)
    except NoActiveModel as e:
        body = Readiness(status="not ready", detail=str(e))
        shown = body.model_dump() if known else {"status": body.status}
        return JSONResponse(shown, status_code=503)
    if not known:
        return JSONResponse({"status": "ready"})
    return Readiness(
        status="ready",
        model=ModelOut.model_validate(identifier.model),
        gallery_size=identifier.gallery.size,
    )
