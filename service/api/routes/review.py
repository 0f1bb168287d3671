"""The review page: server-rendered, no front-end build. A curator signs in with an API key
and decides with buttons or keyboard shortcuts.

Signing in opens a review session (service.access.auth): its random id goes in an HttpOnly,
SameSite=Strict cookie and the key stays out of the browser. Logout ends the session on the
server, so a copied cookie dies with it. The sign-in and logout forms carry a double-submit
token (a cookie and a hidden field that must be equal, signed with the server's form secret),
so another site cannot sign a browser in with the attacker's key, nor out."""

from __future__ import annotations

import logging
import secrets
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from service.access.auth import (
    FORM_SECRET_KEY,
    close_review_session,
    form_token_valid,
    new_form_token,
    open_review_session,
)
from service.api.deps import (
    LEGACY_KEY_COOKIE,
    SESSION_COOKIE,
    SessionDep,
    SessionsDep,
    SettingsDep,
    get_settings,
    principal_for,
)
from service.api.params import StatusFilter
from service.catalogue.curation import decision_history
from service.catalogue.reads import recorded_identification, review_queue
from service.db.checks import MAX_ROW_ID
from service.errors import NotAuthenticated, NotFound, SignInRefused, UnknownKey
from service.settings import Settings
from service.store.objects import shared_secret

log = logging.getLogger(__name__)

router = APIRouter(tags=["review"], include_in_schema=False)

# The double-submit token of the sign-in and logout forms: a cookie only this site's pages can
# set and read, and the same value in a hidden field, signed with the server's form secret (a
# sibling subdomain can plant a cookie, but not one this server signed).
CSRF_COOKIE = "whaleid_csrf"
CSRF_REFUSED = (
    "This form is out of date or was not sent from this site's own page (its form token is "
    "missing or does not match): reload the page and try again, with cookies allowed."
)
templates = Jinja2Templates(directory=Path(__file__).parent.parent / "templates")


def _page(request: Request, name: str, context: dict[str, object], status: int = 200) -> Response:
    """A page with the headers that keep it from being framed, sniffed or leaking its URL; its
    inline script and style run only with this response's nonce."""
    nonce = secrets.token_urlsafe(16)
    csrf = _csrf_token(request)
    response = templates.TemplateResponse(
        request, name, {**context, "nonce": nonce, "csrf": csrf}, status_code=status
    )
    response.headers.update(
        {
            "Content-Security-Policy": (
                f"default-src 'self'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
                "img-src 'self'; connect-src 'self'; form-action 'self'; "
                "frame-ancestors 'none'; base-uri 'none'; object-src 'none'"
            ),
            "X-Frame-Options": "DENY",
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-store",
        }
    )
    response.set_cookie(
        CSRF_COOKIE,
        csrf,
        httponly=True,
        samesite="strict",
        secure=secure_cookie(request, get_settings(request)),
        path="/review",
    )
    _forget_legacy_key(request, response)
    return response


def secure_cookie(request: Request, settings: Settings) -> bool:
    """Whether the page's cookies are Secure: over HTTPS (uvicorn takes the scheme from a
    trusted proxy's X-Forwarded-Proto), or always/never as the setting says."""
    if settings.secure_cookie == "auto":
        return request.url.scheme == "https"
    return settings.secure_cookie == "always"


def _form_secret(request: Request) -> bytes:
    """WHALEID_FORM_SECRET, else the one generated once into the object store."""
    settings = get_settings(request)
    configured = settings.form_secret.get_secret_value()
    return configured.encode() if configured else shared_secret(settings, FORM_SECRET_KEY)


def _csrf_token(request: Request) -> str:
    """The browser's form token: the one its cookie holds, if this server signed it and it
    stays valid another hour (so pages open in several tabs all work), else a new one."""
    held = request.cookies.get(CSRF_COOKIE, "")
    secret = _form_secret(request)
    return held if form_token_valid(secret, held, for_seconds=3600) else new_form_token(secret)


def _forged(request: Request, form_token: str) -> bool:
    """Whether a form POST may have come from another site: the browser says it did
    (Sec-Fetch-Site; a sibling subdomain counts, as it could plant the cookie), the form's
    token is not the cookie's (another site cannot read this site's cookie), or the cookie is not
    one this server signed (a sibling subdomain can set a cookie, without Sec-Fetch-Site too)."""
    if request.headers.get("sec-fetch-site", "") in ("cross-site", "same-site"):
        return True
    cookie = request.cookies.get(CSRF_COOKIE, "")
    # Compared as bytes: compare_digest refuses non-ASCII text, which a form may hold.
    if not (cookie and secrets.compare_digest(cookie.encode(), form_token.encode())):
        return True
    return not form_token_valid(_form_secret(request), cookie)  # planted, or expired


