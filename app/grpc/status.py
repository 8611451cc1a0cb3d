"""camserve's errors as gRPC status codes: one mapping from the one error table.

Each error class declares its HTTP status (``app.errors``); the code a gRPC client reads follows
from it, so a new error class needs no second entry here. The message (the problem and its fix)
becomes the status details, the same text HTTP answers; a refusal's ``Retry-After`` (a busy
queue, a crashed drawing process) becomes the trailing metadata ``retry-after``.
"""

from __future__ import annotations

import grpc

from app.errors import CamserveError, OverBudget

BY_STATUS: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    # The repository API off (no CAMSERVE_ADMIN_KEY): the caller may be known, the act is not
    # allowed here.
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    405: grpc.StatusCode.UNIMPLEMENTED,
    406: grpc.StatusCode.INVALID_ARGUMENT,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    409: grpc.StatusCode.FAILED_PRECONDITION,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    # Too many or too large headers; over gRPC, metadata past grpc's own limit.
    431: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    500: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
"""HTTP status of an error -> the gRPC code of the same meaning."""

BY_CLASS: dict[type[CamserveError], grpc.StatusCode] = {
    # A 422 for HTTP (the request is well formed), but what it lacks is a resource: the
    # request's share of masked forwards.
    OverBudget: grpc.StatusCode.RESOURCE_EXHAUSTED,
}
"""The classes whose gRPC meaning is not their HTTP status's."""


def status_of(error: CamserveError) -> grpc.StatusCode:
    """The gRPC code for ``error`` (INTERNAL for a status the table does not know)."""
    for cls in type(error).__mro__:
        if cls in BY_CLASS:
            return BY_CLASS[cls]
    return BY_STATUS.get(error.status_code, grpc.StatusCode.INTERNAL)


RETRY_AFTER = "retry-after"
"""HTTP's Retry-After header as trailing metadata (gRPC's names are lowercase)."""


def trailing_metadata(error: CamserveError) -> tuple[tuple[str, str], ...]:
    """What a refusal's headers tell a client to do next, as trailing metadata: its
    ``Retry-After`` (the seconds to wait), which its message asks the client to read."""
    for name, value in (error.headers or {}).items():
        if name.lower() == RETRY_AFTER:
            return ((RETRY_AFTER, value),)
    return ()
