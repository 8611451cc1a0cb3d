"""API docs (Swagger UI and ReDoc) whose scripts and styles the app serves itself.

FastAPI's own pages load them from a CDN, so without internet ``/docs`` is blank. The assets
come from the ``fastapi-offline`` package (Swagger UI's bundle and CSS, ReDoc's standalone
script), mounted under ``/static/docs``; nothing is copied into this repository.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from app.http.middleware.security_headers import page_policy

ASSETS_PATH = "/static/docs"
ASSETS_DIR = Path(str(files("fastapi_offline") / "static"))

router = APIRouter(include_in_schema=False)


def _asset(request: Request, name: str) -> str:
    return f"{request.scope.get('root_path', '')}{ASSETS_PATH}/{name}"


def _openapi_url(request: Request) -> str:
    return f"{request.scope.get('root_path', '')}{request.app.openapi_url}"


@router.get("/docs")
def get_swagger_ui(request: Request) -> HTMLResponse:
    """Swagger UI, served with local assets."""
    page = get_swagger_ui_html(
        openapi_url=_openapi_url(request),
        title=f"{request.app.title} - API docs",
        swagger_js_url=_asset(request, "swagger-ui-bundle.js"),
        swagger_css_url=_asset(request, "swagger-ui.css"),
        swagger_favicon_url=_asset(request, "favicon.png"),
    )
    return _with_policy(page)


@router.get("/redoc")
def get_redoc(request: Request) -> HTMLResponse:
    """ReDoc, served with local assets and no web fonts."""
    page = get_redoc_html(
        openapi_url=_openapi_url(request),
        title=f"{request.app.title} - ReDoc",
        redoc_js_url=_asset(request, "redoc.standalone.js"),
        redoc_favicon_url=_asset(request, "favicon.png"),
        with_google_fonts=False,
    )
    # ReDoc's bundle still fetches its attribution logo from cdn.redoc.ly (Redocly/redoc#2108;
    # it hides the image when the load fails). The policy refuses pictures from elsewhere up
    # front, so the page asks nothing of the outside world, online or not. Its styled-components
    # add <style> elements.
    return _with_policy(page, inline_styles=True)


def _with_policy(page: HTMLResponse, *, inline_styles: bool = False) -> HTMLResponse:
    """``page`` with the service's page policy: FastAPI's inline script that starts Swagger UI
    runs by its hash, no other inline script does, and nothing comes from another origin."""
    html = bytes(page.body).decode()
    page.headers["Content-Security-Policy"] = page_policy(html, inline_styles=inline_styles)
    return page


def install_docs(app: FastAPI) -> None:
    """Add /docs, /redoc and their assets; the app must be built with docs_url=None."""
    app.mount(ASSETS_PATH, StaticFiles(directory=ASSETS_DIR), name="docs-assets")
    app.include_router(router)
