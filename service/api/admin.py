"""Admin: API keys, models, and a check of the live gallery."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from service.api.deps import Admin, RuntimeDep, SessionDep, SessionsDep
from service.api.params import KeyId
from service.api.schemas import INVALID, GalleryDigestOut, KeyIn, KeyOut, Problem, as_utc
from service.auth import LastAdminKey, create_key, revoke_key
from service.db import ApiKey, Model

router = APIRouter(tags=["admin"], responses=INVALID)


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
def post_key(body: KeyIn, sessions: SessionsDep, caller: Admin) -> KeyOut:
    """Create an API key; the key itself is in this answer only."""
    row, key = create_key(sessions, body.name, body.role)
    return _key_out(row, key)


@router.get("/keys", response_model=list[KeyOut])
def list_keys(session: SessionDep, caller: Admin) -> list[KeyOut]:
    return [_key_out(r) for r in session.scalars(select(ApiKey).order_by(ApiKey.id))]


@router.delete(
    "/keys/{key_id}", status_code=204, responses={404: {"model": Problem}, 409: {"model": Problem}}
)
def delete_key(key_id: KeyId, sessions: SessionsDep, caller: Admin) -> None:
    """Revoke a key: it stops working at once. The last admin key is refused (409): create
    another first, or revoke it on the server with `whaleid keys revoke`."""
    try:
        found = revoke_key(sessions, key_id, keep_an_admin=True)
    except LastAdminKey as e:
        raise HTTPException(409, str(e)) from e
    if not found:
        raise HTTPException(404, f"key {key_id} does not exist")


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
            "created_at": as_utc(m.created_at).isoformat(),
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
