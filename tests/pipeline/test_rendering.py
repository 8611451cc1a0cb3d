"""Pictures at the size asked for; outside the model's crop the upload shows plain."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from app.cam import blend
from app.errors import InvalidParameter, OverBudget
from app.pipeline import rendering
from app.pipeline.budget import FairThreads
from app.pipeline.decoding import Box, DecodedImage
from app.pipeline.rendering import (
    ANSWER_BYTES_PER_PIXEL,
    OUTPUT_KINDS,
    WORKING_BYTES_PER_PIXEL,
    NamedMap,
    PictureSize,
    RenderBudget,
    RenderCost,
    RenderStyle,
    _blend_in_bands,
    draw_maps,
    encode_image,
    render_cost,
    render_image,
)


def _decoded(size: tuple[int, int], box: Box, color=(10, 200, 30)) -> DecodedImage:  # type: ignore[no-untyped-def]
    image = Image.new("RGB", size, color)
    return DecodedImage("x.png", image, size, torch.zeros(3, 8, 8), box)


def _picture(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data)))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, PictureSize("side", 1024, upscale=False)),
        ("", PictureSize("side", 1024, upscale=False)),
        ("original", PictureSize("original")),
        (" Input ", PictureSize("input")),
        ("512", PictureSize("side", 512)),
    ],
)
def test_size_values(value: str | None, expected: PictureSize) -> None:
    assert PictureSize.parse(value, 1024) == expected


@pytest.mark.parametrize("value", ["0", "15", "4097", "big", "-5", "1e3", "12.5", "x" * 5000])
def test_bad_sizes_name_the_allowed_values(value: str) -> None:
    with pytest.raises(InvalidParameter) as caught:
        PictureSize.parse(value, 1024)
    assert "original" in caught.value.message and "input" in caught.value.message
    assert len(caught.value.message) < 300  # a huge value is not echoed back whole


def test_canvas_sizes() -> None:
    crop = (224, 200)  # (h, w)
    assert PictureSize("side", 1024, upscale=False).canvas_size((4000, 3000), crop) == (1024, 768)
    assert PictureSize("side", 1024, upscale=False).canvas_size((300, 200), crop) == (300, 200)
    assert PictureSize("side", 600).canvas_size((300, 200), crop) == (600, 400)
    assert PictureSize("side", 100).canvas_size((100, 3000), crop) == (3, 100)
    assert PictureSize("original").canvas_size((4000, 3000), crop) == (4000, 3000)
    assert PictureSize("input").canvas_size((4000, 3000), crop) == (200, 224)


def test_outside_the_crop_the_overlay_is_the_plain_image() -> None:
    decoded = _decoded((80, 40), Box(20, 0, 60, 40))
    maps = [NamedMap("layer", "layer", torch.ones(1, 4, 4), True)]
    style = RenderStyle(outputs=("overlay", "heatmap"), image_format="png", alpha=0.5)
    (fields,) = render_image(decoded, 0, maps, style, (40, 40))
    assert (fields["width"], fields["height"], fields["region"]) == (80, 40, [20, 0, 60, 40])
    overlay = np.asarray(_picture(fields["overlay"]).convert("RGB")).astype(int)
    assert (overlay[:, :20] == [10, 200, 30]).all() and (overlay[:, 60:] == [10, 200, 30]).all()
    # Inside: half the image, half jet's top colour (128, 0, 0), rounded to nearest.
    assert (overlay[:, 20:60] == [69, 100, 15]).all()
    heat = _picture(fields["heatmap"])
    assert heat.mode == "RGBA"
    alpha = np.asarray(heat)[..., 3]
    assert (alpha[:, :20] == 0).all() and (alpha[:, 20:60] == 255).all()


def test_sizes_scale_pictures_and_region() -> None:
    decoded = _decoded((400, 200), Box(100, 0, 300, 200))
    maps = [NamedMap("layer", "layer", torch.rand(1, 4, 4), True)]
    for size, expected in [("100", (100, 50)), ("input", (32, 32)), ("original", (400, 200))]:
        style = RenderStyle(outputs=("overlay",), size=PictureSize.parse(size, 1024))
        (fields,) = render_image(decoded, 0, maps, style, (32, 32))
        assert _picture(fields["overlay"]).size == expected
        assert (fields["width"], fields["height"]) == expected
    style = RenderStyle(outputs=("overlay",), size=PictureSize.parse("100", 1024))
    assert render_image(decoded, 0, maps, style, (32, 32))[0]["region"] == [25, 0, 75, 50]


def test_a_full_crop_heatmap_is_a_lossless_palette_png() -> None:
    decoded = _decoded((16, 16), Box(0, 0, 16, 16))
    cam = torch.linspace(0, 1, 16).repeat(16, 1)[None]
    style = RenderStyle(outputs=("heatmap",), image_format="png", colormap="gray")
    (fields,) = render_image(decoded, 0, [NamedMap("l", "layer", cam, True)], style, (16, 16))
    heat = _picture(fields["heatmap"])
    assert heat.mode == "P"
    row = np.asarray(heat.convert("RGB"))[0, :, 0]
    assert row.tolist() == np.round(np.linspace(0, 255, 16)).astype(int).tolist()


def test_raw_only_draws_nothing() -> None:
    decoded = _decoded((16, 16), Box(0, 0, 16, 16))
    style = RenderStyle(outputs=("raw",))
    (fields,) = render_image(
        decoded, 0, [NamedMap("l", "layer", torch.rand(1, 2, 3), False)], style, (16, 16)
    )
    assert fields["width"] is None and fields["raw"].shape == [2, 3]
    assert set(OUTPUT_KINDS) == {"overlay", "heatmap", "raw"}


def test_encode_formats() -> None:
    image = Image.new("RGB", (8, 8), (10, 20, 30))
    for fmt, magic in (("png", b"\x89PNG"), ("jpeg", b"\xff\xd8"), ("webp", b"RIFF")):
        assert encode_image(image, fmt).startswith(magic)


def test_render_cost_counts_images_maps_pictures_and_area() -> None:
    style = RenderStyle(outputs=("overlay", "heatmap", "raw"), size=PictureSize("side", 100))
    cost = render_cost([(400, 200), (50, 50)], 3, style, (32, 32))
    # 100x50 and 100x100 pictures, 3 maps each, 2 pictures (raw draws nothing); the memory: the
    # largest picture's working set and the answer's JPEG pictures.
    pixels = 3 * 2 * (100 * 50 + 100 * 100)
    memory = WORKING_BYTES_PER_PIXEL * 100 * 100 + ANSWER_BYTES_PER_PIXEL["jpeg"] * pixels
    assert cost == RenderCost(maps=6, pixels=pixels, largest_side=100, bytes=int(memory))
    raw_only = render_cost([(400, 200)], 3, RenderStyle(outputs=("raw",)), (32, 32))
    assert raw_only == RenderCost(maps=3, pixels=0, largest_side=0, bytes=0)
    assert cost + raw_only == RenderCost(9, cost.pixels, 100, cost.bytes)


def test_a_picture_past_what_its_format_encodes_is_refused_when_priced() -> None:
    # WebP stores 14 bits a side: size=original of a 20000x200 upload in webp was drawn, then
    # failed in the encoder (a 500, after the whole pass).
    original = PictureSize("original")
    for fmt, side in (("webp", 16383), ("jpeg", 65535)):
        style = RenderStyle(image_format=fmt, size=original)
        assert render_cost([(side, 200)], 1, style, (32, 32)).largest_side == side
        with pytest.raises(InvalidParameter, match=f"{fmt} pictures are at most {side} px"):
            render_cost([(200, side + 1)], 1, style, (32, 32))
    assert render_cost([(70000, 700)], 1, RenderStyle(image_format="png", size=original), (32, 32))
    raw = RenderStyle(outputs=("raw",), image_format="webp", size=original)
    assert render_cost([(20000, 200)], 1, raw, (32, 32)).largest_side == 0


def test_the_render_budget_names_the_numbers_and_how_to_fit() -> None:
    budget = RenderBudget(max_pixels=1000, max_maps=4, max_bytes=10_000)
    budget.check(RenderCost(maps=4, pixels=1000, largest_side=10, bytes=10_000))
    with pytest.raises(OverBudget) as caught:
        budget.check(RenderCost(maps=2, pixels=1001, largest_side=31))
    message = caught.value.message
    assert "1001" in message and "1000" in message and "CAMSERVE_MAX_RENDER_PIXELS" in message
    assert "smaller size" in message and "fewer target layers" in message
    assert caught.value.details == {"pixels": 1001, "limit": 1000, "largest_side": 31}
    with pytest.raises(OverBudget) as caught:
        budget.check(RenderCost(maps=5))
    assert "CAMSERVE_MAX_RENDER_MAPS" in caught.value.message
    with pytest.raises(OverBudget) as caught:
        budget.check(RenderCost(maps=1, pixels=10, largest_side=5, bytes=10_001))
    assert "CAMSERVE_RENDER_BUDGET_BYTES" in caught.value.message


class _CountingThreads(ThreadPoolExecutor):
    """Counts the steps submitted; cancels ``victim`` when the ``cancel_at``-th one starts."""

    def __init__(self, cancel_at: int | None = None) -> None:
        super().__init__(max_workers=1)
        self.steps = 0
        self.cancel_at = cancel_at
        self.victim: asyncio.Task[object] | None = None

    def submit(self, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def,override]
        self.steps += 1
        if self.steps == self.cancel_at and self.victim is not None:
            self.victim.get_loop().call_soon_threadsafe(self.victim.cancel)
        return super().submit(fn, *args, **kwargs)


def _two_maps() -> tuple[list[DecodedImage], list[list[NamedMap]], RenderStyle]:
    decoded = [_decoded((60, 40), Box(0, 0, 60, 40)), _decoded((30, 30), Box(0, 0, 30, 30))]
    cams = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(0))
    maps = [[NamedMap("a", "layer", cams, True)], [NamedMap("b", "layer", cams.flip(0), False)]]
    return decoded, maps, RenderStyle(outputs=("overlay", "heatmap", "raw"), image_format="png")


def test_drawing_in_steps_gives_what_drawing_at_once_gives() -> None:
    decoded, maps, style = _two_maps()
    threads = _CountingThreads()
    with threads:
        drawn = asyncio.run(draw_maps(FairThreads(threads), decoded, maps, style, (32, 32)))
    at_once = [
        [render_image(d, i, group, style, (32, 32)) for group in maps]
        for i, d in enumerate(decoded)
    ]
    assert drawn == at_once
    # A canvas per image, then every output of every map of it: each its own step.
    assert threads.steps == 2 * (1 + 2 * 3)


def test_a_cancel_stops_the_drawing_after_the_step_that_runs() -> None:
    decoded, maps, style = _two_maps()
    threads = _CountingThreads(cancel_at=3)

    async def main() -> None:
        drawing = draw_maps(FairThreads(threads), decoded, maps, style, (32, 32))
        task = asyncio.ensure_future(drawing)
        threads.victim = task
        with pytest.raises(asyncio.CancelledError):
            await task

    with threads:
        asyncio.run(main())
    assert threads.steps == 3  # of 14: the cancel took effect once the third step ended


def test_an_overlay_blended_in_bands_is_the_overlay_blended_at_once() -> None:
    rng = np.random.default_rng(0)
    size = (700, 500)  # 700 px a row: bands of 187 rows, the last one shorter
    picture, colored = (
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
        for _ in range(2)
    )
    banded = _blend_in_bands(picture, colored, 0.3)
    np.testing.assert_array_equal(np.asarray(banded), np.asarray(blend(picture, colored, 0.3)))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread priority is Linux's")
def test_a_heavy_drawing_thread_runs_at_a_lower_priority() -> None:
    from app.pipeline.rendering import HEAVY_NICENESS, lower_thread_priority

    def priority() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    with ThreadPoolExecutor(1, initializer=lower_thread_priority) as heavy:
        niced = heavy.submit(priority).result()
    with ThreadPoolExecutor(1) as plain:
        ordinary = plain.submit(priority).result()
    assert niced == min(19, ordinary + HEAVY_NICENESS)
    assert priority() == ordinary  # the caller's thread keeps its own


@pytest.mark.parametrize("extra", [-1, 0, 1, 2, 3])
@pytest.mark.parametrize("pieces", [1, 3])
def test_base64_in_pieces_is_one_encoding(
    monkeypatch: pytest.MonkeyPatch, pieces: int, extra: int
) -> None:
    monkeypatch.setattr(rendering, "_BASE64_PIECE", 6)
    data = os.urandom(6 * pieces + extra)
    assert rendering.to_base64(data) == base64.b64encode(data).decode("ascii")
