"""/explain through HTTP: every method, every output, batching, concurrency and bad input."""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from pydantic import SecretStr

from app.cam import METHODS
from app.pipeline import explainer as explainer_module
from app.pipeline.lanes import cpu as cpu_lane_module
from tests.conftest import assert_error, files, image_bytes

TINY_OPTIONS = {
    "SmoothGradCAMpp": {"num_samples": "4", "seed": "1"},
    "SSCAM": {"num_samples": "4", "seed": "1", "batch_size": "8"},
    "ISCAM": {"num_samples": "4", "batch_size": "8"},
    "ScoreCAM": {"batch_size": "8"},
}


def decode_png(data: str | bytes) -> Image.Image:
    raw = base64.b64decode(data) if isinstance(data, str) else data
    return Image.open(io.BytesIO(raw))


def explain(client: TestClient, *images: bytes, **form: object):  # type: ignore[no-untyped-def]
    return client.post("/explain", files=files(*images), data=form)


#: one map for several layers (RefineCAM) or for a transformer's blocks (LeGrad): own tests below
PER_LAYER = [name for name, cls in METHODS.items() if not cls.one_map]


@pytest.mark.parametrize("method", PER_LAYER)
def test_every_method(client: TestClient, method: str) -> None:
    form = {"method": method.lower(), "output": "overlay,raw", **TINY_OPTIONS.get(method, {})}
    response = explain(client, image_bytes((40, 32)), **form)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["method"] == method
    assert body["target_layers"] == ["features"]
    assert set(body["timings"]) == {
        "decode_ms",
        "queue_ms",
        "forward_ms",
        "cam_ms",
        "encode_ms",
        "total_ms",
        "batch_images",
        "cam_ms_by_method",
        "cache",
        "forwards",
        "faithfulness_ms",
    }
    assert body["timings"]["batch_images"] == 1
    # One forward, plus the batches of masked or noisy forwards for the methods that run them.
    cls = METHODS[method]
    runs_more = cls.masked_forwards or cls.noisy_forwards
    # The guided methods run one guided forward of their own on the input.
    own = 1 + int(getattr(cls, "input_resolution", False))
    assert (body["timings"]["forwards"] > 1) if runs_more else (body["timings"]["forwards"] == own)
    result = body["results"][0]
    assert len(result["logits"]) == 3
    explanation = result["explanations"][0]
    assert explanation["class_idx"] == result["predictions"][0]["class_idx"]
    (layer_map,) = explanation["maps"]
    assert layer_map["layer"] == "features"
    assert decode_png(layer_map["overlay"]).size == (40, 32)  # the original size
    assert (layer_map["width"], layer_map["height"]) == (40, 32)
    raw = np.array(layer_map["raw"]["values"])
    assert layer_map["raw"]["shape"] == [32, 32] == list(raw.shape)
    assert raw.min() >= 0 and raw.max() <= 1 + 1e-6


def test_outputs_and_formats(client: TestClient) -> None:
    body = explain(
        client, image_bytes((50, 50)), output=["heatmap", "overlay"], image_format="jpeg"
    ).json()
    layer_map = body["results"][0]["explanations"][0]["maps"][0]
    assert body["media_type"] == "image/jpeg"
    assert decode_png(layer_map["heatmap"]).format == "JPEG"
    assert decode_png(layer_map["overlay"]).size == (50, 50)
    assert layer_map["raw"] is None


def test_unnormalized_raw_maps(client: TestClient) -> None:
    data = image_bytes()
    plain = explain(client, data, output="raw", normalized="false", method="GradCAM").json()
    scaled = explain(client, data, output="raw", method="GradCAM").json()
    raw = plain["results"][0]["explanations"][0]["maps"][0]["raw"]
    assert raw["normalized"] is False
    values = np.array(raw["values"])
    norm = np.array(scaled["results"][0]["explanations"][0]["maps"][0]["raw"]["values"])
    expected = (values - values.min()) / (values.max() - values.min())
    assert np.allclose(expected, norm, atol=1e-5)


def test_several_layers_add_a_fused_map(client: TestClient) -> None:
    body = explain(
        client, image_bytes(), target_layer=["features.1", "features"], output="raw,overlay"
    ).json()
    assert body["target_layers"] == ["features.1", "features"]
    maps = body["results"][0]["explanations"][0]["maps"]
    assert [(m["layer"], m["kind"]) for m in maps] == [
        ("features.1", "layer"),
        ("features", "layer"),
        ("fused", "fused"),
    ]
    assert all(m["overlay"] for m in maps)


