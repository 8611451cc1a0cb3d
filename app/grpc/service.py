"""``inference.GRPCInferenceService``: the Open Inference Protocol's RPCs over the service's
own state (the registry, the explainer, the drain), as thin as the HTTP routes.

Like HTTP: ServerLive, ServerReady and ServerMetadata are open; ModelReady, ModelMetadata and
ModelInfer need the API key (metadata ``x-api-key``) when ``CAMSERVE_API_KEY`` is set; the
repository RPCs (RepositoryIndex, RepositoryModelLoad, RepositoryModelUnload) are off without
``CAMSERVE_ADMIN_KEY`` (PERMISSION_DENIED) and need it in metadata ``x-admin-key`` (HTTP's
X-Admin-Key header). Every refusal is a camserve error turned into its gRPC code
(``app.grpc.status``), its message the status details.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import grpc
from google.protobuf.message import DecodeError

from app.errors import (
    BadRequest,
    BodyTimeout,
    CamserveError,
    HttpMethodNotAllowed,
    NotReady,
    Overloaded,
    ShuttingDown,
    Unauthorized,
    clip,
)
from app.grpc import messages
from app.grpc.access import Proxies, accessed
from app.grpc.infer import infer, parse_version
from app.grpc.status import status_of, trailing_metadata
from app.grpc.wire import check_fields
from app.lifecycle import Lifecycle
from app.models.control import ModelControl
from app.models.registry import ModelRegistry
from app.observability.context import current_request, identity
from app.observability.metrics import Metrics
from app.pipeline.explainer import Explainer
from app.protocols import oip, repository
from app.settings import ApiKeys, Settings

logger = logging.getLogger(__name__)

API_KEY_METADATA = "x-api-key"
ADMIN_KEY_METADATA = "x-admin-key"
"""HTTP's X-Admin-Key header, as gRPC metadata names it (lowercase)."""
Handler = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]
Gate = Callable[[grpc.aio.ServicerContext], object]
"""A check of a call's metadata, made before its message is read (it raises to refuse)."""


class ServiceState(Protocol):
    """What the service reads, at each call (the HTTP app's state: the lifespan fills it)."""

    settings: Settings
    lifecycle: Lifecycle


