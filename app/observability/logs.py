"""Logging setup: plain text or one JSON object per line.

Every field a client can reach (a path, a filename, a header) is written with its control
characters escaped, in both formats: a percent-encoded CR LF in a path would otherwise start a
forged line of its own. A client's string that a line names is cut (``logged_field``).
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
from typing import Any

from app.observability.context import RequestIdFilter

# Control characters, Unicode's line separators, and its bidirectional controls: a path with
# U+202E shows the rest of its line reversed in a terminal or a log viewer.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")
LOGGED_FIELD_LIMIT = 1024
"""Most characters of a client's string (a path, a method) that a log line carries."""


class Throttle:
    """A warning that repeats with its cause (a flood of refusals) written at most once every
    ``every_s``: ``due()`` counts one occasion and answers how many there were since the last
    line when a line is due now, else 0."""

    def __init__(self, every_s: float = 10.0) -> None:
        self.every_s = every_s
        self._count = 0
        self._last = -math.inf
        self._lock = threading.Lock()

    def due(self) -> int:
        with self._lock:
            self._count += 1
            now = time.monotonic()
            if now - self._last < self.every_s:
                return 0
            count, self._count, self._last = self._count, 0, now
            return count


def escape_controls(text: str) -> str:
    """``text`` with each control character (and Unicode line separator or bidirectional
    control) written as its Python escape (``\\r``, ``\\x1b``, ``\\u2028``, ``\\u202e``): one
    record, one line, read in the order it was written."""
    return _CONTROL.sub(lambda match: match.group().encode("unicode_escape").decode(), text)


def logged_field(text: str, limit: int = LOGGED_FIELD_LIMIT) -> str:
    """A client's string as a log line carries it: its first ``limit`` characters, then how
    many it had. A path runs up to CAMSERVE_MAX_HEADER_BYTES (64 KiB, up to 16 MiB), and each
    request's access line carried it whole."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


class TextFormatter(logging.Formatter):
    """``time level logger [request id]: message``; the id only for a request's records."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s%(request_tag)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        request_id = getattr(record, "request_id", None)
        record.request_tag = f" [{escape_controls(request_id)}]" if request_id else ""
        # The message is escaped here, the traceback after it in ``formatException``.
        saved = record.msg, record.args
        record.msg, record.args = escape_controls(record.getMessage()), None
        try:
            return super().format(record)
        finally:
            record.msg, record.args = saved

    def formatException(self, ei: Any) -> str:
        """The traceback with every line indented and its control characters escaped: an
        exception's message may carry a client's string, CR LF included, and no line of it may
        then start like a record of its own."""
        text = super().formatException(ei)
        return "\n".join("    " + escape_controls(line) for line in text.split("\n"))


class JsonFormatter(logging.Formatter):
    """One JSON object per record, with the traceback as a string when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": escape_controls(record.getMessage()),
        }
        request_id = getattr(record, "request_id", None)
        if request_id is not None:
            entry["request_id"] = escape_controls(request_id)
        access = getattr(record, "access", None)
        if isinstance(access, dict):
            entry.update(
                {k: escape_controls(v) if isinstance(v, str) else v for k, v in access.items()}
            )
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str, log_format: str, take_over_uvicorn: bool = True) -> None:
    """Route every logger to one stderr handler in the chosen format; uvicorn's loggers too
    unless ``take_over_uvicorn`` is False (uvicorn started us and configured its own)."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    if not take_over_uvicorn:
        return
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    # app.http.middleware.access writes one line per request, with the id, model and sizes;
    # uvicorn's own line would be a second, poorer one. (`disabled` survives uvicorn.run, which
    # resets levels.)
    logging.getLogger("uvicorn.access").disabled = True
