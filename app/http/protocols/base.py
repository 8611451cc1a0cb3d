"""What the inference-protocol routes (KServe v1, Open Inference Protocol v2) share.

Their errors take the protocols' shape, ``{"error": "message"}``, with the status camserve's own
routes would give (400 for a body the protocol does not allow). Images come base64-encoded in
JSON, so their bodies may be a third larger than the multipart ones.
"""

from __future__ import annotations

import base64
import binascii
import email.message
import json
import math
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any

import anyio.to_thread
from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import TypeAdapter, ValidationError
from starlette.convertors import Convertor, register_url_convertor
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.errors import BadRequest, CamserveError, clip
from app.http import uploads
from app.http.deps import get_registry
from app.http.errors import describe_validation
from app.models.registry import ModelRegistry
from app.pipeline.decoding import Upload
from app.settings import Settings

PREFIXES = ("/v1/", "/v2/")
"""Paths of the protocol routes (the body limit and the error shape follow them)."""

EXAMPLE_IMAGE_B64 = (
    "iVBORw0KGgoAAAANSUhEUgAAAAgAAAAICAIAAABLbSncAAAAFUlEQVR42mM8ISfHgA0wMeAAg1MCANDKARQfGKMRAAAAAElF"
    "TkSuQmCC"
)
"""A whole 8x8 PNG, base64: the request examples of the schema work when sent as they are."""


class ModelNameConvertor(Convertor[str]):
    """A model name in a path: no ``/`` and no ``:``, so that ``/v1/models/{name}`` does not
    swallow ``/v1/models/{name}:predict`` (a GET there is a 405, not an unknown model)."""

    regex = "[^/:]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("model", ModelNameConvertor())


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


def _is_json(content_type: str | None) -> bool:
    if not content_type:
        return True  # FastAPI reads a body without a content type as JSON
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json")
    )


class ProtocolRoute(APIRoute):
    """A route whose every refusal (API key, body, domain error) is ``{"error": "..."}``.

    Its JSON body is parsed and checked against the body model on a worker thread: a body of
    the size the protocol limit allows (hundreds of MB) takes seconds to parse, which on the
    event loop would stall every other request, the probes included. Only a body that passed
    reaches FastAPI's own parse (cached) and validation (of a body the model bounds)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        body_type = None if self.body_field is None else self.body_field.field_info.annotation
        checker = None if body_type is None else TypeAdapter(body_type)

        async def handle(request: Request) -> Response:
            try:
                if checker is not None and _is_json(request.headers.get("content-type")):
                    body = await request.body()
                    if body:
                        parsed = await anyio.to_thread.run_sync(_parse_body, checker, body)
                        request._json = parsed  # Starlette's cache: FastAPI parses it no more
                return await handler(request)
            except CamserveError as error:
                return protocol_error(error.message, error.status_code, error.headers)
            except RequestValidationError as error:
                return protocol_error(describe_validation(error)[0], BadRequest.status_code)
            except StarletteHTTPException as error:
                return protocol_error(str(error.detail), error.status_code, error.headers)

        return handle


MAX_JSON_ITEMS = 65_536
"""Most commas (array elements and object members) in a protocol body: a real one has a few
dozen; a hostile one of tiny items (``[-1, -1, ...]``) would take seconds to parse."""
_SCAN_SLICE = 1 << 20


def _count_items(body: bytes) -> int:
    # Slice by slice: each count is one C call holding the GIL for well under a millisecond,
    # and the event loop gets its turn between them (a whole-body count held it for 60 ms).
    return sum(
        body.count(b",", start, start + _SCAN_SLICE) for start in range(0, len(body), _SCAN_SLICE)
    )


def _parse_body(checker: TypeAdapter[Any], body: bytes) -> Any:
    """JSON -> Python, refused unless it fits the body model (runs on a worker thread).

    json.loads and pydantic hold the GIL for the whole call, even on a worker thread: a body of
    few items parses fast (280 ms for the largest allowed, 224 MB of base64), one of millions
    would not, so the items are counted first."""
    items = _count_items(body)
    if items > MAX_JSON_ITEMS:
        raise BadRequest(
            f"The request body holds {items} JSON items, over the {MAX_JSON_ITEMS} allowed; "
            "send the images as base64 strings, one per input element."
        )
    try:
        parsed = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BadRequest(
            f"The request body is not valid JSON ({clip(str(error), 80)}); send a JSON object."
        ) from None
    try:
        checker.validate_python(parsed)
    except ValidationError as error:
        # Placed under "body", as FastAPI places the errors of the body it validates itself.
        problems = error.errors(include_url=False, include_input=False)
        raise RequestValidationError(
            [{**problem, "loc": ("body", *problem["loc"])} for problem in problems]
        ) from None
    return parsed


def decode_images(encoded: Sequence[tuple[str, str]], settings: Settings) -> list[Upload]:
    """``(name, base64 text)`` pairs -> uploads, with the limits of the multipart routes."""
    if not encoded:
        raise BadRequest("No image sent; send at least one base64-encoded image.")
    uploads.check_count(len(encoded), settings)
    decoded = []
    for name, text in encoded:
        compact = "".join(text.split())
        uploads.check_size(name, len(compact) // 4 * 3 - 2, settings)  # before decoding it
        try:
            data = base64.b64decode(compact, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest(
                f"{clip(name)} is not valid base64 (standard alphabet, with padding)."
            ) from None
        uploads.check_size(name, len(data), settings)
        decoded.append(Upload(filename=name, data=data))
    return decoded
