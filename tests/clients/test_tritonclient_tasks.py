"""A detector and a segmenter (the default store's shapes-detect and shapes-segment) through
tritonclient, over HTTP and gRPC against one real server: the outputs each task's metadata
declares, equal to what the native /predict and /explain answer."""

from __future__ import annotations

import base64
import io
import shutil
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from tests.grpc.conftest import wait_for_grpc
from tests.http.test_server import ROOT, free_port, start_server, stop_server

SCENE = (ROOT / "examples" / "scenes" / "scene.png").read_bytes()
#: The scene at another size: a second image whose masks do not stack with the first's.
SMALL = io.BytesIO()
Image.open(io.BytesIO(SCENE)).convert("RGB").resize((96, 80)).save(SMALL, format="PNG")
DETECT, SEGMENT = "shapes-detect", "shapes-segment"


@pytest.fixture(scope="module")
def urls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(HTTP base URL, gRPC target) of a server of the two task models."""
    store = tmp_path_factory.mktemp("task-store")
    for name in (DETECT, SEGMENT):
        shutil.copytree(ROOT / "model_store" / name, store / name)
    port = free_port()
    process, url = start_server(
        store,
        CAMSERVE_DEFAULT_MODEL=DETECT,
        CAMSERVE_GRPC_PORT=str(port),
        CAMSERVE_CACHE_MB="0",
        CAMSERVE_LOG_LEVEL="WARNING",
    )
    target = f"127.0.0.1:{port}"
    try:
        wait_for_grpc(target, process)
        yield url, target
    finally:
        stop_server(process)


@pytest.fixture(scope="module", params=["http", "grpc"])
def client(request: pytest.FixtureRequest, urls: tuple[str, str]) -> Iterator[Any]:
    url, target = urls
    if request.param == "http":
        triton: Any = httpclient.InferenceServerClient(url=url.removeprefix("http://"))
    else:
        triton = grpcclient.InferenceServerClient(target)
    yield triton
    triton.close()


def module_of(client: Any) -> Any:
    return httpclient if isinstance(client, httpclient.InferenceServerClient) else grpcclient


def image_input(client: Any, *images: bytes) -> Any:
    tensor = module_of(client).InferInput("image", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(list(images), dtype=np.object_))
    return tensor


def outputs(client: Any, *names: str) -> list[Any]:
    return [module_of(client).InferRequestedOutput(name) for name in names]


def native(url: str, route: str, *images: bytes, **form: Any) -> dict[str, Any]:
    files = [("file", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
    response = httpx.post(url + route, files=files, data=form, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def parameters_of(result: Any, name: str) -> dict[str, Any]:
    """An output's parameters as plain values, from either client's answer."""
    if isinstance(result, httpclient.InferResult):
        return dict(result.get_output(name).get("parameters", {}))
    given = result.get_output(name).parameters
    return {
        key: getattr(value, value.WhichOneof("parameter_choice")) for key, value in given.items()
    }


def test_metadata_declares_each_tasks_outputs(client: Any) -> None:
    def shown(name: str) -> list[tuple[str, str, list[int]]]:
        metadata = client.get_model_metadata(name)
        if isinstance(metadata, dict):
            return [(o["name"], o["datatype"], o["shape"]) for o in metadata["outputs"]]
        return [(o.name, o.datatype, list(o.shape)) for o in metadata.outputs]

    assert shown(DETECT) == [
        ("boxes", "FP32", [-1, 4]),
        ("scores", "FP32", [-1]),
        ("labels", "BYTES", [-1]),
        ("cam", "FP32", [-1, -1, -1]),
    ]
    assert shown(SEGMENT) == [("mask", "INT32", [-1, -1, -1]), ("cam", "FP32", [-1, -1, -1])]


def test_a_detector_answers_the_boxes_of_predict(client: Any, urls: tuple[str, str]) -> None:
    result = client.infer(DETECT, [image_input(client, SCENE, SMALL.getvalue())])
    found = [
        r["detections"]
        for r in native(urls[0], "/predict", SCENE, SMALL.getvalue(), model=DETECT)["results"]
    ]
    rows = [d for image in found for d in image]
    assert len(found[0]) >= 2, "the scene has several shapes"
    boxes, scores = result.as_numpy("boxes"), result.as_numpy("scores")
    assert boxes.dtype == np.float32 and boxes.shape == (len(rows), 4)
    np.testing.assert_allclose(boxes, np.array([d["box"] for d in rows], dtype=np.float32))
    np.testing.assert_allclose(scores, np.array([d["score"] for d in rows], dtype=np.float32))
    assert [label.decode() for label in result.as_numpy("labels")] == [d["label"] for d in rows]
    labels = parameters_of(result, "labels")
    assert labels["class_idx"] == ",".join(str(d["class_idx"]) for d in rows)
    assert labels["detections_per_image"] == f"{len(found[0])},{len(found[1])}"


def test_a_detector_explains_the_boxes_asked_for(client: Any, urls: tuple[str, str]) -> None:
    result = client.infer(
        DETECT,
        [image_input(client, SCENE)],
        outputs=outputs(client, "cam", "boxes", "labels"),
        parameters={"box": "1,0", "method": "GradCAM"},
    )
    answer = native(
        urls[0], "/explain", SCENE, model=DETECT, box="1,0", method="GradCAM", output="raw"
    )
    explained = answer["results"][0]["explanations"]
    cam = result.as_numpy("cam")
    assert cam.shape == (2, *np.asarray(explained[0]["maps"][-1]["raw"]["values"]).shape)
    for row, explanation in zip(cam, explained, strict=True):
        np.testing.assert_allclose(row, explanation["maps"][-1]["raw"]["values"], atol=1e-6)
    shown = parameters_of(result, "cam")
    assert shown["detection"] == "1,0" and shown["method"] == "GradCAM"
    assert shown["class_idx"] == ",".join(str(e["class_idx"]) for e in explained)
    labels = [label.decode() for label in result.as_numpy("labels")]
    assert [labels[1], labels[0]] == [e["label"] for e in explained]
    np.testing.assert_allclose(result.as_numpy("boxes")[1], explained[0]["box"])


def test_a_segmenter_answers_its_mask_and_explains_a_region(
    client: Any, urls: tuple[str, str]
) -> None:
    predicted = native(urls[0], "/predict", SCENE, model=SEGMENT, output="mask")["results"][0]
    with Image.open(io.BytesIO(base64.b64decode(predicted["mask"]))) as picture:
        expected = np.asarray(picture, dtype=np.int32)
    result = client.infer(SEGMENT, [image_input(client, SCENE)])
    mask = result.as_numpy("mask")
    assert mask.dtype == np.int32 and mask.shape == (1, *expected.shape)
    np.testing.assert_array_equal(mask[0], expected)
    shape = predicted["segments"][1]  # the largest after the background
    result = client.infer(
        SEGMENT,
        [image_input(client, SCENE)],
        outputs=outputs(client, "cam", "mask"),
        parameters={"class_idx": shape["class_idx"], "region": "mask"},
    )
    np.testing.assert_array_equal(result.as_numpy("mask")[0], expected)
    answer = native(
        urls[0], "/explain", SCENE, model=SEGMENT, class_idx=shape["class_idx"], output="raw"
    )
    raw = answer["results"][0]["explanations"][0]["maps"][-1]["raw"]["values"]
    np.testing.assert_allclose(result.as_numpy("cam")[0], raw, atol=1e-6)
    shown = parameters_of(result, "cam")
    assert (shown["class_idx"], shown["region"]) == (str(shape["class_idx"]), "mask")


def test_refusals_name_the_tasks_outputs(client: Any) -> None:
    with pytest.raises(
        InferenceServerException, match="its outputs are boxes, scores, labels, cam"
    ):
        client.infer(DETECT, [image_input(client, SCENE)], outputs=outputs(client, "logits"))
    with pytest.raises(InferenceServerException, match="box is for detection models"):
        client.infer(
            SEGMENT,
            [image_input(client, SCENE)],
            outputs=outputs(client, "cam"),
            parameters={"box": "0"},
        )
    with pytest.raises(InferenceServerException, match="box 40 is past the detections"):
        client.infer(
            DETECT,
            [image_input(client, SCENE)],
            outputs=outputs(client, "cam"),
            parameters={"box": "40"},
        )
    with pytest.raises(InferenceServerException, match="stacks one tensor per image"):
        client.infer(SEGMENT, [image_input(client, SCENE, SMALL.getvalue())])
