"""The page for people at ``GET /``: static HTML, CSS and JavaScript from ``app/http/ui/``.

The page only calls the public API (``/models``, ``/models/{name}``, ``/explain``) from the
browser, so it needs nothing from the server beyond these files. ``CAMSERVE_UI=false`` leaves
it out (``GET /`` then answers KServe v1's liveness to everyone).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from app.cam import COLORMAPS, colormap_lut
from app.http.middleware.security_headers import page_policy
from app.http.negotiation import prefers
from app.protocols.kserve import ALIVE

UI_DIR = Path(__file__).resolve().parents[1] / "ui"
UI_ASSETS_PATH = "/ui"
#: The page has no inline script or style: only its own files run and style it.
_PAGE_HEADERS = {
    "Cache-Control": "no-cache",
    "Vary": "Accept",
    "Content-Security-Policy": page_policy(),
}

router = APIRouter(include_in_schema=False)


@router.get("/")
def get_page(request: Request) -> Response:
    """The explanation page for a browser; KServe v1's liveness answer for any other client
    (one whose Accept does not prefer text/html to JSON: curl's ``*/*``, no Accept, or
    ``text/html;q=0``)."""
    if not prefers(request, "text/html", over="application/json"):
        return JSONResponse(ALIVE, headers={"Vary": "Accept"})
    return FileResponse(UI_DIR / "index.html", headers=_PAGE_HEADERS)


@router.get("/ui/colormaps.json")
def get_colormaps() -> dict[str, list[int]]:
    """The server's colour maps as 768-entry RGB tables, so the page re-colours maps exactly."""
    return {name: list(colormap_lut(name)) for name in COLORMAPS}


def install_ui(app: FastAPI) -> None:
    """Add the page at / and its assets under /ui (the routes first: the mount takes the rest)."""
    app.include_router(router)
    app.mount(UI_ASSETS_PATH, StaticFiles(directory=UI_DIR), name="ui-assets")
