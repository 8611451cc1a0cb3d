"""What the inference-protocol routes (KServe v1, Open Inference Protocol v2) share.

Their errors take the protocols' shape, ``{"error": "message"}``, with the status camserve's own
routes would give (400 for a body the protocol does not allow). Images come base64-encoded in
JSON, so their bodies may be a third larger than the multipart ones.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.errors import BadRequest, CamserveError, InvalidParameter, PayloadTooLarge
from app.http.deps import get_registry
from app.http.errors import describe_validation
from app.models.registry import ModelRegistry
from app.pipeline.decoding import Upload
from app.settings import Settings

PREFIXES = ("/v1/", "/v2/")
"""Paths of the protocol routes (the body limit and the error shape follow them)."""


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"content": {"application/json": {"example": {"error": "what went wrong"}}}}
    for status in (400, 401, 404, 408, 413, 415, 422, 499, 503, 504)
}
"""OpenAPI entries for the refusals of a protocol route."""


def protocol_error(message: str, status: int, headers: Mapping[str, str] | None = None) -> Response:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def get_model_ready(name: str, registry: ModelRegistry = Depends(get_registry)) -> JSONResponse:
    """Answer 200 when the model can serve, 503 while it loads or when it failed."""
    entry = registry.entry(name)
    ready = entry.status == "ready"
    return JSONResponse({"name": entry.name, "ready": ready}, status_code=200 if ready else 503)


def json_body_limit(max_upload_bytes: int, max_images: int, overhead: int) -> int:
    """Largest protocol body: every image at the upload limit, base64-encoded, plus room for
    the JSON around them."""
    return 4 * math.ceil(max_upload_bytes / 3) * max_images + overhead


class ProtocolRoute(APIRoute):
    """A route whose every refusal (API key, body, domain error) is ``{"error": "..."}``."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except CamserveError as error:
                return protocol_error(error.message, error.status_code, error.headers)
            except RequestValidationError as error:
                return protocol_error(describe_validation(error)[0], BadRequest.status_code)
            except StarletteHTTPException as error:
                return protocol_error(str(error.detail), error.status_code, error.headers)

        return handle


def decode_images(encoded: Sequence[tuple[str, str]], settings: Settings) -> list[Upload]:
    """``(name, base64 text)`` pairs -> uploads, with the limits of the multipart routes."""
    if not encoded:
        raise BadRequest("No image sent; send at least one base64-encoded image.")
    if len(encoded) > settings.max_images:
        raise InvalidParameter(
            f"{len(encoded)} images sent but at most {settings.max_images} are accepted per "
            "request (CAMSERVE_MAX_IMAGES); split the batch."
        )
    limit = settings.max_upload_bytes
    uploads = []
    for name, text in encoded:
        compact = "".join(text.split())
        if len(compact) // 4 * 3 > limit + 2:
            raise PayloadTooLarge(
                f"{name} is over the upload limit of {limit} bytes (CAMSERVE_MAX_UPLOAD_BYTES); "
                "send a smaller image."
            )
        try:
            data = base64.b64decode(compact, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest(
                f"{name} is not valid base64 (standard alphabet, with padding)."
            ) from None
        if len(data) > limit:
            raise PayloadTooLarge(
                f"{name} is over the upload limit of {limit} bytes (CAMSERVE_MAX_UPLOAD_BYTES); "
                "send a smaller image."
            )
        uploads.append(Upload(filename=name, data=data))
    return uploads
