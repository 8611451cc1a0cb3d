"""The domain errors are the one table of error codes: one class per code, each with its status."""

from __future__ import annotations

import pytest

import app.errors as errors
from app.errors import ERROR_CODES, CamserveError


def all_classes(base: type[CamserveError] = CamserveError) -> list[type[CamserveError]]:
    found = [base]
    for sub in base.__subclasses__():
        found += all_classes(sub)
    return found


def test_every_error_class_is_in_the_table_under_its_own_code() -> None:
    classes = [cls for cls in all_classes() if not cls.__module__.startswith("tests.")]
    assert len({cls.code for cls in classes}) == len(classes)  # every code unique
    for cls in classes:
        assert ERROR_CODES[cls.code] is cls, cls
        assert 400 <= cls.status_code <= 599, cls


def test_the_table_holds_the_codes_the_middleware_and_server_send() -> None:
    assert ERROR_CODES["unauthorized"].status_code == 401
    assert ERROR_CODES["shutting_down"].status_code == 503
    assert ERROR_CODES["payload_too_large"].status_code == 413
    assert ERROR_CODES["header_timeout"].status_code == 408
    assert ERROR_CODES["body_timeout"].status_code == 408
    assert ERROR_CODES["bad_request"].status_code == 400
    assert ERROR_CODES["validation_error"].status_code == 422


def test_a_second_class_with_a_taken_code_is_refused() -> None:
    with pytest.raises(TypeError, match="'unauthorized' is taken by Unauthorized"):

        class Forbidden(CamserveError):
            status_code = 401
            code = "unauthorized"

    assert ERROR_CODES["unauthorized"] is errors.Unauthorized


def test_a_class_must_declare_its_own_code_and_status() -> None:
    with pytest.raises(TypeError, match="must declare its own code and status_code"):

        class Vague(errors.InvalidParameter):
            pass
