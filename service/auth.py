"""API keys with roles: ``integration`` (identify, read), ``curator`` (+ decisions and
individuals), ``admin`` (+ models, import, keys). Keys are stored hashed."""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.db import ApiKey, transaction

ROLES = ("integration", "curator", "admin")
KEY_PREFIX = "wid_"


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's owner and role."""

    name: str
    role: str
    key_id: int | None = None

    def can(self, role: str) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)


ANONYMOUS_ADMIN = Principal("anonymous (auth off)", "admin")


def hash_key(key: str) -> str:
    # Keys carry 256 random bits, so a fast hash is as safe as a slow one here.
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(factory: sessionmaker[Session], name: str, role: str) -> tuple[ApiKey, str]:
    """A new key for ``name``, committed; the plain key is returned once and never stored."""
    if role not in ROLES:
        raise ValueError(f"role {role!r} is not one of {', '.join(ROLES)}")
    if not name.strip():
        raise ValueError("a key needs the name of its owner")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(name=name.strip(), role=role, key_hash=hash_key(key), prefix=key[:10])
    with transaction(factory) as session:
        session.add(row)
    return row, key


def authenticate(session: Session, key: str) -> Principal | None:
    """The principal of a valid, unrevoked key, else None."""
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key)))
    if row is None or row.revoked_at is not None:
        return None
    return Principal(row.name, row.role, row.id)


class LastAdminKey(Exception):
    """Revoking this key would leave no admin key, and so no way to manage keys over the API."""


def revoke_key(factory: sessionmaker[Session], key_id: int, *, keep_an_admin: bool = False) -> bool:
    """Revoke a key (False if there is none), committed. With ``keep_an_admin``, the last
    active admin key is refused with ``LastAdminKey``."""
    with transaction(factory) as session:
        return _revoke(session, key_id, keep_an_admin)


def _revoke(session: Session, key_id: int, keep_an_admin: bool) -> bool:
    row = session.get(ApiKey, key_id)
    if row is None:
        return False
    if row.revoked_at is None and row.role == "admin" and keep_an_admin:
        # Locked, so two revocations at once cannot each leave the other as the last one.
        admins = session.scalars(
            select(ApiKey.id)
            .where(ApiKey.role == "admin", ApiKey.revoked_at.is_(None))
            .with_for_update()
        ).all()
        if list(admins) == [row.id]:
            raise LastAdminKey(
                f"key {key_id} ({row.name!r}) is the last admin key: create another admin key "
                "first (POST /keys), or revoke it on the server with `whaleid keys revoke`"
            )
    if row.revoked_at is None:
        row.revoked_at = dt.datetime.now(dt.UTC)
    return True
