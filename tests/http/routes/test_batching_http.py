"""Cross-request batching through HTTP: batched answers equal answers alone, failures stay apart."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.cam import METHODS
from app.errors import InvalidParameter
from app.pipeline import explainer as explainer_module
from tests.conftest import assert_error, files, image_bytes
from tests.http.routes.test_explain import TINY_OPTIONS, raw_maps


class HeldPasses:
    """Wraps a pass function: holds the first pass until released, records every pass's images."""

    def __init__(self, original: Callable) -> None:  # type: ignore[type-arg]
        self.original = original
        self.started = threading.Event()
        self.release = threading.Event()
        self.sizes: list[int] = []

    def __call__(self, model, *args):  # type: ignore[no-untyped-def]
        items = args[-2]  # (plan,) items, control
        self.sizes.append(
            sum(len(item.batch if hasattr(item, "batch") else item) for item in items)
        )
        if not self.started.is_set():
            self.started.set()
            self.release.wait(20)
        return self.original(model, *args)


def _hold_passes(
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    wrapped: Callable | None = None,  # type: ignore[type-arg]
) -> HeldPasses:
    """Replace the explainer's pass function ``name`` (run_cam_pass or run_forward_pass)."""
    held = HeldPasses(wrapped or getattr(explainer_module, name))
    monkeypatch.setattr(explainer_module, name, held)
    return held


def _post(client: TestClient, route: str, images: list[bytes], form: dict) -> object:
    return client.post(route, files=files(*images), data=form)


def _run_held(
    client: TestClient, route: str, cases: list[tuple[list[bytes], dict]], held: HeldPasses
) -> list:
    """Send a blocker, queue every case behind it, release: the cases may then share a pass."""
    batcher = client.app.state.explainer._batchers  # type: ignore[attr-defined]
    with ThreadPoolExecutor(max_workers=len(cases) + 1) as pool:
        # /predict refuses a field it does not have (output) like every route.
        blocker_form = {"output": "raw"} if route != "/predict" else {}
        blocker = pool.submit(_post, client, route, [image_bytes(seed=99)], blocker_form)
        assert held.started.wait(20)
        futures = [pool.submit(_post, client, route, images, form) for images, form in cases]
        deadline = time.monotonic() + 20
        while sum(b.waiting for b in batcher.values()) < len(cases):
            assert time.monotonic() < deadline, "the requests never queued"
            time.sleep(0.01)
        held.release.set()
        assert blocker.result().status_code == 200  # type: ignore[attr-defined]
        return [f.result() for f in futures]


#: RandomCAM's seeded draws follow the samples' places in the batch (its docstring): its maps
#: are noise by design, and a batch changes which draw an image gets.
@pytest.mark.parametrize(
    "method", [n for n, c in METHODS.items() if not c.one_map and n != "RandomCAM"]
)
def test_batched_answers_equal_answers_alone(
    make_client: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    client = make_client(max_batch_size=8, batch_timeout_ms=0)
    options = TINY_OPTIONS.get(method, {})
    cases = [
        ([image_bytes((36, 30), seed=1)], {"class_idx": "0"}),
        ([image_bytes((30, 36), seed=2), image_bytes((40, 32), seed=3)], {"class_idx": "2,1"}),
        ([image_bytes((32, 32), seed=4)], {}),  # its own top-1
    ]
    cases = [
        (images, {"method": method, "output": "raw", **options, **form}) for images, form in cases
    ]
    alone = [_post(client, "/explain", images, form).json() for images, form in cases]  # type: ignore[attr-defined]
    held = _hold_passes(monkeypatch, "run_cam_pass")
    batched = _run_held(client, "/explain", cases, held)
    batchable = not METHODS[method].masked_forwards
    for expected, response in zip(alone, batched, strict=True):
        assert response.status_code == 200, response.text
        got = response.json()
        assert got["timings"]["batch_images"] == (4 if batchable else len(got["results"]))
        assert [r["explanations"][0]["class_idx"] for r in got["results"]] == [
            r["explanations"][0]["class_idx"] for r in expected["results"]
        ]
        np.testing.assert_allclose(
            [r["logits"] for r in got["results"]],
            [r["logits"] for r in expected["results"]],
            atol=1e-5,
        )
        for a, b in zip(raw_maps(expected), raw_maps(got), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5)
    # Threads queue in any order: compare the pass sizes as a multiset.
    assert sorted(held.sizes[1:]) == ([4] if batchable else [1, 1, 2])


def test_predict_requests_share_a_forward(
    make_client: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    client = make_client(max_batch_size=8)
    cases = [([image_bytes(seed=s)], {"top_k": "3"}) for s in range(4)]
    alone = [_post(client, "/predict", images, form).json() for images, form in cases]  # type: ignore[attr-defined]
    held = _hold_passes(monkeypatch, "run_forward_pass")
    batched = _run_held(client, "/predict", cases, held)
    for expected, response in zip(alone, batched, strict=True):
        got = response.json()
        assert got["timings"]["batch_images"] == 4
        a = [p["logit"] for p in expected["results"][0]["predictions"]]
        b = [p["logit"] for p in got["results"][0]["predictions"]]
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_different_settings_do_not_share_a_pass(
    make_client: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    client = make_client(max_batch_size=8)
    held = _hold_passes(monkeypatch, "run_cam_pass")
    cases = [
        ([image_bytes(seed=1)], {"method": "GradCAM"}),
        ([image_bytes(seed=2)], {"method": "LayerCAM"}),
        ([image_bytes(seed=3)], {"method": "GradCAM", "normalized": "false"}),
    ]
    answers = _run_held(client, "/explain", cases, held)
    assert [a.json()["timings"]["batch_images"] for a in answers] == [1, 1, 1]


def test_batching_off_runs_each_request_alone(
    make_client: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    client = make_client(max_batch_size=1)
    held = _hold_passes(monkeypatch, "run_cam_pass")
    answers = _run_held(client, "/explain", [([image_bytes(seed=s)], {}) for s in range(3)], held)
    assert [a.json()["timings"]["batch_images"] for a in answers] == [1, 1, 1]
    assert held.sizes[1:] == [1, 1, 1]


def test_a_request_that_breaks_its_batch_fails_alone(
    make_client: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    client = make_client(max_batch_size=8)
    original = explainer_module.run_cam_pass

    def refuses_flat_images(model, plan, items, control):  # type: ignore[no-untyped-def]
        if any(float(item.batch.std()) == 0.0 for item in items):
            raise InvalidParameter("this pass cannot explain a flat image")
        return original(model, plan, items, control)

    held = _hold_passes(monkeypatch, "run_cam_pass", refuses_flat_images)
    buffer = io.BytesIO()
    Image.new("RGB", (40, 32), (120, 120, 120)).save(buffer, format="PNG")
    flat = buffer.getvalue()
    cases = [([image_bytes(seed=1)], {}), ([flat], {}), ([image_bytes(seed=2)], {})]
    good_a, bad, good_b = _run_held(client, "/explain", cases, held)
    assert good_a.status_code == 200 and good_b.status_code == 200
    assert_error(bad, 422, "invalid_parameter")
    assert held.sizes[1:] == [3, 1, 1, 1]  # the batch, then each request alone
