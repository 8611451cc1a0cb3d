"""The OIP gRPC service's health and metadata RPCs, and its refusals, through tritonclient.grpc
against a real server; the health service through grpcio's own stub."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from app.errors import Overloaded
from app.grpc import messages
from app.grpc.service import Service
from app.lifecycle import Lifecycle
from app.settings import Settings
from tests.grpc.conftest import KEYED, Served


def test_server_live_ready_and_metadata_need_no_key(
    triton: grpcclient.InferenceServerClient,
) -> None:
    assert triton.is_server_live()
    assert triton.is_server_ready()
    metadata = triton.get_server_metadata(as_json=True)
    assert metadata["name"] == "camserve" and metadata["version"]


def test_model_metadata_lists_the_image_input_and_the_outputs(
    triton: grpcclient.InferenceServerClient,
) -> None:
    metadata = triton.get_model_metadata("tiny", headers=KEYED, as_json=True)
    assert metadata["name"] == "tiny" and metadata["versions"] == ["1"]
    assert metadata["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": ["-1"]}]
    assert [(o["name"], o["datatype"], o["shape"]) for o in metadata["outputs"]] == [
        ("logits", "FP32", ["-1", "3"]),
        ("cam", "FP32", ["-1", "-1", "-1"]),
        ("concepts", "FP32", ["-1", "-1", "-1", "-1"]),  # DFF applies to tiny
        ("concept_labels", "BYTES", ["-1", "-1", "-1"]),
    ]


def test_model_ready_by_name_and_version(triton: grpcclient.InferenceServerClient) -> None:
    assert triton.is_model_ready("tiny", headers=KEYED)
    assert triton.is_model_ready("tiny", "1", headers=KEYED)
    assert not triton.is_model_ready("tiny", "7", headers=KEYED)
    assert not triton.is_model_ready("broken", headers=KEYED)


def status_of(call: Any) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as caught:
        call()
    return str(caught.value.status()), caught.value.message()


def test_an_unknown_model_is_not_found_and_names_the_models(
    triton: grpcclient.InferenceServerClient,
) -> None:
    code, message = status_of(lambda: triton.get_model_metadata("nope", headers=KEYED))
    assert code == "StatusCode.NOT_FOUND"
    assert "Unknown model 'nope'" in message and "tiny" in message


def test_a_missing_or_wrong_key_is_unauthenticated(
    triton: grpcclient.InferenceServerClient,
) -> None:
    for headers in (None, {"x-api-key": "wrong"}):
        code, message = status_of(lambda h=headers: triton.get_model_metadata("tiny", headers=h))
        assert code == "StatusCode.UNAUTHENTICATED"
        assert "x-api-key" in message


def test_a_version_that_is_not_a_number_is_invalid(
    triton: grpcclient.InferenceServerClient,
) -> None:
    code, message = status_of(lambda: triton.is_model_ready("tiny", "one", headers=KEYED))
    assert code == "StatusCode.INVALID_ARGUMENT" and "'one'" in message
    # Digits that are not ASCII: '²' passed isdigit, then int() failed (INTERNAL).
    for version in ("²", "٣"):
        code, message = status_of(lambda v=version: triton.is_model_ready("tiny", v, headers=KEYED))
        assert code == "StatusCode.INVALID_ARGUMENT" and repr(version) in message


@pytest.mark.parametrize("service", ["", messages.SERVICE])
def test_the_health_service_serves_once_models_are_loaded(served: Served, service: str) -> None:
    with grpc.insecure_channel(served.target) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


class _Aborted(Exception):
    pass


class _Context:
    """The part of a grpc.aio context the service uses."""

    def __init__(self, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self.metadata = metadata
        self.code: grpc.StatusCode | None = None
        self.details = ""

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.metadata

    def time_remaining(self) -> float | None:
        return None

    def peer(self) -> str:
        return "ipv4:127.0.0.1:50000"

    async def send_initial_metadata(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.sent = metadata

    async def abort(self, code: grpc.StatusCode, details: str, trailing_metadata: Any = ()) -> None:
        self.code, self.details, self.trailing = code, details, tuple(trailing_metadata)
        raise _Aborted


def test_draining_refuses_new_inference_and_reports_not_ready() -> None:
    lifecycle = Lifecycle(grace_s=1)
    state = SimpleNamespace(
        settings=Settings(), lifecycle=lifecycle, registry=SimpleNamespace(ready=True)
    )
    service = Service(state)  # type: ignore[arg-type]
    assert service.ready()
    lifecycle.begin_drain()
    assert not service.ready()
    context = _Context()
    with pytest.raises(_Aborted):
        request = messages.ModelInferRequest().SerializeToString()
        asyncio.run(service.handlers()["ModelInfer"](request, context))
    assert context.code == grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in context.details
    assert lifecycle.in_flight == 0


@pytest.mark.parametrize("rpc", ["RepositoryModelLoad", "RepositoryModelUnload"])
def test_draining_refuses_loads_and_unloads(rpc: str) -> None:
    # HTTP's gate refuses every POST once the drain began; gRPC loaded and unloaded models.
    lifecycle = Lifecycle(grace_s=1)
    control = SimpleNamespace()  # any use of it fails the test
    state = SimpleNamespace(
        settings=Settings(admin_key="admin"), lifecycle=lifecycle, control=control
    )
    lifecycle.begin_drain()
    request = messages.methods()[rpc][0](model_name="tiny").SerializeToString()
    context = _Context((("x-admin-key", "admin"),))
    with pytest.raises(_Aborted):
        asyncio.run(Service(state).handlers()[rpc](request, context))  # type: ignore[arg-type]
    assert context.code == grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in context.details


@pytest.mark.parametrize(
    "keys",
    [
        {"api_keys": "alice:alice-key,bob:bob-key"},
        {"api_key": "one-key", "api_keys": "bob:bob-key"},
    ],
)
def test_the_named_api_keys_guard_grpc_as_they_guard_http(keys: dict[str, str]) -> None:
    # CAMSERVE_API_KEYS (and its file) opened HTTP's routes only: gRPC read CAMSERVE_API_KEY
    # alone, so with named keys and no CAMSERVE_API_KEY every call went through without a key.
    state = SimpleNamespace(settings=Settings(**keys), lifecycle=Lifecycle(grace_s=1))
    request = messages.message("ModelMetadataRequest")(name="tiny").SerializeToString()
    handler = Service(state).handlers()["ModelMetadata"]  # type: ignore[arg-type]
    for sent in ((), (("x-api-key", "wrong"),), (("x-api-key", "alice"),)):
        context = _Context(sent)
        with pytest.raises(_Aborted):
            asyncio.run(handler(request, context))
        assert context.code == grpc.StatusCode.UNAUTHENTICATED, sent
    context = _Context((("x-api-key", "bob-key"),))
    with pytest.raises(_Aborted):  # past the key: the state has no registry yet
        asyncio.run(handler(request, context))
    assert context.code == grpc.StatusCode.UNAVAILABLE


def test_calls_are_counted_per_api_key_as_http_requests_are() -> None:
    # camserve_client_requests counted HTTP requests per key and no gRPC call at all.
    counted: list[tuple[str, int]] = []

    class Counting:
        def observe_request(self, route: str, status: int, seconds: float, info: Any) -> None:
            counted.append((info.client, status))

    state = SimpleNamespace(
        settings=Settings(api_keys="alice:alice-key,bob:bob-key"),
        lifecycle=Lifecycle(grace_s=1),
        metrics=Counting(),
    )
    request = messages.message("ModelMetadataRequest")(name="tiny").SerializeToString()
    handler = Service(state).handlers()["ModelMetadata"]  # type: ignore[arg-type]
    for sent in ((("x-api-key", "bob-key"),), (("x-api-key", "wrong"),), ()):
        with pytest.raises(_Aborted):  # bob's passes the key: the state has no registry yet
            asyncio.run(handler(request, _Context(sent)))
    assert counted == [("bob", 503), ("-", 401), ("-", 401)]
    asyncio.run(Service(state).handlers()["ServerLive"](b"", _Context()))  # type: ignore[arg-type]
    assert counted[-1] == ("", 200)  # an open RPC names no client, as an open route does


def test_a_busy_refusal_sends_its_retry_after_as_trailing_metadata() -> None:
    # The message asks the client to wait the seconds in Retry-After, which gRPC dropped.
    def busy(name: str, version: int | None) -> None:
        raise Overloaded(
            "The service is busy; retry after the seconds in Retry-After.",
            headers={"Retry-After": "7"},
        )

    explainer = SimpleNamespace(registry=SimpleNamespace(get=busy))
    state = SimpleNamespace(
        settings=Settings(), lifecycle=Lifecycle(grace_s=1), explainer=explainer
    )
    request = messages.ModelInferRequest(
        model_name="tiny",
        inputs=[{"name": "image", "datatype": "BYTES", "shape": [1]}],
        raw_input_contents=[b"\x03\x00\x00\x00png"],
    ).SerializeToString()
    context = _Context()
    with pytest.raises(_Aborted):
        asyncio.run(Service(state).handlers()["ModelInfer"](request, context))  # type: ignore[arg-type]
    assert context.code == grpc.StatusCode.UNAVAILABLE
    assert context.trailing == (("retry-after", "7"),)


@pytest.mark.parametrize(
    "data",
    [b"\x0a\x02\xff\xfe", b"\xff\xff\xff\xff\xff", b"\x0a\x10ab"],
    ids=["name not utf-8", "garbage", "truncated"],
)
def test_a_malformed_message_is_invalid_argument(served: Served, data: bytes) -> None:
    # grpc's own parse answered UNKNOWN ("Unexpected DecodeError") and logged a traceback,
    # outside the access log and the metrics.
    with grpc.insecure_channel(served.target) as channel:
        for rpc in ("ModelInfer", "ModelReady"):
            call = channel.unary_unary(
                f"/{messages.SERVICE}/{rpc}",
                request_serializer=lambda b: b,
                response_deserializer=lambda b: b,
            )
            with pytest.raises(grpc.RpcError) as caught:
                call(data, metadata=tuple(KEYED.items()), timeout=10)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, rpc
            assert f"not a valid inference.{rpc}Request message" in caught.value.details()


def test_inference_uses_the_cache_scope_of_its_key(monkeypatch: pytest.MonkeyPatch) -> None:
    # Over HTTP a key's cached explanations are its own; gRPC shared one scope among all keys,
    # so a cache hit told one client what another had sent.
    scopes: list[str | None] = []

    async def infer(*args: Any) -> Any:
        scopes.append(args[5])
        return messages.ModelInferResponse(model_name="tiny")

    monkeypatch.setattr("app.grpc.service.infer", infer)
    request = messages.ModelInferRequest(model_name="tiny").SerializeToString()
    for settings, sent, scope in (
        (Settings(api_keys="alice:alice-key,bob:bob-key"), "bob-key", "key:bob"),
        (Settings(api_key="one-key"), "one-key", "key:default"),
        (Settings(), None, None),
    ):
        state = SimpleNamespace(
            settings=settings, lifecycle=Lifecycle(grace_s=1), explainer=SimpleNamespace()
        )
        metadata = () if sent is None else (("x-api-key", sent),)
        handler = Service(state).handlers()["ModelInfer"]  # type: ignore[arg-type]
        asyncio.run(handler(request, _Context(metadata)))
        assert scopes[-1] == scope


def test_calls_past_max_connections_are_refused_by_name() -> None:
    # grpc's own cap answered RESOURCE_EXHAUSTED 'Concurrent RPC limit exceeded!' and refused
    # the health checks as well (a full service read as a dead one).
    state = SimpleNamespace(settings=Settings(max_connections=1), lifecycle=Lifecycle(grace_s=1))
    service = Service(state)  # type: ignore[arg-type]
    release = asyncio.Event()

    async def slow(request: Any, context: Any) -> Any:
        await release.wait()
        return messages.ServerLiveResponse(live=True)

    service.server_live = slow  # type: ignore[method-assign]
    live = service.handlers()["ServerLive"]
    request = messages.message("ServerLiveRequest")().SerializeToString()

    async def scenario() -> tuple[Any, _Context, Any]:
        first = asyncio.create_task(live(request, _Context()))
        await asyncio.sleep(0)
        refused = _Context()
        with pytest.raises(_Aborted):
            await live(request, refused)
        release.set()
        return await first, refused, await live(request, _Context())

    first, refused, after = asyncio.run(scenario())
    assert first.live and after.live
    assert refused.code == grpc.StatusCode.UNAVAILABLE
    assert "CAMSERVE_MAX_CONNECTIONS" in refused.details
    assert refused.trailing == (("retry-after", "1"),)


def test_tritons_rpcs_that_are_not_served_say_what_to_do_instead(
    triton: grpcclient.InferenceServerClient,
) -> None:
    # grpc's own answer was UNIMPLEMENTED 'Method not found!', naming no other way.
    for call, words in (
        (lambda: triton.get_model_config("tiny", headers=KEYED), "GET /v2/models/{name}/config"),
        (lambda: triton.get_inference_statistics("tiny", headers=KEYED), "/stats"),
        (lambda: triton.get_system_shared_memory_status(headers=KEYED), "raw_input_contents"),
        (lambda: triton.get_trace_settings(headers=KEYED), "x-request-id"),
    ):
        code, message = status_of(call)
        assert code == "StatusCode.UNIMPLEMENTED" and words in message
        assert "camserve does not serve" in message


def test_a_stream_is_refused_with_what_to_do_instead(served: Served) -> None:
    errors: list[Any] = []
    client = grpcclient.InferenceServerClient(served.target)
    client.start_stream(callback=lambda result, error: errors.append(error))
    tensor = grpcclient.InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([b"x"], dtype=np.object_))
    client.async_stream_infer("tiny", [tensor])
    client.stop_stream()
    client.close()
    assert errors and "UNIMPLEMENTED" in str(errors[0]) and "ModelInfer" in str(errors[0])
