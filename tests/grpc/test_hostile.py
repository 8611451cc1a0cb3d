"""What a hostile or careless gRPC client sends, and what it must not get: a message that costs
the service far more than its bytes, a call that holds a place it does not use."""

from __future__ import annotations

import struct
import time
from typing import Any

import pytest

from app.errors import BadRequest, InvalidParameter
from app.grpc import messages
from app.grpc.infer import read_message
from app.settings import Settings

BOOL = messages.InferParameter(bool_param=True)


def bytes_request(raw: bytes, count: int) -> object:
    request = messages.ModelInferRequest(
        model_name="tiny",
        inputs=[{"name": "image", "datatype": "BYTES", "shape": [count]}],
    )
    request.raw_input_contents.append(raw)
    return request


def test_a_bytes_tensor_is_read_no_further_than_one_element_past_the_image_limit() -> None:
    # Three empty elements, then a prefix that lies: the lie is past what the limit lets in.
    raw = struct.pack("<I", 0) * 3 + struct.pack("<I", 1000)
    with pytest.raises(InvalidParameter, match="More than 2 images .*CAMSERVE_MAX_IMAGES"):
        read_message(bytes_request(raw, 4), Settings(max_images=2))


def test_millions_of_empty_elements_are_refused_at_once() -> None:
    # 4 bytes each: a 16 MB buffer of them took 9 s of the GIL to read element by element (a
    # message at the default limit, 95 s), all to be refused for their number.
    count = 4_000_000
    request = bytes_request(bytes(4 * count), count)
    started = time.monotonic()
    with pytest.raises(InvalidParameter, match="More than 16 images"):
        read_message(request, Settings())
    assert time.monotonic() - started < 3


@pytest.mark.parametrize(
    ("field", "fill", "words"),
    [
        ("inputs", lambda r: [r.inputs.add(name="image") for _ in range(300)], "301 inputs"),
        ("outputs", lambda r: [r.outputs.add(name="cam") for _ in range(300)], "300 outputs"),
        (
            "parameters",
            lambda r: [r.parameters[f"p{i}"].CopyFrom(BOOL) for i in range(300)],
            "300 parameters",
        ),
        (
            "tensor parameters",
            lambda r: [r.inputs[0].parameters[f"p{i}"].CopyFrom(BOOL) for i in range(300)],
            "300 parameters of input 'image'",
        ),
        ("shape", lambda r: r.inputs[0].shape.extend([1] * 9), "9 dimensions in the shape"),
        (
            "bytes_contents",
            lambda r: r.inputs[0].contents.bytes_contents.extend([b""] * 300),
            "300 elements in the bytes_contents",
        ),
    ],
)
def test_lists_and_maps_past_the_request_models_bounds_are_refused_before_they_are_read(
    monkeypatch: pytest.MonkeyPatch, field: str, fill: Any, words: str
) -> None:
    # A 16 MB message of a million inputs took 14 s of the GIL to become the dicts that the
    # request model then refused; a 15 MB one of a million parameters, 6 s.
    from app.grpc import infer

    read: list[object] = []
    real = infer.parameters
    monkeypatch.setattr(infer, "parameters", lambda given: read.append(given) or real(given))
    request = messages.ModelInferRequest(model_name="tiny")
    request.inputs.add(name="image", datatype="BYTES")
    fill(request)
    with pytest.raises(BadRequest, match=words):
        infer.to_request(request)
    assert read == [], field
