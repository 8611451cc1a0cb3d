"""The uvicorn server camserve runs under ``python -m app``: connection limits, a deadline for
request headers, and a drain on SIGTERM before uvicorn's own shutdown.

uvicorn has no header timeout: a connection that sends half a request line holds a file handle
for ever (20,000 of them locked everyone out). ``HeaderDeadlineProtocol`` closes it, with a 408,
once ``CAMSERVE_HEADER_TIMEOUT_S`` has passed without complete headers.

It caps each request's line and headers while they arrive (``CAMSERVE_MAX_HEADER_FIELDS``,
``CAMSERVE_MAX_HEADER_BYTES``): past the cap it answers 431 and closes the connection, so a
request of a million tiny headers costs the parse of the first hundred, and a 20 MB header is
never held. ``app.http.middleware.header_cap`` is the same rule for other servers.

After an answer, the rest of its request's body (which the app did not read) does not keep the
connection open: uvicorn cancels its keep-alive timer on every byte received, so a client
trickling the rest of a large Content-Length after its answer held the connection for ever,
past every deadline. Those bytes now leave the timer running: the connection closes
``CAMSERVE_KEEP_ALIVE_S`` after the answer unless a new request has begun by then.

It also answers at the connection cap (``CAMSERVE_MAX_CONNECTIONS``) itself: JSON with
Retry-After instead of uvicorn's plain text, and the probes (``/health``, ``/ready``,
``/metrics``) still served, up to ``CAMSERVE_PROBE_CONNECTIONS`` of them at once, so that a few
slow clients filling the cap do not get a healthy pod killed.
"""

from __future__ import annotations

import logging
import resource
from types import FrameType
from typing import Any

import httptools
import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.errors import BadRequest, HeaderTimeout, Overloaded
from app.http.errors import raw_refusal, send_refusal
from app.http.middleware.header_cap import headers_too_large
from app.lifecycle import Lifecycle
from app.observability.logs import Throttle
from app.settings import Settings

logger = logging.getLogger(__name__)

#: uvicorn's own wait for open connections after our drain (which already waited for the work).
UVICORN_SHUTDOWN_S = 5
_LIMIT_LOG_EVERY_S = 10.0
PROBE_PATHS = frozenset({b"/health", b"/ready", b"/metrics"})
"""Raw paths served past the connection cap (up to ``probe_connections`` at once)."""


async def _at_capacity(scope: Scope, receive: Receive, send: Send) -> None:
    await send_refusal(
        send,
        Overloaded(
            "The service has as many connections as it accepts (CAMSERVE_MAX_CONNECTIONS); "
            "retry shortly.",
            headers={"Retry-After": "1"},
        ),
    )


class _Probes:
    """The probe requests in flight past the connection cap, and the app that counts them."""

    def __init__(self, bound: int) -> None:
        self.bound = bound
        self.in_flight = 0

    def wrap(self, app: ASGIApp) -> ASGIApp:
        async def counted(scope: Scope, receive: Receive, send: Send) -> None:
            # Counted while it runs (a pipelined request whose connection drops never does).
            self.in_flight += 1
            try:
                await app(scope, receive, send)
            finally:
                self.in_flight -= 1

        return counted


class _HeadersOver(Exception):
    """Raised in a parser callback to stop the parse of headers over the cap."""


class _Tally:
    """A warning of uvicorn's that each request can cause, written as one line with the count
    at most once every ``_LIMIT_LOG_EVERY_S``."""

    def __init__(self, line: str) -> None:
        self.line = line
        self.throttle = Throttle(_LIMIT_LOG_EVERY_S)

    def count(self) -> None:
        if occasions := self.throttle.due():
            logger.warning(self.line, occasions)


