"""ASGI middleware that bounds how a request body streams in: its size, its total time and its
pace; that decompresses a body sent with ``Content-Encoding: gzip`` or ``deflate``, counting
the decompressed bytes against the same limit; and that refuses a multipart body cut short."""

from __future__ import annotations

import asyncio
import logging
import time
import zlib

import anyio.to_thread
from python_multipart.multipart import parse_options_header
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.digits import whole_number
from app.errors import (
    BadRequest,
    BodyTimeout,
    CamserveError,
    Overloaded,
    PayloadTooLarge,
    UnsupportedMediaType,
    clip,
)
from app.http.errors import send_refusal

logger = logging.getLogger(__name__)


class _BodyRefused(Exception):
    """Raised into the app's body read; the middleware answers ``error`` in its place."""

    def __init__(self, error: CamserveError) -> None:
        super().__init__(error.message)
        self.error = error


#: Content-Encoding -> zlib's window bits for it ("deflate" is the zlib format, RFC 9110).
_ENCODINGS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


class _Inflater:
    """Decompresses a body piece by piece, never to more than ``limit`` bytes in all: a small
    bomb is refused once its output passes the limit, not after it filled the memory."""

    def __init__(self, encoding: str, limit: int) -> None:
        self.encoding = encoding
        self.limit = limit
        self.size = 0
        self.fed = 0
        self._zlib = zlib.decompressobj(_ENCODINGS[encoding])

    def feed(self, piece: bytes, last: bool) -> bytes:
        self.fed += len(piece)
        if last and not self.fed:
            return b""  # no body at all (a GET that names an encoding)
        out: list[bytes] = []
        try:
            data = piece
            while data or not out:
                chunk = self._zlib.decompress(data, self.limit - self.size + 1)
                self.size += len(chunk)
                if self.size > self.limit:
                    raise _BodyRefused(
                        PayloadTooLarge(
                            f"The request body decompresses to over {self.limit} bytes, the "
                            "limit of a body (CAMSERVE_MAX_UPLOAD_BYTES x CAMSERVE_MAX_IMAGES "
                            "bounds it, decompressed); send fewer or smaller images."
                        )
                    )
                out.append(chunk)
                data = self._zlib.unconsumed_tail
                if not chunk:
                    break
        except zlib.error as error:
            raise _BodyRefused(
                BadRequest(
                    f"The request body is not valid {self.encoding} data ({clip(str(error), 60)}); "
                    "compress the whole body, or send it uncompressed."
                )
            ) from None
        if last and not self._zlib.eof:
            raise _BodyRefused(
                BadRequest(
                    f"The request body's {self.encoding} data is truncated; send the whole "
                    "compressed body."
                )
            )
        return b"".join(out)


def _encoding(scope: Scope) -> str | None:
    """The body's Content-Encoding (lower case), None when there is none (or ``identity``)."""
    value = dict(scope["headers"]).get(b"content-encoding", b"").decode("latin-1").strip().lower()
    return None if value in ("", "identity") else value


class _ClosingBoundary:
    """Watches a ``multipart/form-data`` body for its closing delimiter (``--boundary--`` at
    the start of a line). The form parser takes a body that ends before it as complete: the
    part being read is dropped without a word, and the parts before it are answered."""

    def __init__(self, boundary: bytes) -> None:
        self.delimiter = b"\r\n--" + boundary + b"--"
        self._tail = b"\r\n"  # a body may open with its closing delimiter (no parts at all)
        self.seen = False

    @classmethod
    def of(cls, scope: Scope) -> _ClosingBoundary | None:
        """A watcher for the scope's multipart body; None for any other body (and for one
        without a boundary, which the form parser refuses itself)."""
        content_type = dict(scope["headers"]).get(b"content-type", b"")
        kind, options = parse_options_header(content_type)
        boundary = options.get(b"boundary")
        return cls(boundary) if kind == b"multipart/form-data" and boundary else None

    def feed(self, piece: bytes) -> None:
        if self.seen:
            return
        keep = len(self.delimiter) - 1
        self.seen = self.delimiter in self._tail + piece[:keep] or self.delimiter in piece
        self._tail = (self._tail + piece)[-keep:] if len(piece) < keep else piece[-keep:]


