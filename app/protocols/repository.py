"""The Open Inference Protocol's model-repository extension: the index's rows, what a load or
unload request may carry, the admin key that guards them, and the load and unload themselves.
The shapes are the extension's, as Triton and KServe answer them; HTTP (``/v2/repository``) and
gRPC (the Repository* RPCs) are thin adapters over these functions."""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, SecretStr

from app.errors import BadRequest, ModelLoadFailed, RepositoryOff, Unauthorized, clip
from app.models.control import ModelControl
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
    try:
        folders = model_folders(registry.store)
    except OSError:  # the store cannot be listed now: the models known still are
        folders = []
    rows += [
        IndexEntry(name=folder.name, state="UNAVAILABLE", reason="not loaded")
        for folder in folders
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


def require_admin_key(expected: SecretStr | None, sent: str | bytes | None, where: str) -> None:
    """Refuse a repository call unless ``CAMSERVE_ADMIN_KEY`` is set (RepositoryOff, 403) and
    ``sent`` is it (Unauthorized, 401). ``where`` says how the transport carries the key (the
    X-Admin-Key header, the call's metadata), for the messages."""
    if expected is None:
        raise RepositoryOff(
            "The repository API (load, unload, index) is off. Set CAMSERVE_ADMIN_KEY to a "
            f"secret to turn it on, and send that secret in {where}."
        )
    if isinstance(sent, str):
        sent = sent.encode()
    if sent is None or not secrets.compare_digest(sent, expected.get_secret_value().encode()):
        raise Unauthorized(
            f"Missing or wrong admin key; send CAMSERVE_ADMIN_KEY in {where}.",
            headers={"WWW-Authenticate": "ApiKey"},
        )


def loaded_or_refused(entry: ModelEntry) -> ModelEntry:
    """``entry`` when the load left every version serving; else ModelLoadFailed with why."""
    why = entry.reload_error or entry.error
    if why is None and entry.status != "ready":
        why = f"the model is {entry.status}"
    if why is not None:
        serving = entry.serving
        raise ModelLoadFailed(
            f"Loading model {entry.name!r} failed: {why}",
            details={
                "status": entry.status,
                "serving_version": serving.number if serving else None,
            },
        )
    return entry


async def load_model(
    control: ModelControl, name: str, parameters: Mapping[str, Any] | None
) -> ModelEntry:
    """The extension's load: refuse what it cannot apply, (re)load, and answer only once the
    model serves (ModelLoadFailed with why otherwise)."""
    check_parameters(parameters, "load")
    return loaded_or_refused(await control.load(name))


async def unload_model(
    control: ModelControl, name: str, parameters: Mapping[str, Any] | None
) -> None:
    """The extension's unload: stop serving ``name``; running requests finish on it."""
    check_parameters(parameters, "unload")
    await control.unload(name)
