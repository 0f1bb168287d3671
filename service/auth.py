"""API keys with roles: ``integration`` (identify, read), ``curator`` (+ decisions and
individuals), ``admin`` (+ models, import, keys). Keys are stored hashed."""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import re
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
COMMAND_LINE = Principal("command line", "admin")  # whoever runs `whaleid` on the server


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


MAX_CALLBACK_HOSTS = 20
_HOST_NAME = re.compile(
    r"(?=.{1,253}$)[a-z0-9_]([a-z0-9_-]{0,62}[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]{0,62}[a-z0-9_])?)*"
)


def callback_host(host: str) -> str:
    """A host name (or IP address) as callbacks are matched against it; ``ValueError`` if it is
    anything else (a URL, a path, a port, a control character)."""
    name = host.strip().lower().rstrip(".")
    try:
        return str(ipaddress.ip_address(name.strip("[]")))
    except ValueError:
        pass
    if not _HOST_NAME.fullmatch(name):
        raise ValueError(
            f"{host[:100]!r} is not a host name: give names like hooks.example.org, without "
            "scheme, port or path"
        )
    return name


def set_callback_hosts(factory: sessionmaker[Session], key_id: int, hosts: list[str]) -> ApiKey:
    """Allow the key's callbacks to go to ``hosts`` (replacing the previous list), committed;
    ``LookupError`` if there is no such key, ``ValueError`` for a bad host."""
    if len(hosts) > MAX_CALLBACK_HOSTS:
        raise ValueError(f"{len(hosts)} hosts is over the limit of {MAX_CALLBACK_HOSTS} a key")
    names = sorted({callback_host(h) for h in hosts})
    with transaction(factory) as session:
        row = session.get(ApiKey, key_id)
        if row is None:
            raise LookupError(f"key {key_id} does not exist")
        row.callback_hosts = names
        return row


def rotate_callback_secret(factory: sessionmaker[Session], key_id: int) -> tuple[ApiKey, str]:
    """A new callback secret for the key (the old one stops at once), committed; the secret is
    returned to be shown once. ``LookupError`` if there is no such key, or it is revoked."""
    secret = "whsec_" + secrets.token_urlsafe(32)
    with transaction(factory) as session:
        row = session.get(ApiKey, key_id)
        if row is None or row.revoked_at is not None:
            raise LookupError(f"key {key_id} does not exist or is revoked")
        row.callback_secret = secret
        return row, secret
