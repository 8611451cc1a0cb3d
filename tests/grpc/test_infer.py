"""ModelInfer through tritonclient.grpc (its defaults: raw_input_contents) and through typed
contents, against a real server: the logits of /predict, the maps of /explain, and the
refusals read through the client."""

from __future__ import annotations

import struct
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.conftest import calls_on_the_loop, image_bytes
from tests.grpc.conftest import API_KEY, KEYED, MAX_UPLOAD_BYTES, Served

IMAGES = [image_bytes(seed=1), image_bytes((64, 48), seed=2)]


def image_input(*images: bytes) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("image", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(list(images), dtype=np.object_))
    return tensor


def native(served: Served, route: str, **form: str) -> dict[str, Any]:
    files = [("file", (f"{i}.png", data, "image/png")) for i, data in enumerate(IMAGES)]
    response = httpx.post(
        served.url + route, files=files, data=form, headers={"X-API-Key": API_KEY}, timeout=30
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_logits_equal_those_of_predict(
    triton: grpcclient.InferenceServerClient, served: Served
) -> None:
    result = triton.infer("tiny", [image_input(*IMAGES)], headers=KEYED)
    logits = result.as_numpy("logits")
    assert logits.dtype == np.float32 and logits.shape == (2, 3)
    predicted = native(served, "/predict", top_k="3")
    rows = np.zeros((2, 3), dtype=np.float32)
    for i, item in enumerate(predicted["results"]):
        for prediction in item["predictions"]:
            rows[i, prediction["class_idx"]] = prediction["logit"]
    np.testing.assert_array_equal(logits, rows)
    assert result.get_response().model_name == "tiny"
    assert result.get_response().model_version == "1"


def test_the_cam_output_holds_the_maps_of_explain(
    triton: grpcclient.InferenceServerClient, served: Served
) -> None:
    outputs = [grpcclient.InferRequestedOutput("logits"), grpcclient.InferRequestedOutput("cam")]
    result = triton.infer(
        "tiny",
        [image_input(*IMAGES)],
        outputs=outputs,
        parameters={"method": "ScoreCAM", "class_idx": "1,2", "normalized": False},
        headers=KEYED,
    )
    cam = result.as_numpy("cam")
    explained = native(
        served, "/explain", method="ScoreCAM", class_idx="1,2", output="raw", normalized="false"
    )
    maps = np.array(
        [r["explanations"][0]["maps"][-1]["raw"]["values"] for r in explained["results"]]
    )
    assert cam.shape == maps.shape
    np.testing.assert_allclose(cam, maps, atol=1e-5)
    np.testing.assert_allclose(
        result.as_numpy("logits"), [r["logits"] for r in explained["results"]], atol=1e-5
    )
    (cam_output,) = [o for o in result.get_response().outputs if o.name == "cam"]
    parameters = cam_output.parameters
    assert parameters["method"].string_param == "ScoreCAM"
    assert parameters["class_idx"].string_param == "1,2"
    assert parameters["normalized"].WhichOneof("parameter_choice") == "bool_param"
    assert parameters["normalized"].bool_param is False


def test_typed_contents_and_the_request_id(served: Served) -> None:
    request = service_pb2.ModelInferRequest(model_name="tiny", id="req-9")
    tensor = request.inputs.add(name="image", datatype="BYTES", shape=[2])
    tensor.contents.bytes_contents.extend(IMAGES)
    with grpc.insecure_channel(served.target) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        answer = stub.ModelInfer(request, metadata=tuple(KEYED.items()), timeout=30)
    assert answer.id == "req-9"
    assert [(o.name, o.datatype, list(o.shape)) for o in answer.outputs] == [
        ("logits", "FP32", [2, 3])
    ]
    assert len(answer.raw_output_contents[0]) == 2 * 3 * 4


def test_pixels_as_uint8(triton: grpcclient.InferenceServerClient) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (1, 32, 40, 3), dtype=np.uint8)
    tensor = grpcclient.InferInput("image", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels)
    assert triton.infer("tiny", [tensor], headers=KEYED).as_numpy("logits").shape == (1, 3)


def test_tritons_priority_and_timeout_are_understood(
    triton: grpcclient.InferenceServerClient,
) -> None:
    # tritonclient sends priority as uint64_param, a field KServe's proto does not have.
    for priority in (1, 5):
        result = triton.infer(
            "tiny", [image_input(IMAGES[0])], priority=priority, timeout=30_000_000, headers=KEYED
        )
        assert result.as_numpy("logits").shape == (1, 3)


