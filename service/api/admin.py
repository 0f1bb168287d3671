"""Admin: API keys, models, and a check of the live gallery."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from service.api.deps import Admin, RuntimeDep, SessionDep
from service.api.schemas import GalleryDigestOut, KeyIn, KeyOut, Problem
from service.auth import create_key, revoke_key
from service.db import ApiKey, Model

router = APIRouter(tags=["admin"])


def _key_out(row: ApiKey, key: str | None = None) -> KeyOut:
    return KeyOut(
        id=row.id,
        name=row.name,
        role=row.role,
        prefix=row.prefix,
        created_at=row.created_at,
        revoked=row.revoked_at is not None,
        key=key,
    )


@router.post("/keys", response_model=KeyOut, status_code=201)
def post_key(body: KeyIn, session: SessionDep, caller: Admin) -> KeyOut:
    """Create an API key; the key itself is in this answer only."""
    row, key = create_key(session, body.name, body.role)
    session.commit()
    return _key_out(row, key)


@router.get("/keys", response_model=list[KeyOut])
def list_keys(session: SessionDep, caller: Admin) -> list[KeyOut]:
    return [_key_out(r) for r in session.scalars(select(ApiKey).order_by(ApiKey.id))]


@router.delete("/keys/{key_id}", status_code=204, responses={404: {"model": Problem}})
def delete_key(key_id: int, session: SessionDep, caller: Admin) -> None:
    """Revoke a key: it stops working at once."""
    if not revoke_key(session, key_id):
        raise HTTPException(404, f"key {key_id} does not exist")
    session.commit()


@router.get("/models")
def list_models(session: SessionDep, caller: Admin) -> list[dict[str, object]]:
    """Registered models (add and activate them with `whaleid models add`)."""
    return [
        {
            "id": m.id,
            "name": m.name,
            "version": m.version,
            "status": m.status,
            "embedding_dim": m.embedding_dim,
            "k": m.k,
            "cutoff": m.cutoff,
            "ranking": m.ranking,
            "preprocessing": m.preprocessing,
            "created_at": m.created_at.isoformat(),
        }
        for m in session.scalars(select(Model).order_by(Model.id))
    ]


@router.get("/gallery/digest", response_model=GalleryDigestOut, responses={503: {"model": Problem}})
async def gallery_digest(caller: Admin, runtime: RuntimeDep) -> GalleryDigestOut:
    """Fingerprints of the active model's gallery as this replica searches it, after replaying
    the change log as any request does. Equal on every replica, and equal to the same digest
    of the database's gallery (`GalleryDigest.of_database`), when the index is in step."""
    identifier = await run_in_threadpool(runtime.current)
    gallery = identifier.gallery
    digest = await run_in_threadpool(gallery.digest)
    return GalleryDigestOut(**digest.__dict__, last_change=gallery.version)
