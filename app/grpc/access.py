"""Each gRPC call as HTTP's access middleware sees each request: a request id (metadata
``x-request-id`` when valid, else a new one, sent back in the initial metadata with the call's
outcome), one access-log line and the metrics, under the route
``/inference.GRPCInferenceService/<RPC>``.

The status counted is the HTTP status the same refusal has on HTTP (200 for an answer, 500 for
an internal error), so the request counters, Triton's statistics and the dashboards read gRPC
calls beside HTTP ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote

import grpc

from app.errors import CamserveError
from app.observability.context import REQUEST_ID_HEADER, identity, start_request
from app.observability.metrics import Metrics

logger = logging.getLogger("app.grpc.access")

REQUEST_ID_METADATA = REQUEST_ID_HEADER.lower()
FORWARDED_METADATA = "x-forwarded-for"
Handler = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


def http_status(error: BaseException | None) -> int:
    """The HTTP status of a call's outcome: 200, the refusal's own status, 499 for a call its
    client cancelled (nginx's code for it), or 500."""
    if error is None:
        return 200
    if isinstance(error, CamserveError):
        return error.status_code
    if isinstance(error, asyncio.CancelledError):
        return 499
    return 500


def peer_host(peer: str | None) -> str | None:
    """The address in a gRPC peer string (``ipv4:10.0.0.5:51234``, ``ipv6:[::1]:51234``,
    ``unix:/path``): what HTTP's peer address is for per-client rules.

    grpc writes the peer as a URI, its brackets percent-encoded (``ipv6:%5B::1%5D:51234``):
    read as it came, an IPv6 address kept its port, and each connection of one client was a
    client of its own for fair admission."""
    if not peer:
        return None
    kind, _, rest = peer.partition(":")
    rest = unquote(rest)
    if kind == "ipv4":
        return rest.rpartition(":")[0] or rest
    if kind == "ipv6":
        return rest.rpartition("]")[0].lstrip("[") or rest
    return peer


class Proxies:
    """The proxies whose ``x-forwarded-for`` names a call's client: CAMSERVE_FORWARDED_ALLOW_IPS,
    as uvicorn reads it for HTTP (addresses, networks, or ``*``)."""

    def __init__(self, allowed: str) -> None:
        parts = [part.strip() for part in allowed.split(",") if part.strip()]
        self.any = "*" in parts
        self.networks = [ipaddress.ip_network(part, strict=False) for part in parts if part != "*"]

    def trusts(self, host: str | None) -> bool:
        if host is None:
            return False
        if self.any:
            return True
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in network for network in self.networks)

    def client(self, peer: str | None, forwarded: str | None) -> str | None:
        """The call's client address: the peer's, or where a trusted proxy sent the call, the
        nearest address of ``forwarded`` that is not a trusted proxy (uvicorn's rule)."""
        host = peer_host(peer)
        if not forwarded or not self.trusts(host):
            return host
        hops = [hop.strip().strip("[]") for hop in forwarded.split(",") if hop.strip()]
        for hop in reversed(hops):
            if not self.trusts(hop):
                return hop
        return hops[0] if hops else host


NO_PROXIES = Proxies("")


def accessed(
    route: str,
    method: Handler,
    metrics: Callable[[], Metrics | None],
    proxies: Proxies = NO_PROXIES,
) -> Handler:
    """``method`` with its call logged and counted; ``metrics`` is read at each call (the app's
    state holds them once the lifespan ran). A call's client is its peer's address, or the one
    that a trusted proxy (``proxies``) names in ``x-forwarded-for``: behind the gateway, every
    gRPC call was the gateway's, one client for fair admission."""

    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        started = time.perf_counter()
        metadata = dict(context.invocation_metadata() or ())
        given = metadata.get(REQUEST_ID_METADATA)
        info = start_request(given if isinstance(given, str) else None)
        forwarded = metadata.get(FORWARDED_METADATA)
        client = proxies.client(context.peer(), forwarded if isinstance(forwarded, str) else None)
        info.caller = identity(client)  # check_key names a key's client
        outcome: BaseException | None = None
        # The id goes back once the outcome is known, not when the call begins: initial
        # metadata tells a proxy that the call is answered, so when a replica died mid-call,
        # nginx could only reset the stream (INTERNAL at the client, 200 in its log) instead of
        # answering 502 (UNAVAILABLE, which a client may retry).
        sent_id = ((REQUEST_ID_METADATA, info.request_id),)
        try:
            answer = await method(request, context)
            await context.send_initial_metadata(sent_id)
            return answer
        except asyncio.CancelledError as error:
            outcome = error
            raise
        except BaseException as error:  # turned into the call's gRPC status outside this wrapper
            outcome = error
            with contextlib.suppress(Exception):  # the refusal, not a failure to send the id
                await context.send_initial_metadata(sent_id)
            raise
        finally:
            seconds = time.perf_counter() - started
            status = http_status(outcome)
            logger.info(
                "gRPC %s %d %.1f ms model=%s method=%s images=%d",
                route,
                status,
                seconds * 1000,
                info.model or "-",
                info.method or "-",
                info.images,
                extra={
                    "access": {
                        "http_method": "gRPC",
                        "path": route,
                        "status": status,
                        "ms": round(seconds * 1000, 3),
                        "model": info.model or None,
                        "method": info.method or None,
                        "images": info.images,
                    }
                },
            )
            if (counted := metrics()) is not None:
                counted.observe_request(route, status, seconds, info)

    call.__name__ = getattr(method, "__name__", "call")
    return call
