"""What one request is doing: its id, and what the model work noted about it, in a contextvar.

The access middleware opens a ``RequestInfo`` for every HTTP request; the explainer notes the
model, method, images and stage timings into it; log records and error bodies read the id from it.
Tasks started during a request copy the context, so they see (and note into) the same object.
"""

from __future__ import annotations

import logging
import uuid
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TypeGuard

REQUEST_ID_HEADER = "X-Request-ID"
MAX_REQUEST_ID = 128
STAGES = ("decode", "queue", "forward", "cam", "encode")


@dataclass
class RequestInfo:
    """One request, filled in as it goes."""

    request_id: str
    model: str = ""
    version: str = ""
    """The model's version that served it (empty for routes without model work)."""
    method: str = ""
    """The CAM method; empty for routes that draw no map."""
    images: int = 0
    stages: dict[str, float] = field(default_factory=dict)
    """Seconds per stage of ``STAGES`` that the request went through."""
    cam_forwards: int = 0
    """Extra forwards of its CAM call: masked (Score-CAM family) or noisy (SmoothGrad)."""
    client: str = ""
    """The name of its API key when the service has keys ('-' for none or a wrong one), never
    the key itself; empty without keys."""
    caller: str = ""
    """Who sent it, as the per-client rules count (``identity``): fair admission to model work
    among others; empty outside a request."""


_current: ContextVar[RequestInfo | None] = ContextVar("camserve_request", default=None)


def identity(host: str | None, key_name: str | None = None, keyed: bool = False) -> str:
    """Who a request is, for per-client caps, fair admission and job ownership: ``key:<name>``
    when the service requires API keys (``-`` for none or a wrong one), else ``address:<host>``
    (the peer, or the end client that a trusted proxy names). The key itself is never used."""
    if keyed:
        return "key:" + (key_name or "-")
    return "address:" + (host or "unknown")


def valid_request_id(value: str | None) -> TypeGuard[str]:
    """1 to 128 visible ASCII characters (no spaces or control characters)."""
    return (
        value is not None
        and 0 < len(value) <= MAX_REQUEST_ID
        and all(33 <= ord(char) <= 126 for char in value)
    )


def new_request_id() -> str:
    return uuid.uuid4().hex


def start_request(client_id: str | None) -> RequestInfo:
    """Make the current request's info: the client's id when valid, else a new one."""
    info = RequestInfo(client_id if valid_request_id(client_id) else new_request_id())
    _current.set(info)
    return info


def current_request() -> RequestInfo | None:
    return _current.get()


def current_request_id() -> str | None:
    info = _current.get()
    return info.request_id if info else None


def note_work(
    model: str,
    method: str | None,
    images: int,
    stages: dict[str, float],
    cam_forwards: int = 0,
    version: int | None = None,
) -> None:
    """Record what the model work of the current request did (nothing outside a request)."""
    info = _current.get()
    if info is None:
        return
    info.model = model
    info.version = "" if version is None else str(version)
    info.method = method or ""
    info.images = images
    info.stages = dict(stages)
    info.cam_forwards = cam_forwards


class RequestIdFilter(logging.Filter):
    """Give every record a ``request_id`` attribute: the current request's id, or None."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = current_request_id()
        return True
