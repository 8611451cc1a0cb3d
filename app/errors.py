"""Domain errors and the single place that turns every error into a JSON response."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Send

from app.context import REQUEST_ID_HEADER, current_request_id

logger = logging.getLogger(__name__)


class CamserveError(Exception):
    """Base of every error the service reports on purpose; the message is shown to clients."""

    status_code = 500
    code = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        self.headers = headers


class ModelNotFound(CamserveError):
    status_code = 404
    code = "model_not_found"


class ModelUnavailable(CamserveError):
    """The model exists but is still loading or failed to load."""

    status_code = 503
    code = "model_unavailable"


class InvalidImage(CamserveError):
    """The upload is empty, truncated or otherwise undecodable."""

    status_code = 422
    code = "invalid_image"


class UnsupportedMediaType(CamserveError):
    status_code = 415
    code = "unsupported_media_type"


class ImageTooLarge(CamserveError):
    """The image decodes to more pixels than allowed (decompression bombs included)."""

    status_code = 413
    code = "image_too_large"


class NotAcceptable(CamserveError):
    """The Accept header asks for something this request cannot produce."""

    status_code = 406
    code = "not_acceptable"


class PayloadTooLarge(CamserveError):
    status_code = 413
    code = "payload_too_large"


class UnsupportedMethod(CamserveError):
    status_code = 422
    code = "unsupported_method"


class MethodNotApplicable(CamserveError):
    status_code = 422
    code = "method_not_applicable"


class InvalidParameter(CamserveError):
    status_code = 422
    code = "invalid_parameter"


class OverBudget(CamserveError):
    """The request would run more masked forwards than one request may."""

    status_code = 422
    code = "over_budget"


class Unauthorized(CamserveError):
    status_code = 401
    code = "unauthorized"


class Overloaded(CamserveError):
    status_code = 503
    code = "overloaded"


class NotReady(CamserveError):
    status_code = 503
    code = "not_ready"


class RequestTimeout(CamserveError):
    """A synchronous request ran past CAMSERVE_REQUEST_TIMEOUT_S; its work was stopped."""

    status_code = 504
    code = "timeout"


class ShuttingDown(CamserveError):
    """The service is draining after SIGTERM: new work is refused, late work is cut."""

    status_code = 503
    code = "shutting_down"


class OutOfMemory(CamserveError):
    """The accelerator ran out of memory for this request; its cache was freed."""

    status_code = 503
    code = "out_of_memory"


class ModelError(CamserveError):
    """The model itself misbehaved (non-finite logits, say): not the client's fault."""

    status_code = 500
    code = "model_error"


class JobNotFound(CamserveError):
    status_code = 404
    code = "job_not_found"


class TooManyJobs(CamserveError):
    status_code = 503
    code = "too_many_jobs"


class ClientClosedRequest(CamserveError):
    """The client went away before its answer was ready; nobody reads this answer."""

    status_code = 499
    code = "client_closed_request"


ECHO_LIMIT = 40


def clip(value: object, limit: int = ECHO_LIMIT) -> str:
    """``repr`` of client input for a message, cut to ``limit`` characters: an error names what
    it refuses without echoing a megabyte back."""
    text = value if isinstance(value, str) else str(value)
    if len(text) > limit:
        return repr(text[:limit]) + f"... ({len(text)} characters)"
    return repr(text)


def error_body(code: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    """The one JSON error shape: ``{"error": {"code": ..., "message": ...}}``; ``details`` also
    carries the request's id during a request."""
    error: dict[str, Any] = {"code": code, "message": message}
    request_id = current_request_id()
    if request_id is not None:
        details = {**(details or {}), "request_id": request_id}
    if details:
        error["details"] = details
    return {"error": error}


async def send_refusal(
    send: Send,
    status: int,
    code: str,
    message: str,
    *,
    protocol: bool = False,
    headers: Sequence[tuple[bytes, bytes]] = (),
) -> None:
    """Answer from ASGI middleware, before (or instead of) the app: the error in our shape, or in
    the inference protocols' (``{"error": message}``). The request body was not read through, so
    the connection is closed after the answer."""
    shaped = {"error": message} if protocol else error_body(code, message)
    body = json.dumps(shaped).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "too_many_requests",
}


def _describe_validation(exc: RequestValidationError) -> tuple[str, list[dict[str, Any]]]:
    problems = []
    for item in exc.errors():
        loc = [str(part) for part in item.get("loc", ()) if part not in ("body", "query", "path")]
        where = ".".join(loc) or "request"
        message = item.get("msg", "invalid")
        if item.get("type") == "missing":
            message = "is required" if where != "file" else "is required: attach an image file"
        problems.append({"field": where, "problem": message})
    text = "; ".join(f"{p['field']}: {p['problem']}" for p in problems)
    return f"Invalid request: {text}. See /docs for the accepted parameters.", problems


def install_error_handlers(app: FastAPI) -> None:
    """Render domain errors, validation errors, HTTP errors and crashes in one shape."""

    @app.exception_handler(CamserveError)
    async def _domain(request: Request, exc: CamserveError) -> JSONResponse:
        if exc.status_code >= 500 and not isinstance(exc, Overloaded | NotReady | ShuttingDown):
            logger.warning("%s %s: %s", request.method, request.url.path, exc.message)
        elif isinstance(exc, ClientClosedRequest):
            logger.info("%s %s: %s", request.method, request.url.path, exc.message)
        return JSONResponse(
            error_body(exc.code, exc.message, exc.details),
            status_code=exc.status_code,
            headers=exc.headers,
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, problems = _describe_validation(exc)
        return JSONResponse(
            error_body("validation_error", message, {"problems": problems}), status_code=422
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        message = str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"No route {request.url.path}; see /docs for the API."
        elif exc.status_code == 400 and "parsing the body" in message:
            message = "The request body could not be parsed; send multipart/form-data."
        return JSONResponse(
            error_body(code, message), status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(
            error_body("internal_error", "Internal server error; the details are in the log."),
            status_code=500,
            # Rendered outside the access middleware, which tags every other answer.
            headers={REQUEST_ID_HEADER: request_id}
            if (request_id := current_request_id())
            else None,
        )
