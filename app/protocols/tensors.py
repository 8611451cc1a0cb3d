"""An output tensor of the Open Inference Protocol, as every transport sends it: JSON data, the
binary tensor data extension's raw bytes, or gRPC's ``raw_output_contents``."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from app.errors import BadRequest
from app.protocols.binary import pack_bytes

Datatype = Literal["FP32", "INT32", "BYTES"]
#: The raw (little-endian) numpy type of each numeric datatype.
_RAW = {"FP32": "<f4", "INT32": "<i4"}
#: The numpy type whose ``tolist`` gives each numeric datatype's JSON numbers.
_JSON = {"FP32": np.float64, "INT32": np.int64}
JSON_SLICE = 1 << 16
"""Elements of an array output written as JSON per ``json.dumps`` call (about 10 ms each)."""


def one_size(name: str, shapes: Sequence[tuple[int, ...]]) -> None:
    """A stacked output needs every image's part to be the same shape."""
    if len(set(shapes)) > 1:
        raise BadRequest(
            f"The output {name!r} stacks one tensor per image, but the images give "
            f"{', '.join('x'.join(map(str, s)) for s in dict.fromkeys(shapes))}; send images of "
            "one size, or one image per request."
        )


@dataclass(frozen=True)
class OutputTensor:
    """One output of the answer. ``values``: row-major, floats for FP32, whole numbers for
    INT32, bytes for BYTES."""

    name: str
    datatype: Datatype
    shape: tuple[int, ...]
    values: Sequence[float] | Sequence[int] | Sequence[bytes] | np.ndarray
    """A large numeric output (a segmenter's mask: a pixel each) is a flat ndarray."""
    parameters: dict[str, Any] = field(default_factory=dict)
    binary: bool = False
    """Asked for as binary data (HTTP's binary part); JSON data otherwise."""

    def raw(self) -> bytes:
        """The raw form: numbers little-endian; BYTES each with its 4-byte length (as gRPC's
        ``raw_output_contents`` and the binary part carry them)."""
        if self.datatype == "BYTES":
            return pack_bytes(list(self.values))  # type: ignore[arg-type]
        return np.asarray(self.values, dtype=_RAW[self.datatype]).tobytes()

    def json_text(self) -> Iterator[str]:
        """The values as JSON text, without the brackets, in pieces: a large array (a mask's
        millions of pixels) a slice at a time, so that no one ``json.dumps`` holds the GIL,
        and with it the event loop, for seconds."""
        if not isinstance(self.values, np.ndarray):
            yield json.dumps(self.json_data(), separators=(",", ":"))[1:-1]
            return
        kind = _JSON[self.datatype]
        for start in range(0, len(self.values), JSON_SLICE):
            part = self.values[start : start + JSON_SLICE].astype(kind).tolist()
            yield json.dumps(part, separators=(",", ":"))[1:-1]

    def json_data(self) -> list[float] | list[int] | list[str]:
        """The values as JSON data (BYTES as text)."""
        if self.datatype == "BYTES":
            return [bytes(value).decode() for value in self.values]  # type: ignore[arg-type]
        if isinstance(self.values, np.ndarray):
            # One C call for millions of pixels (a loop over them took seconds).
            listed: list[int] | list[float] = self.values.astype(_JSON[self.datatype]).tolist()
            return listed
        if self.datatype == "INT32":
            return [int(value) for value in self.values]
        return [float(value) for value in self.values]
