"""Open Inference Protocol v2: health, metadata and infer, with the protocol's own bodies."""

from __future__ import annotations

import base64
from collections.abc import Callable

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.conftest import files, image_bytes


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def infer_body(*images: bytes, name: str = "image", shape: list[int] | None = None) -> dict:
    """The shape of KServe's image-classification example: one BYTES input, base64 rows."""
    return {
        "id": "42",
        "inputs": [
            {
                "name": name,
                "shape": shape if shape is not None else [len(images)],
                "datatype": "BYTES",
                "data": [b64(image) for image in images],
            }
        ],
        "outputs": [{"name": "logits"}],
    }


def assert_protocol_error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"], body
    return body["error"]


def test_health(client: TestClient) -> None:
    assert client.get("/v2/health/live").json() == {"live": True}
    response = client.get("/v2/health/ready")
    assert response.status_code == 200 and response.json() == {"ready": True}
    assert client.get("/v2").json()["name"] == "camserve"


def test_model_metadata_and_ready(client: TestClient) -> None:
    metadata = client.get("/v2/models/tiny").json()
    assert metadata == {
        "name": "tiny",
        "versions": ["1"],
        "platform": "pytorch",
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1]}],
        "outputs": [
            {"name": "logits", "datatype": "FP32", "shape": [-1, 3]},
            {"name": "cam", "datatype": "FP32", "shape": [-1, -1, -1]},
        ],
    }
    assert client.get("/v2/models/tiny/ready").json() == {"name": "tiny", "ready": True}
    broken = client.get("/v2/models/broken/ready")
    assert broken.status_code == 503 and broken.json() == {"name": "broken", "ready": False}
    assert "Unknown model 'nope'" in assert_protocol_error(client.get("/v2/models/nope"), 404)
    assert_protocol_error(client.get("/v2/models/nope/ready"), 404)
    assert_protocol_error(client.get("/v2/models/broken"), 503)


def test_infer_answers_the_logits_of_predict(client: TestClient) -> None:
    images = [image_bytes(seed=1), image_bytes((64, 48), seed=2)]
    response = client.post("/v2/models/resnet/infer", json=infer_body(*images))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_name"] == "resnet" and body["id"] == "42"
    (output,) = body["outputs"]
    assert (output["name"], output["datatype"], output["shape"]) == ("logits", "FP32", [2, 5])
    assert len(output["data"]) == 10
    native = client.post(
        "/predict", files=files(*images), data={"model": "resnet", "top_k": "5"}
    ).json()
    for row, result in enumerate(native["results"]):
        for prediction in result["predictions"]:
            got = output["data"][row * 5 + prediction["class_idx"]]
            assert got == pytest.approx(prediction["logit"], abs=1e-5)


def test_infer_accepts_a_wildcard_shape_and_nested_rows(client: TestClient) -> None:
    body = infer_body(image_bytes(), image_bytes(seed=3), shape=[-1])
    assert client.post("/v2/models/tiny/infer", json=body).json()["outputs"][0]["shape"] == [2, 3]
    nested = infer_body(image_bytes(), shape=[1, 1])
    nested["inputs"][0]["data"] = [nested["inputs"][0]["data"]]
    assert client.post("/v2/models/tiny/infer", json=nested).status_code == 200


def test_the_specification_example_is_refused_clearly(client: TestClient) -> None:
    # The inference request example of the Open Inference Protocol specification.
    spec_example = {
        "id": "42",
        "inputs": [
            {"name": "input0", "shape": [2, 2], "datatype": "UINT32", "data": [1, 2, 3, 4]},
            {"name": "input1", "shape": [3], "datatype": "BOOL", "data": [True]},
        ],
        "outputs": [{"name": "output0"}],
    }
    message = assert_protocol_error(client.post("/v2/models/tiny/infer", json=spec_example), 400)
    assert "'image'" in message and "'input0', 'input1'" in message


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({}, "inputs"),
        ({"inputs": []}, "inputs"),
        ({"inputs": [{"name": "image"}]}, "shape"),
        ({"inputs": "x"}, "inputs"),
        ([1, 2], "body"),
        (infer_body(image_bytes(), shape=[2]), "shape [2] but 1 element"),
        (infer_body(image_bytes(), shape=[]), "shape [] but 1 element"),
        ({**infer_body(image_bytes()), "outputs": [{"name": "probs"}]}, "Unknown output"),
        (
            {"inputs": [{"name": "image", "shape": [1], "datatype": "FP32", "data": [1.0]}]},
            "datatype BYTES",
        ),
        (
            {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [1]}]},
            "base64 strings",
        ),
        (
            {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["%%%"]}]},
            "not valid base64",
        ),
        (
            {"inputs": [{"name": "image", "shape": [0], "datatype": "BYTES", "data": []}]},
            "No image",
        ),
    ],
)
def test_bad_bodies_are_400_in_the_protocol_shape(
    client: TestClient, body: object, words: str
) -> None:
    message = assert_protocol_error(client.post("/v2/models/tiny/infer", json=body), 400)
    assert words in message


