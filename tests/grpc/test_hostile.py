"""What a hostile or careless gRPC client sends, and what it must not get: a message that costs
the service far more than its bytes, a call that holds a place it does not use."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from app.errors import BadRequest, InvalidParameter
from app.grpc import messages
from app.grpc.infer import read_message
from app.grpc.service import Service
from app.lifecycle import Lifecycle
from app.settings import Settings
from tests.grpc.conftest import KEYED, Served
from tests.grpc.test_service import _Aborted, _Context

BOOL = messages.InferParameter(bool_param=True)


def bytes_request(raw: bytes, count: int) -> object:
    request = messages.ModelInferRequest(
        model_name="tiny",
        inputs=[{"name": "image", "datatype": "BYTES", "shape": [count]}],
    )
    request.raw_input_contents.append(raw)
    return request


def test_a_bytes_tensor_is_read_no_further_than_one_element_past_the_image_limit() -> None:
    # Three empty elements, then a prefix that lies: the lie is past what the limit lets in.
    raw = struct.pack("<I", 0) * 3 + struct.pack("<I", 1000)
    with pytest.raises(InvalidParameter, match="More than 2 images .*CAMSERVE_MAX_IMAGES"):
        read_message(bytes_request(raw, 4), Settings(max_images=2))


def test_millions_of_empty_elements_are_refused_at_once() -> None:
    # 4 bytes each: a 16 MB buffer of them took 9 s of the GIL to read element by element (a
    # message at the default limit, 95 s), all to be refused for their number.
    count = 4_000_000
    request = bytes_request(bytes(4 * count), count)
    started = time.monotonic()
    with pytest.raises(InvalidParameter, match="More than 16 images"):
        read_message(request, Settings())
    assert time.monotonic() - started < 3


@pytest.mark.parametrize(
    ("field", "fill", "words"),
    [
        ("inputs", lambda r: [r.inputs.add(name="image") for _ in range(300)], "301 inputs"),
        ("outputs", lambda r: [r.outputs.add(name="cam") for _ in range(300)], "300 outputs"),
        (
            "parameters",
            lambda r: [r.parameters[f"p{i}"].CopyFrom(BOOL) for i in range(300)],
            "300 parameters",
        ),
        (
            "tensor parameters",
            lambda r: [r.inputs[0].parameters[f"p{i}"].CopyFrom(BOOL) for i in range(300)],
            "300 parameters of input 'image'",
        ),
        ("shape", lambda r: r.inputs[0].shape.extend([1] * 9), "9 dimensions in the shape"),
        (
            "bytes_contents",
            lambda r: r.inputs[0].contents.bytes_contents.extend([b""] * 300),
            "300 elements in the bytes_contents",
        ),
    ],
)
def test_lists_and_maps_past_the_request_models_bounds_are_refused_before_they_are_read(
    monkeypatch: pytest.MonkeyPatch, field: str, fill: Any, words: str
) -> None:
    # A 16 MB message of a million inputs took 14 s of the GIL to become the dicts that the
    # request model then refused; a 15 MB one of a million parameters, 6 s.
    from app.grpc import infer

    read: list[object] = []
    real = infer.parameters
    monkeypatch.setattr(infer, "parameters", lambda given: read.append(given) or real(given))
    request = messages.ModelInferRequest(model_name="tiny")
    request.inputs.add(name="image", datatype="BYTES")
    fill(request)
    with pytest.raises(BadRequest, match=words):
        infer.to_request(request)
    assert read == [], field


# ------------------------------------------------------------------ calls without their message


async def _never() -> AsyncIterator[bytes]:
    await asyncio.Event().wait()
    yield b""


def test_calls_that_never_send_their_message_do_not_lock_out_the_health_checks(
    served: Served,
) -> None:
    # grpc read a unary call's message before the service saw the call, with no time limit: a
    # thousand calls that sent their headers and never their message, on one connection, held
    # every one of grpc's places for ever, and every call got RESOURCE_EXHAUSTED 'Concurrent RPC
    # limit exceeded!', the health checks included. Now the service counts a call before its
    # message, refuses the calls past CAMSERVE_MAX_CONNECTIONS by name, and the probes pass.
    async def scenario() -> tuple[Any, grpc.aio.AioRpcError, Any]:
        async with grpc.aio.insecure_channel(served.target) as channel:
            infer = channel.stream_unary(f"/{messages.SERVICE}/ModelInfer")
            idle = [infer(_never(), metadata=tuple(KEYED.items())) for _ in range(1005)]
            await asyncio.sleep(1)
            async with grpc.aio.insecure_channel(served.target) as probe:
                health = await health_pb2_grpc.HealthStub(probe).Check(
                    health_pb2.HealthCheckRequest(), timeout=10
                )
                live = probe.unary_unary(f"/{messages.SERVICE}/ServerLive")
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await live(b"", timeout=10)
                for call in idle:
                    call.cancel()
                await asyncio.sleep(0.5)
                after = await live(b"", timeout=10)
        return health, refused.value, after

    health, refused, after = asyncio.run(scenario())
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert refused.code() == grpc.StatusCode.UNAVAILABLE
    assert "CAMSERVE_MAX_CONNECTIONS" in (refused.details() or "")
    assert after == messages.ServerLiveResponse(live=True).SerializeToString()


def test_a_call_without_its_key_is_refused_before_its_message(served: Served) -> None:
    # Like HTTP's gate, which refuses on the headers: grpc read (and the service parsed) an
    # anonymous message of up to the whole message limit before the key was checked.
    async def scenario() -> grpc.aio.AioRpcError:
        async with grpc.aio.insecure_channel(served.target) as channel:
            call = channel.stream_unary(f"/{messages.SERVICE}/ModelInfer")(_never(), timeout=10)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call
            return refused.value

    started = time.monotonic()
    refused = asyncio.run(scenario())
    assert refused.code() == grpc.StatusCode.UNAUTHENTICATED, refused.details()
    assert time.monotonic() - started < 5


def test_a_message_that_does_not_come_is_a_deadline_naming_the_setting() -> None:
    state = SimpleNamespace(settings=Settings(body_timeout_s=0.05), lifecycle=Lifecycle(1))
    live = Service(state).handlers()["ServerLive"]  # type: ignore[arg-type]
    context = _Context()
    with pytest.raises(_Aborted):
        asyncio.run(live(_never(), context))
    assert context.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "CAMSERVE_BODY_TIMEOUT_S" in context.details


def test_a_message_still_awaited_at_the_drains_cut_is_answered_shutting_down() -> None:
    # grpc's own stop cancelled it ('Cancelling all calls'), logged as a 400 with tracebacks.
    lifecycle = Lifecycle(grace_s=0)
    state = SimpleNamespace(settings=Settings(body_timeout_s=5), lifecycle=lifecycle)
    live = Service(state).handlers()["ServerLive"]  # type: ignore[arg-type]
    context = _Context()

    async def cut_while_waiting() -> None:
        asyncio.get_running_loop().call_later(0.05, lifecycle.cut.set)
        await live(_never(), context)

    started = time.monotonic()
    with pytest.raises(_Aborted):
        asyncio.run(cut_while_waiting())
    assert time.monotonic() - started < 3
    assert context.code == grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in context.details


def test_the_message_is_read_from_the_calls_stream() -> None:
    async def one() -> AsyncIterator[bytes]:
        yield messages.message("ServerLiveRequest")().SerializeToString()

    state = SimpleNamespace(settings=Settings(), lifecycle=Lifecycle(1))
    live = Service(state).handlers()["ServerLive"]  # type: ignore[arg-type]
    assert asyncio.run(live(one(), _Context())).live


# ---------------------------------------------------------------------------- health


class _Watching(_Context):
    def __init__(self) -> None:
        super().__init__()
        self.written: list[int] = []
        self.wrote = asyncio.Event()

    async def write(self, answer: Any) -> None:
        self.written.append(answer.status)
        self.wrote.set()


async def _asking(service: str) -> AsyncIterator[bytes]:
    yield health_pb2.HealthCheckRequest(service=service).SerializeToString()


def _health(most_watching: int = 8) -> tuple[Any, SimpleNamespace]:
    from app.grpc.server import _Health

    service = SimpleNamespace(ready=lambda: service.is_ready, is_ready=True)
    health = _Health(service, timeout_s=0.05, most_watching=most_watching)  # type: ignore[arg-type]
    health.refresh()
    return health, service


def test_a_watcher_hears_the_change_after_another_watcher_of_its_service_left() -> None:
    # grpc_health's Watch deleted the service's shared wait when one of its watchers left: the
    # others never heard of a change again (NOT_SERVING at the drain included).
    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING

    async def scenario() -> list[int]:
        health, service = _health()
        first, second = _Watching(), _Watching()
        leaving = asyncio.create_task(health.watch(_asking(""), first))
        staying = asyncio.create_task(health.watch(_asking(""), second))
        await asyncio.wait_for(asyncio.gather(first.wrote.wait(), second.wrote.wait()), 5)
        leaving.cancel()
        await asyncio.gather(leaving, return_exceptions=True)
        second.wrote.clear()
        service.is_ready = False
        health.refresh()
        await asyncio.wait_for(second.wrote.wait(), 5)
        staying.cancel()
        await asyncio.gather(staying, return_exceptions=True)
        assert health.watching == 0
        return second.written

    assert asyncio.run(scenario()) == [serving, not_serving]


def test_watch_streams_past_the_probe_places_are_refused() -> None:
    async def scenario() -> _Watching:
        health, _ = _health(most_watching=1)
        held = asyncio.create_task(health.watch(_asking(""), _Watching()))
        await asyncio.sleep(0.01)
        refused = _Watching()
        with pytest.raises(_Aborted):
            await health.watch(_asking(""), refused)
        held.cancel()
        await asyncio.gather(held, return_exceptions=True)
        return refused

    refused = asyncio.run(scenario())
    assert refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "CAMSERVE_PROBE_CONNECTIONS" in refused.details


def test_a_health_check_whose_request_does_not_come_is_cut() -> None:
    health, _ = _health()
    context = _Context()
    with pytest.raises(_Aborted):
        asyncio.run(health.check(_never(), context))
    assert context.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "CAMSERVE_HEADER_TIMEOUT_S" in context.details


def test_a_health_check_of_an_unknown_service_is_not_found() -> None:
    health, _ = _health()
    context = _Context()
    with pytest.raises(_Aborted):
        asyncio.run(health.check(_asking("other"), context))
    assert context.code == grpc.StatusCode.NOT_FOUND


# ---------------------------------------------------------------------------- fields on the wire


def _parameter_entries(count: int, field: bytes = b'"') -> bytes:
    """``count`` map entries ``p<i>: bool_param true`` of the map field whose key is ``field``
    (``"`` is ModelInferRequest.parameters, number 4)."""
    entries = []
    for i in range(count):
        key = b"p%d" % i
        body = b"\n" + bytes([len(key)]) + key + b"\x12\x02\x08\x01"
        entries.append(field + bytes([len(body)]) + body)
    return b"".join(entries)


@pytest.mark.parametrize(
    ("what", "data"),
    [
        ("parameters", _parameter_entries(70_000)),
        ("empty inputs", b"\x2a\x00" * 70_000),
        ("empty raw buffers", b"\x3a\x00" * 70_000),
        (
            "shape",
            messages.ModelInferRequest(inputs=[{"shape": [0] * 70_000}]).SerializeToString(),
        ),
    ],
)
def test_a_message_of_more_fields_than_any_request_needs_is_refused_before_the_parse(
    what: str, data: bytes
) -> None:
    # Ten million parameters (159 MB) took 12 to 23 s to parse, in one C call holding the GIL
    # on the event loop: /health waited 11.6 s.
    from app.grpc.wire import check_fields

    with pytest.raises(BadRequest, match="more than 65536 fields"):
        check_fields(data, messages.ModelInferRequest.DESCRIPTOR)


def test_a_large_request_of_few_fields_is_not_refused() -> None:
    from app.grpc.wire import check_fields

    request = messages.ModelInferRequest(model_name="tiny")
    request.parameters["method"].string_param = "GradCAM"
    request.inputs.add(name="image", datatype="BYTES", shape=[16])
    request.raw_input_contents.append(bytes(16 * 1024 * 1024))
    check_fields(request.SerializeToString(), messages.ModelInferRequest.DESCRIPTOR)
    pixels = messages.ModelInferRequest(model_name="tiny")  # a number each, not counted
    tensor = pixels.inputs.add(name="image", datatype="UINT8", shape=[1, 400, 400, 3])
    tensor.contents.uint_contents.extend([200] * 480_000)
    check_fields(pixels.SerializeToString(), messages.ModelInferRequest.DESCRIPTOR)


def test_a_call_of_too_many_fields_is_invalid(served: Served) -> None:
    with grpc.insecure_channel(served.target) as channel:
        infer = channel.unary_unary(f"/{messages.SERVICE}/ModelInfer")
        with pytest.raises(grpc.RpcError) as refused:
            # 140 kB: within the message limit of the tests' server.
            infer(b"\x2a\x00" * 70_000, metadata=tuple(KEYED.items()), timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "more than 65536 fields" in refused.value.details()


# ---------------------------------------------------------------------------- messages held


def test_the_messages_that_calls_hold_have_a_budget_as_http_bodies_do(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # HTTP's bodies share CAMSERVE_BODY_BUDGET_BYTES; gRPC's messages had no budget: eight
    # ModelInfer calls of 168 MB took the process from 1.4 to 6.6 GB, and ten sent 2 s apart,
    # each held while it waited for model work, to 5.5 GB.
    release = asyncio.Event()

    async def infer(*args: Any) -> Any:
        await release.wait()
        return messages.ModelInferResponse(model_name="tiny")

    monkeypatch.setattr("app.grpc.service.infer", infer)
    state = SimpleNamespace(
        settings=Settings(body_budget_bytes=1024**2),
        lifecycle=Lifecycle(1),
        explainer=SimpleNamespace(),
    )
    handler = Service(state).handlers()["ModelInfer"]  # type: ignore[arg-type]
    request = messages.ModelInferRequest(model_name="tiny", raw_input_contents=[bytes(700_000)])
    data = request.SerializeToString()

    async def scenario() -> tuple[_Context, Any]:
        held = asyncio.create_task(handler(data, _Context()))
        await asyncio.sleep(0.01)
        refused = _Context()
        with pytest.raises(_Aborted):
            await handler(data, refused)
        release.set()
        await held
        return refused, await handler(data, _Context())  # its bytes came back

    refused, after = asyncio.run(scenario())
    assert refused.code == grpc.StatusCode.UNAVAILABLE
    assert "CAMSERVE_BODY_BUDGET_BYTES" in refused.details
    assert refused.trailing == (("retry-after", "1"),)
    assert after.model_name == "tiny"


# ---------------------------------------------------------------------------- who a call is


@pytest.mark.parametrize(
    ("peer", "host"),
    [
        ("ipv6:%5B::1%5D:50960", "::1"),
        ("ipv6:%5B2001:db8::7%5D:443", "2001:db8::7"),
        ("ipv6:%5Bfe80::1%25eth0%5D:443", "fe80::1%eth0"),
    ],
)
def test_an_ipv6_peer_as_grpc_writes_it_is_its_address_without_the_port(
    peer: str, host: str
) -> None:
    # grpc 1.85 names an IPv6 peer 'ipv6:%5B::1%5D:50960' (a URI): the port stayed in the
    # client's name, so each connection of one client was a client of its own, and a flood
    # over many connections was as many light clients for fair admission.
    from app.grpc.access import peer_host

    assert peer_host(peer) == host


@pytest.mark.parametrize(
    ("allowed", "peer", "forwarded", "client"),
    [
        ("10.0.0.0/8", "ipv4:10.0.0.5:4000", "203.0.113.7", "203.0.113.7"),
        # The rightmost address that is not a trusted proxy: a client cannot pick its identity.
        ("10.0.0.0/8", "ipv4:10.0.0.5:4000", "1.2.3.4, 203.0.113.7, 10.0.0.9", "203.0.113.7"),
        ("*", "ipv6:%5B::1%5D:4000", "2001:db8::7", "2001:db8::7"),
        ("10.0.0.0/8", "ipv4:192.0.2.1:4000", "203.0.113.7", "192.0.2.1"),  # not trusted
        ("", "ipv4:10.0.0.5:4000", "203.0.113.7", "10.0.0.5"),  # nobody trusted
        ("10.0.0.0/8", "ipv4:10.0.0.5:4000", None, "10.0.0.5"),
    ],
)
def test_a_trusted_proxy_names_the_calls_client_as_it_does_over_http(
    allowed: str, peer: str, forwarded: str | None, client: str
) -> None:
    # Behind the gateway every gRPC call was the gateway's: one client for fair admission, so
    # one end client's flood of Score-CAM calls locked every other gRPC client out.
    from app.grpc.access import Proxies, accessed
    from app.observability.context import current_request

    seen: list[str] = []

    async def answer(request: Any, context: Any) -> str:
        info = current_request()
        assert info is not None
        seen.append(info.caller)
        return "answer"

    call = accessed("/svc/Answer", answer, lambda: None, Proxies(allowed))  # type: ignore[arg-type]
    metadata = () if forwarded is None else (("x-forwarded-for", forwarded),)
    context = _Context(metadata)
    context.peer = lambda: peer  # type: ignore[method-assign]
    asyncio.run(call(None, context))  # type: ignore[arg-type]
    assert seen == [f"address:{client}"]


def test_the_gateway_sends_x_forwarded_for_with_each_grpc_call() -> None:
    from pathlib import Path

    conf = (Path(__file__).parents[2] / "deploy" / "gateway" / "nginx.conf").read_text()
    grpc_server = conf[conf.index("listen 8081") :]
    grpc_server = grpc_server[: grpc_server.index("\n    }\n")]
    assert "grpc_set_header X-Forwarded-For $proxy_add_x_forwarded_for;" in grpc_server


# ---------------------------------------------------------------------------- connections


def _h2_connection(target: str) -> socket.socket:
    """A TCP connection that opened HTTP/2 (the preface and empty SETTINGS) and sends no call."""
    host, port = target.rsplit(":", 1)
    connection = socket.create_connection((host, int(port)), timeout=15)
    connection.sendall(
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
    )
    return connection


def test_an_idle_connection_is_closed_after_the_keep_alive_time(served: Served) -> None:
    # grpc kept a connection without calls open for ever: 15,000 of them held 173 MB and as
    # many file descriptors, and past the open-file limit HTTP could accept no connection.
    connection = _h2_connection(served.target)
    started = time.monotonic()
    received = b""
    try:
        while chunk := connection.recv(65536):  # until the server closes it
            received += chunk
    finally:
        connection.close()
    assert time.monotonic() - started < 12  # CAMSERVE_KEEP_ALIVE_S is 5
    assert b"\x07\x00\x00\x00\x00\x00" in received  # a GOAWAY frame on stream 0


def test_connections_are_bounded_as_http_bounds_them(monkeypatch: pytest.MonkeyPatch) -> None:
    from app.grpc import server

    given: dict[str, Any] = {}
    real = grpc.aio.server

    def recording(**kwargs: Any) -> Any:
        given.update(kwargs.get("options") or ())
        return real(**kwargs)

    monkeypatch.setattr(server.grpc.aio, "server", recording)
    settings = Settings(max_connections=123, header_timeout_s=7, keep_alive_s=3)
    state = SimpleNamespace(settings=settings, lifecycle=Lifecycle(1))

    async def build() -> None:
        grpc_server = server.GrpcServer(state, "127.0.0.1", 0)  # type: ignore[arg-type]
        await grpc_server.server.stop(0)

    asyncio.run(build())
    assert given["grpc.max_allowed_incoming_connections"] == 123
    assert given["grpc.server_handshake_timeout_ms"] == 7000
    assert given["grpc.max_connection_idle_ms"] == 3000