def refused(triton: grpcclient.InferenceServerClient, *args: Any, **kwargs: Any) -> tuple:
    kwargs.setdefault("headers", KEYED)
    with pytest.raises(InferenceServerException) as caught:
        triton.infer(*args, **kwargs)
    error = caught.value
    assert str(error)  # what `print("failed: " + str(e))` reads
    return str(error.status()), error.message()


def raw_input(buffer: bytes, count: int = 1) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("image", [count], "BYTES")
    tensor._raw_content = buffer  # what set_data_from_numpy leaves there, made by hand
    return tensor


def test_a_length_prefix_that_lies_is_invalid(triton: grpcclient.InferenceServerClient) -> None:
    image = IMAGES[0]
    lying = struct.pack("<I", len(image) + 10) + image
    code, message = refused(triton, "tiny", [raw_input(lying)])
    assert code == "StatusCode.INVALID_ARGUMENT"
    assert "'image'" in message, message


def test_a_binary_length_past_the_buffer_is_invalid(
    triton: grpcclient.InferenceServerClient,
) -> None:
    code, message = refused(triton, "tiny", [raw_input(b"\x01\x00")])
    assert code == "StatusCode.INVALID_ARGUMENT"
    assert "'image'" in message, message


def test_an_unknown_parameter_is_invalid(triton: grpcclient.InferenceServerClient) -> None:
    code, message = refused(
        triton,
        "tiny",
        [image_input(IMAGES[0])],
        outputs=[grpcclient.InferRequestedOutput("cam")],
        parameters={"colour": "red"},
    )
    assert code == "StatusCode.INVALID_ARGUMENT"
    assert "'colour'" in message


def test_an_explain_parameter_without_the_cam_output_is_invalid(
    triton: grpcclient.InferenceServerClient,
) -> None:
    code, message = refused(triton, "tiny", [image_input(IMAGES[0])], parameters={"method": "x"})
    assert code == "StatusCode.INVALID_ARGUMENT" and "'cam'" in message


def test_an_unknown_model_is_not_found(triton: grpcclient.InferenceServerClient) -> None:
    code, message = refused(triton, "nope", [image_input(IMAGES[0])])
    assert code == "StatusCode.NOT_FOUND" and "'nope'" in message


def test_a_missing_key_is_unauthenticated(triton: grpcclient.InferenceServerClient) -> None:
    code, message = refused(triton, "tiny", [image_input(IMAGES[0])], headers={})
    assert code == "StatusCode.UNAUTHENTICATED" and "x-api-key" in message


def test_an_upload_over_the_limit_is_resource_exhausted(
    triton: grpcclient.InferenceServerClient,
) -> None:
    big = b"\x89PNG" + bytes(MAX_UPLOAD_BYTES)
    code, message = refused(triton, "tiny", [image_input(big)])
    assert code == "StatusCode.RESOURCE_EXHAUSTED"
    assert "CAMSERVE_MAX_UPLOAD_BYTES" in message


def test_a_message_over_every_limit_is_resource_exhausted(
    triton: grpcclient.InferenceServerClient,
) -> None:
    huge = bytes(4 * MAX_UPLOAD_BYTES)
    code, _ = refused(triton, "tiny", [image_input(huge, huge)])
    assert code == "StatusCode.RESOURCE_EXHAUSTED"


def test_too_many_images_are_invalid(triton: grpcclient.InferenceServerClient) -> None:
    code, message = refused(triton, "tiny", [image_input(*IMAGES, IMAGES[0])])
    assert code == "StatusCode.INVALID_ARGUMENT" and "CAMSERVE_MAX_IMAGES" in message


