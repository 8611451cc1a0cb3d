"""Answers as JSON, made a slice at a time so that a big one never holds the event loop.

A big answer (16 overlays of 1024 px, or one 4096-px PNG) holds tens of megabytes of base64.
FastAPI's default path turned it into plain Python data and ran ``json.dumps`` over it on the
event loop: about 50 ms on these machines, with the GIL held, while every other request waited.
A worker thread would not help: a serializer holds the GIL for as long.

``answer_parts`` serializes the answer with its long strings replaced by short marks (what remains
is small), then encodes each long string a slice at a time (about a millisecond each), letting
the loop run between slices. The long strings are the pictures' base64, which JSON takes as it
is; a long string that needs escaping is escaped by the serializer instead. The JSON is the one
FastAPI's ``response_model`` path would send (tests hold them equal). The HTTP answer and the
explanation cache both use it.
"""

from __future__ import annotations

import asyncio
import re
import secrets
from typing import Any

import pydantic_core
from pydantic import BaseModel

#: A string at least this long is encoded a slice at a time rather than by the serializer.
LONG_STRING = 64 * 1024
#: Characters encoded at once: about a millisecond of work on these machines.
SLICE = 1 << 20
#: What JSON cannot hold unescaped in a string, among the ASCII bytes.
_ESCAPED = bytes(range(0x20)) + b'\x7f"\\'


def _mark_long_strings(value: Any, longs: list[str], mark: str) -> Any:
    if isinstance(value, str):
        if len(value) >= LONG_STRING and value.isascii():  # isascii costs nothing
            longs.append(value)
            return f"{mark}{len(longs) - 1}."
        return value
    if isinstance(value, dict):
        return {key: _mark_long_strings(item, longs, mark) for key, item in value.items()}
    if isinstance(value, list):
        return [_mark_long_strings(item, longs, mark) for item in value]
    return value


async def _json_string_body(text: str) -> list[bytes]:
    """``text``'s JSON form without its quotes, as slices, the loop free between them."""
    slices: list[bytes] = []
    for start in range(0, len(text), SLICE):
        chunk = text[start : start + SLICE].encode("ascii")
        if len(chunk.translate(None, _ESCAPED)) != len(chunk):  # not base64: let JSON escape
            return [pydantic_core.to_json(text)[1:-1]]
        slices.append(chunk)
        await asyncio.sleep(0)
    return slices


async def answer_parts(model: BaseModel) -> list[bytes]:
    """The answer's JSON, as the parts to send in order."""
    longs: list[str] = []
    mark = f"camserve-long-{secrets.token_hex(8)}-"
    tree = _mark_long_strings(model.model_dump(mode="json", by_alias=True), longs, mark)
    pieces = re.split(re.escape(mark).encode() + rb"([0-9]+)\.", pydantic_core.to_json(tree))
    parts: list[bytes] = []
    for index, piece in enumerate(pieces):
        if index % 2:
            parts.extend(await _json_string_body(longs[int(piece)]))
        elif piece:
            parts.append(piece)
    return parts
