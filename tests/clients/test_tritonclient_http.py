"""tritonclient.http (the sync client, with its defaults) against a real camserve."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.clients.conftest import (
    ADMIN_KEY,
    IMAGES,
    IMAGES_B64,
    explain_raw,
    predict_logits,
)


@pytest.fixture(scope="module")
def client(host: str) -> Iterator[httpclient.InferenceServerClient]:
    triton = httpclient.InferenceServerClient(url=host)
    yield triton
    triton.close()


def image_input(images: list[bytes] = IMAGES, binary: bool = True) -> httpclient.InferInput:
    """The input ``image`` as tritonclient users write it: BYTES from a numpy object array."""
    tensor = httpclient.InferInput("image", [len(images)], "BYTES")
    if binary:
        tensor.set_data_from_numpy(np.array(images, dtype=np.object_))
    else:  # JSON: camserve takes base64 text there
        tensor.set_data_from_numpy(
            np.array(IMAGES_B64[: len(images)], dtype=np.object_), binary_data=False
        )
    return tensor


def test_metadata_and_readiness(client: httpclient.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("tiny") and not client.is_model_ready("broken")
    server = client.get_server_metadata()
    assert server["name"] == "camserve"
    assert {"binary_tensor_data", "model_repository"} <= set(server["extensions"])
    model = client.get_model_metadata("resnet")
    assert model["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    assert model["outputs"][0] == {"name": "logits", "datatype": "FP32", "shape": [-1, 5]}
    # DFF reads the head as CAM does, and resnet's target layer3 is not what its head pools: no
    # concept outputs. On tiny DFF applies, and its two concept outputs are listed.
    assert [o["name"] for o in model["outputs"][1:]] == ["cam"]
    tiny = client.get_model_metadata("tiny")
    assert [(o["name"], o["datatype"], o["shape"]) for o in tiny["outputs"][2:]] == [
        ("concepts", "FP32", [-1, -1, -1, -1]),
        ("concept_labels", "BYTES", [-1, -1, -1]),
    ]
    config = client.get_model_config("resnet")
    assert config["name"] == "resnet" and config["max_batch_size"] == 4
    assert [o["dims"] for o in config["output"]] == [[5], [-1, -1]]
    tiny_config = client.get_model_config("tiny")
    assert [(o["name"], o["data_type"], o["dims"]) for o in tiny_config["output"][2:]] == [
        ("concepts", "TYPE_FP32", [-1, -1, -1]),
        ("concept_labels", "TYPE_STRING", [-1, -1]),
    ]


def test_infer_with_the_clients_defaults_gives_the_logits_of_predict(
    client: httpclient.InferenceServerClient, server: str
) -> None:
    result = client.infer("resnet", [image_input()])  # no outputs: binary logits
    assert result.get_response()["outputs"][0]["parameters"]["binary_data_size"] == 2 * 5 * 4
    logits = result.as_numpy("logits")
    assert logits.shape == (2, 5) and logits.dtype == np.float32
    assert np.array_equal(logits, np.asarray(predict_logits(server, IMAGES, "resnet"), np.float32))


def test_infer_with_json_inputs_and_outputs(client: httpclient.InferenceServerClient) -> None:
    binary = client.infer("resnet", [image_input()]).as_numpy("logits")
    result = client.infer(
        "resnet",
        [image_input(binary=False)],
        outputs=[httpclient.InferRequestedOutput("logits", binary_data=False)],
    )
    assert "data" in result.get_response()["outputs"][0]
    assert np.array_equal(result.as_numpy("logits"), binary)


def test_the_cam_output_is_the_raw_map_of_explain(
    client: httpclient.InferenceServerClient, server: str
) -> None:
    result = client.infer(
        "tiny",
        [image_input(IMAGES[:1])],
        outputs=[httpclient.InferRequestedOutput("logits"), httpclient.InferRequestedOutput("cam")],
        parameters={"method": "GradCAM"},
    )
    cam = result.as_numpy("cam")
    assert cam.dtype == np.float32 and cam.ndim == 3 and cam.shape[0] == 1
    expected = np.asarray(explain_raw(server, IMAGES[:1], "tiny", "GradCAM")[0], np.float32)
    assert np.array_equal(cam[0], expected)
    assert result.get_output("cam")["parameters"]["method"] == "GradCAM"


def test_a_pixel_tensor_and_the_classification_extension(
    client: httpclient.InferenceServerClient,
) -> None:
    pixels = np.random.default_rng(3).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    tensor = httpclient.InferInput("image", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels)
    result = client.infer(
        "tiny", [tensor], outputs=[httpclient.InferRequestedOutput("logits", class_count=2)]
    )
    top = result.as_numpy("logits")
    assert top.shape == (1, 2)
    value, index, label = top[0][0].decode().split(":")
    assert label == f"tiny_class{index}" and float(value) >= float(top[0][1].decode().split(":")[0])


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests_and_answers(
    client: httpclient.InferenceServerClient, algorithm: str
) -> None:
    plain = client.infer("resnet", [image_input()]).as_numpy("logits")
    result = client.infer(
        "resnet",
        [image_input()],
        outputs=[httpclient.InferRequestedOutput("logits", binary_data=False)],
        request_compression_algorithm=algorithm,
        response_compression_algorithm="gzip",
    )
    assert np.array_equal(result.as_numpy("logits"), plain)


def test_triton_parameters_are_understood(client: httpclient.InferenceServerClient) -> None:
    result = client.infer("tiny", [image_input()], priority=5, timeout=30_000_000)
    assert result.as_numpy("logits").shape == (2, 3)
    with pytest.raises(InferenceServerException) as caught:
        client.infer("tiny", [image_input()], sequence_id=3)
    assert "sequence_id, sequence_start, sequence_end" in str(caught.value)


def failure(call: object) -> InferenceServerException:
    """The exception a client call raises; ``str()`` of it must work."""
    with pytest.raises(InferenceServerException) as caught:
        call()  # type: ignore[operator]
    return caught.value


def test_errors_read_through_the_client(client: httpclient.InferenceServerClient) -> None:
    assert "Unknown model 'nope'" in str(failure(lambda: client.get_model_config("nope")))
    assert "Unknown model 'nope'" in str(failure(lambda: client.get_inference_statistics("nope")))
    assert "Unknown model 'nope'" in str(failure(lambda: client.infer("nope", [image_input()])))
    message = str(failure(lambda: client.infer("tiny", [image_input()], parameters={"temp": 1})))
    assert "Unknown explain parameter 'temp'" in message
    # A GET on the infer route: 405 in the protocol's shape, which the client can read.
    response = client._get("v2/models/tiny/infer", None, None)
    error = failure(lambda: httpclient._utils._raise_if_error(response))
    assert error.status() == "405" and "GET is not allowed" in str(error)


def test_bad_binary_data_through_the_client(client: httpclient.InferenceServerClient) -> None:
    past = image_input(IMAGES[:1])
    past._parameters["binary_data_size"] += 100  # the length runs past the body
    assert "runs past the end of the body" in str(failure(lambda: client.infer("tiny", [past])))
    lying = image_input(IMAGES[:1])
    lying._raw_data = struct.pack("<I", len(IMAGES[0]) + 7) + IMAGES[0]
    message = str(failure(lambda: client.infer("tiny", [lying])))
    assert f"says it has {len(IMAGES[0]) + 7} bytes" in message


def test_a_gzip_bomb_through_the_client(client: httpclient.InferenceServerClient) -> None:
    # 20 MB of zeros compresses to ~20 kB; decompressed it is far over the body limit.
    bomb = httpclient.InferInput("image", [1], "BYTES")
    bomb.set_data_from_numpy(np.array([bytes(20_000_000)], dtype=np.object_))
    error = failure(lambda: client.infer("tiny", [bomb], request_compression_algorithm="gzip"))
    assert error.status() == "413" and "decompresses to over" in str(error)


def test_statistics_count_the_inferences(client: httpclient.InferenceServerClient) -> None:
    before = client.get_inference_statistics("vgg")["model_stats"][0]
    client.infer("vgg", [image_input()])
    (after,) = client.get_inference_statistics("vgg")["model_stats"]
    success = after["inference_stats"]["success"]
    assert success["count"] == before["inference_stats"]["success"]["count"] + 1
    assert after["inference_count"] == before["inference_count"] + 2 and success["ns"] > 0
    assert after["last_inference"] >= before["last_inference"] and after["last_inference"] > 0
    assert (
        sum(b["compute_infer"]["count"] for b in after["batch_stats"]) == after["execution_count"]
    )


def test_the_repository_through_the_client(client: httpclient.InferenceServerClient) -> None:
    admin = {"X-Admin-Key": ADMIN_KEY}
    index = client.get_model_repository_index(headers=admin)
    assert {"name": "tiny", "version": "1", "state": "READY", "reason": ""} in index
    assert "admin key" in str(failure(lambda: client.get_model_repository_index()))
    message = str(failure(lambda: client.load_model("vgg", headers=admin, config="{}")))
    assert "takes no 'config'" in message
    client.unload_model("vgg", headers=admin)
    assert not client.is_model_ready("vgg")
    client.load_model("vgg", headers=admin)
    assert client.is_model_ready("vgg")
