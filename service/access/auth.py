"""API keys with roles: ``integration`` (identify, read), ``curator`` (+ decisions and
individuals), ``admin`` (+ models, import, keys). Keys are stored hashed.

The review page signs in with a key once and then holds a review session: a random id in its
cookie, stored here only as a hash, that ends when it expires, at logout, or when its key is
revoked. The key itself never leaves the sign-in form."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import ipaddress
import re
import secrets
import threading
import time
from dataclasses import dataclass

from sqlalchemy import delete, or_, select
from sqlalchemy.orm import Session, sessionmaker

from service.db.tables import ApiKey, ReviewSession, transaction, utcnow
from service.errors import Invalid, LastAdminKey, NotFound, RoleTooLow, UnknownKey

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
    # Keys and review session ids carry 256 random bits, so a fast hash is as safe as a slow one.
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(factory: sessionmaker[Session], name: str, role: str) -> tuple[ApiKey, str]:
    """A new key for ``name``, committed; the plain key is returned once and never stored."""
    if role not in ROLES:
        raise Invalid(f"role {role!r} is not one of {', '.join(ROLES)}")
    if not name.strip():
        raise Invalid("a key needs the name of its owner")
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


class KeyCache:
    """Keys seen valid in the last ``seconds``, by hash, at most ``size`` of them: what
    ``/identify`` admits without a lookup before its body is read. Only routes that confirm the
    key later, before anything is stored, may use it (``Runtime.current(confirm_key=...)``)."""

    def __init__(self, seconds: float, size: int = 1024) -> None:
        self.seconds = seconds
        self.size = size
        self._seen: dict[str, tuple[Principal, float]] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> Principal | None:
        if self.seconds <= 0:
            return None
        with self._lock:
            found = self._seen.get(hash_key(key))
        if found is None or time.monotonic() - found[1] > self.seconds:
            return None
        return found[0]

    def put(self, key: str, principal: Principal) -> None:
        if self.seconds <= 0 or principal.key_id is None:
            return
        digest = hash_key(key)
        with self._lock:
            self._seen.pop(digest, None)  # re-inserted last: the oldest go first
            while len(self._seen) >= self.size:
                self._seen.pop(next(iter(self._seen)))
            self._seen[digest] = (principal, time.monotonic())

    def clear(self) -> None:
        with self._lock:
            self._seen.clear()


# The review page's form tokens (sign-in, logout): "nonce.expiry.signature", signed with the
# server's form secret, so a value planted in the browser by another site is refused.
FORM_TOKEN_HOURS = 24
_FORM_TOKEN = re.compile(r"([A-Za-z0-9_-]{32})\.([0-9]{1,12})\.([A-Za-z0-9_-]{43})")
FORM_SECRET_KEY = "secrets/form-secret"  # where the generated one is kept in the object store


def _form_signature(secret: bytes, nonce: str, expires: str) -> str:
    digest = hmac.new(secret, f"whaleid-form|{nonce}|{expires}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def new_form_token(secret: bytes, hours: float = FORM_TOKEN_HOURS) -> str:
    nonce, expires = secrets.token_urlsafe(24), str(int(time.time() + hours * 3600))
    return f"{nonce}.{expires}.{_form_signature(secret, nonce, expires)}"


def form_token_valid(secret: bytes, token: str, *, for_seconds: float = 0) -> bool:
    """Whether ``token`` is one this server signed, valid for ``for_seconds`` more."""
    found = _FORM_TOKEN.fullmatch(token)
    if found is None or int(found[2]) < time.time() + for_seconds:
        return False
    expected = _form_signature(secret, found[1], found[2])
    return hmac.compare_digest(expected.encode(), found[3].encode())


def open_review_session(
    factory: sessionmaker[Session],
    key: str,
    hours: float,
    *,
    role: str = "curator",
    replacing: str | None = None,
) -> tuple[Principal, str]:
    """Sign ``key`` in to the review page for ``hours``, committed: its principal and the new
    session's id, returned once for the cookie (only its hash is stored). The session in
    ``replacing`` (the cookie the browser already held) ends, and the key's dead sessions are
    deleted, so the table keeps only live ones. Refused with ``UnknownKey`` or ``RoleTooLow``."""
    token = secrets.token_urlsafe(32)
    now = utcnow()
    with transaction(factory) as session:
        principal = authenticate(session, key) if key else None
        if principal is None or principal.key_id is None:
            raise UnknownKey("That key is unknown or revoked.")
        if not principal.can(role):
            raise RoleTooLow(
                f"The key of {principal.name!r} has the {principal.role} role; reviewing needs "
                f"the {role} role."
            )
        if replacing:
            _end_session(session, replacing, now)
        session.execute(
            delete(ReviewSession).where(
                ReviewSession.key_id == principal.key_id,
                or_(ReviewSession.expires_at <= now, ReviewSession.revoked_at.is_not(None)),
            )
        )
        session.add(
            ReviewSession(
                token_hash=hash_key(token),
                key_id=principal.key_id,
                created_at=now,
                expires_at=now + dt.timedelta(hours=hours),
            )
        )
    return principal, token


def session_principal(session: Session, token: str) -> Principal | None:
    """The principal of a live review session: unexpired, not ended, its key not revoked (the
    key is checked too, so a session outlives neither its key nor a revocation made behind
    ``revoke_key``'s back); else None."""
    row = session.execute(
        select(ApiKey)
        .join(ReviewSession, ReviewSession.key_id == ApiKey.id)
        .where(
            ReviewSession.token_hash == hash_key(token),
            ReviewSession.revoked_at.is_(None),
            ReviewSession.expires_at > utcnow(),
            ApiKey.revoked_at.is_(None),
        )
    ).scalar_one_or_none()
    return None if row is None else Principal(row.name, row.role, row.id)


def key_hash_of_session(session: Session, token: str) -> str | None:
    """The stored hash of the key that opened the review session ``token`` (live or not), so a
    session counts against its key's rate limit; None for no such session."""
    return session.scalar(
        select(ApiKey.key_hash)
        .join(ReviewSession, ReviewSession.key_id == ApiKey.id)
        .where(ReviewSession.token_hash == hash_key(token))
    )


def close_review_session(factory: sessionmaker[Session], token: str) -> bool:
    """End the review session ``token`` names (logout), committed; False if none was live."""
    with transaction(factory) as session:
        return _end_session(session, token, utcnow())


def _end_session(session: Session, token: str, now: dt.datetime) -> bool:
    row = session.scalar(select(ReviewSession).where(ReviewSession.token_hash == hash_key(token)))
    if row is None or row.revoked_at is not None:
        return False
    row.revoked_at = now
    return True


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
    now = utcnow()
    if row.revoked_at is None:
        row.revoked_at = now
    # The key's review pages are signed out with it, at once.
    for live in session.scalars(
        select(ReviewSession).where(
            ReviewSession.key_id == key_id, ReviewSession.revoked_at.is_(None)
        )
    ):
        live.revoked_at = now
    return True


MAX_CALLBACK_HOSTS = 20
_HOST_NAME = re.compile(
    r"(?=.{1,253}$)[a-z0-9_]([a-z0-9_-]{0,62}[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]{0,62}[a-z0-9_])?)*"
)


def callback_host(host: str) -> str:
    """A host name (or IP address) as callbacks are matched against it; ``Invalid`` if it is
    anything else (a URL, a path, a port, a control character)."""
    name = host.strip().lower().rstrip(".")
    try:
        return str(ipaddress.ip_address(name.strip("[]")))
    except ValueError:
        pass
    if not _HOST_NAME.fullmatch(name):
        raise Invalid(
            f"{host[:100]!r} is not a host name: give names like hooks.example.org, without "
            "scheme, port or path"
        )
    return name


def set_callback_hosts(factory: sessionmaker[Session], key_id: int, hosts: list[str]) -> ApiKey:
    """Allow the key's callbacks to go to ``hosts`` (replacing the previous list), committed;
    ``NotFound`` if there is no such key, ``Invalid`` for a bad host."""
    if len(hosts) > MAX_CALLBACK_HOSTS:
        raise Invalid(f"{len(hosts)} hosts is over the limit of {MAX_CALLBACK_HOSTS} a key")
    names = sorted({callback_host(h) for h in hosts})
    with transaction(factory) as session:
        row = session.get(ApiKey, key_id)
        if row is None:
            raise NotFound(f"key {key_id} does not exist")
        row.callback_hosts = names
        return row


def rotate_callback_secret(factory: sessionmaker[Session], key_id: int) -> tuple[ApiKey, str]:
    """A new callback secret for the key (the old one stops at once), committed; the secret is
    returned to be shown once. ``NotFound`` if there is no such key, or it is revoked."""
    secret = "whsec_" + secrets.token_urlsafe(32)
    with transaction(factory) as session:
        row = session.get(ApiKey, key_id)
        if row is None or row.revoked_at is not None:
            raise NotFound(f"key {key_id} does not exist or is revoked")
        row.callback_secret = secret
        return row, secret


def all_keys(session: Session) -> list[ApiKey]:
    """Every key, revoked ones too, oldest first (what `GET /keys` and `whaleid keys list` show)."""
    return list(session.scalars(select(ApiKey).order_by(ApiKey.id)))
