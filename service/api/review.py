"""The review page: server-rendered, no front-end build. A curator signs in with an API key
(kept in an HttpOnly cookie) and decides with buttons or keyboard shortcuts."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Form, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from sqlalchemy import select
from sqlalchemy.orm import selectinload

from service.api.deps import COOKIE, SessionDep, SettingsDep, principal_for
from service.api.params import StatusFilter
from service.auth import authenticate
from service.curation import decision_history
from service.db import Identification
from service.limits import MAX_ROW_ID
from service.settings import Settings

router = APIRouter(tags=["review"], include_in_schema=False)
templates = Jinja2Templates(directory=Path(__file__).parent.parent / "templates")


def _page(request: Request, name: str, context: dict[str, object], status: int = 200) -> Response:
    """A page with the headers that keep it from being framed, sniffed or leaking its URL; its
    inline script and style run only with this response's nonce."""
    nonce = secrets.token_urlsafe(16)
    response = templates.TemplateResponse(
        request, name, {**context, "nonce": nonce}, status_code=status
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
    return response


def secure_cookie(request: Request, settings: Settings) -> bool:
    """Whether the key cookie is Secure: over HTTPS (uvicorn takes the scheme from a trusted
    proxy's X-Forwarded-Proto), or always/never as the setting says."""
    if settings.secure_cookie == "auto":
        return request.url.scheme == "https"
    return settings.secure_cookie == "always"


@router.get("/review/login", response_class=HTMLResponse)
def login_page(request: Request) -> Response:
    return _page(request, "login.html", {"error": None})


@router.post("/review/login", response_class=HTMLResponse)
def login(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    key: Annotated[str, Form(max_length=200)] = "",
) -> Response:
    principal = authenticate(session, key.strip()) if key.strip() else None
    if principal is None or not principal.can("curator"):
        error = (
            "That key is unknown or revoked."
            if principal is None
            else f"The key of {principal.name!r} has the {principal.role} role; reviewing needs "
            "the curator role."
        )
        return _page(
            request, "login.html", {"error": error}, status=401 if principal is None else 403
        )
    response = RedirectResponse("/review", status_code=303)
    response.set_cookie(
        COOKIE,
        key.strip(),
        httponly=True,
        samesite="strict",
        secure=secure_cookie(request, settings),
    )
    return response


@router.get("/review/logout")
def logout() -> Response:
    response = RedirectResponse("/review/login", status_code=303)
    response.delete_cookie(COOKIE)
    return response


@router.get("/review", response_class=HTMLResponse)
def review(
    request: Request,
    session: SessionDep,
    identification_id: Annotated[int | None, Query(ge=1, le=MAX_ROW_ID)] = None,
    status: StatusFilter = "pending",
) -> Response:
    try:
        curator = principal_for(request, "curator")
    except HTTPException as e:
        if e.status_code == 401:
            return RedirectResponse("/review/login", status_code=303)
        raise
    where = [Identification.status == status] if status else []
    queue = list(
        session.scalars(
            select(Identification)
            .where(*where)
            .options(selectinload(Identification.candidates))
            .order_by(Identification.id)
            .limit(200)
        )
    )
    ident = None
    if identification_id is not None:
        ident = session.scalar(
            select(Identification)
            .where(Identification.id == identification_id)
            .options(selectinload(Identification.candidates), selectinload(Identification.model))
        )
        if ident is None:
            raise HTTPException(404, f"identification {identification_id} does not exist")
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
