"""Task requests through the model's batcher: concurrent compatible requests (same model, plans
and image size) share one pass and answer as they do alone; other sizes or methods never share."""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from app.http.app import create_app
from app.pipeline.tasks.base import TaskPipeline
from app.settings import Settings
from tests.conftest import wait_ready
from tests.fixtures_tasks import copy_shapes_task_models, shapes_scene


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    store = tmp_path_factory.mktemp("task-batching")
    copy_shapes_task_models(store)
    settings = Settings(
        model_store=store,
        default_model="shapes-detect",
        device="cpu",
        cache_mb=0,
    )
    with TestClient(create_app(settings)) as test_client:
        wait_ready(test_client)
        yield test_client


class HeldPasses:
    """Wraps ``TaskPipeline.explain_images``: holds the first pass until released and records
    every pass's images."""

    def __init__(self, original: Callable[..., Any]) -> None:
        self.original = original
        self.started = threading.Event()
        self.release = threading.Event()
        self.sizes: list[int] = []

    def __call__(self, pipeline: TaskPipeline, model: Any, items: Any, *rest: Any) -> Any:
        self.sizes.append(len(items))
        if not self.started.is_set():
            self.started.set()
            self.release.wait(30)
        return self.original(pipeline, model, items, *rest)


@pytest.fixture
def held(monkeypatch: pytest.MonkeyPatch) -> HeldPasses:
    passes = HeldPasses(TaskPipeline.explain_images)

    def wrapped(self: TaskPipeline, *args: Any) -> Any:
        return passes(self, *args)

    monkeypatch.setattr(TaskPipeline, "explain_images", wrapped)
    return passes


def _explain(client: TestClient, image: bytes, form: dict[str, Any]) -> Any:
    return client.post("/explain", files=[("file", ("scene.png", image, "image/png"))], data=form)


def _behind_a_blocker(
    client: TestClient, held: HeldPasses, cases: list[tuple[bytes, dict[str, Any]]]
) -> list[Any]:
    """A blocker holds the model; the cases queue behind it and may share the next pass."""
    batchers = client.app.state.explainer._batchers  # type: ignore[attr-defined]
    with ThreadPoolExecutor(max_workers=len(cases) + 1) as pool:
        blocker = pool.submit(_explain, client, shapes_scene(2), {"box": "0"})
        assert held.started.wait(30)
        futures = [pool.submit(_explain, client, image, form) for image, form in cases]
        deadline = time.monotonic() + 30
        while sum(b.waiting for b in batchers.values()) < len(cases):
            assert time.monotonic() < deadline, "the requests never queued"
            time.sleep(0.01)
        held.release.set()
        assert blocker.result().status_code == 200
        return [f.result() for f in futures]


def _without_timings(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != "timings"}


def _maps(body: dict[str, Any]) -> list[np.ndarray]:
    return [
        np.asarray(e["maps"][0]["raw"]["values"], dtype=np.float32)
        for r in body["results"]
        for e in r["explanations"]
    ]


