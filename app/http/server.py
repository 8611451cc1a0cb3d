"""The uvicorn server camserve runs under ``python -m app``: connection limits, a deadline for
request headers, and a drain on SIGTERM before uvicorn's own shutdown.

uvicorn has no header timeout: a connection that sends half a request line holds a file handle
for ever (20,000 of them locked everyone out). ``HeaderDeadlineProtocol`` closes it, with a 408,
once ``CAMSERVE_HEADER_TIMEOUT_S`` has passed without complete headers.
"""

from __future__ import annotations

import logging
import resource
import time
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.errors import HeaderTimeout
from app.http.errors import raw_refusal
from app.lifecycle import Lifecycle
from app.settings import Settings

logger = logging.getLogger(__name__)

#: uvicorn's own wait for open connections after our drain (which already waited for the work).
UVICORN_SHUTDOWN_S = 5
_LIMIT_LOG_EVERY_S = 10.0


class HeaderDeadlineProtocol(HttpToolsProtocol):
    """uvicorn's HTTP protocol with a deadline for each request's headers, and a warning in the
    log when the connection limit turns requests away."""

    header_timeout_s = 10.0
    _last_limit_log = 0.0

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._header_timer: Any = None
        self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm_header_timer()  # the next request of a keep-alive connection

    def on_headers_complete(self) -> None:
        self._disarm_header_timer()
        limit = self.limit_concurrency
        if limit is not None and (len(self.connections) >= limit or len(self.tasks) >= limit):
            now = time.monotonic()
            if now - HeaderDeadlineProtocol._last_limit_log > _LIMIT_LOG_EVERY_S:
                HeaderDeadlineProtocol._last_limit_log = now
                logger.warning(
                    "connection limit reached (%d connections, %d requests; "
                    "CAMSERVE_MAX_CONNECTIONS=%d): answering 503",
                    len(self.connections),
                    len(self.tasks),
                    limit,
                )
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a request is being answered; its body has its own deadline
        late = HeaderTimeout(
            f"The request headers did not arrive within {self.header_timeout_s:g} s "
            "(CAMSERVE_HEADER_TIMEOUT_S)."
        )
        self.transport.write(raw_refusal(late))
        self.transport.close()


class DrainingServer(uvicorn.Server):
    """On the first SIGTERM or SIGINT, drain (``/ready`` says 503, new work is refused, work in
    flight finishes or is cut after the grace period), then stop as uvicorn does. A second
    signal stops at once."""

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle) -> None:
        super().__init__(config)
        self.lifecycle = lifecycle
        self._announced = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.lifecycle.draining:
            super().handle_exit(sig, frame)
            return
        # Not in uvicorn's _captured_signals: after a clean drain the process exits with status
        # 0 instead of dying by the signal (which `make serve` reports as a failure).
        self.lifecycle.begin_drain()  # plain fields only: safe in a signal handler

    async def on_tick(self, counter: int) -> bool:
        if self.lifecycle.draining and not self.should_exit:
            if not self._announced:
                self._announced = True
                logger.info(
                    "draining: /ready answers 503, new work is refused, %d in flight "
                    "(grace %.0f s)",
                    self.lifecycle.in_flight,
                    self.lifecycle.grace_s,
                )
            if self.lifecycle.ready_to_exit():
                self.should_exit = True
        return await super().on_tick(counter)


def raise_open_file_limit(wanted: int) -> None:
    """Lift the soft limit on open files towards the hard one, so that ``wanted`` connections
    fit; warn when they cannot."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = hard if hard != resource.RLIM_INFINITY else max(soft, wanted + 256)
        if soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    except (ValueError, OSError) as error:  # not permitted here: keep what we have
        logger.debug("cannot raise the open-file limit: %s", error)
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted + 64:
        logger.warning(
            "CAMSERVE_MAX_CONNECTIONS=%d is close to the open-file limit %d; lower it or raise "
            "the limit (ulimit -n)",
            wanted,
            soft,
        )


def build_server(settings: Settings) -> DrainingServer:
    """The configured server for ``create_app(settings)``."""
    from app.http.app import create_app

    app = create_app(settings)
    protocol = type(
        "CamserveHttpProtocol",
        (HeaderDeadlineProtocol,),
        {"header_timeout_s": settings.header_timeout_s},
    )
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=protocol,
        log_config=None,
        log_level=settings.log_level.lower(),
        limit_concurrency=settings.max_connections,
        timeout_keep_alive=settings.keep_alive_s,  # type: ignore[arg-type]
        timeout_graceful_shutdown=UVICORN_SHUTDOWN_S,
    )
    raise_open_file_limit(settings.max_connections)
    return DrainingServer(config, app.state.lifecycle)
