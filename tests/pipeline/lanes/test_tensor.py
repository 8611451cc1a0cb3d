"""The tensor lane on the CPU (the CUDA lane's code with libjpeg-turbo for nvJPEG) against the
CPU lane: the same sizes, boxes, errors, and pixels within 2 levels on average."""

from __future__ import annotations

import functools
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app.errors import CamserveError
from app.models.manifest import parse_manifest
from app.pipeline.decoding import Upload
from app.pipeline.lanes import lane_for
from app.pipeline.lanes.cpu import CpuLane
from app.pipeline.lanes.tensor import TensorLane
from tests.pipeline.lanes.helpers import encoded, levels, mean_level_gap, photo

SHAPES = Path(__file__).resolve().parents[3] / "model_store" / "shapes"
LIMIT = 10**8
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def spec():  # type: ignore[no-untyped-def]
    return parse_manifest(SHAPES)


def _agree(spec, upload: Upload, side: int | None) -> TensorLane:  # type: ignore[no-untyped-def]
    lane = TensorLane(CPU)
    (want,) = CpuLane().decode([upload], spec, LIMIT, side)
    (got,) = lane.decode([upload], spec, LIMIT, side)
    assert got.original_size == want.original_size
    assert got.image.size == want.image.size
    assert got.box == want.box
    assert got.pixels is not None and got.pixels.shape == (3, want.image.height, want.image.width)
    assert mean_level_gap(got.pixels, levels(want.image)) <= 2.0
    assert mean_level_gap(got.tensor * 255, want.tensor * 255) <= 2.0 / min(spec.std)
    return lane


@pytest.mark.parametrize("orientation", [None, 3, 6, 8])
def test_jpegs_agree_with_the_cpu_lane(spec, orientation: int | None) -> None:  # type: ignore[no-untyped-def]
    _agree(spec, Upload("p.jpg", encoded(photo((640, 480)), "JPEG", orientation)), 1024)


@pytest.mark.parametrize("side", [1024, 0, None])
def test_large_jpegs_come_at_the_draft_scale(spec, side: int | None) -> None:  # type: ignore[no-untyped-def]
    _agree(spec, Upload("big.jpg", encoded(photo((3000, 2000)), "JPEG", 6)), side)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "BMP", "GIF", "TIFF"])
def test_other_formats_decode_on_the_cpu_then_copy(spec, fmt: str) -> None:  # type: ignore[no-untyped-def]
    image = photo((300, 200))
    if fmt == "GIF":
        image = image.convert("P")
    lane = _agree(spec, Upload(f"p.{fmt.lower()}", encoded(image, fmt)), 1024)
    assert lane.staging.allocated == 1
    assert lane.jpegs.calls == []


def test_cmyk_jpegs_go_to_pillow(spec) -> None:  # type: ignore[no-untyped-def]
    lane = _agree(spec, Upload("c.jpg", encoded(photo((200, 100)).convert("CMYK"))), 1024)
    assert lane.jpegs.calls == []


def test_a_request_s_jpegs_decode_in_one_call(spec) -> None:  # type: ignore[no-untyped-def]
    lane = TensorLane(CPU)
    uploads = [Upload(f"{i}.jpg", encoded(photo((320, 240), seed=i))) for i in range(3)]
    uploads.append(Upload("p.png", encoded(photo((100, 100)), "PNG")))
    decoded = lane.decode(uploads, spec, LIMIT, 1024)
    assert lane.jpegs.calls == [3]
    assert [d.filename for d in decoded] == ["0.jpg", "1.jpg", "2.jpg", "p.png"]
    batch = lane.stack(decoded)
    assert batch.shape == (4, *spec.input_shape)
    torch.testing.assert_close(batch[3], decoded[3].tensor)


def test_channels_last_batches(spec) -> None:  # type: ignore[no-untyped-def]
    lane = TensorLane(CPU, channels_last=True)
    decoded = lane.decode([Upload("a.jpg", encoded(photo((200, 150))))] * 2, spec, LIMIT, 0)
    assert lane.stack(decoded).is_contiguous(memory_format=torch.channels_last)


@functools.cache
def _bad_uploads() -> dict[str, bytes]:
    """Read, never changed: made once (the 12000 x 9000 PNG takes seconds to encode, and each
    test of the parametrization used to make all of them again)."""
    data = encoded(photo((640, 480)))
    corrupt = bytearray(data)
    corrupt[len(data) // 2 :] = b"\x00" * (len(data) - len(data) // 2)
    return {
        "empty": b"",
        "text": b"not an image",
        "truncated": data[: len(data) // 2],
        "zeroed": bytes(corrupt),
        "huge": encoded(Image.new("RGB", (12000, 9000)), "PNG"),
        "thin": encoded(Image.new("RGB", (1010, 10)), "PNG"),
    }


@pytest.mark.parametrize("case", list(_bad_uploads()))
def test_errors_are_the_cpu_lane_s(spec, case: str) -> None:  # type: ignore[no-untyped-def]
    upload = Upload(f"{case}.jpg", _bad_uploads()[case])
    outcomes = []
    for lane in (CpuLane(), TensorLane(CPU)):
        try:
            (decoded,) = lane.decode([upload], spec, LIMIT, 1024)
            outcomes.append(("ok", decoded.image.size))
        except CamserveError as error:
            outcomes.append((type(error).__name__, str(error)))
    assert outcomes[0] == outcomes[1]


def test_a_jpeg_the_decoder_rejects_falls_back_to_the_cpu_lane(spec, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    lane = TensorLane(CPU)
    monkeypatch.setattr(lane.jpegs, "run", lambda items: [None] * len(items))
    upload = Upload("a.jpg", encoded(photo((320, 240)), "JPEG", 6))
    (got,) = lane.decode([upload], spec, LIMIT, 1024)
    (want,) = CpuLane().decode([upload], spec, LIMIT, 1024)
    assert lane.fallbacks == 1
    assert got.image.size == want.image.size
    assert np.array_equal(np.asarray(got.image), np.asarray(want.image))


def test_one_bad_jpeg_fails_alone_in_a_batched_call() -> None:
    from app.pipeline.lanes.tensor import _decode_each

    good = encoded(photo((64, 48)))
    decoded = _decode_each([good, good[:100], good], CPU)
    assert decoded[1] is None
    assert decoded[0] is not None and decoded[2] is not None
    assert decoded[0].shape == (3, 48, 64)


def test_the_lane_follows_the_device() -> None:
    assert isinstance(lane_for(CPU), CpuLane)
    assert lane_for(CPU).device == CPU


def test_pillow_decodes_cmyk_as_the_cpu_lane() -> None:  # the image the fallback tests compare
    data = encoded(photo((20, 10)).convert("CMYK"))
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
