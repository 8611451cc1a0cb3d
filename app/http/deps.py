"""Request-scoped dependencies: app state, the API key check and upload reading."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, TypeVar

from fastapi import Depends, Request, UploadFile
from fastapi.security import APIKeyHeader

from app.errors import Unauthorized
from app.http.cutoff import FORM_ADVICE, guarded
from app.models.registry import ModelRegistry
from app.observability.context import identity
from app.pipeline.decoding import Upload
from app.pipeline.explainer import Explainer
from app.protocols import uploads
from app.settings import ApiKeys, Settings, api_key_matches

__all__ = ["ApiKeys", "api_key_matches"]  # the keys' rule, for the gate and the routes

API_KEY_HEADER = "X-API-Key"
_api_key_header = APIKeyHeader(
    name=API_KEY_HEADER,
    auto_error=False,
    description="required when CAMSERVE_API_KEY or CAMSERVE_API_KEYS is set",
)
_CHUNK = 1024 * 1024
T = TypeVar("T")


# The dependencies are coroutines, however trivial: FastAPI runs a plain function on a worker
# thread, and each such hop is two GIL handoffs that wait behind whatever thread holds the GIL
# (a pass, a drawing): in the hostile mix they were 8 % of the GIL's busy time.


def settings_of(request: Request) -> Settings:
    return request.app.state.settings


async def get_settings(request: Request) -> Settings:
    return settings_of(request)


async def get_registry(request: Request) -> ModelRegistry:
    return request.app.state.registry


async def get_explainer(request: Request) -> Explainer:
    return request.app.state.explainer


def get_api_keys(request: Request) -> ApiKeys:
    return request.app.state.api_keys


async def require_api_key(request: Request, api_key: str | None = Depends(_api_key_header)) -> None:
    """Reject the request unless it carries one of the configured keys (no-op when none is)."""
    keys = get_api_keys(request)
    if not keys.required:
        return
    # Starlette decodes header values as latin-1: encoding them back gives the bytes sent.
    sent = None if api_key is None else api_key.encode("latin-1")
    if keys.name_of(sent) is None:
        raise Unauthorized(
            "Missing or wrong API key; send it in the X-API-Key header.",
            headers={"WWW-Authenticate": "ApiKey"},
        )


def client_identity(request: Request) -> str:
    """Who sent the request (``app.observability.context.identity``): the name of its API key
    when the service requires one, else its address (the peer, or the end client that a trusted
    proxy names: ``CAMSERVE_FORWARDED_ALLOW_IPS``). A key nobody checks would let a client be
    anyone, so without keys a sent one is ignored."""
    keys = get_api_keys(request)
    host = request.client.host if request.client else None
    if keys.required:
        raw = request.headers.get("x-api-key")
        return identity(host, keys.name_of(None if raw is None else raw.encode("latin-1")), True)
    return identity(host)


def job_owner(request: Request) -> str | None:
    """Whose jobs this request may see: its key's identity when keys are required (a job is
    visible only to the key that made it), else None (anyone who holds the job's id)."""
    return client_identity(request) if get_api_keys(request).required else None


async def read_uploads(files: list[UploadFile], settings: Settings) -> list[Upload]:
    """Read the file parts, refusing too many files or any file over the size limit."""
    uploads.check_count(len(files), settings)
    read = []
    for number, file in enumerate(files):
        name = file.filename or f"image{number}"
        if file.size is not None:
            uploads.check_size(name, file.size, settings)
        chunks, total = [], 0
        while chunk := await file.read(_CHUNK):
            total += len(chunk)
            uploads.check_size(name, total, settings)
            chunks.append(chunk)
        read.append(Upload(filename=name, data=b"".join(chunks)))
    return read


async def within_limits(
    request: Request,
    work: Coroutine[Any, Any, T],
    timeout_s: float | None = None,
    advice: str = FORM_ADVICE,
) -> T:
    """Run a synchronous request's work under its deadline (CAMSERVE_REQUEST_TIMEOUT_S, or the
    shorter ``timeout_s`` the request asked for), its client's presence and the shutdown's grace
    period (``app.http.cutoff``)."""
    server = settings_of(request).request_timeout_s
    asked = timeout_s is not None and (server is None or timeout_s < server)
    return await guarded(
        request,
        work,
        timeout_s=timeout_s if asked else server,
        lifecycle=request.app.state.lifecycle,
        timeout_source="the request's timeout parameter" if asked else "CAMSERVE_REQUEST_TIMEOUT_S",
        advice=advice,
    )
