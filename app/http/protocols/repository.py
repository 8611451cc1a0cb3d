"""The Open Inference Protocol's model-repository extension over HTTP: index, load and unload
(the codec is ``app.protocols.repository``).

Errors are ``{"error": "..."}``. Guarded by ``CAMSERVE_ADMIN_KEY`` like the native
``/models/{name}/load``.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Depends

from app.http.admin import get_control, require_admin_key
from app.http.deps import get_registry
from app.http.protocols.base import ERROR_RESPONSES, ProtocolRoute
from app.models.control import ModelControl
from app.models.registry import ModelRegistry
from app.protocols.repository import (
    IndexEntry,
    IndexRequest,
    LoadRequest,
    load_model,
    repository_index,
    unload_model,
)

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


@router.post("/index", response_model=list[IndexEntry], responses=RESPONSES)
def get_repository_index(
    body: IndexRequest | None = Body(None),
    registry: ModelRegistry = Depends(get_registry),
) -> list[IndexEntry]:
    """Every model of the store, one row per version, with its state (folders not loaded yet:
    UNAVAILABLE)."""
    return repository_index(registry, ready_only=body is not None and body.ready)


@router.post("/models/{name}/load", responses=RESPONSES)
async def load_repository_model(
    name: str,
    body: LoadRequest | None = Body(None),
    control: ModelControl = Depends(get_control),
) -> dict[str, Any]:
    """Load (or reload and swap) the model's folder; 200 once it serves (a `config` is
    refused: the folder's model.toml is the configuration)."""
    await load_model(control, name, body.parameters if body else None)
    return {}


@router.post("/models/{name}/unload", responses=RESPONSES)
async def unload_repository_model(
    name: str,
    body: LoadRequest | None = Body(None),
    control: ModelControl = Depends(get_control),
) -> dict[str, Any]:
    """Stop serving the model; running requests finish on it."""
    await unload_model(control, name, body.parameters if body else None)
    return {}
