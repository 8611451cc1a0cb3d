"""Request-scoped dependencies: app state, the API key check and upload reading."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Coroutine
from typing import Any, TypeVar

from fastapi import Depends, Request, UploadFile
from fastapi.security import APIKeyHeader

from app.errors import Unauthorized
from app.http.cutoff import guarded
from app.models.registry import ModelRegistry
from app.pipeline.decoding import Upload
from app.pipeline.explainer import Explainer
from app.protocols import uploads
from app.settings import Settings

API_KEY_HEADER = "X-API-Key"
_api_key_header = APIKeyHeader(
    name=API_KEY_HEADER, auto_error=False, description="required when CAMSERVE_API_KEY is set"
)
_CHUNK = 1024 * 1024
T = TypeVar("T")


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_registry(request: Request) -> ModelRegistry:
    return request.app.state.registry


def get_explainer(request: Request) -> Explainer:
    return request.app.state.explainer


def api_key_matches(sent: bytes | None, expected: str) -> bool:
    """The one comparison of a sent X-API-Key with the configured key, for the gate and the
    routes alike: the header's raw bytes against the key's UTF-8 bytes, in constant time."""
    return sent is not None and hmac.compare_digest(sent, expected.encode("utf-8"))


async def require_api_key(request: Request, api_key: str | None = Depends(_api_key_header)) -> None:
    """Reject the request unless it carries the configured key (no-op when none is set)."""
    expected = get_settings(request).api_key
    if expected is None:
        return
    # Starlette decodes header values as latin-1: encoding them back gives the bytes sent.
    sent = None if api_key is None else api_key.encode("latin-1")
    if not api_key_matches(sent, expected.get_secret_value()):
        raise Unauthorized(
            "Missing or wrong API key; send it in the X-API-Key header.",
            headers={"WWW-Authenticate": "ApiKey"},
        )


def client_identity(request: Request) -> str:
    """Who sent the request, for per-client caps: a digest of its API key when the service
    requires one, else its address (a key nobody checks would let a client be anyone)."""
    key = request.headers.get("x-api-key")
    if key and get_settings(request).api_key is not None:
        return "key:" + hashlib.sha256(key.encode()).hexdigest()[:16]
    return "address:" + (request.client.host if request.client else "unknown")


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
    request: Request, work: Coroutine[Any, Any, T], timeout_s: float | None = None
) -> T:
    """Run a synchronous request's work under its deadline (CAMSERVE_REQUEST_TIMEOUT_S, or the
    shorter ``timeout_s`` the request asked for), its client's presence and the shutdown's grace
    period (``app.http.cutoff``)."""
    server = get_settings(request).request_timeout_s
    asked = timeout_s is not None and (server is None or timeout_s < server)
    return await guarded(
        request,
        work,
        timeout_s=timeout_s if asked else server,
        lifecycle=request.app.state.lifecycle,
        timeout_source="the request's timeout parameter" if asked else "CAMSERVE_REQUEST_TIMEOUT_S",
    )
