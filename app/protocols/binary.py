"""The binary tensor data extension of the Open Inference Protocol over HTTP.

A body is a JSON header of ``Inference-Header-Content-Length`` bytes followed by the tensors'
raw bytes, in the order of the tensors that carry ``parameters.binary_data_size``. A BYTES
tensor's raw form is each element as a 4-byte little-endian length followed by that many bytes;
a numeric tensor's is its values, little-endian, row-major. Answers use the same framing.

gRPC carries the same raw forms in ``raw_input_contents`` and ``raw_output_contents``, one
buffer per tensor, so ``bytes_elements`` and ``pack_bytes`` serve it too.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from typing import Any

from app.digits import whole_number
from app.errors import BadRequest, clip

HEADER = "Inference-Header-Content-Length"
"""The request and response header that gives the JSON part's length in bytes."""
SIZE = "binary_data_size"
"""A tensor's parameter: how many bytes of the binary part are its data."""
_PREFIX = struct.Struct("<I")


def header_length(value: str, body_length: int) -> int:
    """The ``Inference-Header-Content-Length`` header, checked against the body it frames."""
    length = whole_number(value)
    if length is None:
        raise BadRequest(f"The {HEADER} header must be a number of bytes; got {clip(value, 20)}.")
    if length == 0:
        raise BadRequest(
            f"The {HEADER} header says the JSON part is 0 bytes; the body starts with the "
            "request's JSON: send its length in bytes."
        )
    if length > body_length:
        raise BadRequest(
            f"The {HEADER} header says the JSON part is {length} bytes, but the body has only "
            f"{body_length}; send the JSON part's length in bytes."
        )
    return length


def split_buffers(
    parameters: Sequence[Mapping[str, Any] | None], binary: memoryview | bytes
) -> list[memoryview | None]:
    """The binary part cut into the tensors' buffers: one per tensor (``None`` for a tensor whose
    data is in the JSON), given each tensor's ``parameters``. Refused: a size that is not a
    non-negative whole number, sizes that run past the body, or bytes left over."""
    view = memoryview(binary)
    buffers: list[memoryview | None] = []
    offset = 0
    for index, params in enumerate(parameters):
        size = (params or {}).get(SIZE)
        if size is None:
            buffers.append(None)
            continue
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise BadRequest(f"Tensor {index}: {SIZE} must be a whole number of bytes.")
        if offset + size > len(view):
            raise BadRequest(
                f"Tensor {index}: {SIZE} {size} runs past the end of the body (the binary part "
                f"has {len(view) - offset} bytes left); send each tensor's exact byte count."
            )
        buffers.append(view[offset : offset + size])
        offset += size
    if offset != len(view):
        raise BadRequest(
            f"The body holds {len(view) - offset} bytes after the tensors' data that no "
            f"{SIZE} accounts for; check the {HEADER} header and the sizes."
        )
    return buffers


def bytes_elements(name: str, buffer: memoryview | bytes, most: int | None = None) -> list[bytes]:
    """A BYTES tensor's raw form -> its elements. Refused: a length prefix that runs past the
    buffer (a prefix that lies), or a truncated prefix.

    ``most``: the caller takes at most that many, so the reading stops after ``most + 1``
    elements (for the caller to refuse): a buffer of empty elements, 4 bytes each, is millions
    of them, and reading a 160 MB one in this loop held the GIL for 95 s."""
    view = memoryview(buffer)
    elements: list[bytes] = []
    offset = 0
    while offset < len(view) and (most is None or len(elements) <= most):
        if offset + _PREFIX.size > len(view):
            raise BadRequest(
                f"Input {clip(name)}: {len(view) - offset} stray bytes where a 4-byte length "
                "prefix should be; each BYTES element is a little-endian uint32 length, then "
                "its bytes."
            )
        (length,) = _PREFIX.unpack_from(view, offset)
        offset += _PREFIX.size
        if offset + length > len(view):
            raise BadRequest(
                f"Input {clip(name)}: element {len(elements)} says it has {length} bytes but "
                f"only {len(view) - offset} follow; each BYTES element is a little-endian "
                "uint32 length, then its bytes."
            )
        elements.append(bytes(view[offset : offset + length]))
        offset += length
    return elements


def pack_bytes(elements: Sequence[bytes]) -> bytes:
    """BYTES elements -> their raw form (each with its 4-byte little-endian length)."""
    return b"".join(_PREFIX.pack(len(element)) + element for element in elements)
