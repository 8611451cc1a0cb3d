"""Drawing on tensors (the CUDA lane's pictures, run here on the CPU) against Pillow's drawing:
maps to 1e-3, overlays at 40 dB PSNR or better, the same fields."""

from __future__ import annotations

import asyncio
import base64
import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app.cam.overlay import _mask_array
from app.models.manifest import parse_manifest
from app.pipeline.budget import FairThreads
from app.pipeline.decoding import Upload
from app.pipeline.lanes import drawing
from app.pipeline.lanes.cpu import CpuLane
from app.pipeline.lanes.tensor import TensorLane
from app.pipeline.rendering import NamedMap, PictureSize, RenderStyle, draw_maps
from tests.pipeline.lanes.helpers import encoded, photo

SHAPES = Path(__file__).resolve().parents[3] / "model_store" / "shapes"
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def spec():  # type: ignore[no-untyped-def]
    return parse_manifest(SHAPES)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGBA"))


def test_upsampled_maps_agree_with_pillow_to_1e3() -> None:
    cam = torch.rand(7, 7, generator=torch.Generator().manual_seed(0))
    for size in [(640, 480), (224, 224), (5, 3)]:
        picture = Image.fromarray(_mask_array(cam), mode="F").resize(
            size, Image.Resampling.BILINEAR
        )
        expected = torch.from_numpy(np.asarray(picture))
        got = drawing.map_values(cam, size)
        assert float((got - expected).abs().max()) <= 1e-3


def _draw(spec, lane, upload, style, cams):  # type: ignore[no-untyped-def]
    decoded = lane.decode([upload], spec, 10**8, style.size.decode_side)
    maps = [[NamedMap("feat", "layer", cams, normalized=False)]]
    drawn = draw_maps(FairThreads(None), decoded, maps, style, spec.crop, lane.painter)
    return asyncio.run(drawn)[0][0][0]


@pytest.mark.parametrize("image_format", ["jpeg", "png", "webp"])
@pytest.mark.parametrize("size", ["input", "original", "300"])
@pytest.mark.parametrize("orientation", [None, 6])
def test_pictures_agree_with_pillow(spec, image_format, size, orientation) -> None:  # type: ignore[no-untyped-def]
    upload = Upload("p.jpg", encoded(photo((640, 480)), "JPEG", orientation))
    style = RenderStyle(
        outputs=("overlay", "heatmap", "raw"),
        colormap="viridis",
        image_format=image_format,
        size=PictureSize.parse(size, 1024),
    )
    cams = torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(1)) * 3
    want = _draw(spec, CpuLane(), upload, style, cams)
    got = _draw(spec, TensorLane(CPU), upload, style, cams)
    assert {k: got[k] for k in ("layer", "kind", "width", "height", "region", "raw")} == {
        k: want[k] for k in ("layer", "kind", "width", "height", "region", "raw")
    }
    assert _psnr(_pixels(got["overlay"]), _pixels(want["overlay"])) >= 40
    assert _psnr(_pixels(got["heatmap"]), _pixels(want["heatmap"])) >= 40


def test_heatmap_outside_the_crop_is_transparent_or_the_zero_colour(spec) -> None:  # type: ignore[no-untyped-def]
    upload = Upload("p.jpg", encoded(photo((640, 480))))
    cams = torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(2))
    for image_format, corner in (("png", (0, 0, 0, 0)), ("jpeg", None)):
        style = RenderStyle(outputs=("heatmap",), image_format=image_format)
        got = _pixels(_draw(spec, TensorLane(CPU), upload, style, cams)["heatmap"])
        want = _pixels(_draw(spec, CpuLane(), upload, style, cams)["heatmap"])
        if corner is not None:
            assert tuple(got[0, 0]) == corner
        assert _psnr(got, want) >= 40


def test_levels_and_colours_are_the_palette_s() -> None:
    levels = torch.arange(256, dtype=torch.uint8).reshape(16, 16)
    colors = drawing.colored(levels, "jet").permute(1, 2, 0).numpy()
    from app.cam import colorize

    assert np.array_equal(colors, np.asarray(colorize(levels.numpy(), "jet")))
