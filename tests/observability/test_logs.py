"""Log format: text or one JSON object per line, tracebacks included."""

from __future__ import annotations

import json
import logging

import pytest

from app.observability.logs import JsonFormatter, configure_logging


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