def test_class_idx_for_all_and_per_image(client: TestClient) -> None:
    images = [image_bytes(seed=1), image_bytes(seed=2)]
    for_all = explain(client, *images, class_idx="2").json()
    assert [r["explanations"][0]["class_idx"] for r in for_all["results"]] == [2, 2]
    per_image = explain(client, *images, class_idx="0,1").json()
    assert [r["explanations"][0]["class_idx"] for r in per_image["results"]] == [0, 1]
    repeated = explain(client, *images, class_idx=["1", "0"]).json()
    assert [r["explanations"][0]["class_idx"] for r in repeated["results"]] == [1, 0]
    explanation = per_image["results"][1]["explanations"][0]
    assert explanation["label"] == "tiny_class1"
    assert explanation["logit"] == per_image["results"][1]["logits"][1]


def raw_maps(body: dict) -> list[np.ndarray]:
    return [
        np.array(m["raw"]["values"])
        for r in body["results"]
        for e in r["explanations"]
        for m in e["maps"]
    ]


def test_batch_equals_single_requests(client: TestClient) -> None:
    images = [image_bytes((48, 40), seed=s) for s in range(3)]
    form = {"model": "resnet", "output": "raw", "class_idx": "0,3,4"}
    batch = explain(client, *images, **form).json()
    for i, data in enumerate(images):
        single = explain(
            client, data, model="resnet", output="raw", class_idx=form["class_idx"][2 * i]
        )
        assert np.allclose(raw_maps(single.json())[0], raw_maps(batch)[i], atol=1e-5)


def test_accept_png_answers_the_overlay(client: TestClient) -> None:
    response = client.post(
        "/explain", files=files(image_bytes((40, 32))), headers={"Accept": "image/png"}
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert decode_png(response.content).size == (40, 32)
    assert response.headers["x-camserve-method"] == "GradCAM"
    two = client.post(
        "/explain",
        files=files(image_bytes(), image_bytes()),
        headers={"Accept": "image/png"},
    )
    assert_error(two, 406, "not_acceptable")
    # One overlay: several classes are refused, not cut to the first (they were, silently).
    for data, name in (({"classes": "0,1"}, "classes"), ({"top_classes": "2"}, "top_classes")):
        several = client.post(
            "/explain", files=files(image_bytes()), data=data, headers={"Accept": "image/png"}
        )
        assert f"and {name} asks for several" in assert_error(several, 406, "not_acceptable")
    png = {"Accept": "image/png"}
    one = client.post("/explain", files=files(image_bytes()), data={"classes": "1"}, headers=png)
    assert one.status_code == 200 and one.headers["content-type"] == "image/png"
    # The overlay has no room for scores: refused before any forward, not computed and dropped.
    scored = client.post(
        "/explain", files=files(image_bytes()), data={"faithfulness": "confidence"}, headers=png
    )
    assert "faithfulness asks for scores" in assert_error(scored, 406, "not_acceptable")


@pytest.mark.parametrize(
    ("accept", "answer"),
    [
        ("image/png", "image/png"),
        ("image/*", "image/png"),
        ("*/*", "application/json"),
        ("text/html,application/xhtml+xml,*/*;q=0.8", "application/json"),  # a browser's
        ("image/png, application/json", "image/png"),
        ("application/json, image/png", "application/json"),
        ("*/*, image/png", "image/png"),
        # The quality (q) decides before the order (RFC 9110, 12.5.1): these were answered by
        # their first range, and image/png;q=0 ("not PNG") with a PNG.
        ("image/png;q=0", "application/json"),
        ("image/png;q=0, application/json", "application/json"),
        ("image/png; q=0, image/*", "application/json"),
        ("application/json;q=0.1, image/png", "image/png"),
        ("application/json;q=0.1, image/png;q=0.9", "image/png"),
        ("image/*;q=0.5, application/json;q=0.9", "application/json"),
        ("IMAGE/PNG;Q=1", "image/png"),
        ("image/png;q=2, application/json;q=0.5", "application/json"),  # q over 1: not a range
        ("image/jpeg", "application/json"),
    ],
)
def test_accept_is_negotiated_by_quality(client: TestClient, accept: str, answer: str) -> None:
    response = client.post("/explain", files=files(image_bytes()), headers={"Accept": accept})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == answer
    assert response.headers["vary"] == "Accept"  # either kind: a cache keys on Accept


def test_repeated_accept_headers_are_one_list(client: TestClient) -> None:
    headers = [("Accept", "application/json;q=0.5"), ("Accept", "image/png")]
    response = client.post("/explain", files=files(image_bytes()), headers=headers)
    assert response.headers["content-type"] == "image/png"


def test_a_webp_picture_too_wide_for_webp_is_a_422_before_any_work(client: TestClient) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (16400, 164), (40, 90, 200)).save(buffer, format="PNG")
    wide = buffer.getvalue()
    form = {"size": "original", "image_format": "webp"}
    message = assert_error(explain(client, wide, **form), 422, "invalid_parameter")
    assert "webp pictures are at most 16383 px" in message and "16400" in message
    assert explain(client, wide, size="original", image_format="png").status_code == 200