def _forget_legacy_key(request: Request, response: Response) -> None:
    """Clear the cookie in which the page used to keep the raw key, where a browser still has it."""
    if LEGACY_KEY_COOKIE in request.cookies:
        response.delete_cookie(LEGACY_KEY_COOKIE)


def _end_session_cookie(request: Request, response: Response, settings: Settings) -> None:
    response.delete_cookie(
        SESSION_COOKIE, httponly=True, samesite="strict", secure=secure_cookie(request, settings)
    )


@router.get("/review/login", response_class=HTMLResponse)
def login_page(request: Request) -> Response:
    return _page(request, "login.html", {"error": None})


@router.post("/review/login", response_class=HTMLResponse)
def login(
    request: Request,
    sessions: SessionsDep,
    settings: SettingsDep,
    key: Annotated[str, Form(max_length=200)] = "",
    csrf: Annotated[str, Form(max_length=100)] = "",
) -> Response:
    """Check the form's token, then the key; a curator's key opens a review session."""
    if _forged(request, csrf):
        log.warning("review sign-in refused: the form token is missing or wrong (CSRF)")
        return _page(request, "login.html", {"error": CSRF_REFUSED}, status=403)
    hours = settings.review_session_hours
    try:
        principal, token = open_review_session(
            sessions, key.strip(), hours, replacing=request.cookies.get(SESSION_COOKIE)
        )
    except SignInRefused as e:
        status = 401 if isinstance(e, UnknownKey) else 403
        return _page(request, "login.html", {"error": str(e)}, status=status)
    log.info(
        "review session opened for %r (key %s), for %g h", principal.name, principal.key_id, hours
    )
    response = RedirectResponse("/review", status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=max(1, round(hours * 3600)),
        httponly=True,
        samesite="strict",
        secure=secure_cookie(request, settings),
    )
    _forget_legacy_key(request, response)
    return response


@router.get("/review/logout", response_class=HTMLResponse)
def logout_page(request: Request) -> Response:
    """A sign-out button: a GET changes nothing (a link or prefetch cannot sign anyone out)."""
    return _page(request, "logout.html", {"error": None})


@router.post("/review/logout", response_class=HTMLResponse)
def logout(
    request: Request,
    sessions: SessionsDep,
    settings: SettingsDep,
    csrf: Annotated[str, Form(max_length=100)] = "",
) -> Response:
    """End the browser's review session on the server, then clear its cookie."""
    if _forged(request, csrf):
        log.warning("review logout refused: the form token is missing or wrong (CSRF)")
        return _page(request, "logout.html", {"error": CSRF_REFUSED}, status=403)
    token = request.cookies.get(SESSION_COOKIE)
    if token and close_review_session(sessions, token):
        log.info("review session closed at logout")
    response = RedirectResponse("/review/login", status_code=303)
    _end_session_cookie(request, response, settings)
    _forget_legacy_key(request, response)
    return response


@router.get("/review", response_class=HTMLResponse)
def review(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    identification_id: Annotated[int | None, Query(ge=1, le=MAX_ROW_ID)] = None,
    status: StatusFilter = "pending",
) -> Response:
    try:
        curator = principal_for(request, "curator")
    except NotAuthenticated:
        response = RedirectResponse("/review/login", status_code=303)
        if SESSION_COOKIE in request.cookies:  # a session that has ended
            _end_session_cookie(request, response, settings)
        return response
    queue = review_queue(session, status)
    ident = None
    if identification_id is not None:
        ident = recorded_identification(session, identification_id)
        if ident is None:
            raise NotFound(f"identification {identification_id} does not exist")
    elif queue:
        ident = queue[0]
    ids = [i.id for i in queue]
    suffix = f"&status={status}" if status else ""
    position = ids.index(ident.id) if ident is not None and ident.id in ids else None
    following = [i for i in ids if ident is None or i != ident.id]
    next_id = ids[position + 1] if position is not None and position + 1 < len(ids) else None
    if next_id is None and position is None and following:
        next_id = following[0]
    prev_id = ids[position - 1] if position else None
    return _page(
        request,
        "review.html",
        {
            "ident": ident,
            "queue": queue,
            "status": status,
            "curator": curator.name,
            "history": decision_history(session, ident.id) if ident else [],
            "next_url": f"/review?identification_id={next_id}{suffix}" if next_id else "/review",
            "prev_url": f"/review?identification_id={prev_id}{suffix}" if prev_id else None,
        },
    )
