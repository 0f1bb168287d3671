"""Models: upload, re-index, shadow report, activate (through the gate), roll back, retire."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path as FilePath
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from service.api.deps import Admin, EmbeddersDep, RuntimeDep, SessionDep, SessionsDep, SettingsDep
from service.api.params import ModelId
from service.api.schemas import (
    INVALID,
    ActivateIn,
    JobOut,
    Problem,
    RegisteredModel,
    ReindexIn,
    SwitchOut,
    VerificationIn,
)
from service.db.tables import Model
from service.errors import ActivationRefused, Invalid, NoActiveModel, NotFound, TooLarge
from service.jobs.queue import get_job, progress
from service.models.calibration import (
    pairs_from_confirmations,
    set_verification,
    store_calibration,
)
from service.models.registry import all_models, register_upload
from service.models.reindex import start_reindex
from service.models.switch import activate, retire, rollback, shadow_report

router = APIRouter(tags=["models"])


async def _receive_model(request: Request, limit: int, folder: FilePath) -> FilePath:
    """The request body, streamed to a temporary file; 413 past ``limit`` bytes."""
    fd, name = tempfile.mkstemp(dir=folder, prefix=".upload.", suffix=".onnx")
    path = FilePath(name)
    try:
        size = 0
        with os.fdopen(fd, "wb") as f:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise TooLarge(
                        f"the model file is over the limit of {limit} bytes "
                        "(WHALEID_MAX_MODEL_BYTES): raise it, or register it with "
                        "`whaleid models add`",
                    )
                f.write(chunk)
        if size == 0:
            raise Invalid(
                "the body is empty: send the ONNX file as the body (application/octet-stream)"
            )
        return path
    except BaseException:
        path.unlink(missing_ok=True)
        raise


@router.post(
    "/models",
    response_model=RegisteredModel,
    status_code=201,
    responses={413: {"model": Problem}, 422: {"model": Problem}},
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/octet-stream": {"schema": {"type": "string"}}},
        }
    },
)
async def upload_model(
    request: Request,
    response: Response,
    sessions: SessionsDep,
    settings: SettingsDep,
    caller: Admin,
) -> RegisteredModel:
    """Register an ONNX model sent as the request body. It is checked as `whaleid models add`
    checks it (contract metadata, output dimension, a probe embedding). The same file again
    answers 200 with the model already registered."""
    settings.models_dir.mkdir(parents=True, exist_ok=True)
    path = await _receive_model(request, settings.max_model_bytes, settings.models_dir)
    try:
        model, created = await run_in_threadpool(register_upload, settings, sessions, path)
    finally:
        path.unlink(missing_ok=True)
    if not created:
        response.status_code = 200
    return RegisteredModel.model_validate(model)


@router.post(
    "/models/{model_id}/reindex",
    response_model=JobOut,
    status_code=202,
    responses={404: {"model": Problem}, 409: {"model": Problem}},
)
async def reindex_model(
    model_id: ModelId,
    sessions: SessionsDep,
    settings: SettingsDep,
    caller: Admin,
    body: ReindexIn | None = None,
) -> JobOut:
    """Start a job embedding the gallery with this model; follow it at `GET /jobs/{id}`. The
    active model keeps answering meanwhile."""
    job = await run_in_threadpool(
        start_reindex,
        settings,
        sessions,
        model_id,
        include_queries=(body or ReindexIn()).include_queries,
        actor=caller.name,
    )
    with sessions() as session:
        return JobOut.model_validate(progress(session, get_job(session, job.id, caller)))


@router.get("/models/{model_id}/shadow", responses={404: {"model": Problem}})
async def get_shadow_report(
    model_id: ModelId, sessions: SessionsDep, settings: SettingsDep, caller: Admin
) -> dict[str, Any]:
    """The shadow evaluation of this model against the active one (recomputed if the active
    model changed since its re-index)."""
    report = await run_in_threadpool(shadow_report, settings, sessions, model_id)
    return report.data


async def _follow(runtime: RuntimeDep) -> None:
    # This replica loads the new model before answering; the others at their next request.
    try:
        await run_in_threadpool(runtime.current)
    except NoActiveModel:
        pass


@router.post(
    "/models/{model_id}/activate",
    response_model=SwitchOut,
    responses={404: {"model": Problem}, 409: {"description": "Refused, with the figures."}},
)
async def activate_model(
    model_id: ModelId,
    sessions: SessionsDep,
    embedders: EmbeddersDep,
    settings: SettingsDep,
    runtime: RuntimeDep,
    caller: Admin,
    body: ActivateIn | None = None,
) -> SwitchOut | JSONResponse:
    """Switch `/identify` to this ready model. Refused (409, with both models' MAP@5) when it
    scores worse than the active model on the confirmed identifications, or when there are too
    few to judge, unless `force` is set."""
    choice = body or ActivateIn()
    try:
        switch = await run_in_threadpool(
            activate,
            settings,
            sessions,
            embedders,
            model_id,
            head=choice.head,
            force=choice.force,
            actor=caller.name,
            before_switch=runtime.prepare,
        )
    except ActivationRefused as e:
        runtime.drop_prepared()
        return JSONResponse({"detail": str(e), "shadow": e.report}, status_code=409)
    except BaseException:
        runtime.drop_prepared()
        raise
    await _follow(runtime)
    return SwitchOut.model_validate(switch)


@router.post("/models/rollback", response_model=SwitchOut, responses={409: {"model": Problem}})
async def rollback_model(
    sessions: SessionsDep,
    embedders: EmbeddersDep,
    settings: SettingsDep,
    runtime: RuntimeDep,
    caller: Admin,
) -> SwitchOut:
    """Go back to the model that was active before, in one call."""
    try:
        switch = await run_in_threadpool(
            rollback,
            settings,
            sessions,
            embedders,
            caller.name,
            runtime.prepare,
        )
    except BaseException:
        runtime.drop_prepared()
        raise
    await _follow(runtime)
    return SwitchOut.model_validate(switch)


@router.post(
    "/models/{model_id}/retire",
    response_model=RegisteredModel,
    responses={404: {"model": Problem}, 409: {"model": Problem}},
)
async def retire_model(
    model_id: ModelId, sessions: SessionsDep, settings: SettingsDep, caller: Admin
) -> RegisteredModel:
    """Retire a model that is not active: its index is deleted; it can no longer be rolled
    back to without a re-index."""
    model = await run_in_threadpool(retire, settings, sessions, model_id)
    return RegisteredModel.model_validate(model)


@router.put(
    "/models/{model_id}/verification",
    response_model=RegisteredModel,
    responses={404: {"model": Problem}, **INVALID},
)
async def put_verification(
    model_id: ModelId, body: VerificationIn, sessions: SessionsDep, caller: Admin
) -> RegisteredModel:
    """Turn local-feature verification of a model's answers on or off; every replica answers
    with the setting from its next request (the shadow evaluation compares both)."""
    model = await run_in_threadpool(set_verification, sessions, model_id, body.verification)
    return RegisteredModel.model_validate(model)


@router.post(
    "/models/{model_id}/calibration",
    response_model=RegisteredModel,
    responses={404: {"model": Problem}, **INVALID},
)
async def calibrate_model(
    model_id: ModelId, sessions: SessionsDep, caller: Admin
) -> RegisteredModel:
    """Fit the model's calibration on the curators' confirmations of its verified answers
    (at least 10 right and 10 wrong candidates), and keep it with the model."""

    def fit() -> Model:
        with sessions() as session:
            pairs = pairs_from_confirmations(session, model_id)
        store_calibration(sessions, model_id, pairs, source="curators' confirmations")
        with sessions() as session:
            return session.get_one(Model, model_id)

    return RegisteredModel.model_validate(await run_in_threadpool(fit))


@router.get("/models", response_model=list[RegisteredModel])
def list_models(session: SessionDep, caller: Admin) -> list[RegisteredModel]:
    """Registered models (add and activate them with `whaleid models add`)."""
    return [RegisteredModel.model_validate(m) for m in all_models(session)]


@router.get(
    "/models/{model_id}", response_model=RegisteredModel, responses={404: {"model": Problem}}
)
def get_model(model_id: ModelId, session: SessionDep, caller: Admin) -> RegisteredModel:
    """One registered model, with its calibration and the open-set decision last fitted on
    its gallery (``open_set``)."""
    model = session.get(Model, model_id)
    if model is None:
        raise NotFound(f"model {model_id} does not exist: see GET /models")
    return RegisteredModel.model_validate(model)