def test_typed_contents_beside_raw_contents_are_invalid(served: Served) -> None:
    request = service_pb2.ModelInferRequest(model_name="tiny", raw_input_contents=[b""])
    tensor = request.inputs.add(name="image", datatype="BYTES", shape=[1])
    tensor.contents.bytes_contents.append(IMAGES[0])
    with grpc.insecure_channel(served.target) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(request, metadata=tuple(KEYED.items()), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "raw_input_contents" in caught.value.details()


# ---------------------------------------------------------------------------- in process


@pytest.mark.parametrize(
    ("datatype", "contents", "words"),
    [
        ("UINT8", {"bytes_contents": [b"x" * 12]}, "in uint_contents; got bytes_contents"),
        ("BYTES", {"fp32_contents": [1.0]}, "in bytes_contents; got fp32_contents"),
    ],
)
def test_typed_contents_in_another_field_are_named(
    datatype: str, contents: dict[str, Any], words: str
) -> None:
    # They read as no data at all: "0 bytes of data", "use shape [0] for 0 image(s)".
    from app.errors import BadRequest
    from app.grpc import messages
    from app.grpc.infer import to_request

    request = messages.ModelInferRequest(
        model_name="tiny",
        inputs=[
            {"name": "image", "datatype": datatype, "shape": [1, 2, 2, 3], "contents": contents}
        ],
    )
    with pytest.raises(BadRequest, match=words):
        to_request(request)


def test_tritons_extra_parameter_kinds_are_read_from_unknown_fields() -> None:
    from app.grpc import messages
    from app.grpc.infer import parameter_value

    for sent, expected in (
        (service_pb2.InferParameter(uint64_param=7), 7),
        (service_pb2.InferParameter(double_param=0.25), 0.25),
        (service_pb2.InferParameter(string_param="GradCAM"), "GradCAM"),
        (service_pb2.InferParameter(bool_param=True), True),
    ):
        ours = messages.InferParameter.FromString(sent.SerializeToString())
        assert parameter_value("p", ours) == expected


def test_a_parameter_without_a_value_is_invalid() -> None:
    from app.errors import BadRequest
    from app.grpc import messages
    from app.grpc.infer import parameter_value

    with pytest.raises(BadRequest, match="'p' has no value"):
        parameter_value("p", messages.InferParameter())


def test_work_past_its_deadline_is_stopped_with_a_timeout() -> None:
    import asyncio

    from app.errors import RequestTimeout
    from app.grpc.infer import within_limits
    from app.lifecycle import Lifecycle

    stopped = []

    async def forever() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            stopped.append(True)

    with pytest.raises(RequestTimeout, match="deadline"):
        asyncio.run(within_limits(forever(), 0.01, Lifecycle(grace_s=1)))
    assert stopped == [True]


def test_work_past_the_drains_grace_is_cut() -> None:
    import asyncio

    from app.errors import ShuttingDown
    from app.grpc.infer import within_limits
    from app.lifecycle import Lifecycle

    async def cut_while_running() -> None:
        lifecycle = Lifecycle(grace_s=0)
        asyncio.get_running_loop().call_soon(lifecycle.cut.set)
        await within_limits(asyncio.Event().wait(), None, lifecycle)

    with pytest.raises(ShuttingDown, match="grace period"):
        asyncio.run(cut_while_running())


def test_the_message_is_read_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    # Turning a message of pixel tensors into uploads took most of a second on the loop that
    # serves HTTP and gRPC alike.
    import asyncio

    from app.errors import BadRequest
    from app.grpc import infer, messages
    from app.lifecycle import Lifecycle
    from app.settings import Settings

    def stop(*args: Any) -> Any:
        raise BadRequest("stop here")

    seen = calls_on_the_loop(monkeypatch, "app.grpc.infer.read_inference", instead=stop)
    request = messages.ModelInferRequest(
        model_name="tiny", inputs=[{"name": "image", "datatype": "BYTES", "shape": [1]}]
    )
    with pytest.raises(BadRequest, match="stop here"):
        asyncio.run(infer.infer(request, Settings(), None, Lifecycle(grace_s=1), None))  # type: ignore[arg-type]
    assert seen == [False]


def test_the_answer_is_made_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    # A segmenter's mask is a number per pixel, packed into raw_output_contents.
    import asyncio
    from types import SimpleNamespace

    from app.grpc import infer
    from app.lifecycle import Lifecycle
    from app.protocols.oip import InferenceResult
    from app.settings import Settings

    result = InferenceResult("tiny", "1", [])

    async def run(*args: Any) -> InferenceResult:
        return result

    monkeypatch.setattr(infer, "read_message", lambda *args: SimpleNamespace(timeout_s=None))
    monkeypatch.setattr(infer, "run_inference", run)
    seen = calls_on_the_loop(monkeypatch, "app.grpc.infer.to_response")
    request = infer.messages.ModelInferRequest(model_name="tiny")
    lifecycle = Lifecycle(grace_s=1)
    answer = asyncio.run(infer.infer(request, Settings(), None, lifecycle, None))  # type: ignore[arg-type]
    assert answer.model_name == "tiny" and seen == [False]


def test_uint8_typed_contents_become_the_pixel_bytes_and_values_over_255_are_refused() -> None:
    from app.errors import BadRequest
    from app.grpc import messages
    from app.grpc.infer import to_request

    def request(values: list[int]) -> Any:
        tensor = {"name": "image", "datatype": "UINT8", "shape": [1, 1, 2, 3]}
        contents = {"uint_contents": values}
        return messages.ModelInferRequest(inputs=[{**tensor, "contents": contents}])

    _, buffers = to_request(request([0, 1, 2, 253, 254, 255]))
    assert buffers == [bytes([0, 1, 2, 253, 254, 255])]
    with pytest.raises(BadRequest, match="a UINT8 value is over 255"):
        to_request(request([0, 1, 2, 3, 4, 256]))
