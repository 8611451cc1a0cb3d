"""The one rule for whole numbers in clients' text."""

from __future__ import annotations

import pytest

from app.digits import MOST_DIGITS, number_text, whole_number
from app.errors import clip


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("0", 0),
        (" 42 ", 42),
        (b"17", 17),
        ("0" * 5000 + "12", 12),  # int() refuses 5,002 digits, zeros included
        ("0" * 5000, 0),
        ("9" * MOST_DIGITS, int("9" * MOST_DIGITS)),
    ],
)
def test_whole_numbers_are_read(text: str | bytes, number: int) -> None:
    assert whole_number(text) == number


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "²",
        "١٢",
        "٣",
        b"\xb2",
        "1" + "0" * MOST_DIGITS,
        "9" * 5000,
        "1e3",
        "0x10",
        "+5",
        "-1",
        "1.0",
        "1 2",
    ],
)
def test_anything_else_is_none(text: str | bytes) -> None:
    assert whole_number(text) is None


def test_the_digits_allowed_are_the_callers() -> None:
    assert whole_number("123456789", most_digits=9) == 123456789
    assert whole_number("1234567890", most_digits=9) is None
    assert whole_number("000000000001", most_digits=9) == 1


def test_a_number_is_shown_by_its_digits_or_its_size() -> None:
    assert number_text(12) == "12" and number_text(-(10**17)) == str(-(10**17))
    assert number_text(10**400) == "an integer of about 401 digits"
    assert number_text(-(10**5000)) == "a negative integer of about 5,001 digits"  # str() refuses


def test_clip_echoes_a_huge_number_by_its_size() -> None:
    assert clip(10**5000) == "'an integer of about 5,001 digits'"
    assert clip(7) == "'7'"
