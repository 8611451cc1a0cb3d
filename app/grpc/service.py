"""``inference.GRPCInferenceService``: the Open Inference Protocol's RPCs over the service's
own state (the registry, the explainer, the drain), as thin as the HTTP routes.

Like HTTP: ServerLive, ServerReady and ServerMetadata are open; ModelReady, ModelMetadata and
ModelInfer need the API key (metadata ``x-api-key``) when ``CAMSERVE_API_KEY`` is set. Every
refusal is a camserve error turned into its gRPC code (``app.grpc.status``), its message the
status details.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import grpc

from app.errors import CamserveError, NotReady, ShuttingDown, Unauthorized
from app.grpc import messages
from app.grpc.infer import infer, parse_version
from app.grpc.status import status_of
from app.lifecycle import Lifecycle
from app.models.registry import ModelRegistry
from app.pipeline.explainer import Explainer
from app.protocols import oip
from app.settings import Settings

logger = logging.getLogger(__name__)

API_KEY_METADATA = "x-api-key"
Handler = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


class ServiceState(Protocol):
    """What the service reads, at each call (the HTTP app's state: the lifespan fills it)."""

    settings: Settings
    lifecycle: Lifecycle


class Service:
    """The RPCs, each a coroutine ``(request, context) -> response``."""

    def __init__(self, state: ServiceState) -> None:
        self.state = state
        self.settings = state.settings

    # ------------------------------------------------------------------ state

    @property
    def registry(self) -> ModelRegistry:
        registry: ModelRegistry | None = getattr(self.state, "registry", None)
        if registry is None:
            raise NotReady("The service is starting; retry in a moment.")
        return registry

    @property
    def explainer(self) -> Explainer:
        explainer: Explainer | None = getattr(self.state, "explainer", None)
        if explainer is None:
            raise NotReady("The service is starting; retry in a moment.")
        return explainer

    @property
    def lifecycle(self) -> Lifecycle:
        return self.state.lifecycle

    def ready(self) -> bool:
        """The server's readiness, as ``/ready`` answers it: models loaded, not draining."""
        registry = getattr(self.state, "registry", None)
        return registry is not None and oip.server_ready(registry, self.lifecycle.draining)

    def check_key(self, context: grpc.aio.ServicerContext) -> None:
        """Refuse a call without the configured API key (no-op when none is set)."""
        expected = self.settings.api_key
        if expected is None:
            return
        sent = dict(context.invocation_metadata() or ()).get(API_KEY_METADATA)
        if isinstance(sent, str):
            sent = sent.encode("utf-8")
        if sent is None or not hmac.compare_digest(sent, expected.get_secret_value().encode()):
            raise Unauthorized(
                f"Missing or wrong API key; send it in the call's metadata as {API_KEY_METADATA!r}."
            )

    # ------------------------------------------------------------------ health and metadata

    async def server_live(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return messages.ServerLiveResponse(live=True)

    async def server_ready(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return messages.ServerReadyResponse(ready=self.ready())

    async def server_metadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        metadata = oip.server_metadata()
        return messages.ServerMetadataResponse(
            name=metadata.name,
            version=metadata.version,
            extensions=[name for name in metadata.extensions if name in EXTENSIONS],
        )

    async def model_ready(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self.check_key(context)
        ready = oip.model_ready(self.registry, request.name, parse_version(request.version))
        return messages.ModelReadyResponse(ready=ready)

    async def model_metadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self.check_key(context)
        metadata = oip.model_metadata(self.registry, request.name, parse_version(request.version))
        return messages.ModelMetadataResponse(**metadata.model_dump())

    # ------------------------------------------------------------------ inference

    async def model_infer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self.check_key(context)
        if self.lifecycle.draining:
            raise ShuttingDown(
                "The service is shutting down and takes no new work; retry on another replica."
            )
        with self.lifecycle.track():
            return await infer(
                request,
                self.settings,
                self.explainer,
                self.lifecycle,
                context.time_remaining(),
            )

    def handlers(self) -> dict[str, Handler]:
        """RPC name -> its coroutine, refusals turned into gRPC statuses."""
        return {
            name: _answering(method)
            for name, method in {
                "ServerLive": self.server_live,
                "ServerReady": self.server_ready,
                "ServerMetadata": self.server_metadata,
                "ModelReady": self.model_ready,
                "ModelMetadata": self.model_metadata,
                "ModelInfer": self.model_infer,
            }.items()
        }


EXTENSIONS = ("classification",)
"""The protocol extensions (of those camserve serves over HTTP) that gRPC serves too: not the
binary tensor data (gRPC's raw contents are its own), the repository or the statistics (KServe's
proto has no RPCs for them)."""


def _answering(method: Handler) -> Handler:
    async def answer(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(request, context)
        except CamserveError as error:
            await context.abort(status_of(error), error.message)
        except Exception:
            logger.exception("gRPC %s failed", method.__name__)
            await context.abort(
                grpc.StatusCode.INTERNAL, "Internal error; the server log has the details."
            )

    answer.__name__ = method.__name__
    return answer
