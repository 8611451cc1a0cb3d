"""Open Inference Protocol v2: health, metadata and infer, with the protocol's own bodies."""

from __future__ import annotations

import asyncio
import base64
import gzip
import io
import json
import struct
import sys
import time
import zlib
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.conftest import calls_on_the_loop, files, image_bytes


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
            {"name": "concepts", "datatype": "FP32", "shape": [-1, -1, -1, -1]},
            {"name": "concept_labels", "datatype": "BYTES", "shape": [-1, -1, -1]},
        ],
    }
    # DFF reads the model's head as CAM does: on vgg neither applies, so no concept outputs.
    vgg = client.get("/v2/models/vgg").json()
    assert [o["name"] for o in vgg["outputs"]] == ["logits", "cam"]
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
            "Unknown explain parameter 'colormap'; the parameters are priority, timeout, "
            "binary_data_output, method, class_idx, classes, top_classes, target_layer, "
            "normalized, faithfulness, faithfulness_steps, box, region, eigen_smooth, aug_smooth, "
            "num_samples",
        ),
        (explain_body(image_bytes(), box="0"), 400, "box is for detection models"),
        (
            explain_body(image_bytes(), outputs=("boxes",)),
            400,
            "The output 'boxes' is a detection model's; 'tiny' is a classifier",
        ),
        (
            explain_body(image_bytes(), method="FinerCAM", gamma="high"),
            400,
            "gamma must be a number, got 'high'.",
        ),
        (explain_body(image_bytes(), class_idx=[9]), 422, "class_idx 9 is out of range"),
    ],
)
def test_explain_parameters_are_checked(
    client: TestClient, body: dict, status: int, words: str
) -> None:
    assert words in assert_protocol_error(client.post("/v2/models/tiny/infer", json=body), status)


def test_tritons_parameters_are_taken_without_cam(client: TestClient) -> None:
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


# ---------------------------------------------------------------- content types, binary data


def binary_body(
    *images: bytes, outputs: list[dict] | None = None, parameters: dict | None = None
) -> tuple[bytes, dict[str, str]]:
    """An infer request in the binary tensor data extension: JSON, then the BYTES elements
    (each with its 4-byte little-endian length); the body and its headers."""
    raw = b"".join(struct.pack("<I", len(image)) + image for image in images)
    header: dict = {
        "inputs": [
            {
                "name": "image",
                "shape": [len(images)],
                "datatype": "BYTES",
                "parameters": {"binary_data_size": len(raw)},
            }
        ]
    }
    if outputs is not None:
        header["outputs"] = outputs
    if parameters is not None:
        header["parameters"] = parameters
    text = json.dumps(header).encode()
    return text + raw, {"Inference-Header-Content-Length": str(len(text))}


def binary_outputs(response: httpx.Response) -> tuple[dict, dict[str, bytes]]:
    """The JSON part of a binary answer, and each binary output's bytes by name."""
    length = int(response.headers["inference-header-content-length"])
    header = json.loads(response.content[:length])
    rest, buffers = response.content[length:], {}
    for output in header["outputs"]:
        size = output.get("parameters", {}).get("binary_data_size")
        if size is not None:
            buffers[output["name"]], rest = rest[:size], rest[size:]
    assert rest == b""
    return header, buffers


@pytest.mark.parametrize(
    "content_type", [None, "application/octet-stream", "application/x-www-form-urlencoded"]
)
def test_a_protocol_body_is_json_whatever_its_content_type(
    client: TestClient, content_type: str | None
) -> None:
    # tritonclient sends no type (sync) or application/octet-stream (asyncio); curl -d a form.
    headers = {} if content_type is None else {"content-type": content_type}
    text = json.dumps(infer_body(image_bytes())).encode()
    request = client.build_request("POST", "/v2/models/tiny/infer", content=text, headers=headers)
    assert request.headers.get("content-type") == content_type
    response = client.send(request)
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["shape"] == [1, 3]
    v1 = client.post(
        "/v1/models/tiny:predict",
        content=json.dumps({"instances": [{"image": {"b64": b64(image_bytes())}}]}),
        headers=headers,
    )
    assert v1.status_code == 200, v1.text


