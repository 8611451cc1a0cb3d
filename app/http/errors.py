"""The single place that turns every error into a JSON response: the app's exception handlers
and the refusals that ASGI middleware sends before the app."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import Send

from app.errors import (
    BadRequest,
    CamserveError,
    ClientClosedRequest,
    HttpError,
    HttpMethodNotAllowed,
    InvalidRequest,
    NotAcceptable,
    NotReady,
    Overloaded,
    PayloadTooLarge,
    RouteNotFound,
    ShuttingDown,
    TooManyJobs,
    Unauthorized,
    UnsupportedMediaType,
    error_body,
)
from app.observability.context import REQUEST_ID_HEADER, current_request_id
from app.observability.logs import logged_field
from app.protocols.validation import describe

logger = logging.getLogger(__name__)

PREFIXES = ("/v1/", "/v2/")
"""Paths of the inference protocols (KServe v1, OIP v2): their body limit, and every refusal
under them (an unknown route, a method not allowed, a crash) in their shape."""


def _shaped(request: Request, code: str, message: str, details: Any = None) -> dict[str, Any]:
    """The error body for ``request``'s path: ``{"error": message}`` under the protocols' paths
    (tritonclient and the kserve SDK read nothing else), camserve's own shape elsewhere."""
    if (request.url.path + "/").startswith(PREFIXES):
        return {"error": message}
    return error_body(code, message, details)


def _refusal(error: CamserveError, protocol: bool) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """Body and headers of an answer sent outside the app: the error in our shape, or in the
    inference protocols' (``{"error": message}``). The request body was not read through, so the
    connection is closed after the answer."""
    shaped = (
        {"error": error.message}
        if protocol
        else error_body(error.code, error.message, error.details)
    )
    body = json.dumps(shaped).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
        *((name.lower().encode(), value.encode()) for name, value in (error.headers or {}).items()),
    ]
    return body, headers


async def send_refusal(send: Send, error: CamserveError, *, protocol: bool = False) -> None:
    """Answer ``error`` from ASGI middleware, before (or instead of) the app."""
    body, headers = _refusal(error, protocol)
    await send({"type": "http.response.start", "status": error.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def raw_refusal(error: CamserveError) -> bytes:
    """``error`` as the bytes of a whole HTTP/1.1 response, for the server's own protocol
    (a refusal before there is a request for the app)."""
    body, headers = _refusal(error, protocol=False)
    status = HTTPStatus(error.status_code)
    head = f"HTTP/1.1 {status.value} {status.phrase}\r\n".encode()
    head += b"".join(name + b": " + value + b"\r\n" for name, value in headers)
    return head + b"\r\n" + body


#: The web framework's own refusals (unknown route, unparsable body, ...) by status.
_FRAMEWORK_ERRORS: dict[int, type[CamserveError]] = {
    cls.status_code: cls
    for cls in (
        BadRequest,
        Unauthorized,
        RouteNotFound,
        HttpMethodNotAllowed,
        NotAcceptable,
        PayloadTooLarge,
        UnsupportedMediaType,
    )
}


#: What FastAPI says of a text part where a file part is declared (``curl -F 'file=<x.png'``).
_NOT_A_FILE = "Expected UploadFile"


def describe_validation(exc: RequestValidationError) -> tuple[str, list[dict[str, Any]]]:
    """FastAPI's validation errors as one message naming each field and its problem, and the
    problems as a list."""
    return describe(
        {
            **error,
            "msg": "is a text field, not a file: attach the image as a file part "
            "(curl -F file=@image.png, with @)",
        }
        if _NOT_A_FILE in str(error.get("msg", ""))
        else error
        for error in exc.errors()
    )


def _allowed_methods(request: Request) -> str:
    """Every method some route takes on this path (Starlette's 405 names only the first route's,
    so GET /jobs/{id} hid DELETE /jobs/{id})."""
    methods: set[str] = set()
    for route in _flat(request.app.router.routes):
        match, _ = route.matches(request.scope)
        if match is not Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return ", ".join(sorted(methods))


def _flat(routes: Sequence[Any]) -> Iterator[Any]:
    # FastAPI 0.16x keeps an included router as one entry (its routes on `original_router`).
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from _flat(inner.routes)
        else:
            yield route


def _logged(request: Request) -> tuple[str, str]:
    """The request's method and path as a log line names them."""
    return logged_field(request.method), logged_field(request.url.path)


def install_error_handlers(app: FastAPI) -> None:
    """Render domain errors, validation errors, HTTP errors and crashes in one shape."""

    @app.exception_handler(CamserveError)
    async def _domain(request: Request, exc: CamserveError) -> JSONResponse:
        # TooManyJobs logs its refusals itself, at a bounded rate.
        quiet = Overloaded | NotReady | ShuttingDown | TooManyJobs
        if exc.status_code >= 500 and not isinstance(exc, quiet):
            logger.warning("%s %s: %s", *_logged(request), exc.message)
        elif isinstance(exc, ClientClosedRequest):
            logger.info("%s %s: %s", *_logged(request), exc.message)
        return JSONResponse(
            _shaped(request, exc.code, exc.message, exc.details),
            status_code=exc.status_code,
            headers=exc.headers,
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, problems = describe_validation(exc)
        return JSONResponse(
            _shaped(request, InvalidRequest.code, message, {"problems": problems}),
            status_code=InvalidRequest.status_code,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _FRAMEWORK_ERRORS.get(exc.status_code, HttpError).code
        message = str(exc.detail)
        headers = exc.headers
        method, path = _logged(request)  # cut as the log cuts them: no 64 kB echoed back
        if exc.status_code == 405:
            allowed = _allowed_methods(request)
            headers = {**(headers or {}), "Allow": allowed}
            message = f"{method} is not allowed on {path}; use {allowed}."
        if exc.status_code == 404 and message == "Not Found":
            message = f"No route {path}; see /docs for the API."
        elif exc.status_code == 400 and "parsing the body" in message:
            message = "The request body could not be parsed; send multipart/form-data."
        return JSONResponse(
            _shaped(request, code, message), status_code=exc.status_code, headers=headers
        )

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", *_logged(request))
        return JSONResponse(
            _shaped(
                request, CamserveError.code, "Internal server error; the details are in the log."
            ),
            status_code=500,
            # Rendered outside the access middleware, which tags every other answer.
            headers={REQUEST_ID_HEADER: request_id}
            if (request_id := current_request_id())
            else None,
        )
