"""The API's documentation pages, served from files installed with the service rather than a
CDN, so they work without internet: Swagger UI at ``/docs`` (with an Authorize button for the
API key) and ReDoc at ``/redoc``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import fastapi_offline
from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS = Path(fastapi_offline.__file__).parent / "static"
ASSETS_URL = "/docs-assets"
PROBLEM = {"$ref": "#/components/schemas/Problem"}
KEY_ERRORS = {
    "401": "No API key, or an unknown or revoked one.",
    "403": "The key's role is too small for this call (the message names the role needed).",
}


def install_docs(app: FastAPI) -> None:
    """Serve ``/docs`` and ``/redoc`` from local files; build the app with ``docs_url=None``
    and ``redoc_url=None``."""
    app.mount(ASSETS_URL, StaticFiles(directory=ASSETS), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=str(app.openapi_url),
            title=f"{app.title} API",
            swagger_js_url=f"{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS_URL}/favicon.png",
            swagger_ui_parameters={"persistAuthorization": True},
        )

    @app.get("/redoc", include_in_schema=False)
    def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url=str(app.openapi_url),
            title=f"{app.title} API",
            redoc_js_url=f"{ASSETS_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{ASSETS_URL}/favicon.png",
            with_google_fonts=False,
        )

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            # FastAPI's own description of the app (it keeps it in app.openapi_schema).
            app.openapi_schema = with_key_errors(FastAPI.openapi(app))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def with_key_errors(schema: dict[str, Any]) -> dict[str, Any]:
    """Document 401 and 403 on every operation that needs a key (those declaring the bearer
    scheme), with the same problem body as the other errors."""
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            if operation.get("security"):
                responses = operation.setdefault("responses", {})
                for status, text in KEY_ERRORS.items():
                    responses.setdefault(
                        status,
                        {"description": text, "content": {"application/json": {"schema": PROBLEM}}},
                    )
    return schema
