"""The gRPC server: the inference service and the standard health service on
``CAMSERVE_GRPC_PORT``, in the event loop of the HTTP server, drained with it.

Started and stopped by ``python -m app`` (``app.__main__``): the app's state, which the HTTP
lifespan fills, is what the service reads. The health service answers for the whole server
(service ``""``) and for ``inference.GRPCInferenceService``: SERVING when ``/ready`` would say
200 (models loaded, not draining), NOT_SERVING otherwise, so a Kubernetes gRPC readiness probe
reads what the HTTP one reads.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2

from app.errors import CamserveError, clip
from app.grpc import messages
from app.grpc.service import Service, ServiceState, read_one
from app.grpc.status import status_of

logger = logging.getLogger(__name__)

MESSAGE_OVERHEAD = 64 * 1024
"""Room in a request for everything but the images (names, shapes, parameters)."""
_HEALTH_EVERY_S = 0.5
_HEALTH = "grpc.health.v1.Health"
_HEALTH_SERVICES = ("", messages.SERVICE)
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def max_message_bytes(max_upload_bytes: int, max_images: int) -> int:
    """Largest request: every image at the upload limit, with its 4-byte length prefix."""
    return (max_upload_bytes + 4) * max_images + MESSAGE_OVERHEAD


class _Health:
    """``grpc.health.v1.Health`` for the server (``""``) and the inference service: SERVING
    while the service is ready, NOT_SERVING otherwise and from the drain on.

    Not grpc_health's servicer: its handlers were unary, so a call that never sent its request
    held one of grpc's places for ever (here each request is read within
    CAMSERVE_HEADER_TIMEOUT_S: it is a few bytes, sent with the headers); and its Watch deleted
    the shared wait of a service when one of its watchers left, so every other watcher of it
    never heard of a change again (NOT_SERVING at the drain included). Watch streams are held
    for as long as their client likes: at most CAMSERVE_PROBE_CONNECTIONS at once."""

    def __init__(self, service: Service, timeout_s: float, most_watching: int) -> None:
        self.service = service
        self.timeout_s = timeout_s
        self.most_watching = most_watching
        self.watching = 0
        self.status = _NOT_SERVING
        self.stopping = False
        self._changed = asyncio.Event()
        """Set (and replaced) when the status changes."""

    def refresh(self) -> None:
        ready = self.service.ready() and not self.stopping
        status = _SERVING if ready else _NOT_SERVING
        if status != self.status:
            self.status = status
            changed, self._changed = self._changed, asyncio.Event()
            changed.set()

    def stop(self) -> None:
        """NOT_SERVING from now on."""
        self.stopping = True
        self.refresh()

    def handlers(self) -> grpc.GenericRpcHandler:
        answer = health_pb2.HealthCheckResponse.SerializeToString
        return grpc.method_handlers_generic_handler(
            _HEALTH,
            {
                "Check": grpc.stream_unary_rpc_method_handler(
                    self.check, response_serializer=answer
                ),
                "Watch": grpc.stream_stream_rpc_method_handler(
                    self.watch, response_serializer=answer
                ),
            },
        )

    async def _request(self, requests: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return health_pb2.HealthCheckRequest.FromString(
                await read_one(requests, self.timeout_s, "CAMSERVE_HEADER_TIMEOUT_S")
            )
        except CamserveError as error:
            await context.abort(status_of(error), error.message)
        except DecodeError:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"The request is not a valid {_HEALTH}.HealthCheckRequest message.",
            )

    def _status_of(self, name: str) -> Any:
        return self.status if name in _HEALTH_SERVICES else None

    async def check(self, requests: Any, context: grpc.aio.ServicerContext) -> Any:
        request = await self._request(requests, context)
        self.refresh()
        status = self._status_of(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, _unknown(request.service))
        return health_pb2.HealthCheckResponse(status=status)

    async def watch(self, requests: Any, context: grpc.aio.ServicerContext) -> None:
        request = await self._request(requests, context)
        if self.watching >= self.most_watching:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"The server has as many health Watch streams open as it allows "
                f"({self.most_watching}, CAMSERVE_PROBE_CONNECTIONS); use Check.",
            )
        self.watching += 1
        try:
            last = None
            while True:
                changed = self._changed
                status = self._status_of(request.service)
                if status is None:
                    status = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
                if status != last:
                    await context.write(health_pb2.HealthCheckResponse(status=status))
                    last = status
                await changed.wait()
        finally:
            self.watching -= 1


def _unknown(name: str) -> str:
    return f"No service {clip(name)}; ask for '' (the server) or {messages.SERVICE!r}."


class GrpcServer:
    """One ``grpc.aio`` server: start, bound port, drain-aware stop."""

    def __init__(
        self, state: ServiceState, host: str, port: int, *, reuse_port: bool = False
    ) -> None:
        settings = state.settings
        self.service = Service(state)
        limit = max_message_bytes(settings.max_upload_bytes, settings.max_images)
        self.server = grpc.aio.server(
            # grpc's own cap, which refuses a call before its message is read: the service's
            # calls are capped at CAMSERVE_MAX_CONNECTIONS by the service itself (a named
            # refusal), and health checks have CAMSERVE_PROBE_CONNECTIONS more, as HTTP's probes
            # do, so that a full service is not taken for a dead one; the Watch streams, as
            # many again.
            maximum_concurrent_rpcs=settings.max_connections + 2 * settings.probe_connections,
            options=[
                ("grpc.max_receive_message_length", limit),
                # Connections as HTTP bounds its own: at most CAMSERVE_MAX_CONNECTIONS (more are
                # closed at once), the HTTP/2 handshake within CAMSERVE_HEADER_TIMEOUT_S (grpc
                # waits 120 s), closed once CAMSERVE_KEEP_ALIVE_S pass without a call (a
                # client's channel connects again at its next call). grpc had no bound: 15,000
                # idle connections held 173 MB and 15,000 file descriptors, and past the
                # open-file limit HTTP could accept no connection either.
                ("grpc.max_allowed_incoming_connections", settings.max_connections),
                ("grpc.server_handshake_timeout_ms", round(settings.header_timeout_s * 1000)),
                ("grpc.max_connection_idle_ms", round(settings.keep_alive_s * 1000)),
                # Off, so that a taken port is an error; on for the workers sharing it.
                ("grpc.so_reuseport", int(reuse_port)),
            ],
        )
        types = messages.methods()
        handlers = {
            # Stream-unary (the same on the wire as unary): grpc calls the handler before the
            # message arrives, and the handler reads it after its checks, within a deadline
            # (Service._reading). No request_deserializer: each handler parses its bytes itself.
            name: grpc.stream_unary_rpc_method_handler(
                handler,
                # None for the RPCs it refuses (UNSERVED): they answer no message.
                response_serializer=types[name][1].SerializeToString if name in types else None,
            )
            for name, handler in self.service.handlers().items()
        }
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(messages.SERVICE, handlers),)
        )
        self.health = _Health(self.service, settings.header_timeout_s, settings.probe_connections)
        self.server.add_generic_rpc_handlers((self.health.handlers(),))
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.port = self.server.add_insecure_port(address)
        self._watch: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.health.refresh()
        await self.server.start()
        self._watch = asyncio.create_task(self._keep_health())
        logger.info("gRPC (Open Inference Protocol, health) on port %d", self.port)

    async def _keep_health(self) -> None:
        # Watch streams hear of a change when a refresh finds it.
        while True:
            await asyncio.sleep(_HEALTH_EVERY_S)
            self.health.refresh()

    async def stop(self, grace_s: float) -> None:
        """Refuse new calls, give those in flight ``grace_s``, then close."""
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
            self._watch = None
        self.health.stop()
        await self.server.stop(grace_s)
