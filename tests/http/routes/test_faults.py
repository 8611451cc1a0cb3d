"""Faults and careless or hostile clients: nothing crashes, nothing runs on for nobody, and
every answer is our JSON."""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from app.pipeline import explainer as explainer_module
from app.pipeline import passes
from app.pipeline.lanes import cpu as cpu_lane_module
from tests.conftest import assert_error, files, image_bytes

#: 4,096 masked forwards of resnet18 at 64x64 (256 channels x 16 draws): many seconds of work.
SLOW = {"model": "resnet", "method": "SSCAM", "num_samples": "16", "batch_size": "1", "seed": "0"}


def _hook_model(client: TestClient, name: str, hook: Callable) -> torch.utils.hooks.RemovableHandle:  # type: ignore[type-arg]
    module = client.app.state.registry.get(name).module  # type: ignore[attr-defined]
    return module.register_forward_hook(hook)


@pytest.mark.parametrize("route", ["/predict", "/explain"])
def test_non_finite_logits_are_a_model_error_not_a_schema_lie(
    make_client: Callable[..., TestClient], route: str
) -> None:
    client = make_client()
    handle = _hook_model(client, "tiny", lambda module, args, out: out * float("nan"))
    try:
        message = assert_error(client.post(route, files=files(image_bytes())), 500, "model_error")
    finally:
        handle.remove()
    assert "NaN" in message and "tiny" in message
    assert client.post(route, files=files(image_bytes())).status_code == 200


def test_out_of_memory_is_503_frees_the_cache_and_the_next_request_works(
    make_client: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    client = make_client()
    freed: list[str] = []
    monkeypatch.setattr(passes, "release_cached_memory", lambda device: freed.append(str(device)))
    calls = []

    def oom_once(module, args, out):  # type: ignore[no-untyped-def]
        calls.append(None)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return out

    handle = _hook_model(client, "tiny", oom_once)
    try:
        refused = client.post("/explain", files=files(image_bytes()))
        after = client.post("/explain", files=files(image_bytes()))
    finally:
        handle.remove()
    assert "memory" in assert_error(refused, 503, "out_of_memory")
    assert int(refused.headers["retry-after"]) >= 1
    assert freed == ["cpu"]
    assert after.status_code == 200


def test_a_request_past_its_deadline_is_504_and_its_work_stops(
    make_client: Callable[..., TestClient], caplog: pytest.LogCaptureFixture
) -> None:
    client = make_client(request_timeout_s=3.0)  # time enough for the pass to start
    with caplog.at_level(logging.INFO, logger="app.pipeline.batching"):
        response = client.post("/explain", files=files(image_bytes()), data=SLOW)
        message = assert_error(response, 504, "timeout")
        assert "/jobs" in message and "CAMSERVE_REQUEST_TIMEOUT_S" in message
        _assert_pass_stopped_early(caplog)


def _assert_pass_stopped_early(caplog: pytest.LogCaptureFixture) -> None:
    """The SLOW pass logged that it stopped at a chunk, before its 4,096 inputs were done."""
    deadline = time.monotonic() + 30
    while True:
        found = [r.getMessage() for r in caplog.records if "pass stopped early" in r.getMessage()]
        if found:
            counts = re.search(r"after (\d+) of (\d+) inputs", found[0])
            assert counts is not None, found[0]
            assert int(counts.group(1)) < 4096
            return
        assert time.monotonic() < deadline, "the pass never stopped"
        time.sleep(0.02)


def test_a_client_that_leaves_stops_its_work(
    make_client: Callable[..., TestClient],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A real disconnect, over ASGI: the request's body is read, then the client goes away."""
    client = make_client()
    started = threading.Event()
    original = explainer_module.run_cam_pass

    def noting_start(*args):  # type: ignore[no-untyped-def]
        started.set()
        return original(*args)

    monkeypatch.setattr(explainer_module, "run_cam_pass", noting_start)
    app = client.app
    boundary = "b0undary"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
        for k, v in SLOW.items()
    ]
    image = image_bytes()
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
        "Content-Type: image/png\r\n\r\n".encode()
        + image
        + f"\r\n--{boundary}--\r\n".encode()
    )
    body = b"".join(parts)
    sent: list[dict] = []

    async def scenario() -> None:
        gone = asyncio.Event()
        delivered = False

        async def receive() -> dict:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/explain",
            "raw_path": b"/explain",
            "query_string": b"",
            "root_path": "",
            "headers": [
                (b"content-type", f"multipart/form-data; boundary={boundary}".encode()),
                (b"content-length", str(len(body)).encode()),
            ],
            "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 80),
            "state": {},
        }
        task = asyncio.ensure_future(app(scope, receive, send))
        assert await asyncio.to_thread(started.wait, 30)
        await asyncio.sleep(0.1)
        gone.set()
        await asyncio.wait_for(task, 30)

    with caplog.at_level(logging.INFO, logger="app.pipeline.batching"):
        client.portal.call(scenario)  # type: ignore[union-attr]
        start = next(m for m in sent if m["type"] == "http.response.start")
        assert start["status"] == 499
        _assert_pass_stopped_early(caplog)


def test_model_errors_name_paths_relative_to_the_store(
    make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    store = tmp_path / "deep" / "store"
    folder = store / "bad"
    folder.mkdir(parents=True)
    (folder / "model.toml").write_text(
        '[model]\narchitecture = "resnet18"\nweights = "weights.pt"\nnum_classes = 2\n'
        "[preprocess]\ninput_shape = [3, 32, 32]\nresize = 32\ncrop = 32\n"
        "mean = [0.5, 0.5, 0.5]\nstd = [0.5, 0.5, 0.5]\n"
    )
    (folder / "weights.pt").write_bytes(b"not a checkpoint")
    client = make_client(model_store=store, default_model="bad")
    listing = client.get("/models").text
    refused = client.post("/predict", files=files(image_bytes()))
    assert refused.status_code == 503
    for text in (listing, refused.text):
        assert str(tmp_path) not in text
    assert "failed to load" in refused.json()["error"]["message"]


@pytest.mark.parametrize("field", ["method", "target_layer", "colormap", "output", "model", "size"])
def test_echoed_input_is_cut_short(client: TestClient, field: str) -> None:
    value = "z" * 500_000
    response = client.post("/explain", files=files(image_bytes()), data={field: value})
    assert 400 <= response.status_code < 500, response.text
    assert len(response.content) < 2_000, (field, len(response.content))


def test_decoding_runs_on_a_bounded_pool_of_image_threads(
    make_client: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    client = make_client(queue_size=64)
    pool = client.app.state.explainer.image_threads  # type: ignore[attr-defined]
    threads: set[threading.Thread] = set()
    original = cpu_lane_module.decode_upload

    def noting_thread(*args):  # type: ignore[no-untyped-def]
        threads.add(threading.current_thread())
        return original(*args)

    monkeypatch.setattr(cpu_lane_module, "decode_upload", noting_thread)
    with ThreadPoolExecutor(max_workers=24) as senders:
        answers = list(
            senders.map(
                lambda seed: client.post("/predict", files=files(image_bytes(seed=seed))),
                range(24),
            )
        )
    assert all(a.status_code == 200 for a in answers)
    assert threads <= set(pool._threads)  # 24 concurrent uploads, decoded on the pool alone
    assert 1 <= len(threads) <= pool._max_workers <= 8
