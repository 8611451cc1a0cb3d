"""The OIP codec without a transport: a request read into what it asks of the pipeline (Triton's
parameters consumed first), and the output tensors in their JSON and raw forms."""

from __future__ import annotations

import base64
import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.errors import BadRequest
from app.protocols.oip import (
    InferenceRequest,
    InferenceResult,
    OutputTensor,
    Wanted,
    answer_json,
    answer_text,
    classification,
    read_inference,
)
from app.protocols.validation import validated
from app.settings import Settings
from tests.conftest import image_bytes


@pytest.fixture
def settings(store: Path) -> Settings:
    return Settings(model_store=store, request_timeout_s=30)


def request(parameters: dict[str, Any] | None = None, outputs: Any = None) -> InferenceRequest:
    data = {
        "inputs": [
            {
                "name": "image",
                "shape": [1],
                "datatype": "BYTES",
                "data": [base64.b64encode(image_bytes()).decode()],
            }
        ],
        "parameters": parameters,
        "outputs": outputs,
    }
    return validated(InferenceRequest, data)


def test_triton_parameters_become_priority_deadline_and_binary(settings: Settings) -> None:
    plain = read_inference(request(), None, settings)
    assert (plain.priority, plain.timeout_s, plain.outputs) == (
        "interactive",
        30,
        (Wanted("logits"),),
    )
    asked = read_inference(
        request({"priority": 2, "timeout": 1_500_000, "binary_data_output": True}), None, settings
    )
    assert (asked.priority, asked.timeout_s) == ("background", 1.5)
    assert asked.outputs == (Wanted("logits", binary=True),)
    capped = read_inference(request({"timeout": 120_000_000}), None, settings)
    assert capped.timeout_s == 30  # never past the server's own deadline
    assert read_inference(request({"priority": 1}), None, settings).priority == "interactive"


@pytest.mark.parametrize("name", ["timeout", "priority"])
@pytest.mark.parametrize("value", [-1, 2**64, 10**400, 1.5, True, "5"])
def test_a_triton_parameter_that_is_no_uint64_is_refused(
    settings: Settings, name: str, value: Any
) -> None:
    # A timeout of 400 digits overflowed the float of the deadline: a 500.
    with pytest.raises(BadRequest, match=f"'{name}' must be a whole number from 0 to"):
        read_inference(request({name: value}), None, settings)
    assert read_inference(request({name: 2**64 - 1}), None, settings)


def test_the_explanation_comes_from_the_request_and_the_cam_output(settings: Settings) -> None:
    inference = read_inference(
        request({"class_idx": 1}, [{"name": "cam", "parameters": {"method": "ScoreCAM"}}]),
        None,
        settings,
    )
    assert inference.params is not None
    assert (inference.params.method, inference.params.class_idx) == ("ScoreCAM", (1,))
    assert inference.params.outputs == ("raw",)
    assert read_inference(request(), None, settings).params is None


def test_raw_buffers_carry_the_images(settings: Settings) -> None:
    image = image_bytes(seed=4)
    model = validated(
        InferenceRequest,
        {"inputs": [{"name": "image", "shape": [-1], "datatype": "BYTES"}]},
    )
    inference = read_inference(model, [struct.pack("<I", len(image)) + image], settings)
    assert [u.data for u in inference.uploads] == [image]
    # gRPC's bytes_contents: the elements as bytes in data, no base64
    carried = validated(
        InferenceRequest,
        {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [image]}]},
    )
    assert read_inference(carried, None, settings).uploads[0].data == image
    with pytest.raises(BadRequest, match="has no data"):
        read_inference(model, None, settings)
    # An empty buffer said "use shape [0] for 0 image(s)", which then said "no image sent".
    for shape in ([0], [1]):
        empty = validated(
            InferenceRequest,
            {"inputs": [{"name": "image", "shape": shape, "datatype": "BYTES", "data": []}]},
        )
        with pytest.raises(BadRequest, match="No image in input 'image'; send at least one"):
            read_inference(empty, None, settings)
    with pytest.raises(BadRequest, match="No image in input 'image'; send at least one"):
        read_inference(model, [b""], settings)


@pytest.mark.parametrize(
    "outputs",
    [
        [{"name": "cam", "parameters": {"method": "GradCAM"}}, {"name": "cam"}],
        [{"name": "logits", "parameters": {"classification": 3}}, {"name": "logits"}],
        [{"name": "logits"}, {"name": "logits"}],
    ],
)
def test_an_output_asked_for_twice_is_refused(settings: Settings, outputs: list) -> None:
    # The second's parameters won silently: GradCAM then LayerCAM answered one LayerCAM map.
    with pytest.raises(BadRequest, match="'(cam|logits)' is asked for twice"):
        read_inference(request(outputs=outputs), None, settings)


def test_a_request_that_does_not_fit_is_bad_request() -> None:
    with pytest.raises(BadRequest, match="inputs: is required"):
        validated(InferenceRequest, {"id": "1"})


def test_output_tensors_in_json_and_raw() -> None:
    logits = OutputTensor("logits", "FP32", (1, 2), [0.5, -1.25], binary=True)
    assert logits.raw() == np.asarray([0.5, -1.25], dtype="<f4").tobytes()
    assert logits.json_data() == [0.5, -1.25]
    top = classification([[0.1, 0.7, 0.2]], 2, ("a", "b", "c"))
    assert top.json_data() == ["0.700000:1:b", "0.200000:2:c"]
    assert top.raw() == b"".join(struct.pack("<I", len(t)) + t for t in top.values)  # type: ignore[arg-type]
    assert classification([[0.1, 0.7]], 5, None).json_data() == ["0.700000:1", "0.100000:0"]
    body, buffers = answer_json(InferenceResult("m", "1", [logits, top], id="x"))
    assert body["id"] == "x" and buffers == [logits.raw()]
    assert body["outputs"][0]["parameters"] == {"binary_data_size": 8}
    assert body["outputs"][1]["data"] == top.json_data()


def test_the_answer_text_is_the_answers_json_written_in_slices(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # One json.dumps of a mask's millions of numbers held the GIL (and the event loop) for
    # seconds; the text is now written a slice at a time, and must read as the same JSON.
    monkeypatch.setattr("app.protocols.tensors.JSON_SLICE", 7)
    mask = np.arange(30, dtype=np.int32) % 5
    outputs = [
        OutputTensor("mask", "INT32", (1, 5, 6), mask, {"k": "v"}),
        OutputTensor("empty", "INT32", (0, 4), np.zeros(0, dtype=np.int32)),
        OutputTensor("logits", "FP32", (1, 2), [0.5, -1.25]),
        OutputTensor("labels", "BYTES", (2,), [b"a", b"b:c"], binary=True),
        OutputTensor("cam", "FP32", (1, 2), [0.1, 0.2], binary=True),
    ]
    for result in (
        InferenceResult("m", "1", outputs, id="x"),
        InferenceResult("m", "1", outputs[:1]),
        InferenceResult("m", "1", []),
    ):
        text, buffers = answer_text(result)
        body, expected = answer_json(result)
        assert json.loads(text) == body and buffers == expected
        assert text == json.dumps(body, separators=(",", ":")).encode()
    assert (
        json.loads(answer_text(InferenceResult("m", "1", outputs[:1]))[0])["outputs"][0]["data"]
        == mask.tolist()
    )