def test_binary_inputs_and_outputs_match_json(client: TestClient) -> None:
    images = [image_bytes(seed=1), image_bytes((50, 30), seed=2)]
    outputs = [{"name": "logits"}, {"name": "cam"}]
    as_json = client.post("/v2/models/tiny/infer", json={**infer_body(*images), "outputs": outputs})
    json_outputs = {o["name"]: o for o in as_json.json()["outputs"]}
    body, headers = binary_body(
        *images, outputs=[{"name": n, "parameters": {"binary_data": True}} for n in json_outputs]
    )
    response = client.post("/v2/models/tiny/infer", content=body, headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    header, buffers = binary_outputs(response)
    for output in header["outputs"]:
        expected = json_outputs[output["name"]]
        assert output["shape"] == expected["shape"] and "data" not in output
        values = np.frombuffer(buffers[output["name"]], dtype="<f4")
        assert np.array_equal(values, np.asarray(expected["data"], dtype=np.float32))
    cam = next(o for o in header["outputs"] if o["name"] == "cam")
    assert cam["parameters"]["method"] == "GradCAM" and cam["shape"][0] == 2


def test_binary_data_output_makes_every_output_binary(client: TestClient) -> None:
    body, headers = binary_body(image_bytes(), parameters={"binary_data_output": True})
    header, buffers = binary_outputs(
        client.post("/v2/models/tiny/infer", content=body, headers=headers)
    )
    assert [o["name"] for o in header["outputs"]] == ["logits"]
    assert len(buffers["logits"]) == 3 * 4
    # An output's own binary_data wins over the request's default.
    body, headers = binary_body(
        image_bytes(),
        outputs=[{"name": "logits", "parameters": {"binary_data": False}}],
        parameters={"binary_data_output": True},
    )
    answer = client.post("/v2/models/tiny/infer", content=body, headers=headers)
    assert "inference-header-content-length" not in answer.headers
    assert len(answer.json()["outputs"][0]["data"]) == 3


def test_a_uint8_pixel_tensor_is_taken_as_images(client: TestClient) -> None:
    pixels = np.random.default_rng(5).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    header = {
        "inputs": [
            {
                "name": "image",
                "shape": [2, 32, 32, 3],
                "datatype": "UINT8",
                "parameters": {"binary_data_size": pixels.nbytes},
            }
        ]
    }
    text = json.dumps(header).encode()
    response = client.post(
        "/v2/models/tiny/infer",
        content=text + pixels.tobytes(),
        headers={"Inference-Header-Content-Length": str(len(text))},
    )
    assert response.status_code == 200, response.text
    pngs = []
    for image in pixels:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    encoded = client.post("/v2/models/tiny/infer", json=infer_body(*pngs)).json()
    assert response.json()["outputs"][0]["data"] == encoded["outputs"][0]["data"]


@pytest.mark.parametrize("side", [2, 32])
def test_uint8_pixels_in_json_are_refused_by_name(client: TestClient, side: int) -> None:
    # tritonclient's set_data_from_numpy(binary_data=False): the 32 x 32 image's 3,072 values
    # met the 256-element bound first, "List should have at most 256 items", which names
    # neither the datatype nor the fix.
    pixels = [0] * (side * side * 3)
    body = {"inputs": [{"name": "image", "shape": [1, side, side, 3], "datatype": "UINT8"}]}
    body["inputs"][0]["data"] = pixels
    message = assert_protocol_error(client.post("/v2/models/tiny/infer", json=body), 400)
    assert "UINT8 pixels as binary data" in message and "256" not in message


@pytest.mark.parametrize(
    ("mangle", "words"),
    [
        (lambda b, h: (b, {h: "999999"}), "the body has only"),
        (lambda b, h: (b, {h: "ten"}), "must be a number of bytes"),
        # '²' (latin-1 0xB2) passed isdigit, then int() failed; 5,000 digits int() refused: 500s
        (lambda b, h: (b, {h: b"\xb2"}), "must be a number of bytes"),
        (lambda b, h: (b, {h: "9" * 5000}), "must be a number of bytes"),
        (lambda b, h: (b[:-5], None), "runs past the end of the body"),
        (lambda b, h: (b + b"xx", None), "2 bytes after the tensors' data"),
    ],
)
def test_binary_framing_that_does_not_add_up_is_400(
    client: TestClient, mangle: Callable, words: str
) -> None:
    body, headers = binary_body(image_bytes())
    body, changed = mangle(body, "Inference-Header-Content-Length")
    response = client.post("/v2/models/tiny/infer", content=body, headers=changed or headers)
    assert words in assert_protocol_error(response, 400)


def test_the_framing_header_given_twice_is_400(client: TestClient) -> None:
    # The first was taken and the second ignored: a proxy that reads the other one frames the
    # same body differently.
    body, headers = binary_body(image_bytes())
    (name, length), *_ = headers.items()
    for second in (length, "5"):
        response = client.post(
            "/v2/models/tiny/infer", content=body, headers=[(name, length), (name, second)]
        )
        assert "given 2 times" in assert_protocol_error(response, 400)


def test_a_length_prefix_that_lies_is_400(client: TestClient) -> None:
    image = image_bytes()
    raw = struct.pack("<I", len(image) + 100) + image
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "shape": [1],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ]
        }
    ).encode()
    response = client.post(
        "/v2/models/tiny/infer",
        content=header + raw,
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    message = assert_protocol_error(response, 400)
    assert f"says it has {len(image) + 100} bytes but only {len(image)} follow" in message


def test_binary_data_only_on_infer(make_client: Callable[..., TestClient]) -> None:
    keyed = make_client(admin_key="admin")
    response = keyed.post(
        "/v2/repository/index",
        content=b"{}",
        headers={"Inference-Header-Content-Length": "2", "X-Admin-Key": "admin"},
    )
    assert "takes no binary data" in assert_protocol_error(response, 400)


def test_the_body_limit_counts_the_binary_part(make_client: Callable[..., TestClient]) -> None:
    limited = make_client(max_upload_bytes=2048, max_images=1)
    body, headers = binary_body(image_bytes((64, 64)))  # ~12 kB of PNG
    message = assert_protocol_error(
        limited.post("/v2/models/tiny/infer", content=body, headers=headers), 413
    )
    assert "CAMSERVE_MAX_UPLOAD_BYTES" in message


# ---------------------------------------------------------------- Triton's parameters


def test_sequence_parameters_are_refused_by_name(client: TestClient) -> None:
    body = {**infer_body(image_bytes()), "parameters": {"sequence_id": 7, "sequence_start": True}}
    message = assert_protocol_error(client.post("/v2/models/tiny/infer", json=body), 400)
    assert "sequence_id, sequence_start" in message and "stateless" in message


def test_an_unknown_parameter_is_400(client: TestClient) -> None:
    body = {**infer_body(image_bytes()), "parameters": {"temperature": 0.5}}
    message = assert_protocol_error(client.post("/v2/models/tiny/infer", json=body), 400)
    assert "Unknown explain parameter 'temperature'" in message and "priority, timeout" in message


def test_the_classification_extension(client: TestClient) -> None:
    images = [image_bytes(seed=1), image_bytes(seed=2)]
    logits = client.post("/v2/models/tiny/infer", json=infer_body(*images)).json()["outputs"][0]
    body = {
        **infer_body(*images),
        "outputs": [{"name": "logits", "parameters": {"classification": 2}}],
    }
    (output,) = client.post("/v2/models/tiny/infer", json=body).json()["outputs"]
    assert (output["datatype"], output["shape"]) == ("BYTES", [2, 2])
    rows = np.asarray(logits["data"]).reshape(2, 3)
    for row, (first, second) in zip(
        rows, zip(*[iter(output["data"])] * 2, strict=True), strict=True
    ):
        best = int(np.argmax(row))
        value, index, label = first.split(":")
        assert (int(index), label) == (best, f"tiny_class{best}")
        assert float(value) == pytest.approx(row[best], abs=1e-6)
        assert float(second.split(":")[0]) <= float(value)
    bad = {
        **infer_body(image_bytes()),
        "outputs": [{"name": "cam", "parameters": {"classification": 2}}],
    }
    assert "Only the output 'logits'" in assert_protocol_error(
        client.post("/v2/models/tiny/infer", json=bad), 400
    )


def test_the_cam_outputs_parameters_carry_the_explain_options(client: TestClient) -> None:
    body = {
        **infer_body(image_bytes()),
        "outputs": [{"name": "cam", "parameters": {"method": "ScoreCAM", "batch_size": 4}}],
    }
    (cam,) = client.post("/v2/models/tiny/infer", json=body).json()["outputs"]
    assert cam["parameters"]["method"] == "ScoreCAM"
    conflict = {**body, "parameters": {"method": "GradCAM"}}
    message = assert_protocol_error(client.post("/v2/models/tiny/infer", json=conflict), 400)
    assert "'method' is 'GradCAM' in the request but 'ScoreCAM' in the output 'cam'" in message
    same = {**body, "parameters": {"method": "ScoreCAM"}}
    assert client.post("/v2/models/tiny/infer", json=same).status_code == 200
    unknown = {**body, "outputs": [{"name": "cam", "parameters": {"colour": "red"}}]}
    message = assert_protocol_error(client.post("/v2/models/tiny/infer", json=unknown), 400)
    assert "Unknown explain parameter 'colour'" in message
    typo = {**body, "parameters": {"methd": "ScoreCAM"}}
    message = assert_protocol_error(client.post("/v2/models/tiny/infer", json=typo), 400)
    assert "Unknown explain parameter 'methd' (did you mean 'method'?)" in message


def test_an_input_parameter_is_not_ignored(client: TestClient) -> None:
    body = infer_body(image_bytes())
    body["inputs"][0]["parameters"] = {"content_type": "str"}
    message = assert_protocol_error(client.post("/v2/models/tiny/infer", json=body), 400)
    assert "unknown parameter 'content_type'" in message


def test_a_bad_priority_or_timeout_is_400(client: TestClient) -> None:
    for parameters, words in (
        ({"priority": -1}, "'priority' must be a whole number"),
        ({"timeout": "soon"}, "'timeout' must be a whole number"),
        ({"binary_data_output": "yes"}, "true or false"),
    ):
        body = {**infer_body(image_bytes()), "parameters": parameters}
        assert words in assert_protocol_error(client.post("/v2/models/tiny/infer", json=body), 400)


# ---------------------------------------------------------------- errors, compression, keys


def test_every_status_under_the_protocols_is_error_and_message(settings) -> None:  # type: ignore[no-untyped-def]
    from app.http.app import create_app

    app = create_app(settings)
    with TestClient(app, raise_server_exceptions=False) as client:
        from tests.conftest import wait_ready

        wait_ready(client)
        assert "No route /v2/nothing" in assert_protocol_error(client.get("/v2/nothing"), 404)
        assert_protocol_error(client.get("/v1/nothing/here"), 404)
        response = client.get("/v2/models/tiny/infer")
        assert "GET is not allowed" in assert_protocol_error(response, 405)
        assert response.headers["allow"] == "POST"
        assert_protocol_error(client.get("/v1/models/tiny:predict"), 405)

        def crash(*args: object, **kwargs: object) -> None:
            raise RuntimeError("boom")

        import app.http.protocols.oip as routes

        original = routes.model_metadata
        routes.model_metadata = crash  # type: ignore[assignment]
        try:
            message = assert_protocol_error(client.get("/v2/models/tiny"), 500)
        finally:
            routes.model_metadata = original  # type: ignore[assignment]
        assert "boom" not in message and "Internal server error" in message
        # Elsewhere, camserve's own shape stays.
        assert client.get("/nothing").json()["error"]["code"] == "not_found"


def test_a_compressed_request_and_a_compressed_answer(client: TestClient) -> None:
    images = [image_bytes(seed=n) for n in range(4)]
    body = {**infer_body(*images), "outputs": [{"name": "cam"}]}
    plain = client.post("/v2/models/tiny/infer", json=body).json()
    for encoding, packed in (
        ("gzip", gzip.compress(json.dumps(body).encode())),
        ("deflate", zlib.compress(json.dumps(body).encode())),
    ):
        response = client.post(
            "/v2/models/tiny/infer",
            content=packed,
            headers={"Content-Encoding": encoding, "Accept-Encoding": "gzip"},
        )
        assert response.status_code == 200, response.text
        assert response.headers["content-encoding"] == "gzip"  # answers come back gzipped
        assert response.json() == plain
    small = client.get("/v2/health/live", headers={"Accept-Encoding": "gzip"})
    assert "content-encoding" not in small.headers  # too small to be worth it


def test_a_gzip_bomb_is_413(make_client: Callable[..., TestClient]) -> None:
    limited = make_client(max_upload_bytes=1024, max_images=1)
    bomb = gzip.compress(b" " * 50_000_000)
    assert len(bomb) < 100_000
    response = limited.post(
        "/v2/models/tiny/infer", content=bomb, headers={"Content-Encoding": "gzip"}
    )
    assert "decompresses to over" in assert_protocol_error(response, 413)
    response = limited.post(
        "/v2/models/tiny/infer", content=b"x", headers={"Content-Encoding": "br"}
    )
    assert "gzip or deflate" in assert_protocol_error(response, 415)


def test_an_integer_of_thousands_of_digits_is_400(client: TestClient) -> None:
    text = '{"id": "1", "inputs": [], "parameters": {"priority": ' + "9" * 5000 + "}}"
    response = client.post("/v2/models/tiny/infer", content=text)
    assert "not valid JSON" in assert_protocol_error(response, 400)
    response = client.post("/v1/models/tiny:predict", content=text)
    assert "not valid JSON" in assert_protocol_error(response, 400)


@pytest.mark.parametrize("past", [100, 100_000])
def test_json_nested_past_the_parsers_depth_is_400(client: TestClient, past: int) -> None:
    # json.loads raised RecursionError (not a ValueError) past about 1,000 levels: a 500 with
    # two tracebacks in the log, for any place in the body, on both protocols. The parser's
    # depth is the interpreter's recursion limit, which torch.compile raises to 2,000 for the
    # process (an earlier test compiling a model made a fixed 1,100 levels parse).
    depth = sys.getrecursionlimit() + past
    nested = "[" * depth + "]" * depth
    text = '{"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": %s}]}'
    for url in ("/v2/models/tiny/infer", "/v1/models/tiny:predict"):
        response = client.post(url, content=text % nested)
        assert "nested too deeply" in assert_protocol_error(response, 400)


def test_keys_are_checked_before_the_body_is_parsed(
    make_client: Callable[..., TestClient],
) -> None:
    keyed = make_client(api_key="k", admin_key="admin")
    not_json = b"{" * 1000
    for url in ("/v2/models/tiny/infer", "/v1/models/tiny:predict"):
        assert_protocol_error(keyed.post(url, content=not_json), 401)
    for url in ("/v2/repository/index", "/v2/repository/models/tiny/load"):
        assert "admin key" in assert_protocol_error(keyed.post(url, content=not_json), 401)
    off = make_client(admin_key=None)
    response = off.post("/v2/repository/models/tiny/load", content=not_json)
    assert "CAMSERVE_ADMIN_KEY" in assert_protocol_error(response, 403)


# ---------------------------------------------------------------- configuration, statistics


def test_the_model_configuration_in_tritons_shape(client: TestClient) -> None:
    config = client.get("/v2/models/tiny/config").json()
    assert config["name"] == "tiny" and config["platform"] == "pytorch"
    assert config["max_batch_size"] == 16
    assert config["input"] == [
        {"name": "image", "data_type": "TYPE_STRING", "dims": [1], "reshape": {"shape": []}}
    ]
    assert [(o["name"], o["dims"]) for o in config["output"]] == [
        ("logits", [3]),
        ("cam", [-1, -1]),
        ("concepts", [-1, -1, -1]),
        ("concept_labels", [-1, -1]),
    ]
    methods = config["parameters"]["methods"]["string_value"].split(",")
    assert "GradCAM" in methods and "ScoreCAM" in methods
    assert client.get("/v2/models/tiny/versions/1/config").json() == config
    assert_protocol_error(client.get("/v2/models/nope/config"), 404)


def test_statistics_in_tritons_shape(make_client: Callable[..., TestClient]) -> None:
    fresh = make_client()
    (idle,) = fresh.get("/v2/models/tiny/stats").json()["model_stats"]
    assert idle["last_inference"] == 0 and idle["batch_stats"] == []
    before_ms = time.time() * 1000
    for _ in range(2):
        assert (
            fresh.post("/v2/models/tiny/infer", json=infer_body(image_bytes())).status_code == 200
        )
    assert_protocol_error(fresh.post("/v2/models/tiny/infer", json=infer_body(b"junk")), 415)
    (stats,) = fresh.get("/v2/models/tiny/stats").json()["model_stats"]
    assert (stats["name"], stats["version"]) == ("tiny", "1")
    phases = stats["inference_stats"]
    assert phases["success"]["count"] == 2 and phases["success"]["ns"] > 0
    assert phases["compute_infer"]["count"] == 2 and phases["compute_infer"]["ns"] > 0
    assert stats["inference_count"] == 2 and stats["execution_count"] == 2
    assert phases["cache_hit"] == {"count": 0, "ns": 0}
    # When the last pass ended (ms since the epoch), and the passes by their number of images.
    assert before_ms - 1 <= stats["last_inference"] <= time.time() * 1000 + 1
    (one,) = stats["batch_stats"]
    assert one["batch_size"] == 1 and one["compute_infer"]["count"] == 2
    assert 0 < one["compute_infer"]["ns"] <= phases["success"]["ns"]
    every = fresh.get("/v2/models/stats").json()["model_stats"]
    assert {"tiny", "resnet", "vgg"} <= {s["name"] for s in every}
    assert fresh.get("/v2/models/tiny/versions/1/stats").json()["model_stats"] == [stats]
    off = make_client(metrics=False)
    assert "CAMSERVE_METRICS" in assert_protocol_error(off.get("/v2/models/tiny/stats"), 400)


def test_the_server_lists_its_extensions(client: TestClient) -> None:
    extensions = client.get("/v2").json()["extensions"]
    assert {"binary_tensor_data", "model_repository", "classification"} <= set(extensions)


def test_the_timeout_parameter_is_the_requests_deadline(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:

    import app.http.protocols.oip as routes

    seen = {}

    async def slow(
        explainer: object, name: str, version: object, inference: Any, scope: object = None
    ) -> None:
        seen["priority"] = inference.priority
        await asyncio.sleep(30)

    monkeypatch.setattr(routes, "run_inference", slow)
    body = {**infer_body(image_bytes()), "parameters": {"timeout": 1000, "priority": 3}}
    message = assert_protocol_error(client.post("/v2/models/tiny/infer", json=body), 504)
    assert "longer than 0.001 s (the request's timeout parameter)" in message
    # An OIP body is not /jobs' form: the advice says how to send it there (it said "the same
    # form", which an inference-protocol client never sent).
    assert "POST the images as a form, with the same parameters, to camserve's /jobs" in message
    assert "the same form" not in message
    assert seen["priority"] == "background"


def test_native_answers_are_not_compressed(client: TestClient) -> None:
    # /explain's JSON carries base64 pictures: gzip would cost more CPU than it saves.
    response = client.post(
        "/explain",
        files=files(image_bytes(), image_bytes(seed=2)),
        data={"method": "GradCAM", "output": "raw"},
        headers={"Accept-Encoding": "gzip"},
    )
    assert response.status_code == 200 and len(response.content) > 1024
    assert "content-encoding" not in response.headers


def test_the_images_are_read_off_the_event_loop(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # base64 text of CAMSERVE_MAX_IMAGES images decoded on the loop for over a second, and
    # every other request (the probes included) waited for it.
    seen = calls_on_the_loop(monkeypatch, "app.http.protocols.oip.read_inference")
    response = client.post("/v2/models/tiny/infer", json=infer_body(image_bytes()))
    assert response.status_code == 200, response.text
    assert seen == [False]


def test_the_answer_is_encoded_off_the_event_loop(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A segmenter's mask in JSON is a number per pixel: 16 images of 1024x1024 took seconds
    # of json.dumps on the loop.
    seen = calls_on_the_loop(monkeypatch, "app.http.protocols.oip.answer_text")
    response = client.post("/v2/models/tiny/infer", json=infer_body(image_bytes()))
    assert response.status_code == 200, response.text
    assert seen == [False]
