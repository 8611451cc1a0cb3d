"""What the inference-protocol routes (KServe v1, Open Inference Protocol v2) share.

Their errors take the protocols' shape, ``{"error": "message"}``, with the status camserve's own
routes would give (400 for a body the protocol does not allow). Images come base64-encoded in
JSON, so their bodies may be a third larger than the multipart ones. The codecs themselves are
transport-neutral, in ``app.protocols``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Coroutine, Mapping
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
from app.http.admin import ADMIN_KEY_HEADER, require_admin_key
from app.http.deps import API_KEY_HEADER, get_registry, require_api_key
from app.http.errors import describe_validation
from app.http.routing import depends_on
from app.models.registry import ModelRegistry
from app.protocols.binary import HEADER, header_length
from app.protocols.oip import InferenceRequest, model_ready


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
    ready = model_ready(registry, name, None)
    return JSONResponse({"name": name, "ready": ready}, status_code=200 if ready else 503)


def json_body_limit(max_upload_bytes: int, max_images: int, overhead: int) -> int:
    """Largest protocol body: every image at the upload limit, base64-encoded, plus room for
    the JSON around them."""
    return 4 * math.ceil(max_upload_bytes / 3) * max_images + overhead


def _as_json(request: Request, parsed: Any) -> Request:
    """The request as FastAPI's handler should see it: its body ``parsed`` already, and typed
    JSON. FastAPI reads a body as JSON only under a JSON content type (0.132 and later), and
    tritonclient sends none (sync) or ``application/octet-stream`` (asyncio)."""
    scope = dict(request.scope)
    scope["headers"] = [
        *((name, value) for name, value in request.scope["headers"] if name != b"content-type"),
        (b"content-type", b"application/json"),
    ]
    typed = Request(scope, request.receive, request._send)
    typed._body = request._body
    typed._json = parsed  # Starlette's cache: FastAPI parses it no more
    return typed


class ProtocolRoute(APIRoute):
    """A route whose every refusal (API key, body, domain error) is ``{"error": "..."}``.

    Its keys (API key, admin key) are checked before a byte of its body is read. Its body is
    read as JSON whatever its Content-Type: the strict JSON check of FastAPI guards against
    cross-site form posts, which cannot send a key header, and every protocol route takes its
    key in a header only (docs/hardening.md). With ``Inference-Header-Content-Length`` the body
    is the binary tensor data extension's: that much JSON, then the tensors' bytes
    (``request.state.binary``), on the routes whose body is an ``InferenceRequest``.

    The JSON is parsed and checked against the body model on a worker thread: a body of the
    size the protocol limit allows (hundreds of MB) takes seconds to parse, which on the event
    loop would stall every other request, the probes included. Only a body that passed reaches
    FastAPI's own validation (of a body the model bounds)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        body_type = None if self.body_field is None else self.body_field.field_info.annotation
        checker = None if body_type is None else TypeAdapter(body_type)
        takes_binary = body_type is InferenceRequest
        keys = [
            check
            for check in (require_api_key, require_admin_key)
            if depends_on(self.dependant, check)
        ]

        async def handle(request: Request) -> Response:
            try:
                for check in keys:  # before the body: an anonymous body is never read
                    header = API_KEY_HEADER if check is require_api_key else ADMIN_KEY_HEADER
                    await check(request, request.headers.get(header))
                if checker is not None:
                    body = await request.body()
                    framing = _framing(request)
                    binary: bytes | memoryview = b""
                    if framing is not None:
                        if not takes_binary:
                            raise BadRequest(
                                f"This route takes no binary data; send JSON without {HEADER}."
                            )
                        length = header_length(framing, len(body))
                        # A view: the binary part (up to the body limit) is not copied.
                        body, binary = body[:length], memoryview(body)[length:]
                    if body:
                        parsed = await anyio.to_thread.run_sync(_parse_body, checker, body)
                        request = _as_json(request, parsed)
                    request.state.binary = binary
                return await handler(request)
            except CamserveError as error:
                return protocol_error(error.message, error.status_code, error.headers)
            except RequestValidationError as error:
                return protocol_error(describe_validation(error)[0], BadRequest.status_code)
            except StarletteHTTPException as error:
                return protocol_error(str(error.detail), error.status_code, error.headers)

        return handle


def _framing(request: Request) -> str | None:
    """The ``Inference-Header-Content-Length`` header, given at most once: with two, the first
    framed the body here, and a proxy that reads the other frames it differently."""
    values = request.headers.getlist(HEADER)
    if len(values) > 1:
        raise BadRequest(f"The {HEADER} header is given {len(values)} times; send it once.")
    return values[0] if values else None


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
    except ValueError as error:
        # JSONDecodeError, UnicodeDecodeError, and the ValueError of an integer of more than
        # 4,300 digits (Python's guard against quadratic int parsing).
        raise BadRequest(
            f"The request body is not valid JSON ({clip(str(error), 80)}); send a JSON object."
        ) from None
    except RecursionError:
        # The C parser's guard, past about sys.getrecursionlimit() levels: not a ValueError.
        raise BadRequest(
            "The request body is JSON nested too deeply (over a thousand levels); a protocol "
            "body needs fewer than ten: send a JSON object of the protocol's shape."
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
