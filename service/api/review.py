"""The review page: server-rendered, no front-end build. A curator signs in with an API key
(kept in an HttpOnly cookie) and decides with buttons or keyboard shortcuts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from sqlalchemy import select
from sqlalchemy.orm import selectinload

from service.api.deps import COOKIE, SessionDep, principal_for
from service.auth import authenticate
from service.curation import decision_history
from service.db import Identification

router = APIRouter(tags=["review"], include_in_schema=False)
templates = Jinja2Templates(directory=Path(__file__).parent.parent / "templates")


@router.get("/review/login", response_class=HTMLResponse)
def login_page(request: Request) -> Response:
    return templates.TemplateResponse(request, "login.html", {"error": None})


@router.post("/review/login", response_class=HTMLResponse)
def login(request: Request, session: SessionDep, key: Annotated[str, Form()] = "") -> Response:
    principal = authenticate(session, key.strip()) if key.strip() else None
    if principal is None or not principal.can("curator"):
        error = (
            "That key is unknown or revoked."
            if principal is None
            else f"The key of {principal.name!r} has the {principal.role} role; reviewing needs "
            "the curator role."
        )
        return templates.TemplateResponse(
            request, "login.html", {"error": error}, status_code=401 if principal is None else 403
        )
    response = RedirectResponse("/review", status_code=303)
    response.set_cookie(COOKIE, key.strip(), httponly=True, samesite="strict")
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
    identification_id: int | None = None,
    status: str | None = "pending",
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
    return templates.TemplateResponse(
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
