"""Log format: text or one JSON object per line, tracebacks included."""

from __future__ import annotations

import io
import json
import logging

import pytest
from fastapi.testclient import TestClient

from app.observability.context import RequestIdFilter
from app.observability.logs import (
    JsonFormatter,
    TextFormatter,
    Throttle,
    configure_logging,
    escape_controls,
    logged_field,
)


def test_json_formatter_includes_traceback() -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record = logging.LogRecord(
            "app.x", logging.ERROR, __file__, 1, "failed %s", ("here",), exc_info=True
        )
        import sys

        record.exc_info = sys.exc_info()
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "failed here"
    assert entry["level"] == "ERROR" and entry["logger"] == "app.x"
    assert "RuntimeError: boom" in entry["traceback"]


def test_configure_logging_sets_level_and_format(monkeypatch: pytest.MonkeyPatch) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging("WARNING", "json")
        assert root.level == logging.WARNING
        assert isinstance(root.handlers[0].formatter, JsonFormatter)
        assert logging.getLogger("uvicorn.access").propagate
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)


FORGED = "/nope%0d%0a2026-12-02%2003:30:00,000%20INFO%20app.access%20GET%20/admin%20200"


@pytest.mark.parametrize("formatter", [TextFormatter(), JsonFormatter()], ids=["text", "json"])
def test_a_client_cannot_forge_a_log_line(client: TestClient, formatter: logging.Formatter) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(formatter)
    root = logging.getLogger()
    saved = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        assert client.get(FORGED).status_code == 404
        upload = [("file", ("a\r\nb\x1b[31m.png", b"text", "image/png"))]
        assert client.post("/predict", files=upload).status_code == 415
    finally:
        root.removeHandler(handler)
        root.setLevel(saved)
    lines = stream.getvalue().splitlines()
    access = [line for line in lines if "app.http.middleware.access" in line and "/nope" in line]
    assert len(access) == 1, lines
    if isinstance(formatter, JsonFormatter):
        assert json.loads(access[0])["path"].startswith("/nope\\r\\n2026-12-02")
    else:
        assert "GET /nope\\r\\n2026-12-02 03:30:00,000 INFO" in access[0]
    assert not any(line.startswith("2026-12-02") for line in lines)
    assert all("\x1b" not in line and "\r" not in line for line in lines)


def test_escape_controls_keeps_text_and_escapes_the_rest() -> None:
    assert escape_controls("plain é ✓") == "plain é ✓"
    assert escape_controls("a\r\nb\x00\x1b\x7f\u2028") == "a\\r\\nb\\x00\\x1b\\x7f\\u2028"
    # Bidirectional controls: "/\u202enimda" shows as "/admin" (found by a hostile review).
    assert escape_controls("/\u202enimda\u2066\u200f") == "/\\u202enimda\\u2066\\u200f"


def test_a_logged_field_is_cut_and_says_how_long_it_was() -> None:
    assert logged_field("/health") == "/health"
    assert logged_field("x" * 1024) == "x" * 1024
    assert logged_field("x" * 5000) == "x" * 1024 + "... (5000 characters)"
    assert logged_field("abcdef", limit=3) == "abc... (6 characters)"


def test_a_throttle_lets_one_line_through_per_period_with_the_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [100.0]
    monkeypatch.setattr("app.observability.logs.time.monotonic", lambda: now[0])
    throttle = Throttle(10.0)
    assert throttle.due() == 1  # the first occasion is written at once
    assert [throttle.due() for _ in range(3)] == [0, 0, 0]
    now[0] += 9.9
    assert throttle.due() == 0
    now[0] += 0.1
    assert throttle.due() == 5  # the four held back and this one
    assert throttle.due() == 0


def test_a_traceback_cannot_forge_a_log_line_either() -> None:
    # An exception's message may carry a client's string: in the text format every line of the
    # traceback is indented and its controls escaped (the JSON format holds it in one field).
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(TextFormatter())
    logger = logging.getLogger("tests.forged")
    logger.addHandler(handler)
    try:
        try:
            raise ValueError("bad name 'x\r\n2026-12-02 03:30:00,000 ERROR app: forged\x1b[31m'")
        except ValueError:
            logger.exception("a request failed")
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert "a request failed" in lines[0]
    assert len(lines) > 3 and all(line.startswith("    ") for line in lines[1:]), lines
    assert all("\x1b" not in line and "\r" not in line for line in lines)
    assert any("ValueError: bad name 'x\\r" in line for line in lines)
