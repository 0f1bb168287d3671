"""The review page's sign-in: the cookie names a server-side session, never the key; the session
ends at logout (a copied cookie too), when it expires and when its key is revoked; the sign-in
and logout forms refuse a POST without their double-submit token (CSRF)."""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from collections.abc import Iterator

import httpx
import pytest
from sqlalchemy import Update, select, update

from service.db.tables import ApiKey, ReviewSession, make_engine, make_sessionmaker, utcnow
from service.settings import Settings
from tests.conftest import LiveServer, run_server
from tests.service.catalogue.test_curation import identify

SESSION, CSRF = "whaleid_session", "whaleid_csrf"
_FORM_TOKEN = re.compile(r'name="csrf" value="([^"]*)"')


def form_token(page: httpx.Response) -> str:
    """The hidden form token of a sign-in or logout page."""
    found = _FORM_TOKEN.search(page.text)
    assert found, f"no form token on the page: {page.status_code} {page.text[:300]}"
    return found.group(1)


def sign_in(browser: httpx.Client, key: str, **headers: str) -> httpx.Response:
    """Sign in as a browser does: load the form (its token cookie and field), then post it."""
    token = form_token(browser.get("/review/login"))
    return browser.post("/review/login", data={"key": key, "csrf": token}, headers=headers)


def set_cookies(response: httpx.Response, name: str) -> list[str]:
    return [c for c in response.headers.get_list("set-cookie") if c.startswith(f"{name}=")]


def replay(live: LiveServer, cookies: dict[str, str] | str) -> httpx.Client:
    """A fresh client that sends copied ``cookies`` (a string: the session cookie's value), as a
    thief would."""
    jar = {SESSION: cookies} if isinstance(cookies, str) else cookies
    return httpx.Client(base_url=live.url, cookies=jar, timeout=30)


def assert_refused(live: LiveServer, cookies: dict[str, str] | str, ident: int) -> None:
    """The copied ``cookies`` open neither the page nor the API, read or write."""
    with replay(live, cookies) as thief:
        page = thief.get("/review")
        assert page.status_code == 303 and page.headers["location"] == "/review/login"
        read = thief.get(f"/identifications/{ident}")
        assert read.status_code == 401 and "review session has ended" in read.json()["detail"]
        write = thief.post(
            f"/identifications/{ident}/decision",
            json={"decision": "reject"},
            headers={"X-Requested-With": "fetch"},
        )
        assert write.status_code == 401
    with live.client() as integration:
        assert integration.get(f"/identifications/{ident}").json()["status"] == "pending"


def assert_accepted(live: LiveServer, cookies: dict[str, str] | str) -> None:
    with replay(live, cookies) as browser:
        page = browser.get("/review")
        assert page.status_code == 200 and "curator tester" in page.text


def sessions_of(settings: Settings) -> list[ReviewSession]:
    engine = make_engine(settings.sqlalchemy_url)
    try:
        with make_sessionmaker(engine)() as session:
            return list(session.scalars(select(ReviewSession).order_by(ReviewSession.id)))
    finally:
        engine.dispose()


def execute(settings: Settings, statement: Update) -> None:
    """Change the database behind the service's back (the clock, a revocation)."""
    engine = make_engine(settings.sqlalchemy_url)
    try:
        with make_sessionmaker(engine)() as session, session.begin():
            session.execute(statement)
    finally:
        engine.dispose()


