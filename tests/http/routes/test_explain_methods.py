"""Several methods in one /explain request: one decode, shared forwards, one budget."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.conftest import assert_error, files, image_bytes


def explain(client: TestClient, *images: bytes, **form: object):  # type: ignore[no-untyped-def]
    return client.post("/explain", files=files(*images), data=form)


def raw_maps(body: dict) -> dict[str, list[np.ndarray]]:
    """method -> one raw map per image (the first layer's)."""
    maps: dict[str, list[np.ndarray]] = {}
    for result in body["results"]:
        for explanation in result["explanations"]:
            values = explanation["maps"][0]["raw"]["values"]
            maps.setdefault(explanation["method"], []).append(np.array(values))
    return maps


@pytest.fixture
def forwards(client: TestClient) -> Iterator[list[int]]:
    """Batch sizes of every forward of the tiny model while the test runs."""
    module = client.app.state.registry.get("tiny").module  # type: ignore[attr-defined]
    seen: list[int] = []
    handle = module.register_forward_pre_hook(lambda _m, args: seen.append(len(args[0])))
    yield seen
    handle.remove()


def test_each_explanation_names_its_method_and_equals_the_single_answer(
    client: TestClient,
) -> None:
    images = [image_bytes(seed=3), image_bytes(seed=4)]
    form = {"output": "raw,overlay", "class_idx": "1,2", "batch_size": "8"}
    both = explain(client, *images, method="GradCAM,ScoreCAM", **form)
    assert both.status_code == 200, both.text
    body = both.json()
    assert body["method"] == "GradCAM,ScoreCAM"
    assert body["options"] == {"batch_size": 8}
    for result, cls in zip(body["results"], (1, 2), strict=True):
        assert [e["method"] for e in result["explanations"]] == ["GradCAM", "ScoreCAM"]
        assert {e["class_idx"] for e in result["explanations"]} == {cls}
        assert all(e["maps"][0]["overlay"] for e in result["explanations"])
    times = body["timings"]["cam_ms_by_method"]
    assert list(times) == ["GradCAM", "ScoreCAM"]
    assert sum(times.values()) == pytest.approx(body["timings"]["cam_ms"], abs=0.01)
    got = raw_maps(body)
    for method, extra in (("GradCAM", {}), ("ScoreCAM", {"batch_size": "8"})):
        alone = explain(client, *images, method=method, output="raw", class_idx="1,2", **extra)
        assert alone.json()["method"] == method
        for a, b in zip(raw_maps(alone.json())[method], got[method], strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5)


def test_repeated_field_and_any_case_without_repeats(client: TestClient) -> None:
    response = client.post(
        "/explain",
        files=files(image_bytes()),
        data={"method": ["gradcam", "LayerCAM", "GRADCAM"], "output": "raw"},
    )
    assert response.status_code == 200, response.text
    explanations = response.json()["results"][0]["explanations"]
    assert [e["method"] for e in explanations] == ["GradCAM", "LayerCAM"]


def test_gradient_methods_share_one_forward(client: TestClient, forwards: list[int]) -> None:
    images = [image_bytes(seed=1), image_bytes(seed=2)]
    methods = "GradCAM,GradCAMpp,XGradCAM,LayerCAM,CAM"
    response = explain(client, *images, method=methods, output="raw")
    assert response.status_code == 200, response.text
    assert forwards == [2]  # one forward of both images for all five methods
    got = raw_maps(response.json())
    # On GAP + linear, CAM, Grad-CAM and XGrad-CAM are the same map (see docs/benchmarks.md).
    for a, b, c in zip(got["CAM"], got["GradCAM"], got["XGradCAM"], strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
        np.testing.assert_allclose(a, c, atol=1e-5)
    for method in methods.split(","):
        alone = explain(client, *images, method=method, output="raw")
        for a, b in zip(raw_maps(alone.json())[method], got[method], strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5)


def test_other_methods_run_their_own_passes(client: TestClient, forwards: list[int]) -> None:
    response = explain(
        client, image_bytes(), method="GradCAM,SmoothGradCAMpp,LayerCAM", num_samples="2"
    )
    assert response.status_code == 200, response.text
    # The shared pass (GradCAM, LayerCAM), then SmoothGradCAMpp's clean and noisy forwards.
    assert forwards[0] == 1 and len(forwards) >= 3
    assert response.json()["options"] == {"num_samples": 2}


def test_options_go_only_to_the_methods_that_take_them(client: TestClient) -> None:
    response = explain(client, image_bytes(), method="GradCAM,CAM", std="0.1")
    message = assert_error(response, 422, "invalid_parameter")
    assert "None of GradCAM, CAM takes the option 'std'" in message
    assert response.json()["error"]["details"]["methods"] == ["SmoothGradCAMpp", "SSCAM"]


def test_the_budget_counts_every_method(make_client: Callable[..., TestClient]) -> None:
    probe = make_client()
    channels = probe.app.state.registry.get("tiny").layer_shapes["features"][1]  # type: ignore[attr-defined]
    client = make_client(max_cam_forwards=2 * channels)
    form = {"batch_size": "8", "num_samples": "2"}
    both = explain(client, image_bytes(), method="ScoreCAM,GradCAM", batch_size="8")
    assert both.status_code == 200, both.text
    assert explain(client, image_bytes(), method="ISCAM", **form).status_code == 200
    response = explain(client, image_bytes(), method="ScoreCAM,ISCAM", **form)
    message = assert_error(response, 422, "over_budget")
    assert f"{3 * channels} masked forwards together" in message
    details = response.json()["error"]["details"]
    assert details["per_method"] == {"ScoreCAM": channels, "ISCAM": 2 * channels}


def test_png_with_several_methods_is_406(client: TestClient) -> None:
    response = client.post(
        "/explain",
        files=files(image_bytes()),
        data={"method": "GradCAM,ScoreCAM"},
        headers={"Accept": "image/png"},
    )
    assert_error(response, 406, "not_acceptable")
    one = client.post(
        "/explain",
        files=files(image_bytes()),
        data={"method": ["GradCAM", "gradcam"]},
        headers={"Accept": "image/png"},
    )
    assert one.status_code == 200 and one.headers["x-camserve-method"] == "GradCAM"


def test_an_unknown_method_in_the_list_is_named(client: TestClient) -> None:
    response = explain(client, image_bytes(), method="GradCAM,FooCAM")
    message = assert_error(response, 422, "unsupported_method")
    assert "'FooCAM'" in message and "GradCAM" in message
    assert "ScoreCAM" in response.json()["error"]["details"]["methods"]


def test_a_single_method_answer_names_its_method(client: TestClient) -> None:
    body = explain(client, image_bytes()).json()
    assert body["method"] == "GradCAM"
    (explanation,) = body["results"][0]["explanations"]
    assert explanation["method"] == "GradCAM"
    assert body["timings"]["cam_ms_by_method"] == {"GradCAM": body["timings"]["cam_ms"]}


def test_a_job_with_several_methods_counts_their_forwards_as_one(client: TestClient) -> None:
    channels = client.app.state.registry.get("tiny").layer_shapes["features"][1]  # type: ignore[attr-defined]
    created = client.post(
        "/jobs",
        files=files(image_bytes()),
        data={"method": "ScoreCAM,GradCAM,ISCAM", "num_samples": "2", "batch_size": "8"},
    )
    assert created.status_code == 202, created.text
    deadline = time.monotonic() + 30
    while (view := client.get(created.json()["url"]).json())["status"] in ("queued", "running"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert view["status"] == "succeeded", view
    assert view["progress"]["done"] == view["progress"]["total"] == 3 * channels
    methods = [e["method"] for e in view["result"]["results"][0]["explanations"]]
    assert methods == ["ScoreCAM", "GradCAM", "ISCAM"]
