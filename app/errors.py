"""Domain errors: what went wrong, with a public message; ``app.http.errors`` maps them to HTTP.

The classes are the one table of error codes: each declares its ``code`` and HTTP
``status_code`` once, and every layer (the routes, the middleware, the raw server, the
protocols, the job store) raises or renders a class instead of typing a code. ``ERROR_CODES``
indexes them; a second class with a taken code fails at import.
"""

from __future__ import annotations

from typing import Any, ClassVar

from app.digits import number_text
from app.observability.context import current_request_id


class CamserveError(Exception):
    """Base of every error the service reports on purpose; the message is shown to clients."""

    status_code: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "code" not in cls.__dict__ or "status_code" not in cls.__dict__:
            raise TypeError(f"{cls.__name__} must declare its own code and status_code.")
        taken = ERROR_CODES.get(cls.code)
        if taken is not None and taken.__qualname__ != cls.__qualname__:  # not a module reload
            raise TypeError(f"{cls.__name__}: code {cls.code!r} is taken by {taken.__name__}.")
        ERROR_CODES[cls.code] = cls

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


ERROR_CODES: dict[str, type[CamserveError]] = {CamserveError.code: CamserveError}
"""Every error code -> the class that declares it (filled as the classes are defined)."""


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


class MalformedParameter(InvalidParameter):
    """A parameter that cannot be read at all: a name no parameter has, one value sent twice,
    a value of the wrong type, a number not written in ASCII digits or beyond its kind's range.
    The request is malformed (400); a readable value out of its bounds stays a 422."""

    status_code = 400
    code = "malformed_parameter"


class InvalidTarget(CamserveError):
    """What to explain does not fit the model's task or answer: a box index past the detections,
    a region outside the image, a mask of the wrong size, ``box`` on a classifier, a method that
    cannot explain the task."""

    status_code = 400
    code = "invalid_target"


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


class RenderUnavailable(CamserveError):
    """The process drawing a request's pictures ended before it was done (comes with
    Retry-After; the next request gets a fresh process)."""

    status_code = 503
    code = "render_unavailable"


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


class BadRequest(CamserveError):
    """The body is not what the route (or the inference protocol) allows."""

    status_code = 400
    code = "bad_request"


class InvalidRequest(CamserveError):
    """The request does not match the route's declared parameters (FastAPI's validation)."""

    status_code = 422
    code = "validation_error"


class RouteNotFound(CamserveError):
    status_code = 404
    code = "not_found"


class HttpMethodNotAllowed(CamserveError):
    status_code = 405
    code = "method_not_allowed"


class HttpError(CamserveError):
    """Any other refusal of the web framework; it is answered with the framework's status."""

    status_code = 400
    code = "http_error"


class HeaderTimeout(CamserveError):
    """The request headers did not arrive within CAMSERVE_HEADER_TIMEOUT_S."""

    status_code = 408
    code = "header_timeout"


class BodyTimeout(CamserveError):
    """The client paused its body longer than CAMSERVE_BODY_TIMEOUT_S."""

    status_code = 408
    code = "body_timeout"


class JobCancelled(CamserveError):
    """The background job was cancelled by DELETE /jobs/{id} (its error, never an answer)."""

    status_code = 409
    code = "cancelled"


class ModelBusy(CamserveError):
    """Another load or unload of the same model is running (the repository API, or a poll)."""

    status_code = 409
    code = "model_busy"


class RepositoryOff(CamserveError):
    """The repository API is disabled: CAMSERVE_ADMIN_KEY is not set."""

    status_code = 403
    code = "repository_off"


class ModelControlMode(CamserveError):
    """Loads and unloads through the API need CAMSERVE_MODEL_CONTROL=explicit."""

    status_code = 409
    code = "model_control_mode"


class ModelLoadFailed(CamserveError):
    """A load through the repository API ended with the model (or a version) failing."""

    status_code = 422
    code = "model_load_failed"


class InvalidModelName(CamserveError):
    """A model name that no folder of the store can have (too long, or with ``/`` or NUL)."""

    status_code = 400
    code = "invalid_model_name"


class JobStoreUnavailable(CamserveError):
    """The shared job store (Redis) does not answer; jobs cannot be created or read now."""

    status_code = 503
    code = "job_store_unavailable"


class ResultTooLarge(CamserveError):
    """A job's result would be larger than the job store keeps."""

    status_code = 413
    code = "result_too_large"


class OriginNotAllowed(CamserveError):
    """A browser page of an origin that ``CAMSERVE_CORS_ORIGINS`` does not list asked for work."""

    status_code = 403
    code = "origin_not_allowed"


class PreflightRefused(CamserveError):
    """A browser's CORS preflight (``OPTIONS`` with ``Access-Control-Request-Method``) asked for
    an origin, a method or headers that the service does not allow across origins."""

    status_code = 400
    code = "preflight_refused"


class HostNotAllowed(CamserveError):
    """A browser reached the service by a host name it does not answer to
    (``CAMSERVE_ALLOWED_HOSTS``: a site whose name was made to resolve here, DNS rebinding)."""

    status_code = 403
    code = "host_not_allowed"


class TooManyStreams(CamserveError):
    """Too many job event streams open, for this client or this replica."""

    status_code = 429
    code = "too_many_streams"


class HeadersTooLarge(CamserveError):
    """A request's headers are over the count or size the service reads."""

    status_code = 431
    code = "headers_too_large"


ECHO_LIMIT = 40


def clip(value: object, limit: int = ECHO_LIMIT) -> str:
    """``repr`` of client input for a message, cut to ``limit`` characters: an error names what
    it refuses without echoing a megabyte back."""
    if isinstance(value, int) and not isinstance(value, bool):
        text = number_text(value)
    else:
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
