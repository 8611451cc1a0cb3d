"""ModelInfer: the protobuf request -> the OIP codec's request model and raw buffers, the
codec's answer -> protobuf with ``raw_output_contents``.

The codec (``app.protocols.oip``) does the reading, the checks and the rendering for every
transport; this module only moves fields between protobuf and the codec's shapes, and runs the
work under the call's limits: its deadline (the gRPC deadline, capped by the request's
``timeout`` and CAMSERVE_REQUEST_TIMEOUT_S) and the drain's cut.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Coroutine, Mapping
from typing import Any, TypeVar

import anyio.to_thread
from google.protobuf import unknown_fields

from app.digits import whole_number
from app.errors import BadRequest, RequestTimeout, ShuttingDown, clip
from app.grpc import messages
from app.lifecycle import Lifecycle
from app.pipeline.explainer import Explainer
from app.protocols.oip import (
    MAX_ELEMENTS,
    MAX_RANK,
    Inference,
    InferenceRequest,
    InferenceResult,
    read_inference,
    run_inference,
)
from app.protocols.validation import validated
from app.settings import Settings

T = TypeVar("T")

_CHOICE = "parameter_choice"
# Triton's InferParameter adds double_param (4) and uint64_param (5) to KServe's oneof, and
# tritonclient sends `priority` as uint64: read them from the unknown fields.
_DOUBLE, _UINT64 = 4, 5
_FIXED64, _VARINT = 1, 0
#: Typed contents field of each datatype camserve's input takes.
_CONTENTS = {"BYTES": "bytes_contents", "UINT8": "uint_contents"}


def parameter_value(name: str, parameter: Any) -> bool | int | str | float:
    """One InferParameter's value; BadRequest when it holds none camserve can read."""
    choice = parameter.WhichOneof(_CHOICE)
    if choice is not None:
        value: bool | int | str = getattr(parameter, choice)
        return value
    for field in unknown_fields.UnknownFieldSet(parameter):
        if field.field_number == _UINT64 and field.wire_type == _VARINT:
            return int(field.data)
        if field.field_number == _DOUBLE and field.wire_type == _FIXED64:
            return float(struct.unpack("<d", struct.pack("<Q", field.data))[0])
    raise BadRequest(
        f"Parameter {clip(name)} has no value; set one of bool_param, int64_param or string_param."
    )


def parameters(given: Mapping[str, Any]) -> dict[str, Any] | None:
    """A protobuf parameter map -> a plain dict (None when empty)."""
    return {name: parameter_value(name, value) for name, value in given.items()} or None


def _parameter(value: Any) -> Any:
    """A plain value -> an InferParameter (a number with a fraction as its text: KServe's
    proto has no double)."""
    if isinstance(value, bool):
        return messages.InferParameter(bool_param=value)
    if isinstance(value, int):
        return messages.InferParameter(int64_param=value)
    return messages.InferParameter(string_param=str(value))


def _at_most(count: int, most: int, what: str) -> None:
    if count > most:
        raise BadRequest(f"The request has {count} {what}; at most {most} are accepted.")


def _bounded(message: Any) -> None:
    """The request model's bounds on the lists and maps of a message (HTTP's JSON body is
    bounded by its number of items before it is parsed), checked on their lengths before any is
    turned into Python objects: a 16 MB message of a million inputs took 14 s of the GIL to
    become the dicts that the request model then refused."""
    _at_most(len(message.inputs), MAX_ELEMENTS, "inputs")
    _at_most(len(message.outputs), MAX_ELEMENTS, "outputs")
    _at_most(len(message.raw_input_contents), MAX_ELEMENTS, "raw_input_contents buffers")
    _at_most(len(message.parameters), MAX_ELEMENTS, "parameters")
    for tensor in message.inputs:
        name = clip(tensor.name)
        _at_most(len(tensor.shape), MAX_RANK, f"dimensions in the shape of input {name}")
        _at_most(len(tensor.parameters), MAX_ELEMENTS, f"parameters of input {name}")
        _at_most(
            len(tensor.contents.bytes_contents),
            MAX_ELEMENTS,
            f"elements in the bytes_contents of input {name}",
        )
    for output in message.outputs:
        _at_most(len(output.parameters), MAX_ELEMENTS, f"parameters of output {clip(output.name)}")


def to_request(message: Any) -> tuple[InferenceRequest, list[bytes | None] | None]:
    """A ModelInferRequest -> the codec's request model and one raw buffer per input (None
    when no input is raw)."""
    _bounded(message)
    if message.raw_input_contents and len(message.raw_input_contents) != len(message.inputs):
        raise BadRequest(
            f"raw_input_contents has {len(message.raw_input_contents)} buffer(s) for "
            f"{len(message.inputs)} input(s); send one per input, in the order of the inputs."
        )
    raw = list(message.raw_input_contents)
    buffers: list[bytes | None] = list(raw)
    inputs = []
    for number, tensor in enumerate(message.inputs):
        data = None
        if tensor.HasField("contents"):
            if raw:
                raise BadRequest(
                    f"Input {clip(tensor.name)} has typed contents and the request has "
                    "raw_input_contents; send one or the other."
                )
            data, buffer = _typed(tensor)
            if buffer is not None:
                buffers = buffers or [None] * len(message.inputs)
                buffers[number] = buffer
        inputs.append(
            {
                "name": tensor.name,
                "datatype": tensor.datatype,
                "shape": list(tensor.shape),
                "parameters": parameters(tensor.parameters),
                "data": data,
            }
        )
    body = {
        "id": message.id or None,
        "parameters": parameters(message.parameters),
        "inputs": inputs,
        "outputs": [
            {"name": output.name, "parameters": parameters(output.parameters)}
            for output in message.outputs
        ]
        or None,
    }
    raw_any = any(buffer is not None for buffer in buffers)
    return validated(InferenceRequest, body), (buffers if raw_any else None)


