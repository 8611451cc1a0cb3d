"""The Open Inference Protocol's model-repository extension: the index's rows and what a load
or unload request may carry. The shapes are the extension's, as Triton and KServe answer them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel

from app.errors import BadRequest, clip
from app.models.registry import ModelEntry, ModelRegistry
from app.models.store import model_folders

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


def repository_index(registry: ModelRegistry, ready_only: bool) -> list[IndexEntry]:
    """Every model of the store, one row per version, with its state (folders not loaded yet:
    UNAVAILABLE); only the READY rows with ``ready_only``."""
    rows = [row for entry in registry.entries.values() for row in _rows(entry)]
    listed = set(registry.entries)
    rows += [
        IndexEntry(name=folder.name, state="UNAVAILABLE", reason="not loaded")
        for folder in model_folders(registry.store)
        if folder.name not in listed
    ]
    if ready_only:
        rows = [row for row in rows if row.state == "READY"]
    return sorted(rows, key=lambda row: (row.name, int(row.version or 0)))


def check_parameters(
    parameters: Mapping[str, Any] | None, action: Literal["load", "unload"]
) -> None:
    """What a load or unload may carry: nothing a load would have to apply (a ``config``, a
    ``file:`` override, anything else is refused rather than ignored); an unload may say
    ``unload_dependents`` (camserve's models have no dependents, so it changes nothing)."""
    for name in parameters or {}:
        if action == "unload" and name == "unload_dependents":
            continue
        if name == "config":
            raise BadRequest(
                "A load takes no 'config': camserve reads each model's configuration from "
                "model.toml in its folder of the store; edit it there, then load."
            )
        if name.startswith("file:"):
            raise BadRequest(
                f"A load takes no file overrides ({clip(name)}); put the model's files in its "
                "folder of the store, then load."
            )
        raise BadRequest(
            f"{'A load' if action == 'load' else 'An unload'} takes no parameter "
            f"{clip(name)}; send it without."
        )
