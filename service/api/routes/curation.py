"""Curators at work: decisions on identifications, the review queue, edits to individuals."""

from __future__ import annotations

import os

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from service.api.deps import (
    Curator,
    Integration,
    RuntimeDep,
    SessionDep,
    SessionsDep,
    SettingsDep,
)
from service.api.params import (
    IdentificationId,
    IndividualId,
    Limit,
    ModelIdFilter,
    Offset,
    SpeciesFilter,
    StatusFilter,
)
from service.api.schemas import (
    INVALID,
    DecisionIn,
    EventOut,
    IdentificationPage,
    IdentificationSummary,
    IndividualIn,
    IndividualOut,
    IndividualPatch,
    MergeIn,
    Problem,
    SplitIn,
)
from service.catalogue.curation import (
    DecisionRecord,
    DecisionRequest,
    create_individual,
    decide,
    individual_history,
    merge_individuals,
    split_individual,
    update_individual,
)
from service.catalogue.reads import identifications_page, photo_count
from service.db.tables import Individual

router = APIRouter(tags=["curation"], responses=INVALID)
ERRORS: dict[int | str, dict[str, object]] = {
    404: {"model": Problem},
    409: {"model": Problem},
}


@router.get("/identifications", response_model=IdentificationPage)
def list_identifications(
    session: SessionDep,
    caller: Integration,
    status: StatusFilter = None,
    species: SpeciesFilter = None,
    model_id: ModelIdFilter = None,
    offset: Offset = 0,
    limit: Limit = 50,
) -> IdentificationPage:
    """The review queue: identifications, oldest first, by status, species filter or model (an
    integration key lists its own)."""
    total, rows = identifications_page(
        session,
        caller,
        status=status,
        species=species,
        model_id=model_id,
        offset=offset,
        limit=limit,
    )
    items = [IdentificationSummary.model_validate(ident) for ident in rows]
    return IdentificationPage(items=items, total=total, offset=offset, limit=limit)


@router.post(
    "/identifications/{identification_id}/decision", response_model=DecisionRecord, responses=ERRORS
)
async def post_decision(
    identification_id: IdentificationId,
    body: DecisionIn,
    caller: Curator,
    sessions: SessionsDep,
    runtime: RuntimeDep,
    settings: SettingsDep,
) -> DecisionRecord:
    """Confirm a candidate, declare a new individual, or reject. The photo joins the gallery at
    once. Repeating a decision returns the first; a different one needs `supersede`."""
    request = DecisionRequest(**body.model_dump())
    record = await run_in_threadpool(decide, sessions, identification_id, request, caller.name)
    if settings.failpoint == "after-decision-commit":
        os._exit(70)  # a crash between the database commit and the index update
    await run_in_threadpool(runtime.sync)
    return record


@router.post("/individuals", response_model=IndividualOut, status_code=201, responses=ERRORS)
async def post_individual(
    body: IndividualIn, caller: Curator, sessions: SessionsDep
) -> IndividualOut:
    """Create an individual (without photos yet)."""
    ind = await run_in_threadpool(
        create_individual,
        sessions,
        body.individual_id,
        body.species,
        body.name,
        caller.name,
    )
    return IndividualOut(
        individual_id=ind.catalogue_id,
        species=ind.species,
        display_name=ind.display_name,
        image_count=0,
    )


async def _summary(sessions: SessionsDep, runtime: RuntimeDep, ind: Individual) -> IndividualOut:
    def count() -> int:
        with sessions() as session:
            return photo_count(session, ind.id)

    await run_in_threadpool(runtime.sync)
    return IndividualOut(
        individual_id=ind.catalogue_id,
        species=ind.species,
        display_name=ind.display_name,
        image_count=await run_in_threadpool(count),
    )


@router.patch("/individuals/{individual_id}", response_model=IndividualOut, responses=ERRORS)
async def patch_individual(
    individual_id: IndividualId,
    body: IndividualPatch,
    caller: Curator,
    sessions: SessionsDep,
    runtime: RuntimeDep,
) -> IndividualOut:
    """Rename (catalogue id or display name) or change the species."""
    ind = await run_in_threadpool(
        lambda: update_individual(
            sessions,
            individual_id,
            caller.name,
            new_code=body.individual_id,
            name=body.name,
            species=body.species,
        )
    )
    return await _summary(sessions, runtime, ind)


@router.post("/individuals/{individual_id}/merge", response_model=IndividualOut, responses=ERRORS)
async def merge(
    individual_id: IndividualId,
    body: MergeIn,
    caller: Curator,
    sessions: SessionsDep,
    runtime: RuntimeDep,
) -> IndividualOut:
    """Merge this individual into another: every photo moves, this one redirects there."""
    target = await run_in_threadpool(
        merge_individuals, sessions, individual_id, body.into, caller.name
    )
    return await _summary(sessions, runtime, target)


@router.post("/individuals/{individual_id}/split", response_model=IndividualOut, responses=ERRORS)
async def split(
    individual_id: IndividualId,
    body: SplitIn,
    caller: Curator,
    sessions: SessionsDep,
    runtime: RuntimeDep,
) -> IndividualOut:
    """Move chosen photos to another or a new individual; answers with where they went."""
    target = await run_in_threadpool(
        lambda: split_individual(
            sessions,
            individual_id,
            body.image_ids,
            caller.name,
            into=body.into,
            new_code=body.new_individual_id,
            name=body.name,
        )
    )
    return await _summary(sessions, runtime, target)


@router.get(
    "/individuals/{individual_id}/history",
    response_model=list[EventOut],
    responses={404: {"model": Problem}},
)
def history(
    individual_id: IndividualId, session: SessionDep, caller: Integration
) -> list[EventOut]:
    """Every change to this individual, oldest first, with who made it."""
    return [
        EventOut(event=e.event, detail=e.detail, actor=e.actor, created_at=e.created_at)
        for e in individual_history(session, individual_id)
    ]
