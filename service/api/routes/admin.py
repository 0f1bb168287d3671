"""Admin: API keys and their callbacks, and a check of the live gallery."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from service.access.auth import (
    all_keys,
    create_key,
    revoke_key,
    rotate_callback_secret,
    set_callback_hosts,
)
from service.api.deps import Admin, Integration, RuntimeDep, SessionDep, SessionsDep
from service.api.params import KeyId
from service.api.schemas import (
    INVALID,
    CallbackHostsIn,
    CallbackSecretOut,
    GalleryDigestOut,
    KeyIn,
    KeyOut,
    Problem,
)
from service.errors import Conflict, NotFound

router = APIRouter(tags=["admin"], responses=INVALID)


@router.post("/keys", response_model=KeyOut, status_code=201)
def post_key(body: KeyIn, sessions: SessionsDep, caller: Admin) -> KeyOut:
    """Create an API key; the key itself is in this answer only."""
    row, key = create_key(sessions, body.name, body.role)
    return KeyOut.model_validate(row).model_copy(update={"key": key})


@router.get("/keys", response_model=list[KeyOut])
def list_keys(session: SessionDep, caller: Admin) -> list[KeyOut]:
    return [KeyOut.model_validate(r) for r in all_keys(session)]


@router.delete(
    "/keys/{key_id}", status_code=204, responses={404: {"model": Problem}, 409: {"model": Problem}}
)
def delete_key(key_id: KeyId, sessions: SessionsDep, caller: Admin) -> None:
    """Revoke a key: it stops working at once. The last admin key is refused (409): create
    another first, or revoke it on the server with `whaleid keys revoke`."""
    if not revoke_key(sessions, key_id, keep_an_admin=True):
        raise NotFound(f"key {key_id} does not exist")


@router.put(
    "/keys/{key_id}/callback-hosts",
    response_model=KeyOut,
    responses={404: {"model": Problem}},
)
def put_callback_hosts(
    key_id: KeyId, body: CallbackHostsIn, sessions: SessionsDep, caller: Admin
) -> KeyOut:
    """The hosts this key's job callbacks may go to (replacing the list; empty: none). Each
    partner's key has its own, so one partner cannot send callbacks to another's receiver."""
    return KeyOut.model_validate(set_callback_hosts(sessions, key_id, body.hosts))


def _rotated(sessions: SessionsDep, key_id: int) -> CallbackSecretOut:
    row, secret = rotate_callback_secret(sessions, key_id)
    return CallbackSecretOut(key_id=row.id, callback_secret=secret)


@router.post(
    "/keys/{key_id}/callback-secret",
    response_model=CallbackSecretOut,
    responses={404: {"model": Problem}},
)
def post_callback_secret(key_id: KeyId, sessions: SessionsDep, caller: Admin) -> CallbackSecretOut:
    """Create or rotate a key's callback secret; shown in this answer only."""
    return _rotated(sessions, key_id)


@router.post(
    "/callbacks/secret",
    response_model=CallbackSecretOut,
    responses={409: {"model": Problem}},
)
def post_own_callback_secret(sessions: SessionsDep, caller: Integration) -> CallbackSecretOut:
    """Create or rotate the calling key's own callback secret; shown in this answer only."""
    if caller.key_id is None:
        raise Conflict("callbacks need an API key: authentication is off")
    return _rotated(sessions, caller.key_id)


@router.get("/gallery/digest", response_model=GalleryDigestOut, responses={503: {"model": Problem}})
async def gallery_digest(caller: Admin, runtime: RuntimeDep) -> GalleryDigestOut:
    """Fingerprints of the active model's gallery as this replica searches it, after replaying
    the change log as any request does. Equal on every replica, and equal to the same digest
    of the database's gallery (`GalleryDigest.of_database`), when the index is in step."""
    identifier = await run_in_threadpool(runtime.current)
    gallery = identifier.gallery
    digest = await run_in_threadpool(gallery.digest)
    return GalleryDigestOut(**digest.__dict__, last_change=gallery.version)