class Service:
    """The RPCs, each a coroutine ``(request, context) -> response``."""

    def __init__(self, state: ServiceState) -> None:
        self.state = state
        self.settings = state.settings
        self._calls = 0
        """Calls of the service in flight (health checks are not among them)."""
        self._messages = MessageBudget(self.settings.body_budget_bytes)
        self._proxies = Proxies(self.settings.forwarded_allow_ips)
        # Every key HTTP takes (CAMSERVE_API_KEY, CAMSERVE_API_KEYS, CAMSERVE_API_KEYS_FILE),
        # read once at startup and matched by the same rule as HTTP's.
        self._api_keys = ApiKeys.from_settings(self.settings)

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
    def control(self) -> ModelControl:
        control: ModelControl | None = getattr(self.state, "control", None)
        if control is None:
            raise NotReady("The service is starting; retry in a moment.")
        return control

    def _metrics(self) -> Metrics | None:
        return getattr(self.state, "metrics", None)

    @property
    def lifecycle(self) -> Lifecycle:
        return self.state.lifecycle

    def ready(self) -> bool:
        """The server's readiness, as ``/ready`` answers it: models loaded, not draining."""
        registry = getattr(self.state, "registry", None)
        return registry is not None and oip.server_ready(registry, self.lifecycle.draining)

    def check_key(self, context: grpc.aio.ServicerContext) -> str | None:
        """Refuse a call without one of the configured API keys (no-op when none is set); the
        caller's identity as HTTP names it (``key:<name>``), None without keys."""
        if not self._api_keys.required:
            return None
        sent = dict(context.invocation_metadata() or ()).get(API_KEY_METADATA)
        if isinstance(sent, str):
            sent = sent.encode("utf-8")
        found = self._api_keys.name_of(sent)
        if (info := current_request()) is not None:  # counted per key, as HTTP's gate does
            info.client = found or "-"
            info.caller = identity(None, found, keyed=True)
        if found is None:
            raise Unauthorized(
                f"Missing or wrong API key; send it in the call's metadata as {API_KEY_METADATA!r}."
            )
        return identity(None, found, keyed=True)

    def check_admin_key(self, context: grpc.aio.ServicerContext) -> None:
        """Refuse a repository call: the API off without CAMSERVE_ADMIN_KEY, or the key not
        sent."""
        repository.require_admin_key(
            self.settings.admin_key,
            dict(context.invocation_metadata() or ()).get(ADMIN_KEY_METADATA),
            f"the call's metadata as {ADMIN_KEY_METADATA!r}",
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

    def check_not_draining(self) -> None:
        """Refuse new work (an inference, a load or unload) once the drain has begun, as HTTP's
        gate refuses every POST."""
        if self.lifecycle.draining:
            raise ShuttingDown(
                "The service is shutting down and takes no new work; retry on another replica."
            )

    async def model_infer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        # With keys, the cached explanations a call may be given and makes are its key's, as
        # over HTTP: one client cannot learn from a cache hit what another sent.
        scope = self.check_key(context)
        self.check_not_draining()
        with self.lifecycle.track():
            return await infer(
                request,
                self.settings,
                self.explainer,
                self.lifecycle,
                context.time_remaining(),
                scope,
            )

    # ------------------------------------------------------------------ model repository

    async def repository_index(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self.check_admin_key(context)
        _one_store(request.repository_name)
        rows = repository.repository_index(self.registry, ready_only=request.ready)
        return messages.RepositoryIndexResponse(
            models=[
                {"name": r.name, "version": r.version or "", "state": r.state, "reason": r.reason}
                for r in rows
            ]
        )

    async def repository_model_load(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self.check_admin_key(context)
        _one_store(request.repository_name)
        self.check_not_draining()
        with self.lifecycle.track():
            await repository.load_model(
                self.control, request.model_name, _parameters(request.parameters)
            )
        return messages.RepositoryModelLoadResponse()

    async def repository_model_unload(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self.check_admin_key(context)
        _one_store(request.repository_name)
        self.check_not_draining()
        with self.lifecycle.track():
            await repository.unload_model(
                self.control, request.model_name, _parameters(request.parameters)
            )
        return messages.RepositoryModelUnloadResponse()

    def handlers(self) -> dict[str, Handler]:
        """RPC name -> its coroutine, taking the request's bytes (parsed here: a malformed
        message is refused like any other bad request), logged and counted as HTTP requests
        are, refusals turned into gRPC statuses."""
        methods = {
            "ServerLive": self.server_live,
            "ServerReady": self.server_ready,
            "ServerMetadata": self.server_metadata,
            "ModelReady": self.model_ready,
            "ModelMetadata": self.model_metadata,
            "ModelInfer": self.model_infer,
            "RepositoryIndex": self.repository_index,
            "RepositoryModelLoad": self.repository_model_load,
            "RepositoryModelUnload": self.repository_model_unload,
        }
        # What each RPC checks on its metadata, before its message is read (HTTP's gate checks
        # the headers before the body): an anonymous 160 MB message is refused unread.
        gates: dict[str, Gate] = {
            "ModelReady": self.check_key,
            "ModelMetadata": self.check_key,
            "ModelInfer": self._new_work(self.check_key),
            "RepositoryIndex": self.check_admin_key,
            "RepositoryModelLoad": self._new_work(self.check_admin_key),
            "RepositoryModelUnload": self._new_work(self.check_admin_key),
        }
        types = messages.methods()
        missing = set(types) ^ set(methods)
        if missing:  # the proto and the service must list the same RPCs
            raise RuntimeError(f"RPCs without a handler or a message type: {sorted(missing)}")
        served = {
            name: _answering(
                accessed(
                    f"/{messages.SERVICE}/{name}",
                    self._capped(self._reading(gates.get(name), types[name][0], method)),
                    self._metrics,
                    self._proxies,
                )
            )
            for name, method in methods.items()
        }
        refused = {
            # Refused once the first message came, as before (tritonclient's stream reports
            # the refusal through its callback then, not as a broken stream); counted, and read
            # within the deadline, as the served calls are.
            name: _answering(
                accessed(
                    f"/{messages.SERVICE}/{name}",
                    self._capped(self._reading(None, None, _unserved(name, fix))),
                    self._metrics,
                    self._proxies,
                )
            )
            for name, fix in UNSERVED.items()
        }
        return {**served, **refused}

    def _new_work(self, check: Gate) -> Gate:
        """``check``, then the drain's refusal of new work."""

        def gate(context: grpc.aio.ServicerContext) -> None:
            check(context)
            self.check_not_draining()

        return gate

    def _reading(self, gate: Gate | None, request_type: Any, method: Handler) -> Handler:
        """``method`` called with the call's request: its message, read once ``gate`` passed
        it, within CAMSERVE_BODY_TIMEOUT_S, held in the message budget until the call ends,
        and parsed as ``request_type`` (None: left as bytes). ``request`` is the call's stream
        of messages (the server's handlers are stream-unary, so that nothing is read before
        the checks), or the message's bytes."""

        async def reading(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if gate is not None:
                gate(context)
            if isinstance(request, bytes):
                data = request
            else:
                data = await read_one(request, self.settings.body_timeout_s, cut=self.lifecycle.cut)
            with self._messages.holding(len(data)):
                if request_type is None:
                    return await method(data, context)
                parsed = parse(data, request_type)
                del data  # the parse is a copy: the call keeps that one
                return await method(parsed, context)

        reading.__name__ = method.__name__
        return reading

    def _capped(self, method: Handler) -> Handler:
        """``method`` refused (Overloaded) while CAMSERVE_MAX_CONNECTIONS calls are in flight,
        HTTP's cap on requests: grpc's own refusal said only 'Concurrent RPC limit exceeded!',
        and counted the health checks, which it then refused too."""

        async def capped(data: bytes, context: grpc.aio.ServicerContext) -> Any:
            if self._calls >= self.settings.max_connections:
                raise Overloaded(
                    f"The service has as many gRPC calls in flight as it accepts "
                    f"({self.settings.max_connections}, CAMSERVE_MAX_CONNECTIONS); retry after "
                    "the seconds in the trailing metadata retry-after.",
                    headers={"Retry-After": "1"},
                )
            self._calls += 1
            try:
                return await method(data, context)
            finally:
                self._calls -= 1

        capped.__name__ = method.__name__
        return capped


_SHARED_MEMORY = (
    "camserve takes images in the request, not in shared memory: send them in raw_input_contents."
)
UNSERVED: dict[str, str] = {
    "ModelStreamInfer": "camserve does not stream: send each request with ModelInfer.",
    "ModelConfig": "camserve serves a model's configuration (Triton's shape) over HTTP: "
    "GET /v2/models/{name}/config.",
    "ModelStatistics": "camserve serves the statistics (Triton's shape) over HTTP: "
    "GET /v2/models/{name}/stats.",
    **{
        f"{kind}SharedMemory{verb}": _SHARED_MEMORY
        for kind in ("System", "Cuda")
        for verb in ("Status", "Register", "Unregister")
    },
    "TraceSetting": "camserve has no trace settings: each call's x-request-id, access log line "
    "and metrics do that job.",
    "LogSettings": "camserve's log level is CAMSERVE_LOG_LEVEL, set at startup.",
}
"""Triton's RPCs that camserve does not serve, and what to do instead: each is refused
(UNIMPLEMENTED) with that, where grpc's own answer said only 'Method not found!'."""


async def read_one(
    requests: AsyncIterator[bytes],
    timeout_s: float,
    setting: str = "CAMSERVE_BODY_TIMEOUT_S",
    cut: asyncio.Event | None = None,
) -> bytes:
    """The one message of a unary call, from its stream of messages, within ``timeout_s`` and
    before the drain's ``cut`` (then ShuttingDown, as HTTP answers a body still arriving).

    grpc reads a unary handler's message before it calls the handler, with no time limit: a
    call that sent its headers and never its message held one of grpc's places for ever, and
    a thousand of them (one connection) locked out every call, health checks included."""
    message = asyncio.ensure_future(anext(requests))
    waits: set[asyncio.Future[Any]] = {message}
    if cut is not None:
        waits.add(asyncio.ensure_future(cut.wait()))
    try:
        await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        if message.done():
            return message.result()
        if cut is not None and cut.is_set():
            # A call still sending its message at the cut was cancelled by grpc's own stop:
            # 'Cancelling all calls', logged as a 400 with two tracebacks.
            raise ShuttingDown(
                "The service is shutting down and this call's request message had not arrived "
                "when its grace period ended; retry it on another replica."
            )
        raise BodyTimeout(
            f"The call's request message did not arrive within {timeout_s:g} s ({setting}); "
            "send it with the call."
        )
    except StopAsyncIteration:
        raise BadRequest("The call ended without its request message; send one.") from None
    finally:
        for wait in waits:
            wait.cancel()
        await asyncio.gather(*waits, return_exceptions=True)


def _unserved(name: str, fix: str) -> Handler:
    async def unserved(data: bytes, context: grpc.aio.ServicerContext) -> Any:
        raise HttpMethodNotAllowed(f"{name} is a Triton RPC that camserve does not serve; {fix}")

    unserved.__name__ = name
    return unserved


EXTENSIONS = ("classification", "model_repository")
"""The protocol extensions (of those camserve serves over HTTP) that gRPC serves too: not the
binary tensor data (gRPC's raw contents are its own) or the statistics (no ModelStatistics RPC
in the proto)."""


def _one_store(repository_name: str) -> None:
    """camserve has one model store, unnamed: a request that names a repository is refused
    rather than answered from a store it did not name."""
    if repository_name:
        raise BadRequest(
            f"camserve has one model store and no repository {clip(repository_name)}; "
            "send repository_name empty."
        )


def _parameters(parameters: Any) -> dict[str, Any]:
    """A request's ``map<string, ModelRepositoryParameter>`` as plain values."""
    return {
        name: getattr(value, value.WhichOneof("parameter_choice") or "string_param")
        for name, value in parameters.items()
    }


def parse(data: bytes, request_type: Any) -> Any:
    """A request of ``request_type`` from its bytes; BadRequest for bytes that are not that
    message (grpc's own parse answered UNKNOWN and logged a traceback), or of more fields than
    any request needs (``check_fields``, before the parse)."""
    check_fields(data, request_type.DESCRIPTOR)
    try:
        return request_type.FromString(data)
    except DecodeError:
        raise BadRequest(
            f"The request is not a valid {request_type.DESCRIPTOR.full_name} message "
            "(malformed protobuf, or a string field that is not UTF-8); send one built from "
            "the service's proto (grpc_predict_v2.proto)."
        ) from None


class MessageBudget:
    """The bytes of the gRPC messages that calls hold, from their reading to their answer, at
    most CAMSERVE_BODY_BUDGET_BYTES: HTTP's bodies have that budget, and the messages had
    none (eight ModelInfer calls of 168 MB at once took the process from 1.4 to 6.6 GB, each
    message read, parsed, split into its images and copied on the way, all at once)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    @contextmanager
    def holding(self, size: int) -> Iterator[None]:
        """Hold ``size`` bytes for the block; Overloaded (with Retry-After) when they do not
        fit beside the bytes held."""
        if self.held + size > self.limit:
            raise Overloaded(
                f"The service holds as many gRPC messages as it may ({self.limit} bytes, "
                f"CAMSERVE_BODY_BUDGET_BYTES) and this one has {size}; retry after the seconds "
                "in the trailing metadata retry-after.",
                headers={"Retry-After": "1"},
            )
        self.held += size
        try:
            yield
        finally:
            self.held -= size


def _answering(method: Handler) -> Handler:
    async def answer(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(request, context)
        except CamserveError as error:
            await context.abort(status_of(error), error.message, trailing_metadata(error))
        except Exception:
            logger.exception("gRPC %s failed", method.__name__)
            await context.abort(
                grpc.StatusCode.INTERNAL, "Internal error; the server log has the details."
            )

    answer.__name__ = method.__name__
    return answer