_UVICORN_PER_REQUEST: dict[str, _Tally | None] = {
    "Invalid HTTP request received": _Tally(
        "answered %d request(s) that were not valid HTTP/1.1 (a malformed or overlong request "
        "line or header, an unknown method) with 400 since the last such line"
    ),
    "Unsupported upgrade request": _Tally(
        "served %d request(s) asking to upgrade the connection to another protocol "
        "(Connection: Upgrade) as plain HTTP/1.1 since the last such line"
    ),
    "No supported WebSocket library": None,  # follows the one above; camserve has no WebSocket
}
"""uvicorn's warnings that a client can cause once per request (the start of each), and the
line that counts them instead: 1000 requests of an unknown method wrote 1000 lines, and 1000
upgrade requests on one kept-alive connection 1000 more."""


class _QuietAfterOurRefusal(logging.LoggerAdapter):  # type: ignore[type-arg]
    """uvicorn's logger for one connection, less its warnings that a client can cause once per
    request (``_UVICORN_PER_REQUEST``): those are counted into a line at most once every
    ``_LIMIT_LOG_EVERY_S``, and the one for bytes that are not HTTP is dropped when it was our
    header cap that stopped the parse (the protocol counts those refusals itself), so that a
    flood of bad requests cannot flood the log."""

    def __init__(self, logger: logging.Logger, protocol: HeaderDeadlineProtocol) -> None:
        super().__init__(logger, {})
        self.protocol = protocol

    @property
    def level(self) -> int:  # uvicorn reads it to decide on its trace lines
        return int(self.logger.level)

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if level == logging.WARNING:
            if self.protocol._head_over:
                return
            for start, tally in _UVICORN_PER_REQUEST.items():
                if str(msg).startswith(start):
                    if tally is not None:
                        tally.count()
                    return
        super().log(level, msg, *args, **kwargs)