def test_not_json_is_400(client: TestClient) -> None:
    response = client.post(
        "/v2/models/tiny/infer", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert_protocol_error(response, 400)


def test_domain_errors_keep_their_status(client: TestClient) -> None:
    url = "/v2/models/tiny/infer"
    assert_protocol_error(client.post("/v2/models/nope/infer", json=infer_body(image_bytes())), 404)
    assert_protocol_error(client.post(url, json=infer_body(b"not an image")), 415)
    assert_protocol_error(client.post(url, json=infer_body(b"")), 422)


def test_limits_are_those_of_the_native_routes(make_client: Callable[..., TestClient]) -> None:
    client = make_client(max_images=2, max_upload_bytes=4096)
    url = "/v2/models/tiny/infer"
    assert "at most 2" in assert_protocol_error(
        client.post(url, json=infer_body(*[image_bytes()] * 3)), 422
    )
    big = image_bytes((64, 64))  # a random 64x64 PNG is over 4 KiB
    assert len(big) > 4096
    assert "upload limit" in assert_protocol_error(client.post(url, json=infer_body(big)), 413)
    # The body limit, base64 included, gives 413 in the protocol's shape too.
    huge = {
        "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["A" * 100_000]}]
    }
    assert "request body is over" in assert_protocol_error(client.post(url, json=huge), 413)
    # Two images at the limit still fit: the body limit allows for base64.
    near = image_bytes((36, 36))
    assert 3000 < len(near) <= 4096
    assert client.post(url, json=infer_body(near, near)).status_code == 200


def test_api_key(make_client: Callable[..., TestClient]) -> None:
    client = make_client(api_key="k")
    body = infer_body(image_bytes())
    assert_protocol_error(client.post("/v2/models/tiny/infer", json=body), 401)
    assert_protocol_error(client.get("/v2/models/tiny"), 401)
    response = client.post("/v2/models/tiny/infer", json=body, headers={"X-API-Key": "k"})
    assert response.status_code == 200
    assert client.get("/v2/health/ready").status_code == 200  # probes stay open


def test_shares_the_batcher_and_the_request_id(client: TestClient) -> None:
    response = client.post(
        "/v2/models/tiny/infer", json=infer_body(image_bytes()), headers={"X-Request-ID": "oip-1"}
    )
    assert response.headers["x-request-id"] == "oip-1"
    bad = client.post("/v2/models/tiny/infer", json={}, headers={"X-Request-ID": "oip-2"})
    assert bad.headers["x-request-id"] == "oip-2"


def explain_body(*images: bytes, outputs: tuple[str, ...] = ("logits", "cam"), **params) -> dict:
    return {**infer_body(*images), "outputs": [{"name": n} for n in outputs], "parameters": params}


def test_the_cam_output_holds_the_maps_of_explain(client: TestClient) -> None:
    images = [image_bytes(seed=1), image_bytes((64, 48), seed=2)]
    params = {"method": "ScoreCAM", "class_idx": [1, 2], "batch_size": 2, "normalized": False}
    response = client.post("/v2/models/tiny/infer", json=explain_body(*images, **params))
    assert response.status_code == 200, response.text
    logits, cam = response.json()["outputs"]
    assert (logits["name"], logits["shape"], cam["name"]) == ("logits", [2, 3], "cam")
    assert cam["parameters"] == {
        "method": "ScoreCAM",
        "layer": "features",
        "target_layers": "features",
        "class_idx": "1,2",
        "normalized": False,
        "batch_size": 2,
    }
    form = {"method": "ScoreCAM", "class_idx": "1,2", "batch_size": "2"}
    native = client.post(
        "/explain", files=files(*images), data={**form, "output": "raw", "normalized": "false"}
    ).json()
    maps = np.array([r["explanations"][0]["maps"][-1]["raw"]["values"] for r in native["results"]])
    assert cam["shape"] == list(maps.shape) and cam["datatype"] == "FP32"
    np.testing.assert_allclose(np.array(cam["data"]).reshape(maps.shape), maps, atol=1e-5)
    native_logits = [r["logits"] for r in native["results"]]
    np.testing.assert_allclose(np.array(logits["data"]).reshape(2, 3), native_logits, atol=1e-5)


def test_outputs_come_in_the_order_asked_and_several_layers_give_the_fused_map(
    client: TestClient,
) -> None:
    body = explain_body(image_bytes(), outputs=("cam",), target_layer=["layer2", "layer3"])
    (cam,) = client.post("/v2/models/resnet/infer", json=body).json()["outputs"]
    assert cam["parameters"]["layer"] == "fused"
    assert cam["parameters"]["target_layers"] == "layer2,layer3"
    assert cam["parameters"]["method"] == "GradCAM"  # the model's default
    both = explain_body(image_bytes(), outputs=("cam", "logits"))
    outputs = client.post("/v2/models/tiny/infer", json=both).json()["outputs"]
    assert [output["name"] for output in outputs] == ["cam", "logits"]


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        (
            explain_body(image_bytes(), outputs=("logits",), method="GradCAM"),
            400,
            "Parameter 'method' is for an explanation; add the output 'cam'",
        ),
        (
            explain_body(image_bytes(), method="GradCAM,ScoreCAM"),
            400,
            "The output 'cam' holds one map per image; send one method.",
        ),
        (
            explain_body(image_bytes(), colormap="jet"),
            400,
            "infer takes no parameter 'colormap'; its parameters are priority, timeout, "
            "binary_data_output, method, class_idx, target_layer, normalized, num_samples",
        ),
        (
            explain_body(image_bytes(), method="FinerCAM", gamma="high"),
            422,
            "gamma must be a number, got 'high'.",
        ),
        (explain_body(image_bytes(), class_idx=[9]), 422, "class_idx 9 is out of range"),
    ],
)
def test_explain_parameters_are_checked(
    client: TestClient, body: dict, status: int, words: str
) -> None:
    assert words in assert_protocol_error(client.post("/v2/models/tiny/infer", json=body), status)