@pytest.mark.slow
def test_the_cookie_holds_a_random_session_id_never_the_key(live: LiveServer) -> None:
    key = live.keys["curator"]
    with httpx.Client(base_url=live.url, timeout=60) as browser:
        signed_in = sign_in(browser, key)
        assert signed_in.status_code == 303, signed_in.text
        assert not any(
            key in c or hashlib.sha256(key.encode()).hexdigest() in c
            for c in signed_in.headers.get_list("set-cookie")
        ), "a cookie holds the key or its hash"
        [cookie] = set_cookies(signed_in, SESSION)
        flags = cookie.lower()
        assert "httponly" in flags and "samesite=strict" in flags and "max-age=43200" in flags
        token = browser.cookies[SESSION]
        with httpx.Client(base_url=live.url, timeout=60) as other:
            assert sign_in(other, key).status_code == 303
            second = other.cookies[SESSION]
        assert second != token  # random per sign-in, not derived from the key

        # The cookie still authenticates as before: the page, reads, and the page's script.
        page = browser.get("/review")
        assert page.status_code == 200 and "curator tester" in page.text
        with live.client() as integration:
            ident = identify(integration, 3, 40)["identification_id"]
        assert browser.get(f"/identifications/{ident}").status_code == 200
        decided = browser.post(
            f"/identifications/{ident}/decision",
            json={"decision": "reject"},
            headers={"X-Requested-With": "fetch"},
        )
        assert decided.status_code == 200 and decided.json()["curator"] == "curator tester"

    # The database keeps only the id's hash, against the key's row; 12 hours by default.
    rows = sessions_of(live.settings)
    assert [r.token_hash for r in rows] == [
        hashlib.sha256(token.encode()).hexdigest(),
        hashlib.sha256(second.encode()).hexdigest(),
    ]
    assert rows[0].expires_at - rows[0].created_at == dt.timedelta(hours=12)


@pytest.mark.slow
def test_a_logged_out_session_is_refused_even_when_replayed(live: LiveServer) -> None:
    with live.client() as integration:
        ident = identify(integration, 3, 40)["identification_id"]
    with httpx.Client(base_url=live.url, timeout=60) as browser:
        assert sign_in(browser, live.keys["curator"]).status_code == 303
        copied = dict(browser.cookies)  # every cookie the browser holds, as a thief takes them
        # A GET of the logout page (a link, a prefetch) only shows the sign-out button.
        page = browser.get("/review/logout")
        assert page.status_code == 200 and 'action="/review/logout"' in page.text
        assert_accepted(live, copied)

        out = browser.post("/review/logout", data={"csrf": form_token(page)})
        assert out.status_code == 303 and out.headers["location"] == "/review/login"
        [cleared] = set_cookies(out, SESSION)
        assert "max-age=0" in cleared.lower()
        assert SESSION not in browser.cookies
    [row] = sessions_of(live.settings)
    assert row.revoked_at is not None
    assert_refused(live, copied, ident)  # a copy taken before logout is dead too


@pytest.fixture
def half_hour(settings: Settings) -> Iterator[LiveServer]:
    """The service with review sessions of 30 minutes (SQLite and PostgreSQL)."""
    yield from run_server(settings.model_copy(update={"review_session_hours": 0.5}))


@pytest.mark.slow
def test_an_expired_session_is_refused(half_hour: LiveServer) -> None:
    live = half_hour
    with httpx.Client(base_url=live.url, timeout=60) as browser:
        signed_in = sign_in(browser, live.keys["curator"])
        assert signed_in.status_code == 303
        # The browser drops the cookie when the session ends; the server enforces it anyway.
        assert "max-age=1800" in set_cookies(signed_in, SESSION)[0].lower()
        token = browser.cookies[SESSION]
    [row] = sessions_of(live.settings)
    assert row.expires_at - row.created_at == dt.timedelta(minutes=30)
    assert_accepted(live, token)

    execute(
        live.settings, update(ReviewSession).values(expires_at=utcnow() - dt.timedelta(seconds=1))
    )
    with replay(live, token) as thief:
        page = thief.get("/review")
        assert page.status_code == 303 and page.headers["location"] == "/review/login"
        read = thief.get("/identifications")
        assert read.status_code == 401 and "review session has ended" in read.json()["detail"]
    with live.client("curator") as curator:  # the key itself still works
        assert curator.get("/identifications").status_code == 200