def _close(got: Any, want: Any, where: str) -> None:
    """Equal, numbers to float rounding: a batched convolution may round its last bit apart
    from the same image's alone (a 6-digit mean logit can then differ by 1e-6)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), where
        for key in want:
            _close(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            _close(a, b, f"{where}[{i}]")
    elif isinstance(want, float) and not isinstance(want, bool):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-5), (where, got, want)
    else:
        assert got == want, (where, got, want)


def _same(together: dict[str, Any], alone: dict[str, Any]) -> None:
    def fields(body: dict[str, Any]) -> Any:
        out = copy.deepcopy(_without_timings(body))
        for result in out["results"]:
            for item in result["explanations"]:
                item["maps"] = [{k: v for k, v in m.items() if k != "raw"} for m in item["maps"]]
        return out

    got, want = fields(together), fields(alone)
    _close(got, want, "answer")
    for got, want in zip(_maps(together), _maps(alone), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_two_compatible_requests_share_one_pass_and_answer_as_alone(
    client: TestClient, held: HeldPasses
) -> None:
    forms = [
        {"box": "0", "output": "raw", "method": "LayerCAM"},
        {"box": "all", "output": "raw", "method": "LayerCAM"},
    ]
    cases = [(shapes_scene(0), forms[0]), (shapes_scene(1), forms[1])]
    together = _behind_a_blocker(client, held, cases)
    assert held.sizes == [1, 2]  # the blocker alone, then both in one pass
    assert [r.status_code for r in together] == [200, 200], [r.text for r in together]
    assert [r.json()["timings"]["batch_images"] for r in together] == [2, 2]
    held.release.set()
    alone = [_explain(client, image, form) for image, form in cases]
    assert held.sizes[2:] == [1, 1]
    assert len(together[1].json()["results"][0]["explanations"]) == 2  # box=all: both shapes
    for got, want in zip(together, alone, strict=True):
        assert want.json()["timings"]["batch_images"] == 1
        _same(got.json(), want.json())


def test_a_segmenter_batches_its_regions_too(client: TestClient, held: HeldPasses) -> None:
    form = {"model": "shapes-segment", "output": "raw"}
    batchers = client.app.state.explainer._batchers  # type: ignore[attr-defined]
    with ThreadPoolExecutor(max_workers=3) as pool:
        blocker = pool.submit(_explain, client, shapes_scene(2), form)
        assert held.started.wait(30)
        futures = [pool.submit(_explain, client, shapes_scene(i), form) for i in (0, 1)]
        deadline = time.monotonic() + 30
        while sum(b.waiting for b in batchers.values()) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        held.release.set()
        assert blocker.result().status_code == 200
        together = [f.result() for f in futures]
    assert held.sizes == [1, 2]
    for i, got in enumerate(together):
        _same(got.json(), _explain(client, shapes_scene(i), form).json())


@pytest.mark.parametrize(
    ("second", "why"),
    [
        ((48, {"box": "0", "output": "raw", "method": "LayerCAM"}), "another image size"),
        ((64, {"box": "0", "output": "raw", "method": "GradCAM"}), "another method"),
    ],
)
def test_incompatible_requests_never_share(
    client: TestClient, held: HeldPasses, second: tuple[int, dict[str, Any]], why: str
) -> None:
    size, form = second
    cases = [
        (shapes_scene(0), {"box": "0", "output": "raw", "method": "LayerCAM"}),
        (shapes_scene(1, size), form),
    ]
    answers = _behind_a_blocker(client, held, cases)
    assert [r.status_code for r in answers] == [200, 200]
    assert held.sizes == [1, 1, 1], why


def test_a_bad_box_in_a_shared_pass_fails_alone(client: TestClient, held: HeldPasses) -> None:
    cases = [
        (shapes_scene(0), {"box": "0", "output": "raw", "method": "LayerCAM"}),
        (shapes_scene(1), {"box": "7", "output": "raw", "method": "LayerCAM"}),
    ]
    good, bad = _behind_a_blocker(client, held, cases)
    assert good.status_code == 200
    assert bad.status_code == 400 and "box 7 is past the detections" in bad.text


def test_predict_of_compatible_requests_shares_a_forward(client: TestClient) -> None:
    batchers = client.app.state.explainer._batchers  # type: ignore[attr-defined]
    seen: list[int] = []
    original = TaskPipeline._predict_pass
    started, release = threading.Event(), threading.Event()

    def held_predict(self: TaskPipeline, model: Any, items: Any, control: Any) -> Any:
        seen.append(len(items))
        if not started.is_set():
            started.set()
            release.wait(30)
        return original(self, model, items, control)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(TaskPipeline, "_predict_pass", held_predict)
        post: Callable[[bytes], Any] = lambda image: client.post(  # noqa: E731
            "/predict", files=[("file", ("s.png", image, "image/png"))]
        )
        with ThreadPoolExecutor(max_workers=3) as pool:
            blocker = pool.submit(post, shapes_scene(2))
            assert started.wait(30)
            futures = [pool.submit(post, shapes_scene(i)) for i in (0, 1)]
            deadline = time.monotonic() + 30
            while sum(b.waiting for b in batchers.values()) < 2:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            release.set()
            assert blocker.result().status_code == 200
            together = [f.result().json() for f in futures]
    assert seen == [1, 2]
    for i, got in enumerate(together):
        alone = post(shapes_scene(i)).json()
        assert got["timings"]["batch_images"] == 2
        assert got["results"] == alone["results"]


def test_several_layers_give_one_map_each_and_their_fusion(client: TestClient) -> None:
    from app.cam import LayerCAM

    layers = ["segmenter.layer1", "segmenter.layer2"]
    form = {"box": "0", "output": "raw", "method": "LayerCAM", "target_layer": layers}
    response = _explain(client, shapes_scene(0), form)
    assert response.status_code == 200, response.text
    maps = response.json()["results"][0]["explanations"][0]["maps"]
    assert [(m["layer"], m["kind"]) for m in maps] == [
        ("segmenter.layer1", "layer"),
        ("segmenter.layer2", "layer"),
        ("fused", "fused"),
    ]
    per_layer = [torch.tensor(m["raw"]["values"])[None] for m in maps[:2]]
    assert [tuple(c.shape[1:]) for c in per_layer] == [(16, 16), (8, 8)]
    fused = LayerCAM.fuse_cams(per_layer)[0]
    np.testing.assert_allclose(maps[2]["raw"]["values"], fused.numpy(), atol=1e-5)
    alone = _explain(client, shapes_scene(0), {**form, "target_layer": layers[0]}).json()
    (only,) = alone["results"][0]["explanations"][0]["maps"]
    assert (only["layer"], only["kind"]) == ("segmenter.layer1", "layer")
    np.testing.assert_allclose(only["raw"]["values"], maps[0]["raw"]["values"], atol=1e-5)