def _typed(tensor: Any) -> tuple[list[Any] | None, bytes | None]:
    """An input's typed contents: its data, or (UINT8 pixels) its raw buffer."""
    field = _CONTENTS.get(tensor.datatype)
    if field is None:
        return [], None  # the codec refuses the datatype, naming what it takes
    misplaced = [f.name for f, _ in tensor.contents.ListFields() if f.name != field]
    if misplaced:
        raise BadRequest(
            f"Input {clip(tensor.name)} of datatype {tensor.datatype} takes its typed contents "
            f"in {field}; got {misplaced[0]}. Move the values there, or send them in "
            "raw_input_contents."
        )
    values = getattr(tensor.contents, field)
    if tensor.datatype == "UINT8":
        try:
            # bytes() refuses a value over 255 itself, in C: a Python loop over the values
            # first took 2 s more for 20M pixel values.
            return None, bytes(values)
        except ValueError:
            raise BadRequest(f"Input {clip(tensor.name)}: a UINT8 value is over 255.") from None
    return list(values), None


def to_response(result: InferenceResult) -> Any:
    """The codec's answer -> a ModelInferResponse, every output in raw_output_contents."""
    tensor = messages.ModelInferResponse.InferOutputTensor
    return messages.ModelInferResponse(
        model_name=result.model_name,
        model_version=result.model_version,
        id=result.id or "",
        outputs=[
            tensor(
                name=output.name,
                datatype=output.datatype,
                shape=list(output.shape),
                parameters={k: _parameter(v) for k, v in output.parameters.items()},
            )
            for output in result.outputs
        ],
        raw_output_contents=[output.raw() for output in result.outputs],
    )


async def infer(
    message: Any,
    settings: Settings,
    explainer: Explainer,
    lifecycle: Lifecycle,
    time_left_s: float | None,
    scope: str | None = None,
) -> Any:
    """Read, run and answer one ModelInfer call (``time_left_s``: the call's own deadline;
    ``scope``: whose cached explanations it may use, ``Explainer.explain``)."""
    # Off the event loop, as HTTP reads its images: a message of CAMSERVE_MAX_IMAGES pixel
    # tensors takes most of a second to turn into uploads, and the loop serves HTTP too.
    inference = await anyio.to_thread.run_sync(read_message, message, settings)
    timeout_s = inference.timeout_s
    if time_left_s is not None:
        timeout_s = time_left_s if timeout_s is None else min(timeout_s, time_left_s)
    version = parse_version(message.model_version)
    work = run_inference(explainer, message.model_name, version, inference, scope)
    result = await within_limits(work, timeout_s, lifecycle)
    # Off the event loop too: a segmenter's mask is a number per pixel.
    return await anyio.to_thread.run_sync(to_response, result)


def read_message(message: Any, settings: Settings) -> Inference:
    """A ModelInferRequest -> what it asks (the codec's ``read_inference``)."""
    request, buffers = to_request(message)
    return read_inference(request, buffers, settings)


def parse_version(text: str) -> int | None:
    """A request's ``version`` field: empty (the server picks) or a whole number."""
    if not text:
        return None
    version = whole_number(text, most_digits=9)
    if version is None:
        raise BadRequest(f"Model version {clip(text)} is not a whole number; send e.g. '1'.")
    return version


async def within_limits(
    work: Coroutine[Any, Any, T], timeout_s: float | None, lifecycle: Lifecycle
) -> T:
    """Await ``work`` unless ``timeout_s`` passes or the drain's grace runs out; then cancel it
    (a running pass stops at its next chunk) and raise the matching error. A call the client
    cancels is cancelled here by grpc, and ``work`` with it."""
    task = asyncio.ensure_future(work)
    cut = asyncio.ensure_future(lifecycle.cut.wait())
    started = time.monotonic()
    try:
        done, _ = await asyncio.wait(
            {task, cut}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
        if task in done:
            return task.result()
        if cut in done:
            raise ShuttingDown(
                "The service is shutting down and this call ran past its grace period; retry "
                "it on another replica."
            )
        raise RequestTimeout(
            f"The call took longer than {time.monotonic() - started:.3g} s (its deadline, its "
            "'timeout' parameter or CAMSERVE_REQUEST_TIMEOUT_S, whichever is first) and was "
            "stopped; give it a longer deadline, or use the HTTP /jobs API for long work."
        )
    finally:
        for pending in (task, cut):
            if not pending.done():
                pending.cancel()
        await asyncio.gather(task, cut, return_exceptions=True)