@pytest.mark.slow
def test_revoking_a_key_ends_its_sessions(live: LiveServer) -> None:
    with live.client() as integration:
        ident = identify(integration, 3, 40)["identification_id"]
    with live.client("admin") as admin:
        made = admin.post("/keys", json={"name": "second curator", "role": "curator"}).json()
        curator_id = next(k["id"] for k in admin.get("/keys").json() if k["role"] == "curator")
    with (
        httpx.Client(base_url=live.url, timeout=60) as first,
        httpx.Client(base_url=live.url, timeout=60) as second,
    ):
        assert sign_in(first, live.keys["curator"]).status_code == 303
        assert sign_in(second, made["key"]).status_code == 303
        revoked, other = first.cookies[SESSION], second.cookies[SESSION]

    with live.client("admin") as admin:
        assert admin.delete(f"/keys/{curator_id}").status_code == 204
    ended = {r.key_id: r.revoked_at for r in sessions_of(live.settings)}
    assert ended[curator_id] is not None and ended[made["id"]] is None
    assert_refused(live, revoked, ident)

    # A key revoked in the database directly (not through revoke_key) ends its sessions too.
    with replay(live, other) as browser:
        assert browser.get("/review").status_code == 200
    execute(
        live.settings,
        update(ApiKey).where(ApiKey.id == made["id"]).values(revoked_at=utcnow()),
    )
    assert_refused(live, other, ident)


def _token_pair(case: str, token: str) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """(cookies, form fields, headers) of a sign-in POST that must be refused."""
    other = "x" * 43
    return {
        "no token at all": ({}, {}, {}),
        "no cookie": ({}, {"csrf": token}, {}),
        "no field": ({CSRF: token}, {}, {}),
        "different": ({CSRF: token}, {"csrf": other}, {}),
        "non-ascii": ({CSRF: token}, {"csrf": "é" * 43}, {}),
        "cross-site": ({CSRF: token}, {"csrf": token}, {"Sec-Fetch-Site": "cross-site"}),
    }[case]


CASES = ["no token at all", "no cookie", "no field", "different", "non-ascii", "cross-site"]


@pytest.fixture
def bare(sqlite_settings: Settings) -> Iterator[LiveServer]:
    """The service over loopback with no model: enough to sign in."""
    yield from run_server(sqlite_settings)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_a_sign_in_without_its_form_token_is_refused(bare: LiveServer, case: str) -> None:
    with httpx.Client(base_url=bare.url, timeout=60) as page:
        token = form_token(page.get("/review/login"))
    cookies, fields, headers = _token_pair(case, token)
    with httpx.Client(base_url=bare.url, cookies=cookies, timeout=60) as forger:
        refused = forger.post(
            "/review/login", data={"key": bare.keys["curator"], **fields}, headers=headers
        )
        assert refused.status_code == 403
        assert "form token is missing or does not match" in refused.text
        assert not set_cookies(refused, SESSION) and SESSION not in forger.cookies
    assert sessions_of(bare.settings) == []
    # The page that said so carries a working form: sent from this site, it signs in.
    with httpx.Client(base_url=bare.url, timeout=60) as browser:
        retry = browser.post("/review/login", data={"key": "wrong"})
        assert retry.status_code == 403
        signed_in = browser.post(
            "/review/login", data={"key": bare.keys["curator"], "csrf": form_token(retry)}
        )
        assert signed_in.status_code == 303 and SESSION in browser.cookies


@pytest.mark.parametrize("case", ["no field", "different", "cross-site"])
def test_a_logout_without_its_form_token_is_refused(bare: LiveServer, case: str) -> None:
    with httpx.Client(base_url=bare.url, timeout=60) as browser:
        assert sign_in(browser, bare.keys["curator"]).status_code == 303
        token = browser.cookies[SESSION]
        _, fields, headers = _token_pair(case, browser.cookies[CSRF])
        refused = browser.post("/review/logout", data=fields, headers=headers)
        assert refused.status_code == 403 and "form token" in refused.text
        assert not set_cookies(refused, SESSION)
        # The refused page's own button works.
        assert browser.get("/review").status_code == 200
        out = browser.post("/review/logout", data={"csrf": form_token(refused)})
        assert out.status_code == 303
    assert [r.revoked_at is not None for r in sessions_of(bare.settings)] == [True]
    with replay(bare, token) as thief:
        assert thief.get("/review").status_code == 303
