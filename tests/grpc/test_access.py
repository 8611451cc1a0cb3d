"""Each gRPC call is logged and counted as an HTTP request is (app/grpc/access.py)."""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

import grpc
import httpx
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from app.errors import BadRequest
from app.grpc.access import accessed, peer_host
from app.observability.context import current_request, note_work
from tests.conftest import image_bytes
from tests.grpc.conftest import KEYED, Served

ROUTE = "/inference.GRPCInferenceService/ModelInfer"


def _counted(served: Served, status: str) -> float:
    text = httpx.get(f"{served.url}/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("camserve_requests_total{") and f'route="{ROUTE}"' in line:
            if f'status="{status}"' in line:
                total += float(line.rsplit(" ", 1)[1])
    return total


def _infer(served: Served, metadata: tuple[tuple[str, str], ...]) -> Any:
    request = service_pb2.ModelInferRequest(model_name="tiny")
    tensor = request.inputs.add(name="image", datatype="BYTES", shape=[1])
    tensor.contents.bytes_contents.append(image_bytes())
    with grpc.insecure_channel(served.target) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        return stub.ModelInfer.with_call(request, metadata=metadata, timeout=30)


def test_calls_are_counted_under_their_rpc_with_their_http_status(served: Served) -> None:
    ok, refused = _counted(served, "200"), _counted(served, "401")
    _, call = _infer(served, (*KEYED.items(), ("x-request-id", "grpc-call-7")))
    assert dict(call.initial_metadata())["x-request-id"] == "grpc-call-7"
    with pytest.raises(grpc.RpcError) as raised:
        _infer(served, ())
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert _counted(served, "200") == ok + 1
    assert _counted(served, "401") == refused + 1
    text = httpx.get(f"{served.url}/metrics", timeout=10).text
    # Its stage times too, under the model that served it.
    stage = f'model="tiny",route="{ROUTE}",stage="forward"'
    assert re.search(r"camserve_request_duration_seconds_count\{[^}]*" + re.escape(stage), text)


class _Context:
    def __init__(
        self, metadata: tuple[tuple[str, str], ...], peer: str = "ipv4:127.0.0.1:50000"
    ) -> None:
        self.metadata = metadata
        self.sent: tuple[tuple[str, str], ...] = ()
        self._peer = peer

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.metadata

    def peer(self) -> str:
        return self._peer

    async def send_initial_metadata(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.sent = metadata


class _Metrics:
    def __init__(self) -> None:
        self.seen: list[tuple[str, int, str, str]] = []

    def observe_request(self, route: str, status: int, seconds: float, info: Any) -> None:
        self.seen.append((route, status, info.model, info.request_id))


def test_one_access_line_and_one_count_per_call(caplog: pytest.LogCaptureFixture) -> None:
    metrics = _Metrics()

    async def answer(request: Any, context: Any) -> str:
        note_work("tiny", "GradCAM", 1, {"forward": 0.01}, version=1)
        return "answer"

    async def refuse(request: Any, context: Any) -> str:
        raise BadRequest("no such thing; send another")

    good = accessed("/svc/Answer", answer, lambda: metrics)  # type: ignore[arg-type]
    bad = accessed("/svc/Refuse", refuse, lambda: metrics)  # type: ignore[arg-type]
    forged = "x\r\nINFO forged line"
    with caplog.at_level(logging.INFO, logger="app.grpc.access"):
        context = _Context((("x-request-id", "given-1"),))
        assert asyncio.run(good(None, context)) == "answer"  # type: ignore[arg-type]
        assert context.sent == (("x-request-id", "given-1"),)
        fresh = _Context((("x-request-id", forged),))
        with pytest.raises(BadRequest):
            asyncio.run(bad(None, fresh))  # type: ignore[arg-type]
    assert fresh.sent[0][1] != forged  # an invalid id is replaced, never echoed
    assert metrics.seen[0] == ("/svc/Answer", 200, "tiny", "given-1")
    assert metrics.seen[1][:3] == ("/svc/Refuse", 400, "")
    lines = [r for r in caplog.records if r.name == "app.grpc.access"]
    assert [r.access["status"] for r in lines] == [200, 400]  # type: ignore[attr-defined]
    assert "gRPC /svc/Answer 200" in lines[0].getMessage()
    assert "model=tiny method=GradCAM images=1" in lines[0].getMessage()


def test_a_cancelled_call_counts_as_499() -> None:
    metrics = _Metrics()

    async def hang(request: Any, context: Any) -> None:
        await asyncio.sleep(30)

    call = accessed("/svc/Hang", hang, lambda: metrics)  # type: ignore[arg-type]

    async def run() -> None:
        task = asyncio.create_task(call(None, _Context(())))  # type: ignore[arg-type]
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    assert [status for _, status, _, _ in metrics.seen] == [499]


def test_the_request_id_goes_back_with_the_outcome_not_before_the_work() -> None:
    # Sent when the call began, the initial metadata told a proxy that the call had its answer:
    # nginx passed it on, and when the replica died mid-call it could only reset the stream
    # (the client read INTERNAL and the gateway logged 200), where a call without metadata yet
    # gets nginx's 502, which a gRPC client reads as UNAVAILABLE and may retry.
    order: list[str] = []

    class Recording(_Context):
        async def send_initial_metadata(self, metadata: tuple[tuple[str, str], ...]) -> None:
            order.append("id")
            await super().send_initial_metadata(metadata)

    async def answer(request: Any, context: Any) -> str:
        order.append("work")
        return "answer"

    async def refuse(request: Any, context: Any) -> str:
        order.append("work")
        raise BadRequest("no such thing; send another")

    async def hang(request: Any, context: Any) -> None:
        order.append("work")
        await asyncio.sleep(30)

    good = Recording((("x-request-id", "given-2"),))
    call = accessed("/svc/Answer", answer, lambda: None)  # type: ignore[arg-type]
    assert asyncio.run(call(None, good)) == "answer"  # type: ignore[arg-type]
    assert order == ["work", "id"] and good.sent == (("x-request-id", "given-2"),)
    order.clear()
    refused = Recording((("x-request-id", "given-3"),))
    with pytest.raises(BadRequest):
        asyncio.run(accessed("/svc/Refuse", refuse, lambda: None)(None, refused))  # type: ignore[arg-type]
    assert order == ["work", "id"] and refused.sent == (("x-request-id", "given-3"),)
    order.clear()

    async def cancelled() -> None:
        call = accessed("/svc/Hang", hang, lambda: None)  # type: ignore[arg-type]
        task = asyncio.create_task(call(None, Recording(())))  # type: ignore[arg-type]
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancelled())
    assert order == ["work"]  # nothing is sent on a call its client gave up


@pytest.mark.parametrize(
    ("peer", "host"),
    [
        ("ipv4:10.0.0.5:51234", "10.0.0.5"),
        ("ipv6:[::1]:51234", "::1"),
        ("ipv6:[2001:db8::7]:443", "2001:db8::7"),
        ("unix:/tmp/camserve.sock", "unix:/tmp/camserve.sock"),
        ("", None),
    ],
)
def test_a_calls_peer_names_its_client_as_http_names_an_address(peer: str, host: str) -> None:
    assert peer_host(peer) == host


def test_a_call_is_its_peers_client_for_the_per_client_rules() -> None:
    seen: list[str] = []

    async def answer(request: Any, context: Any) -> str:
        info = current_request()
        assert info is not None
        seen.append(info.caller)
        return "answer"

    call = accessed("/svc/Answer", answer, lambda: None)  # type: ignore[arg-type]
    asyncio.run(call(None, _Context((), "ipv6:[fd00::2]:4000")))  # type: ignore[arg-type]
    asyncio.run(call(None, _Context((), "ipv4:10.9.8.7:1")))  # type: ignore[arg-type]
    assert seen == ["address:fd00::2", "address:10.9.8.7"]