class HeaderDeadlineProtocol(HttpToolsProtocol):
    """uvicorn's HTTP protocol with a deadline for each request's headers, a cap on their count
    and size, JSON refusals, and the connection cap decided here (probes exempt, a warning in
    the log when it turns requests away)."""

    header_timeout_s = 10.0
    max_header_fields = 100
    max_header_bytes = 64 * 1024
    probes = _Probes(8)
    # Each refusal's line in the log at most once every 10 s, with the count since the last.
    _capacity_log = Throttle(_LIMIT_LOG_EVERY_S)
    _header_log = Throttle(_LIMIT_LOG_EVERY_S)

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        # uvicorn's methods only call it as a logger: an adapter serves them.
        self.logger = _QuietAfterOurRefusal(self.logger, self)  # type: ignore[assignment]
        self._header_timer: Any = None
        self._in_head = False
        self._head_fields = 0
        self._head_bytes = 0  # of the line and the fields parsed so far
        self._head_raw = 0  # received while the head was incomplete (an unfinished field too)
        self._head_over = False
        self._message_done = False  # the current request's body has arrived whole
        self._messages_begun = 0
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        if self._head_over:
            return
        continued = self._in_head
        if self._leftover_body():
            self._feed_keeping_timer(data)
        else:
            super().data_received(data)
        if continued and self._in_head and not self._head_over:
            # A field still arriving is not in the counts of the callbacks (llhttp hands it
            # over whole): the bytes of the chunks after the one where the head began bound it.
            self._head_raw += len(data)
            if self._head_raw > self.max_header_bytes:
                self._refuse_head()

    def _leftover_body(self) -> bool:
        """Whether bytes arriving now are the rest of the body of a request already answered."""
        cycle = self.cycle
        return cycle is not None and cycle.response_complete and not self._message_done

    def _feed_keeping_timer(self, data: bytes) -> None:
        """Parse ``data`` without cancelling the keep-alive timer (uvicorn cancels it on every
        byte): the rest of an answered request's body is dropped, and a client trickling it
        would otherwise hold the connection for ever. A new request beginning in ``data``
        cancels the timer, as any byte of a request does."""
        timer, self.timeout_keep_alive_task = self.timeout_keep_alive_task, None
        begun = self._messages_begun
        super().data_received(data)
        if self._messages_begun == begun and self.timeout_keep_alive_task is None:
            self.timeout_keep_alive_task = timer
        elif timer is not None:
            timer.cancel()

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url), 0)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value), 1)
        super().on_header(name, value)

    def _count_head(self, size: int, fields: int) -> None:
        self._head_bytes += size
        self._head_fields += fields
        if self._head_bytes > self.max_header_bytes or self._head_fields > self.max_header_fields:
            self._head_over = True
            raise _HeadersOver  # stops the parse; uvicorn then calls send_400_response

    def _refuse_head(self) -> None:
        self._head_over = True
        self._disarm_header_timer()
        self._log_header_refusal()
        over = headers_too_large(
            self._head_fields,
            max(self._head_bytes, self._head_raw),
            self.max_header_fields,
            self.max_header_bytes,
        )
        self.transport.write(raw_refusal(over))
        self.transport.close()

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._message_done = False
        self._messages_begun += 1
        self._head_fields = self._head_bytes = self._head_raw = 0
        self._arm_header_timer()  # the next request of a keep-alive connection

    def on_message_complete(self) -> None:
        self._message_done = True
        super().on_message_complete()

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._disarm_header_timer()
        limit = self.limit_concurrency
        if limit is None or (len(self.connections) < limit and len(self.tasks) < limit):
            super().on_headers_complete()
            return
        if self._is_probe() and self.probes.in_flight < self.probes.bound:
            app = self.probes.wrap(self.app)
        else:
            app = _at_capacity
            self._log_at_capacity(limit)
        # uvicorn picks the app (or its own plain-text 503) in the middle of this method: it is
        # handed ours, with its cap lifted for this one call.
        own_app = self.app
        self.app, self.limit_concurrency = app, None
        try:
            super().on_headers_complete()
        finally:
            self.app, self.limit_concurrency = own_app, limit

    def _is_probe(self) -> bool:
        try:
            return httptools.parse_url(self.url).path in PROBE_PATHS
        except httptools.HttpParserInvalidURLError:
            return False

    @classmethod
    def _log_header_refusal(cls) -> None:
        refused = cls._header_log.due()
        if refused:
            logger.warning(
                "refused %d request(s) with headers over the cap (CAMSERVE_MAX_HEADER_FIELDS=%d, "
                "CAMSERVE_MAX_HEADER_BYTES=%d) with 431 since the last such line",
                refused,
                cls.max_header_fields,
                cls.max_header_bytes,
            )

    def _log_at_capacity(self, limit: int) -> None:
        refused = self._capacity_log.due()
        if refused:
            logger.warning(
                "connection limit reached (%d connections, %d requests; "
                "CAMSERVE_MAX_CONNECTIONS=%d): answering 503 (%d time(s) since the last such "
                "line)",
                len(self.connections),
                len(self.tasks),
                limit,
                refused,
            )

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to bytes that are not HTTP (a bad header, an overlong line), as
        JSON; 431 when it was the cap on the headers that stopped the parse."""
        if self._head_over:
            self._refuse_head()
            return
        bad = BadRequest(
            "The request is not valid HTTP/1.1 (a malformed or overlong request line or "
            "header); check the client."
        )
        self.transport.write(raw_refusal(bad))
        self.transport.close()

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
            "%d connections (CAMSERVE_MAX_CONNECTIONS, for HTTP and again for gRPC) come close "
            "to the open-file limit %d; lower it or raise the limit (ulimit -n)",
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
        {
            "header_timeout_s": settings.header_timeout_s,
            "max_header_fields": settings.max_header_fields,
            "max_header_bytes": settings.max_header_bytes,
            "probes": _Probes(settings.probe_connections),
        },
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
        # The end client, as a trusted proxy names it in X-Forwarded-For; nobody's word is
        # taken without CAMSERVE_FORWARDED_ALLOW_IPS (uvicorn would trust loopback by default,
        # and a local client could then be anyone).
        proxy_headers=bool(settings.forwarded_allow_ips),
        forwarded_allow_ips=settings.forwarded_allow_ips or "",
        h11_max_incomplete_event_size=settings.max_header_bytes,
    )
    # gRPC, when it listens, has as many connections again.
    listeners = 1 if settings.grpc_port is None else 2
    raise_open_file_limit(listeners * settings.max_connections)
    return DrainingServer(config, app.state.lifecycle)
