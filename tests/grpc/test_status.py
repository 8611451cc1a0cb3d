"""Every camserve error has a gRPC code, derived from the one error table."""

from __future__ import annotations

import grpc
import pytest

from app.errors import (
    ERROR_CODES,
    BadRequest,
    ModelNotFound,
    OverBudget,
    Overloaded,
    PayloadTooLarge,
    RepositoryOff,
    RequestTimeout,
    ShuttingDown,
    Unauthorized,
)
from app.grpc.status import BY_STATUS, status_of, trailing_metadata


@pytest.mark.parametrize("cls", sorted(ERROR_CODES.values(), key=lambda c: c.code))
def test_every_error_status_has_a_grpc_code(cls: type) -> None:
    assert cls.status_code in BY_STATUS, f"{cls.__name__} ({cls.status_code}) has no gRPC code"


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (BadRequest("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (ModelNotFound("x"), grpc.StatusCode.NOT_FOUND),
        (Unauthorized("x"), grpc.StatusCode.UNAUTHENTICATED),
        (RepositoryOff("x"), grpc.StatusCode.PERMISSION_DENIED),
        (PayloadTooLarge("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (OverBudget("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (ShuttingDown("x"), grpc.StatusCode.UNAVAILABLE),
        (RequestTimeout("x"), grpc.StatusCode.DEADLINE_EXCEEDED),
    ],
)
def test_the_codes_clients_read(error: Exception, code: grpc.StatusCode) -> None:
    assert status_of(error) == code  # type: ignore[arg-type]


def test_retry_after_becomes_trailing_metadata() -> None:
    busy = Overloaded("busy; retry after the seconds in Retry-After.", headers={"Retry-After": "3"})
    assert trailing_metadata(busy) == (("retry-after", "3"),)
    assert trailing_metadata(Unauthorized("x", headers={"WWW-Authenticate": "ApiKey"})) == ()
    assert trailing_metadata(BadRequest("x")) == ()