def _decoded_scope(scope: Scope) -> Scope:
    """The scope the app sees once the middleware decompresses the body: no Content-Encoding,
    and no Content-Length (which counted the compressed bytes)."""
    headers = [
        (name, value)
        for name, value in scope["headers"]
        if name not in (b"content-encoding", b"content-length")
    ]
    return {**scope, "headers": headers}


class BodyLimitMiddleware:
    """Answer 413 once a body exceeds ``max_bytes`` (from Content-Length or from counting), and
    408 once it is late: not all there ``body_timeout_s`` after the headers, or arriving slower
    than ``min_rate`` bytes per second on average once ``grace_s`` has passed (so a client that
    trickles a few bytes every second cannot hold its connection until the deadline).

    The bodies of all requests in flight share ``budget`` bytes: a body is counted as it
    arrives until its request is answered, and refused with 503 when it does not fit: on its
    headers when its Content-Length does not fit beside the bytes the others hold, else when
    a piece of it does not.

    Paths under ``protocol_prefixes`` (the inference-protocol routes, whose images come base64
    in JSON) get ``protocol_max_bytes`` instead, and their refusals the protocols' shape.

    A body with ``Content-Encoding: gzip`` (or ``x-gzip``) or ``deflate`` reaches the app
    decompressed, and its decompressed size counts against the limit (a bomb gets 413 once it
    passes it) and the budget; any other encoding gets 415, and data that does not decompress
    400.

    A ``multipart/form-data`` body (outside ``protocol_prefixes``) that ends before its closing
    boundary gets 400: a Content-Length short of the body, or a chunked body ended early, cut
    its last part, which the form parser dropped in silence (two images sent, one answered)."""

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        body_timeout_s: float = 60.0,
        protocol_prefixes: tuple[str, ...] = (),
        protocol_max_bytes: int | None = None,
        min_rate: float = 0.0,
        grace_s: float = 10.0,
        budget: int | None = None,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.body_timeout_s = body_timeout_s
        self.protocol_prefixes = protocol_prefixes
        self.protocol_max_bytes = protocol_max_bytes or max_bytes
        self.min_rate = min_rate
        self.grace_s = grace_s
        self.budget = budget
        """Bytes of the bodies of all requests in flight, at most (None: no bound)."""
        self.held = 0

    @staticmethod
    def _too_large(limit: int) -> _BodyRefused:
        return _BodyRefused(
            PayloadTooLarge(
                f"The request body is over {limit} bytes; send fewer or smaller "
                "images (CAMSERVE_MAX_UPLOAD_BYTES x CAMSERVE_MAX_IMAGES bounds it)."
            )
        )

    def _no_room(self) -> _BodyRefused:
        return _BodyRefused(
            Overloaded(
                f"The service holds as many request bodies as it may ({self.budget} bytes, "
                "CAMSERVE_BODY_BUDGET_BYTES); retry after the seconds in Retry-After.",
                headers={"Retry-After": "1"},
            )
        )

    def _late(self, received: int, elapsed: float) -> _BodyRefused:
        if elapsed >= self.body_timeout_s:
            why = (
                f"The request body was not complete {self.body_timeout_s:g} s after its headers "
                "(CAMSERVE_BODY_TIMEOUT_S)"
            )
        else:
            why = (
                f"The request body arrived at {received / elapsed:.0f} bytes/s, under the "
                f"{self.min_rate:g} bytes/s allowed after {self.grace_s:g} s "
                "(CAMSERVE_BODY_MIN_RATE)"
            )
        return _BodyRefused(BodyTimeout(why + "; send the body at once."))

    def _wait_s(self, received: int, elapsed: float) -> float:
        """How long the next piece may take: to the deadline, or to when the average rate
        would fall under the minimum."""
        until = self.body_timeout_s
        if self.min_rate > 0:
            until = min(until, max(self.grace_s, received / self.min_rate))
        return until - elapsed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        protocol = bool(self.protocol_prefixes) and scope["path"].startswith(self.protocol_prefixes)
        limit = self.protocol_max_bytes if protocol else self.max_bytes
        declared = dict(scope["headers"]).get(b"content-length")
        length = None if declared is None else whole_number(declared)
        if length is not None and length > limit:
            await _refuse(send, self._too_large(limit), protocol)
            return
        encoding = _encoding(scope)
        if encoding is not None and encoding not in _ENCODINGS:
            unsupported = UnsupportedMediaType(
                f"Content-Encoding {clip(encoding, 30)} is not supported; send the body "
                "uncompressed, or compressed with gzip or deflate."
            )
            await send_refusal(send, unsupported, protocol=protocol)
            return
        # Refused on its headers when its Content-Length could not fit beside the bytes the
        # others hold; but counted only as its bytes arrive: a declared length held from the
        # headers on let two connections trickling 1.5 kB/s under 150 MB Content-Lengths hold
        # the whole budget for the body deadline, and every other upload got 503.
        if self.budget is not None and self.held + (length or 0) > self.budget:
            await _refuse(send, self._no_room(), protocol)
            return
        inflater = None if encoding is None else _Inflater(encoding, limit)
        closing = None if protocol else _ClosingBoundary.of(scope)
        await self._limited(scope, receive, send, limit, protocol, inflater, closing)

    async def _limited(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        limit: int,
        protocol: bool,
        inflater: _Inflater | None,
        closing: _ClosingBoundary | None,
    ) -> None:
        started = time.monotonic()
        received = 0
        counted = 0  # bytes of the budget this body holds until the answer
        refused: _BodyRefused | None = None
        answered = False
        body_done = False

        async def limited_receive() -> Message:
            nonlocal received, refused, body_done, counted
            if body_done:  # after the body, only a disconnect is left to hear: no deadline
                return await receive()
            elapsed = time.monotonic() - started
            try:
                message = await asyncio.wait_for(
                    receive(), max(0.0, self._wait_s(received, elapsed))
                )
            except asyncio.TimeoutError:
                elapsed = time.monotonic() - started
                logger.info(
                    "%s %s: body late (%d bytes in %.1f s); answering 408",
                    scope["method"],
                    clip(scope["path"], 80),
                    received,
                    elapsed,
                )
                refused = self._late(received, elapsed)
                raise refused from None
            if message["type"] == "http.request":
                piece = len(message.get("body", b""))
                received += piece
                body_done = not message.get("more_body", False)
                if received > limit:
                    refused = self._too_large(limit)
                    raise refused
                if inflater is not None:
                    try:
                        # On a worker thread (zlib lets go of the GIL): a small piece of a
                        # bomb can inflate to many MB, which would stall the event loop.
                        body = await anyio.to_thread.run_sync(
                            inflater.feed, message.get("body", b""), body_done
                        )
                    except _BodyRefused as error:
                        refused = error
                        raise
                    message = {**message, "body": body}
                if closing is not None:
                    closing.feed(message.get("body", b""))
                    if body_done and not closing.seen:
                        refused = _cut_short()
                        raise refused
                # The budget counts what the app holds: the bytes as received, or decompressed.
                held = received if inflater is None else max(received, inflater.size)
                extra = held - counted
                if extra > 0:
                    if self.budget is not None and self.held + extra > self.budget:
                        refused = self._no_room()
                        raise refused
                    self.held += extra
                    counted += extra
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal answered
            if refused is not None:
                return  # the app's answer to the aborted read is replaced by ours
            answered = answered or message["type"] == "http.response.start"
            await send(message)

        try:
            app_scope = scope if inflater is None else _decoded_scope(scope)
            await self.app(app_scope, limited_receive, guarded_send)
        except Exception:
            if refused is None:
                raise
        finally:
            self.held -= counted
        if refused is not None and not answered:
            await _refuse(send, refused, protocol)


def _cut_short() -> _BodyRefused:
    return _BodyRefused(
        BadRequest(
            "The multipart body ended before its closing boundary (--boundary--): the upload "
            "was cut short, and its last part would be lost; send the whole body (a "
            "Content-Length that counts every byte)."
        )
    )


async def _refuse(send: Send, refused: _BodyRefused, protocol: bool) -> None:
    await send_refusal(send, refused.error, protocol=protocol)