def test_a_repeated_explanation_says_hit_in_its_header_and_timings(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(cache_mb=8)
    form = {"method": "ScoreCAM", "output": "overlay"}
    first = explain(client, image_bytes(seed=3), **form)
    again = explain(client, image_bytes(seed=3), **form)
    assert first.status_code == again.status_code == 200, again.text
    assert first.headers["x-camserve-cache"] == first.json()["timings"]["cache"] == "miss"
    assert again.headers["x-camserve-cache"] == again.json()["timings"]["cache"] == "hit"
    assert again.json()["results"] == first.json()["results"]
    # The overlay itself is a PNG: another format, so another entry.
    pngs = [
        client.post(
            "/explain", files=files(image_bytes(seed=3)), data=form, headers={"Accept": "image/png"}
        )
        for _ in range(2)
    ]
    assert [png.headers["x-camserve-cache"] for png in pngs] == ["miss", "hit"]
    assert pngs[0].content == pngs[1].content and pngs[1].headers["content-type"] == "image/png"
    random = {"method": "SmoothGradCAMpp", "num_samples": "2"}
    assert explain(client, image_bytes(seed=3), **random).headers["x-camserve-cache"] == "bypass"
    # The tests' own services run without a cache (tests/conftest.py).
    assert explain(make_client(), image_bytes()).headers["x-camserve-cache"] == "off"


def test_cam_on_chosen_layer(client: TestClient) -> None:
    message = assert_error(
        explain(client, image_bytes(), model="resnet", method="CAM"), 422, "method_not_applicable"
    )
    assert "layer4" in message
    response = explain(client, image_bytes(), model="resnet", method="CAM", target_layer="layer4")
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16"])
def test_image_modes_are_accepted(client: TestClient, mode: str) -> None:
    if mode == "I;16":
        array = (np.arange(32 * 40).reshape(32, 40) * 40).astype(np.uint16)
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        data = buffer.getvalue()
    else:
        data = image_bytes(mode=mode, fmt="TIFF" if mode == "CMYK" else "PNG")
    response = explain(client, data)
    assert response.status_code == 200, response.text
    assert response.json()["results"][0]["width"] == 40


def test_exif_rotated_equals_pre_rotated(client: TestClient) -> None:
    upright = Image.open(io.BytesIO(image_bytes((40, 32), seed=5)))
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated, plain = io.BytesIO(), io.BytesIO()
    upright.transpose(Image.Transpose.ROTATE_90).save(rotated, format="PNG", exif=exif)
    upright.save(plain, format="PNG")
    a = explain(client, rotated.getvalue(), output="raw").json()
    b = explain(client, plain.getvalue(), output="raw").json()
    assert (a["results"][0]["width"], a["results"][0]["height"]) == (40, 32)
    assert a["results"][0]["logits"] == b["results"][0]["logits"]
    assert np.array_equal(raw_maps(a)[0], raw_maps(b)[0])


def test_concurrent_requests_equal_sequential(client: TestClient) -> None:
    cases = []
    for i in range(12):
        method = ["GradCAM", "ScoreCAM", "LayerCAM", "GradCAMpp", "CAM", "XGradCAM"][i % 6]
        # Score-CAM on resnet18 would mean hundreds of forwards: keep it to the tiny model.
        model = "resnet" if i % 4 == 3 and "Grad" in method else "tiny"
        form = {
            "model": model,
            "method": method,
            "class_idx": str(i % 3),
            "output": "raw",
            **TINY_OPTIONS.get(method, {}),
        }
        cases.append(([image_bytes((36, 30), seed=i), image_bytes((30, 36), seed=100 + i)], form))
    sequential = [explain(client, *images, **form).json() for images, form in cases]
    with ThreadPoolExecutor(max_workers=12) as pool:
        answers = list(pool.map(lambda case: explain(client, *case[0], **case[1]), cases))
    for expected, response in zip(sequential, answers, strict=True):
        assert response.status_code == 200, response.text
        got = response.json()
        assert got["method"] == expected["method"]
        # Requests with the same settings may share a batched pass: equal to float rounding.
        for a, b in zip(raw_maps(expected), raw_maps(got), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5)


def held_passes(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """Every CAM pass waits (at most 10 s) for ``release`` once it has set ``started``."""
    started, release = threading.Event(), threading.Event()
    original = explainer_module.run_cam_pass

    def held(*args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        started.set()
        release.wait(10)
        return original(*args, **kwargs)

    monkeypatch.setattr(explainer_module, "run_cam_pass", held)
    return started, release


def test_overload_is_503_with_retry_after(
    make_client: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    client = make_client(max_model_slots=1, queue_size=0)
    started, release = held_passes(monkeypatch)
    decoded: list[str] = []
    original_decode = cpu_lane_module.decode_upload

    def counting_decode(upload, *args):  # type: ignore[no-untyped-def]
        decoded.append(upload.filename)
        return original_decode(upload, *args)

    monkeypatch.setattr(cpu_lane_module, "decode_upload", counting_decode)
    with ThreadPoolExecutor(max_workers=1) as pool:
        first = pool.submit(explain, client, image_bytes())
        assert started.wait(10)
        refused = client.post(
            "/explain", files=[("file", ("refused.png", image_bytes(), "image/png"))]
        )
        release.set()
        assert first.result().status_code == 200
    assert_error(refused, 503, "overloaded")
    assert int(refused.headers["retry-after"]) >= 1
    assert "refused.png" not in decoded  # refused before a pixel of it was decoded


def test_a_full_service_gives_a_place_of_the_client_holding_the_most_to_another(
    make_client: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    client = make_client(max_model_slots=1, queue_size=2, api_keys="alice:a-key,bob:b-key")
    explainer = client.app.state.explainer  # type: ignore[attr-defined]
    started, release = held_passes(monkeypatch)

    def send(key: str, name: str):  # type: ignore[no-untyped-def]
        return client.post(
            "/explain",
            files=[("file", (name, image_bytes(), "image/png"))],
            headers={"X-API-Key": key},
        )

    def until(condition: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 10
        while not condition():
            assert time.monotonic() < deadline, "never happened"
            time.sleep(0.01)

    with ThreadPoolExecutor(max_workers=4) as pool:
        alice = [pool.submit(send, "a-key", "alice0.png")]
        assert started.wait(10)
        alice += [pool.submit(send, "a-key", f"alice{i}.png") for i in (1, 2)]
        until(lambda: explainer.limiter.in_flight == 3 and explainer.waiting == 2)
        bob = pool.submit(send, "b-key", "bob.png")  # every place is alice's: one becomes bob's
        until(lambda: explainer.limiter.held_by("key:bob") == 1 and explainer.waiting == 2)
        # alice holds 2, bob 1: taking another of alice's would only swap who is ahead
        assert "busy" in assert_error(send("b-key", "bob2.png"), 503, "overloaded")
        release.set()
        answers = [future.result() for future in alice]
        assert bob.result().status_code == 200, bob.result().text
    assert answers[0].status_code == 200  # its pass had started: never displaced
    displaced = [r for r in answers if r.status_code == 503]
    assert len(displaced) == 1 and sum(r.status_code == 200 for r in answers) == 2
    message = assert_error(displaced[0], 503, "overloaded")
    assert "gave its place" in message and int(displaced[0].headers["retry-after"]) >= 1
    assert explainer.limiter.in_flight == 0
    metrics = client.get("/metrics").text
    assert "camserve_requests_displaced_total 1.0" in metrics


# ---------------------------------------------------------------------------- bad input


def test_no_file(client: TestClient) -> None:
    message = assert_error(
        client.post("/explain", data={"method": "GradCAM"}), 422, "validation_error"
    )
    assert "file" in message


def test_empty_file(client: TestClient) -> None:
    assert "empty" in assert_error(explain(client, b""), 422, "invalid_image")


def test_not_an_image(client: TestClient) -> None:
    assert_error(explain(client, b"%PDF-1.4 not an image" * 5), 415, "unsupported_media_type")


def test_truncated_image(client: TestClient) -> None:
    data = image_bytes((64, 64), fmt="JPEG")
    assert "truncated" in assert_error(explain(client, data[:400]), 422, "invalid_image")


def test_unsupported_format(client: TestClient) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PPM")
    message = assert_error(explain(client, buffer.getvalue()), 415, "unsupported_media_type")
    assert "PPM" in message


def test_too_many_pixels(make_client: Callable[..., TestClient]) -> None:
    client = make_client(max_image_pixels=10_000)
    buffer = io.BytesIO()
    Image.new("L", (3000, 3000)).save(buffer, format="PNG")
    message = assert_error(explain(client, buffer.getvalue()), 413, "image_too_large")
    assert "CAMSERVE_MAX_IMAGE_PIXELS" in message


def test_upload_over_limit(make_client: Callable[..., TestClient]) -> None:
    client = make_client(max_upload_bytes=4096, max_images=2)
    big = image_bytes((100, 100))  # ~30 KB of noise
    message = assert_error(explain(client, big), 413, "payload_too_large")
    assert "4096" in message
    # The whole body over the limit: refused from Content-Length before reading it.
    assert_error(explain(client, big, big, big), 413, "payload_too_large")


def test_too_many_files(make_client: Callable[..., TestClient]) -> None:
    client = make_client(max_images=2)
    images = [image_bytes(seed=s) for s in range(3)]
    assert "CAMSERVE_MAX_IMAGES" in assert_error(explain(client, *images), 422, "invalid_parameter")


def test_unknown_model(client: TestClient) -> None:
    message = assert_error(explain(client, image_bytes(), model="resnt"), 404, "model_not_found")
    assert message.index("resnet") < message.index("tiny")


def test_no_model_named_and_no_default_model_says_so(
    make_client: Callable[..., TestClient],
) -> None:
    """A request that names no model, on a store without the default model: the error says the
    default is missing and how to fix it (it said 'Unknown model' of a name never sent, and
    listed failed models as available)."""
    client = make_client(default_model="shapes")
    message = assert_error(explain(client, image_bytes()), 404, "model_not_found")
    assert "No model was named" in message and "CAMSERVE_DEFAULT_MODEL" in message
    ready = message.split("ready models: ")[1]
    assert "tiny" in ready and "broken" not in ready
    assert "Unknown model 'nope'" in assert_error(
        explain(client, image_bytes(), model="nope"), 404, "model_not_found"
    )


def test_unknown_method(client: TestClient) -> None:
    response = explain(client, image_bytes(), method="gradcm")
    message = assert_error(response, 422, "unsupported_method")
    assert "Did you mean GradCAM" in message and "ScoreCAM" in message


def test_class_idx_out_of_range(client: TestClient) -> None:
    message = assert_error(explain(client, image_bytes(), class_idx="3"), 422, "invalid_parameter")
    assert "0..2" in message
    assert_error(explain(client, image_bytes(), class_idx="-1"), 422, "invalid_parameter")
    assert_error(explain(client, image_bytes(), class_idx="one"), 400, "malformed_parameter")
    two = explain(client, image_bytes(), image_bytes(), image_bytes(), class_idx="0,1")
    assert "one per image" in assert_error(two, 422, "invalid_parameter")


def test_bad_target_layer(client: TestClient) -> None:
    response = explain(client, image_bytes(), target_layer="featurs")
    message = assert_error(response, 422, "invalid_parameter")
    assert "Close matches: features" in message


def test_method_that_does_not_apply(client: TestClient) -> None:
    response = explain(client, image_bytes(), model="vgg", method="CAM")
    message = assert_error(response, 422, "method_not_applicable")
    assert "Linear" in message and "GradCAM" in message


@pytest.mark.parametrize(
    ("form", "words"),
    [
        ({"method": "SSCAM", "num_samples": "65"}, "SSCAM: num_samples must lie in [1, 64]"),
        ({"method": "SSCAM", "num_samples": "0"}, "SSCAM: num_samples must lie in [1, 64]"),
        ({"method": "ScoreCAM", "batch_size": "1000"}, "batch_size must lie in [1, 256]"),
        ({"method": "SmoothGradCAMpp", "std": "11"}, "std must lie in [0, 10]"),
        ({"method": "SmoothGradCAMpp", "seed": "-1"}, "seed must lie in [0, 4294967295]"),
        ({"alpha": "1.5"}, "alpha must lie in [0, 1], got 1.5."),
        ({"top_k": "0"}, "top_k must lie in [1, 1000], got 0."),
        ({"image_format": "gif"}, "image_format must be one of png, jpeg, webp"),
    ],
)
def test_options_out_of_bounds(client: TestClient, form: dict[str, str], words: str) -> None:
    # Checked by the pipeline (not the form's types), so every protocol says the same.
    message = assert_error(explain(client, image_bytes(), **form), 422, "invalid_parameter")
    assert words in message


def test_an_option_of_the_wrong_type_is_a_malformed_parameter(client: TestClient) -> None:
    # Read by app.pipeline.params, not the form's types: the message of every protocol.
    response = explain(client, image_bytes(), method="SSCAM", num_samples="many")
    message = assert_error(response, 400, "malformed_parameter")
    assert message == "num_samples must be an integer, got 'many'."


def test_score_cam_budget(make_client: Callable[..., TestClient]) -> None:
    client = make_client(max_cam_forwards=16)  # tiny's "features" has 4 channels
    images = [image_bytes(seed=s) for s in range(3)]
    assert explain(client, *images[:2], method="ScoreCAM").status_code == 200  # 8 forwards
    message = assert_error(explain(client, *images, method="ISCAM"), 422, "over_budget")
    assert "120 masked forwards (3 image(s) x 4 channels x 10 sample(s))" in message
    response = explain(client, images[0], method="SSCAM", num_samples="4")  # 16: allowed
    assert response.status_code == 200, response.text
    assert explain(client, *images, method="GradCAM").status_code == 200  # not counted


def test_the_guided_pass_counts_in_the_budget(make_client: Callable[..., TestClient]) -> None:
    client = make_client(max_cam_forwards=2)  # one guided forward per image and class
    images = [image_bytes(seed=s) for s in range(3)]
    assert explain(client, *images[:2], method="GuidedBackprop").status_code == 200
    response = explain(client, *images, method="GuidedGradCAM")
    message = assert_error(response, 422, "over_budget")
    assert "3 guided forwards (3 image(s) x 1 guided pass(es))" in message
    response = explain(client, images[0], method="GuidedBackprop", top_classes="3")
    assert "3 guided forwards" in assert_error(response, 422, "over_budget")


def test_option_the_method_does_not_take(client: TestClient) -> None:
    response = explain(client, image_bytes(), method="GradCAM", num_samples="4")
    message = assert_error(response, 422, "invalid_parameter")
    assert "GradCAM does not take the option 'num_samples'" in message
    assert "SmoothGradCAMpp, SSCAM, ISCAM" in message


def test_bad_output_and_colormap(client: TestClient) -> None:
    assert_error(explain(client, image_bytes(), output="overlay,pdf"), 422, "invalid_parameter")
    response = explain(client, image_bytes(), colormap="rainbowz")
    assert "viridis" in assert_error(response, 422, "invalid_parameter")


def test_cached_answers_are_not_shared_between_api_keys(
    make_client: Callable[..., TestClient],
) -> None:
    # A hit would tell one client that another sent this very image: each key has its own.
    client = make_client(cache_mb=8, api_keys=SecretStr("alice:a-key,bob:b-key"))

    def cache_state(key: str) -> str:
        response = client.post(
            "/explain", files=files(image_bytes(seed=4)), headers={"X-API-Key": key}
        )
        assert response.status_code == 200, response.text
        return response.headers["x-camserve-cache"]

    assert [cache_state("a-key"), cache_state("b-key"), cache_state("a-key")] == [
        "miss",
        "miss",
        "hit",
    ]
    assert cache_state("b-key") == "hit"


def test_api_key_on_explain(make_client: Callable[..., TestClient]) -> None:
    client = make_client(api_key="k")
    assert_error(explain(client, image_bytes()), 401, "unauthorized")
    response = client.post("/explain", files=files(image_bytes()), headers={"X-API-Key": "k"})
    assert response.status_code == 200


def test_unexpected_error_is_an_opaque_500(
    settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    from app.http.app import create_app
    from tests.conftest import wait_ready

    async def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(explainer_module.Explainer, "explain", boom)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        wait_ready(client)
        response = explain(client, image_bytes())
        assert response.status_code == 500
        assert response.json()["error"]["code"] == "internal_error"
        assert "secret" not in response.text
        assert "secret internals" in caplog.text  # with its traceback, in the log
        assert client.get("/health").status_code == 200


def test_still_serving_after_errors(client: TestClient) -> None:
    explain(client, b"junk")
    explain(client, b"")
    assert explain(client, image_bytes()).status_code == 200


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_answers_match_cpu(client: TestClient, make_client: Callable[..., TestClient]) -> None:
    gpu = make_client(device="cuda")
    assert gpu.get("/health").json()["device"].startswith("cuda:")
    images = [image_bytes(seed=s) for s in range(2)]
    for method in ("GradCAM", "ScoreCAM"):
        form = {"method": method, "output": "raw", "class_idx": "1"}
        on_gpu = explain(gpu, *images, **form).json()
        on_cpu = explain(client, *images, **form).json()
        assert on_gpu["device"].startswith("cuda")
        for a, b in zip(raw_maps(on_cpu), raw_maps(on_gpu), strict=True):
            assert np.allclose(a, b, atol=1e-3)


def test_fused_map_does_not_depend_on_normalized(client: TestClient) -> None:
    form = {"target_layer": ["features.1", "features"], "output": "raw", "class_idx": "0"}
    scaled = raw_maps(explain(client, image_bytes(), **form).json())
    plain = raw_maps(explain(client, image_bytes(), normalized="false", **form).json())
    assert np.allclose(scaled[-1], plain[-1], atol=1e-5)
    assert plain[0].max() > 1 or not np.allclose(plain[0], scaled[0])


# ---------------------------------------------------------------------------- picture sizes


def test_size_field_and_the_default_cap(make_client: Callable[..., TestClient]) -> None:
    client = make_client(max_output_side=64)
    big = image_bytes((200, 100))
    cases = {None: (64, 32), "original": (200, 100), "input": (32, 32), "50": (50, 25)}
    for size, expected in cases.items():
        form = {"output": "overlay,heatmap,raw"} | ({"size": size} if size else {})
        body = explain(client, big, **form).json()
        (layer_map,) = body["results"][0]["explanations"][0]["maps"]
        assert decode_png(layer_map["overlay"]).size == expected
        assert decode_png(layer_map["heatmap"]).size == expected
        assert (layer_map["width"], layer_map["height"]) == expected
        assert layer_map["raw"]["shape"] == [32, 32]  # raw maps keep the layer's resolution
        assert (body["results"][0]["width"], body["results"][0]["height"]) == (200, 100)
    # Small uploads are not scaled up by the default.
    body = explain(client, image_bytes((40, 32))).json()
    assert body["results"][0]["explanations"][0]["maps"][0]["width"] == 40


@pytest.mark.parametrize("size", ["0", "huge", "99999", "-1"])
def test_bad_size(client: TestClient, size: str) -> None:
    message = assert_error(explain(client, image_bytes(), size=size), 422, "invalid_parameter")
    assert "original" in message and "input" in message


def test_default_format_is_jpeg_and_png_on_request(client: TestClient) -> None:
    body = explain(client, image_bytes()).json()
    assert (body["image_format"], body["media_type"]) == ("jpeg", "image/jpeg")
    layer_map = body["results"][0]["explanations"][0]["maps"][0]
    assert decode_png(layer_map["overlay"]).format == "JPEG"
    png = explain(client, image_bytes(), image_format="png").json()
    assert decode_png(png["results"][0]["explanations"][0]["maps"][0]["overlay"]).format == "PNG"


@pytest.mark.parametrize("size", [(100, 1), (1, 100)])
def test_thin_images_are_explained(client: TestClient, size: tuple[int, int]) -> None:
    response = explain(client, image_bytes(size), output="overlay,heatmap,raw")
    assert response.status_code == 200, response.text
    layer_map = response.json()["results"][0]["explanations"][0]["maps"][0]
    assert decode_png(layer_map["overlay"]).size == size


def test_refinecam_gives_one_fused_map_for_two_layers(client: TestClient) -> None:
    form = {"method": "refinecam", "output": "raw", "target_layer": "features.1,features.3"}
    response = explain(client, image_bytes((40, 32)), **form)
    assert response.status_code == 200, response.text
    (layer_map,) = response.json()["results"][0]["explanations"][0]["maps"]
    assert layer_map["layer"] == "fused"
    raw = np.array(layer_map["raw"]["values"])
    assert raw.min() >= 0 and raw.max() <= 1 + 1e-6
    one_layer = explain(client, image_bytes((40, 32)), method="RefineCAM")
    assert "at least two" in assert_error(one_layer, 422, "method_not_applicable")


def test_legrad_is_refused_on_a_cnn_with_the_reason(client: TestClient) -> None:
    message = assert_error(
        explain(client, image_bytes((40, 32)), method="LeGrad"), 422, "method_not_applicable"
    )
    assert "Vision Transformer" in message


@pytest.mark.parametrize("route", ["/explain", "/predict"])
@pytest.mark.parametrize("size", [(101, 1), (1, 50_000)])
def test_degenerate_aspect_ratios_are_refused_before_decoding(
    client: TestClient, route: str, size: tuple[int, int]
) -> None:
    response = client.post(route, files={"file": ("thin.png", image_bytes(size), "image/png")})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_image"
    assert "aspect ratio" in error["message"] and "crop or pad" in error["message"]


def test_finercam_takes_comparison_idx_and_its_options(client: TestClient) -> None:
    form = {"method": "FinerCAM", "output": "raw", "class_idx": "0"}
    plain = explain(client, image_bytes((40, 32)), **form, gamma="0")
    assert plain.status_code == 200, plain.text
    gradcam = explain(client, image_bytes((40, 32)), **{**form, "method": "GradCAM"})
    np.testing.assert_allclose(raw_maps(plain.json())[0], raw_maps(gradcam.json())[0], atol=1e-5)
    contrasted = explain(client, image_bytes((40, 32)), **form, comparison_idx="1,2")
    assert contrasted.status_code == 200, contrasted.text
    assert contrasted.json()["options"] == {"comparison_idx": [1, 2]}
    for bad, code in [
        ({"comparison_idx": "0"}, "invalid_parameter"),  # the explained class itself
        ({"comparison_idx": "x"}, "malformed_parameter"),
        ({"gamma": "11"}, None),
    ]:
        response = explain(client, image_bytes((40, 32)), **form, **bad)
        assert response.status_code in (400, 422), response.text
        if code:
            assert response.json()["error"]["code"] in (code, "method_not_applicable")
    refused = explain(client, image_bytes((40, 32)), method="GradCAM", comparison_idx="1")
    assert "FinerCAM" in assert_error(refused, 422, "invalid_parameter")


def test_ablation_and_noisy_forwards_count_towards_the_budget(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(max_cam_forwards=16)  # tiny's "features" has 4 channels
    images = [image_bytes(seed=s) for s in range(5)]
    assert explain(client, *images[:4], method="AblationCAM").status_code == 200  # 16
    message = assert_error(explain(client, *images, method="AblationCAM"), 422, "over_budget")
    assert "20 masked forwards (5 image(s) x 4 channels x 1 sample(s))" in message
    message = assert_error(
        explain(client, *images, method="SmoothGradCAMpp"), 422, "over_budget"
    )  # 5 images x 4 noisy samples
    assert "20 noisy forwards" in message


def test_legrad_explains_a_served_vit_over_its_blocks(
    make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    from tests.fixtures_models import write_tiny_vit

    write_tiny_vit(tmp_path)
    client = make_client(model_store=tmp_path, default_model="vit")
    response = explain(client, image_bytes((40, 32)), method="LeGrad", output="raw")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["target_layers"] == [
        "encoder.layers.encoder_layer_0",
        "encoder.layers.encoder_layer_1",
    ]
    (layer_map,) = body["results"][0]["explanations"][0]["maps"]
    assert layer_map["layer"] == "fused" and layer_map["raw"]["shape"] == [4, 4]


def test_a_served_vit_is_explained_on_its_patch_grid(
    make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    """Its blocks give tokens (N, 17, 16): read as a 1-D map they were a 500 (before the
    engine refused them, a 422 naming a reshape_transform no HTTP client can send); now they
    are laid on the 4x4 patch grid as vit_target lays them, for every method."""
    from tests.fixtures_models import write_tiny_vit

    write_tiny_vit(tmp_path)
    client = make_client(model_store=tmp_path, default_model="vit")
    info = client.get("/models/vit").json()
    assert info["target_layers"] == ["encoder.layers.encoder_layer_1.ln_1"]
    # ScoreCAM masks the 16 features of each patch token, not the 17 tokens
    assert info["method_info"]["ScoreCAM"]["forwards"] == 16
    for method in ("GradCAM", "ScoreCAM", "EigenCAM", "LayerCAM"):
        response = explain(client, image_bytes((40, 32)), method=method, output="raw")
        assert response.status_code == 200, response.text
        (layer_map,) = response.json()["results"][0]["explanations"][0]["maps"]
        assert layer_map["raw"]["shape"] == [4, 4]
    mixed = explain(client, image_bytes((40, 32)), target_layer=["conv_proj", "encoder.ln"])
    assert assert_error(mixed, 422, "method_not_applicable")


def test_a_served_vits_candidate_layers_end_at_its_preset(
    make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    """Past the last block's first norm, patch tokens no longer reach the class token the head
    reads: encoder.layers, encoder.ln and encoder were offered and their Grad-CAM maps were
    all zeros."""
    from tests.fixtures_models import write_tiny_vit

    write_tiny_vit(tmp_path)
    client = make_client(model_store=tmp_path, default_model="vit")
    info = client.get("/models/vit").json()
    preset = "encoder.layers.encoder_layer_1.ln_1"
    assert info["candidate_layers"] == ["conv_proj", "encoder.dropout", preset]
    for layer in [*info["candidate_layers"], "encoder.ln"]:
        response = explain(client, image_bytes((40, 32)), target_layer=layer, output="raw")
        assert response.status_code == 200, response.text
        (layer_map,) = response.json()["results"][0]["explanations"][0]["maps"]
        peak = float(np.max(layer_map["raw"]["values"]))
        assert (peak > 0) == (layer != "encoder.ln"), layer  # the one left out is blank


def test_a_served_vit_without_target_layers_gets_its_last_blocks_first_norm(
    make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    from tests.fixtures_models import build_tiny_vit, write_model

    torch.manual_seed(0)
    write_model(
        tmp_path,
        "vit",
        build_tiny_vit(),
        architecture="tests.fixtures_models:build_tiny_vit",
        num_classes=3,
        input_size=32,
        target_layers=[],
    )
    client = make_client(model_store=tmp_path, default_model="vit")
    info = client.get("/models/vit").json()
    assert info["target_layers"] == ["encoder.layers.encoder_layer_1.ln_1"]  # vit_target's


@pytest.mark.parametrize("factory", ["build_tiny_swin", "build_tiny_timm_swin"])
def test_a_served_swin_is_explained_on_its_preset_grid(
    make_client: Callable[..., TestClient], tmp_path: Path, factory: str
) -> None:
    from tests.fixtures_models import write_tiny_swin

    write_tiny_swin(tmp_path, factory=factory)
    client = make_client(model_store=tmp_path, default_model="swin")
    info = client.get("/models/swin").json()
    assert info["target_layers"] == ["norm"]
    assert info["layer_shapes"]["norm"] == [16, 4, 4]  # (C, H, W) as the extractors read it
    assert "LeGrad" in info["not_applicable"]
    for form in ({}, {"aug_smooth": "true", "eigen_smooth": "true"}):
        response = explain(client, image_bytes((40, 32)), method="GradCAM", output="raw", **form)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["target_layers"] == ["norm"] and body["options"] == {k: True for k in form}
        (layer_map,) = body["results"][0]["explanations"][0]["maps"]
        assert layer_map["raw"]["shape"] == [4, 4]
    # ScoreCAM masks the 16 channels of the final norm (not its width of 16 read as channels
    # of a 4x16 map): 16 forwards per image.
    assert info["method_info"]["ScoreCAM"]["forwards"] == 16
    conv = "features.0.0" if factory == "build_tiny_swin" else "patch_embed.proj"
    mixed = explain(client, image_bytes((40, 32)), target_layer=["norm", conv])
    assert "separate requests" in assert_error(mixed, 422, "method_not_applicable")
    alone = explain(client, image_bytes((40, 32)), target_layer=conv, output="raw")
    assert alone.status_code == 200, alone.text  # the patch convolution is channels-first
    assert alone.json()["results"][0]["explanations"][0]["maps"][0]["raw"]["shape"] == [8, 8]
