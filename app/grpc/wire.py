"""A request's fields counted on the wire, before protobuf parses them.

protobuf parses a message in one C call that holds the GIL, on the event loop that serves HTTP
and gRPC alike, and its time grows with the number of fields, not with the bytes: a 159 MB
``ModelInferRequest`` of ten million parameters (a map entry is 16 bytes) took 12 to 23 s to
parse, and every other request of the process waited (``/health`` 11.6 s). HTTP's JSON bodies
are bounded the same way before they are parsed (65,536 items). Here the fields of a message are
walked as the wire lays them out, into the nested messages the proto declares, and counted up
to ``MAX_FIELDS``; a packed list of numbers counts its bytes, one a number at most. The walk
skips each field by its length, so an image of 10 MB costs one step, and a message smaller than
``MAX_FIELDS`` bytes cannot hold more fields than that: it is not walked at all.

The walk does not judge what it does not count: bytes that are not protobuf stop it, and the
parse that follows refuses them."""

from __future__ import annotations

from functools import cache
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from app.errors import BadRequest

MAX_FIELDS = 65_536
"""Most fields in one request: HTTP's bound on a JSON body's items."""
UNCOUNTED = frozenset({"inference.InferTensorContents.uint_contents"})
"""Packed lists whose numbers are not counted: pixel values (``CAMSERVE_MAX_REQUEST_PIXELS``
bounds them, after the parse), a number a byte or two."""

_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5
_Layout = dict[int, "tuple[str, Any]"]
"""Field number -> ``("message", layout)`` or ``("packed", None)`` (counted by its bytes);
fields not listed count one each."""


class _Malformed(Exception):
    """Not protobuf: left to the parse to refuse."""


_TEXT = (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES)


@cache
def _layout(descriptor: Descriptor) -> _Layout:
    layout: _Layout = {}
    for field in descriptor.fields:
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            layout[field.number] = ("message", field.message_type)
        elif field.type not in _TEXT and field.full_name not in UNCOUNTED:
            # A number is length-delimited on the wire only in a packed list.
            layout[field.number] = ("packed", None)
    return layout


def check_fields(data: bytes, descriptor: Descriptor, most: int = MAX_FIELDS) -> None:
    """Refuse (BadRequest) a message of type ``descriptor`` with more than ``most`` fields,
    before it is parsed."""
    if len(data) <= most:
        return
    try:
        count = _walk(memoryview(data), 0, len(data), descriptor, 0, most)
    except _Malformed:
        return
    if count > most:
        raise BadRequest(
            f"The request has more than {most} fields (protobuf fields: parameters, inputs, "
            f"outputs, shape dimensions, elements); a request of camserve's needs a few dozen."
        )


def _varint(data: memoryview, at: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= end or shift > 63:
            raise _Malformed
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7


def _walk(
    data: memoryview, at: int, end: int, descriptor: Descriptor, count: int, most: int
) -> int:
    """``count`` plus the fields of the message in ``data[at:end]``; it stops past ``most``."""
    layout = _layout(descriptor)
    while at < end:
        count += 1
        if count > most:
            return count
        key = data[at]  # one byte for fields 1 to 15, the common case: no call
        if key < 0x80:
            at += 1
        else:
            key, at = _varint(data, at, end)
        number, kind = key >> 3, key & 7
        if kind == _VARINT:
            _, at = _varint(data, at, end)
        elif kind == _FIXED64:
            at += 8
        elif kind == _FIXED32:
            at += 4
        elif kind == _LENGTH:
            length = data[at] if at < end else 0x80
            if length < 0x80:
                at += 1
            else:
                length, at = _varint(data, at, end)
            if at + length > end:
                raise _Malformed
            what, inner = layout.get(number, ("", None))
            if what == "message":
                count = _walk(data, at, at + length, inner, count, most)
            elif what == "packed":
                count += length
            at += length
        else:  # groups: no proto3 message has them (and the parse would walk their fields)
            raise BadRequest("The request is not a valid protobuf message (it has groups).")
    if at != end:
        raise _Malformed
    return count
