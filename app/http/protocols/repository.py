"""The Open Inference Protocol's model-repository extension: index, load and unload.

The shapes are the extension's (as Triton and KServe answer them); errors are
``{"error": "..."}``. Guarded by ``CAMSERVE_ADMIN_KEY`` like the native ``/models/{name}/load``.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Body, Depends
from pydantic import BaseModel

from app.http.admin import get_control, require_admin_key
from app.http.deps import get_registry
from app.http.protocols.base import ERROR_RESPONSES, ProtocolRoute
from app.http.routes.models import loaded_or_refused
from app.models.control import ModelControl
from app.models.registry import ModelEntry, ModelRegistry
from app.models.store import model_folders

router = APIRouter(
    prefix="/v2/repository",
    tags=["open inference protocol (v2)"],
    route_class=ProtocolRoute,
    dependencies=[Depends(require_admin_key)],
)

#: The protocol refusals, and the repository API's own: off (403), a load that races (409).
RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERROR_RESPONSES,
    **{status: ERROR_RESPONSES[400] for status in (403, 409)},
}

State = Literal["READY", "LOADING", "UNAVAILABLE"]
_STATES: dict[str, State] = {"ready": "READY", "loading": "LOADING"}


class IndexRequest(BaseModel):
    ready: bool = False
    """Only the models (versions) that can serve."""


class IndexEntry(BaseModel):
    name: str
    version: str | None = None
    state: State
    reason: str = ""


class LoadRequest(BaseModel):
    parameters: dict[str, Any] | None = None


def _rows(entry: ModelEntry) -> list[IndexEntry]:
    if entry.unloaded:
        return [IndexEntry(name=entry.name, state="UNAVAILABLE", reason="unloaded")]
    if not entry.versions:
        state = _STATES.get(entry.status, "UNAVAILABLE")
        return [IndexEntry(name=entry.name, state=state, reason=entry.error or "")]
    return [
        IndexEntry(
            name=entry.name,
            version=str(v.number),
            state=_STATES.get(v.status, "UNAVAILABLE"),
            reason=v.error or v.reload_error or "",
        )
        for v in sorted(entry.versions.values(), key=lambda v: v.number)
    ]


@router.post("/index", response_model=list[IndexEntry], responses=RESPONSES)
def get_repository_index(
    body: IndexRequest | None = Body(None),
    registry: ModelRegistry = Depends(get_registry),
) -> list[IndexEntry]:
    """Every model of the store, one row per version, with its state (folders not loaded yet:
    UNAVAILABLE)."""
    rows = [row for entry in registry.entries.values() for row in _rows(entry)]
    listed = set(registry.entries)
    try:
        folders = model_folders(registry.store)
    except OSError:  # the store cannot be listed now: the models known still are
        folders = []
    rows += [
        IndexEntry(name=folder.name, state="UNAVAILABLE", reason="not loaded")
        for folder in folders
        if folder.name not in listed
    ]
    if body is not None and body.ready:
        rows = [row for row in rows if row.state == "READY"]
    return sorted(rows, key=lambda row: (row.name, int(row.version or 0)))


@router.post("/models/{name}/load", responses=RESPONSES)
async def load_repository_model(
    name: str,
    body: LoadRequest | None = Body(None),
    control: ModelControl = Depends(get_control),
) -> dict[str, Any]:
    """Load (or reload and swap) the model's folder; 200 once it serves."""
    loaded_or_refused(await control.load(name))
    return {}


@router.post("/models/{name}/unload", responses=RESPONSES)
async def unload_repository_model(
    name: str,
    body: LoadRequest | None = Body(None),
    control: ModelControl = Depends(get_control),
) -> dict[str, Any]:
    """Stop serving the model; running requests finish on it."""
    await control.unload(name)
    return {}
