"""Content negotiation: one rule reads Accept for every route with more than one answer form."""

from __future__ import annotations

from starlette.requests import Request

from app.http.negotiation import media_ranges, prefers


def _request(*accept: str) -> Request:
    headers = [(b"accept", value.encode("latin-1")) for value in accept]
    return Request({"type": "http", "method": "GET", "path": "/", "headers": headers})


def test_media_ranges_read_quality_and_drop_ranges_with_a_bad_one() -> None:
    assert media_ranges("Text/HTML;q=0.5, */*;level=1, image/png;q=2, a/b;q=x, ,") == [
        ("text/html", 0.5),
        ("*/*", 1.0),
    ]


def test_the_higher_quality_then_the_named_type_then_the_first_listed_wins() -> None:
    cases = {
        ("image/png",): True,
        ("image/png;q=0.4, application/json;q=0.5",): False,
        ("image/*, */*",): True,  # image/* names png's type, */* names none
        ("*/*",): False,  # a tie: the other form
        ("image/png, application/json",): True,
        ("application/json, image/png",): False,
        ("image/png;q=0",): False,
        ("application/json", "image/png;q=0.9"): False,  # headers sent twice are one list
        (): False,
    }
    for accept, wanted in cases.items():
        assert prefers(_request(*accept), "image/png", over="application/json") is wanted, accept
