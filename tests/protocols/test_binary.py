"""The binary tensor data extension's framing: the JSON part's length, the tensors' buffers,
BYTES elements with their 4-byte little-endian lengths."""

from __future__ import annotations

import struct

import pytest

from app.errors import BadRequest
from app.protocols.binary import bytes_elements, header_length, pack_bytes, split_buffers


def test_bytes_elements_round_trip() -> None:
    elements = [b"first", b"", b"\x00\xff" * 300]
    raw = pack_bytes(elements)
    assert raw[:4] == struct.pack("<I", 5)
    assert bytes_elements("image", raw) == elements
    assert bytes_elements("image", b"") == []


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (struct.pack("<I", 10) + b"short", "element 0 says it has 10 bytes but only 5 follow"),
        (pack_bytes([b"ok"]) + b"\x01\x00", "2 stray bytes where a 4-byte length prefix"),
    ],
)
def test_a_prefix_that_lies_or_is_cut_is_refused(raw: bytes, words: str) -> None:
    with pytest.raises(BadRequest, match=words):
        bytes_elements("image", raw)


def test_the_binary_part_is_cut_by_each_tensors_size() -> None:
    buffers = split_buffers([{"binary_data_size": 3}, None, {"binary_data_size": 2}], b"abcde")
    assert [None if b is None else bytes(b) for b in buffers] == [b"abc", None, b"de"]


@pytest.mark.parametrize(
    ("sizes", "body", "words"),
    [
        ([4], b"abc", "runs past the end of the body"),
        ([2], b"abc", "1 bytes after the tensors' data"),
        ([-1], b"", "whole number of bytes"),
        ([True], b"a", "whole number of bytes"),
    ],
)
def test_sizes_that_do_not_add_up_are_refused(sizes: list, body: bytes, words: str) -> None:
    with pytest.raises(BadRequest, match=words):
        split_buffers([{"binary_data_size": size} for size in sizes], body)


def test_the_header_length_is_a_number_within_the_body() -> None:
    assert header_length("12", 20) == 12
    with pytest.raises(BadRequest, match="must be a number of bytes"):
        header_length("-3", 20)
    with pytest.raises(BadRequest, match="only 20"):
        header_length("21", 20)
    with pytest.raises(BadRequest, match="says the JSON part is 0 bytes"):
        header_length("0", 20)
    assert header_length("0" * 60 + "12", 20) == 12  # leading zeros are still a number
    assert header_length("0" * 5000 + "12", 20) == 12  # more than int() reads with them


@pytest.mark.parametrize("value", ["²", "١٢", "9" * 5000, "1e3", "0x10", "+5"])
def test_a_header_length_that_is_not_ascii_digits_is_refused(value: str) -> None:
    # '²' passed isdigit and then failed int(); 5,000 digits passed both checks and failed
    # int()'s 4,300-digit guard: each a 500.
    with pytest.raises(BadRequest, match="must be a number of bytes"):
        header_length(value, 20)
