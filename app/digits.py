"""Whole numbers read from text that clients send (headers, versions, event ids, indices).

``str.isdigit`` takes '²' and '٣', which ``int`` refuses or reads as another number, and
``int`` refuses more than 4,300 digits, leading zeros included: each was a 500 somewhere. One
rule reads them all: ASCII digits only, at most ``most_digits`` of them past the leading zeros.
"""

from __future__ import annotations

MOST_DIGITS = 18
"""Enough for any byte count or revision (an exabyte less one)."""


def whole_number(text: str | bytes, most_digits: int = MOST_DIGITS) -> int | None:
    """``text`` (surrounding whitespace aside) as a whole number, or None when it is not one:
    anything but ASCII digits, or over ``most_digits`` digits once its leading zeros are gone."""
    digits = text.strip()
    if isinstance(digits, bytes):
        digits = digits.decode("latin-1")
    if not (digits and digits.isascii() and digits.isdigit()):
        return None
    significant = digits.lstrip("0")
    if len(significant) > most_digits:
        return None
    return int(significant or "0")


def number_text(value: int, most_digits: int = MOST_DIGITS) -> str:
    """``str(value)`` for a message, or its size in words past ``most_digits`` digits: ``str``
    refuses an int of over 4,300 digits (a 500 where a message echoed a client's number), and
    an error needs no more."""
    if abs(value) < 10**most_digits:
        return str(value)
    digits = int(abs(value).bit_length() * 0.30103) + 1  # log10(2): within a digit
    return f"{'a negative' if value < 0 else 'an'} integer of about {digits:,} digits"