def test_parameters_of_other_extensions_are_ignored_without_cam(client: TestClient) -> None:
    body = explain_body(image_bytes(), outputs=("logits",), priority=1, binary_data_output=False)
    assert client.post("/v2/models/tiny/infer", json=body).status_code == 200


@pytest.mark.parametrize(
    ("shape", "images", "words"),
    [
        ([-1] * 600_000, 2, "over the 65536 allowed"),  # the hostile repro: a 2.5 MB shape
        ([-1] * 60_000, 2, "at most 8 items"),
        ([-1, -1], 1, "at most one dimension may be -1"),
        ([1, -1, 1], 2, None),
        ([3, -1], 2, "shape [3, -1] but 2 element(s)"),
        ([-2], 1, "greater than or equal to -1"),
    ],
)
def test_shapes_have_a_small_rank_and_one_wildcard(
    client: TestClient, shape: list[int], images: int, words: str | None
) -> None:
    body = infer_body(*[image_bytes(seed=i) for i in range(images)], shape=shape)
    response = client.post("/v2/models/tiny/infer", json=body)
    if words is None:
        assert response.status_code == 200, response.text
    else:
        assert words in assert_protocol_error(response, 400)


def test_an_id_is_bounded_before_it_is_echoed(client: TestClient) -> None:
    body = {**infer_body(image_bytes()), "id": "x" * 100_000}
    message = assert_protocol_error(client.post("/v2/models/tiny/infer", json=body), 400)
    assert "id" in message and len(message) < 300
    body["id"] = "x" * 256
    assert client.post("/v2/models/tiny/infer", json=body).json()["id"] == body["id"]


def test_rows_of_data_are_bounded(client: TestClient) -> None:
    body = infer_body(image_bytes(), shape=[1, -1])
    body["inputs"][0]["data"] = [["a"] * 10_000]
    assert "at most 256 elements" in assert_protocol_error(
        client.post("/v2/models/tiny/infer", json=body), 400
    )
