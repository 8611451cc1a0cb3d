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
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from app.grpc import messages
from app.grpc.service import Service, ServiceState

logger = logging.getLogger(__name__)

MESSAGE_OVERHEAD = 64 * 1024
"""Room in a request for everything but the images (names, shapes, parameters)."""
_HEALTH_EVERY_S = 0.5
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def max_message_bytes(max_upload_bytes: int, max_images: int) -> int:
    """Largest request: every image at the upload limit, with its 4-byte length prefix."""
    return (max_upload_bytes + 4) * max_images + MESSAGE_OVERHEAD


class _Health(health.aio.HealthServicer):  # type: ignore[misc]
    """The health service, its statuses read from the service at each check."""

    def __init__(self, service: Service) -> None:
        super().__init__()
        self.service = service

    async def refresh(self) -> None:
        status = _SERVING if self.service.ready() else _NOT_SERVING
        for name in ("", messages.SERVICE):
            await self.set(name, status)

    async def Check(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        await self.refresh()
        return await super().Check(request, context)


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
            # do, so that a full service is not taken for a dead one.
            maximum_concurrent_rpcs=settings.max_connections + settings.probe_connections,
            options=[
                ("grpc.max_receive_message_length", limit),
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
        self.health = _Health(self.service)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.port = self.server.add_insecure_port(address)
        self._watch: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.health.refresh()
        await self.server.start()
        self._watch = asyncio.create_task(self._keep_health())
        logger.info("gRPC (Open Inference Protocol, health) on port %d", self.port)

    async def _keep_health(self) -> None:
        # Watch streams hear of a change only when the status is set again.
        while True:
            await asyncio.sleep(_HEALTH_EVERY_S)
            await self.health.refresh()

    async def stop(self, grace_s: float) -> None:
        """Refuse new calls, give those in flight ``grace_s``, then close."""
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
            self._watch = None
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)
