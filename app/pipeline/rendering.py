"""Phase 3 of a request: explanation maps -> the outputs the client asked for.

The render stage has a budget and a pool of its own: ``RenderBudget`` prices a request's drawing
at admission (maps, and pixels drawn: images x methods x maps x pictures x area), and
``draw_maps`` draws on the render threads one picture at a time, so a cancel (the deadline, the
drain, a cancelled job) stops it after the picture being drawn.

Every output kind (``overlay``, ``heatmap``, ``raw``) is declared once in ``OUTPUT_KINDS``; the
checks, the route's help text and the response schema derive from it. Pictures are drawn at the
size ``size`` asks for, straight from the map at the layer's resolution: one resize, 8-bit levels,
a 256-entry colour table and one blend.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property, partial
from typing import Any, Final, Literal, Protocol

import torch
from PIL import Image
from pydantic import BaseModel, Field

from app.cam import blend, colormap_lut, mask_levels, normalize_maps, palette_image
from app.errors import InvalidParameter, OverBudget
from app.pipeline.budget import FairThreads
from app.pipeline.decoding import DecodedImage

logger = logging.getLogger(__name__)

DEFAULT_ALPHA = 0.5
DEFAULT_COLORMAP = "jet"
# Overlays are photos under a colour map: JPEG (q90, 4:4:4) encodes them ~30x faster than PNG at a
# fifth of the size, 44 dB PSNR (bench/results/output_formats.md). png stays one field away.
DEFAULT_IMAGE_FORMAT: Final = "jpeg"
MIN_SIDE, MAX_SIDE = 16, 4096
_SIDE_RE = re.compile(r"^\d{1,6}$")
_ALPHA_FORMATS = ("png", "webp")


OUTPUT_FORMATS = {
    "png": ("PNG", "image/png"),
    "jpeg": ("JPEG", "image/jpeg"),
    "webp": ("WEBP", "image/webp"),
}
#: The longest side a format can encode (WebP stores 14 bits of it, JPEG 16); PNG has room.
MAX_FORMAT_SIDE = {"webp": 16383, "jpeg": 65535}


class RawMap(BaseModel):
    shape: list[int] = Field(
        description="[h, w] of the map at the layer's resolution (the input's for the guided "
        "methods)"
    )
    normalized: bool
    values: list[list[float]]


@dataclass(frozen=True)
class PictureSize:
    """The ``size`` field: ``original``, ``input`` (the model's crop) or a longest side.

    ``upscale`` is False for the default (``CAMSERVE_MAX_OUTPUT_SIDE``), which only ever scales
    large uploads down; an explicit side is the exact longest side of the pictures."""

    kind: Literal["original", "input", "side"]
    side: int = 0
    upscale: bool = True

    @classmethod
    def parse(cls, value: str | None, default_side: int) -> PictureSize:
        """Read the form value; ``None`` or empty gives the default. InvalidParameter if bad."""
        text = (value or "").strip().lower()
        if not text:
            return cls("side", default_side, upscale=False)
        if text in ("original", "input"):
            return cls("original" if text == "original" else "input")
        if _SIDE_RE.match(text) and MIN_SIDE <= int(text) <= MAX_SIDE:
            return cls("side", int(text))
        raise InvalidParameter(
            f"size must be 'original', 'input' or a longest side in pixels from {MIN_SIDE} to "
            f"{MAX_SIDE}; got {(value or '')[:40]!r}.",
            details={"allowed": ["original", "input", f"{MIN_SIDE}..{MAX_SIDE}"]},
        )

    @property
    def decode_side(self) -> int | None:
        """The longest side the pictures need from the upload (None: all of it)."""
        if self.kind == "original":
            return None
        return 0 if self.kind == "input" else self.side

    def canvas_size(self, original: tuple[int, int], crop: tuple[int, int]) -> tuple[int, int]:
        """(width, height) of the pictures for an upload of size ``original``."""
        if self.kind == "input":
            return crop[1], crop[0]
        width, height = original
        longest = max(width, height)
        if self.kind == "original" or (not self.upscale and longest <= self.side):
            return width, height
        scale = self.side / longest
        return max(1, round(width * scale)), max(1, round(height * scale))


@dataclass(frozen=True)
class RenderStyle:
    """How the maps of one request are drawn."""

    outputs: tuple[str, ...] = ("overlay",)
    colormap: str = DEFAULT_COLORMAP
    alpha: float = DEFAULT_ALPHA
    image_format: str = DEFAULT_IMAGE_FORMAT
    size: PictureSize = field(default_factory=lambda: PictureSize("side", 1024, upscale=False))

    @property
    def draws_pictures(self) -> bool:
        return draws_pictures(self.outputs)

    @classmethod
    def of(cls, params: Any, max_output_side: int) -> RenderStyle:
        """The style a request's parameters ask for (``ExplainParams`` or a task's view of it):
        each output once, in order; ``size`` read against ``CAMSERVE_MAX_OUTPUT_SIDE``."""
        return cls(
            outputs=tuple(dict.fromkeys(params.outputs)),
            colormap=params.colormap,
            alpha=params.alpha,
            image_format=params.image_format,
            size=PictureSize.parse(params.size, max_output_side),
        )


@dataclass(frozen=True)
class Canvas:
    """The upload at the pictures' size, and where the model's crop (the map) lies on it."""

    picture: Image.Image
    region: tuple[int, int, int, int]
    """(left, top, right, bottom) in the picture's pixels."""

    @property
    def covers_all(self) -> bool:
        return self.region == (0, 0, *self.picture.size)

    @classmethod
    def build(cls, decoded: DecodedImage, size: PictureSize, crop: tuple[int, int]) -> Canvas:
        box = decoded.box
        width, height = size.canvas_size(decoded.original_size, crop)
        if size.kind == "input":
            picture = decoded.image.resize(
                (width, height),
                Image.Resampling.BILINEAR,
                box=(box.left, box.top, box.right, box.bottom),
            )
            return cls(picture, (0, 0, width, height))
        picture = decoded.image
        if picture.size != (width, height):
            picture = picture.resize((width, height), Image.Resampling.BILINEAR, reducing_gap=3.0)
        sx, sy = width / decoded.image.width, height / decoded.image.height
        left, top = max(0, round(box.left * sx)), max(0, round(box.top * sy))
        right, bottom = min(width, round(box.right * sx)), min(height, round(box.bottom * sy))
        return cls(picture, (left, top, max(right, left + 1), max(bottom, top + 1)))


@dataclass
class MapJob:
    """One map of one image, with what every output kind needs to draw it."""

    cam: torch.Tensor
    normalized: bool
    canvas: Canvas | None
    style: RenderStyle

    @cached_property
    def palette(self) -> Image.Image:
        """The map over the canvas's region as a palette image (shared by every picture)."""
        assert self.canvas is not None
        left, top, right, bottom = self.canvas.region
        cam = self.cam if self.normalized else normalize_maps(self.cam[None])[0]
        return palette_image(mask_levels(cam, (right - left, bottom - top)), self.style.colormap)

    @cached_property
    def colored(self) -> Image.Image:
        """The coloured map over the canvas's region, RGB."""
        return self.palette.convert("RGB")

    def encode(self, picture: Image.Image) -> str:
        return to_base64(encode_image(picture, self.style.image_format))


#: Pixels blended at once: the blend's float32 arrays of a whole 4096-px picture took 40 bytes a
#: pixel and 7 s; in bands of this size they fit the allocator's reused blocks (0.9 s, same bytes).
_BLEND_BAND_PIXELS = 128 * 1024


def _blend_in_bands(picture: Image.Image, colored: Image.Image, alpha: float) -> Image.Image:
    """``blend`` of two RGB images of one size, a band of rows at a time."""
    width, height = picture.size
    rows = max(1, _BLEND_BAND_PIXELS // width)
    if rows >= height:
        return blend(picture, colored, alpha)
    mixed = Image.new("RGB", picture.size)
    for top in range(0, height, rows):
        box = (0, top, width, min(height, top + rows))
        mixed.paste(blend(picture.crop(box), colored.crop(box), alpha), box[:2])
    return mixed


def _render_overlay(job: MapJob) -> str:
    canvas = job.canvas
    assert canvas is not None
    if canvas.covers_all:
        return job.encode(_blend_in_bands(canvas.picture, job.colored, job.style.alpha))
    # Outside the model's crop there is no map: the picture shows the plain image there.
    picture = canvas.picture.copy()
    inside = _blend_in_bands(canvas.picture.crop(canvas.region), job.colored, job.style.alpha)
    picture.paste(inside, canvas.region[:2])
    return job.encode(picture)


def _render_heatmap(job: MapJob) -> str:
    canvas = job.canvas
    assert canvas is not None
    if canvas.covers_all:
        # A palette PNG is lossless and about 5x faster to encode than RGB.
        return job.encode(job.palette if job.style.image_format == "png" else job.colored)
    # Outside the crop there is no map: transparent where the format has alpha, else the
    # colour map's zero.
    if job.style.image_format in _ALPHA_FORMATS:
        picture = Image.new("RGBA", canvas.picture.size, (0, 0, 0, 0))
    else:
        picture = Image.new("RGB", canvas.picture.size, tuple(colormap_lut(job.style.colormap)[:3]))
    picture.paste(job.colored, canvas.region[:2])
    return job.encode(picture)


def _render_raw(job: MapJob) -> RawMap:
    return RawMap(shape=list(job.cam.shape), normalized=job.normalized, values=job.cam.tolist())


@dataclass(frozen=True)
class OutputKind:
    """One thing the client may ask for with ``output``."""

    name: str
    description: str
    picture: bool
    """Drawn as an image: takes ``colormap``, ``alpha``, ``image_format`` and ``size``."""
    value_type: Any
    render: Callable[[MapJob], Any]


OUTPUT_KINDS: dict[str, OutputKind] = {
    kind.name: kind
    for kind in (
        OutputKind(
            "overlay",
            "base64 image: the map coloured and blended over the upload, at the `size` asked for; "
            "outside the model's crop the upload shows plain",
            picture=True,
            value_type=str,
            render=_render_overlay,
        ),
        OutputKind(
            "heatmap",
            "base64 image: the coloured map alone at the `size` asked for; outside the model's "
            "crop transparent (png, webp) or the colour map's zero (jpeg)",
            picture=True,
            value_type=str,
            render=_render_heatmap,
        ),
        OutputKind(
            "raw",
            "the map's values at the layer's resolution (the input's for GuidedBackprop and "
            "GuidedGradCAM)",
            picture=False,
            value_type=RawMap,
            render=_render_raw,
        ),
    )
}


def draws_pictures(outputs: Sequence[str]) -> bool:
    """Whether any of these (known) output kinds is drawn as an image."""
    return any(OUTPUT_KINDS[name].picture for name in outputs)


@dataclass(frozen=True)
class NamedMap:
    """The maps of one layer (or of the fusion) for every image of a request."""

    layer: str
    kind: Literal["layer", "fused", "concept"]
    cams: torch.Tensor
    """(N, h, w) on the CPU."""
    normalized: bool


def _map_fields(named: NamedMap, canvas: Canvas | None) -> dict[str, Any]:
    return {
        "layer": named.layer,
        "kind": named.kind,
        "width": canvas.picture.width if canvas else None,
        "height": canvas.picture.height if canvas else None,
        "region": list(canvas.region) if canvas else None,
    }


class Painter(Protocol):
    """Draws pictures where a device lane decoded the image (``app.pipeline.lanes``)."""

    def canvas(self, decoded: DecodedImage, size: PictureSize, crop: tuple[int, int]) -> Any:
        """The image's canvas on the lane's device; None: Pillow draws this image."""
        ...

    def render(
        self, name: str, cam: torch.Tensor, normalized: bool, canvas: Any, style: RenderStyle
    ) -> str:
        """Output kind ``name`` (a picture) of one map, base64."""
        ...


def _painted_fields(named: NamedMap, canvas: Any) -> dict[str, Any]:
    width, height = canvas.size
    return {
        "layer": named.layer,
        "kind": named.kind,
        "width": width,
        "height": height,
        "region": list(canvas.region),
    }


def render_image(
    decoded: DecodedImage,
    index: int,
    maps: Sequence[NamedMap],
    style: RenderStyle,
    crop: tuple[int, int],
) -> list[dict[str, Any]]:
    """The outputs of every map of image ``index``, as the fields of ``MapOutput``, in one go
    (``draw_maps`` is the same drawing in steps)."""
    canvas = Canvas.build(decoded, style.size, crop) if style.draws_pictures else None
    rendered = []
    for named in maps:
        job = MapJob(named.cams[index], named.normalized, canvas, style)
        fields = _map_fields(named, canvas)
        for name in style.outputs:
            fields[name] = OUTPUT_KINDS[name].render(job)
        rendered.append(fields)
    return rendered


async def draw_maps(
    threads: FairThreads,
    decoded: Sequence[DecodedImage],
    maps: Sequence[Sequence[NamedMap]],
    style: RenderStyle,
    crop: tuple[int, int],
    painter: Painter | None = None,
) -> list[list[list[dict[str, Any]]]]:
    """[image][group][map] -> the fields of ``MapOutput``, for each group of maps (a method's).

    Every canvas and every output of every map is one step on ``threads``, in its turn among
    clients: a cancel waits for the step that runs (one picture at most), never for the rest of
    the drawing, and another client's picture waits for one of this request's at most. ``painter``:
    the device lane's, which draws the images it decoded."""
    drawn = []
    for index, image in enumerate(decoded):
        if painter is not None and style.draws_pictures:
            painted = await threads.run(partial(painter.canvas, image, style.size, crop))
            if painted is not None:
                drawn.append(await _paint(threads, painter, painted, index, maps, style))
                continue
        canvas = (
            await threads.run(partial(Canvas.build, image, style.size, crop))
            if style.draws_pictures
            else None
        )
        per_group = []
        for group in maps:
            rendered = []
            for named in group:
                job = MapJob(named.cams[index], named.normalized, canvas, style)
                fields = _map_fields(named, canvas)
                for name in style.outputs:
                    fields[name] = await threads.run(partial(OUTPUT_KINDS[name].render, job))
                rendered.append(fields)
            per_group.append(rendered)
        drawn.append(per_group)
    return drawn


async def _paint(
    threads: FairThreads,
    painter: Painter,
    canvas: Any,
    index: int,
    maps: Sequence[Sequence[NamedMap]],
    style: RenderStyle,
) -> list[list[dict[str, Any]]]:
    """``draw_maps`` of one image on a device lane's canvas, one picture a step."""
    per_group = []
    for group in maps:
        rendered = []
        for named in group:
            fields = _painted_fields(named, canvas)
            for name in style.outputs:
                kind = OUTPUT_KINDS[name]
                if kind.picture:
                    fields[name] = await threads.run(
                        partial(
                            painter.render, name, named.cams[index], named.normalized, canvas, style
                        )
                    )
                else:
                    fields[name] = kind.render(
                        MapJob(named.cams[index], named.normalized, None, style)
                    )
            rendered.append(fields)
        per_group.append(rendered)
    return per_group


#: Peak bytes of memory per pixel of the picture being drawn: its canvas (RGB), the map resized
#: to it (float, then levels), the map's palette and RGB images, the blend and the encoder's
#: buffer. bench/render_memory.py measured 13 (a heatmap) to 18 (a JPEG overlay) at 4096 px.
WORKING_BYTES_PER_PIXEL = 20
#: Bytes of the answer's base64 text per pixel drawn, at most: PNG may not compress (3 bytes, 4
#: in base64); JPEG q90 4:4:4 and WebP stay under half of that even on noise (measured on smooth
#: maps: 0.7 to 1.1 for PNG, 0.1 to 0.2 for JPEG).
ANSWER_BYTES_PER_PIXEL = {"png": 4.0, "jpeg": 2.0, "webp": 2.0}


@dataclass(frozen=True)
class RenderCost:
    """What drawing a request's outputs takes, priced before any pixel is decoded."""

    maps: int = 0
    """Maps drawn or sent raw: images x methods x classes x maps per method."""
    pixels: int = 0
    """Pixels drawn: for each image, methods x maps x pictures x its pictures' area."""
    largest_side: int = 0
    """The longest side of any picture."""
    bytes: int = 0
    """Memory the drawing holds at its peak: the largest picture's working set, and the
    answer's pictures."""

    def __add__(self, other: RenderCost) -> RenderCost:
        return RenderCost(
            self.maps + other.maps,
            self.pixels + other.pixels,
            max(self.largest_side, other.largest_side),
            self.bytes + other.bytes,
        )


def render_cost(
    sizes: Sequence[tuple[int, int]],
    maps_per_image: int,
    style: RenderStyle,
    crop: tuple[int, int],
) -> RenderCost:
    """The cost of drawing ``maps_per_image`` maps (all methods together) for uploads of these
    (width, height)s in ``style``."""
    pictures = sum(1 for name in style.outputs if OUTPUT_KINDS[name].picture)
    pixels = largest = largest_area = 0
    if pictures:
        for size in sizes:
            width, height = style.size.canvas_size(size, crop)
            pixels += maps_per_image * pictures * width * height
            largest = max(largest, width, height)
            largest_area = max(largest_area, width * height)
    limit = MAX_FORMAT_SIDE.get(style.image_format)
    if limit is not None and largest > limit:
        raise InvalidParameter(
            f"image_format={style.image_format}: {style.image_format} pictures are at most "
            f"{limit} px on a side, and this request's largest would be {largest} px; ask for "
            "a smaller size or image_format=png.",
            details={"parameter": "image_format", "largest_side": largest, "limit": limit},
        )
    memory = WORKING_BYTES_PER_PIXEL * largest_area
    memory += int(ANSWER_BYTES_PER_PIXEL.get(style.image_format, 4.0) * pixels)
    return RenderCost(len(sizes) * maps_per_image, pixels, largest, memory)


@dataclass(frozen=True)
class RenderBudget:
    """The most one request may have drawn (``CAMSERVE_MAX_RENDER_PIXELS`` and ``_MAPS``), and
    the memory all drawing may hold at once (``CAMSERVE_RENDER_BUDGET_BYTES``)."""

    max_pixels: int
    max_maps: int
    max_bytes: int | None = None

    def check(self, cost: RenderCost) -> None:
        """OverBudget (422) naming the numbers and how to fit, when ``cost`` is over."""
        if cost.maps > self.max_maps:
            raise OverBudget(
                f"This request would draw {cost.maps} maps (images x methods x classes x maps "
                f"per method); the limit is {self.max_maps} (CAMSERVE_MAX_RENDER_MAPS). Send "
                "fewer images, methods, classes or target layers.",
                details={"maps": cost.maps, "limit": self.max_maps},
            )
        if cost.pixels > self.max_pixels:
            raise OverBudget(
                f"This request would draw {cost.pixels} pixels (images x methods x classes x "
                f"maps x pictures x each picture's area; its largest picture is "
                f"{cost.largest_side} px "
                f"on its longest side); the limit is {self.max_pixels} "
                "(CAMSERVE_MAX_RENDER_PIXELS). Ask for a smaller size, fewer target layers, "
                "methods or images, or fewer outputs (overlay or heatmap, not both; raw draws "
                "nothing).",
                details={
                    "pixels": cost.pixels,
                    "limit": self.max_pixels,
                    "largest_side": cost.largest_side,
                },
            )
        if self.max_bytes is not None and cost.bytes > self.max_bytes:
            raise OverBudget(
                f"Drawing this request would take about {cost.bytes} bytes of memory (its "
                f"largest picture is {cost.largest_side} px on its longest side), over the "
                f"{self.max_bytes} all drawing may hold at once (CAMSERVE_RENDER_BUDGET_BYTES). "
                "Ask for a smaller size or image_format=jpeg.",
                details={"bytes": cost.bytes, "limit": self.max_bytes},
            )


#: How much nicer (Linux ``nice``) a heavy drawing's thread is than the service's others.
HEAVY_NICENESS = 10


def lower_thread_priority(niceness: int = HEAVY_NICENESS) -> None:
    """Makes the calling thread ``niceness`` nicer, where the platform allows it per thread
    (Linux): a thread pool's initializer for the heavy drawings, so that a 4096-px picture
    takes the CPU the small requests leave instead of sharing it evenly with them."""
    try:
        thread = threading.get_native_id()
        current = os.getpriority(os.PRIO_PROCESS, thread)
        os.setpriority(os.PRIO_PROCESS, thread, min(19, current + niceness))
    except (AttributeError, OSError):  # no per-thread priority here: the thread stays as it is
        logger.debug("the heavy drawing thread keeps its priority", exc_info=True)


def encode_image(image: Image.Image, image_format: str) -> bytes:
    """Encode as png, jpeg or webp, with the settings bench/output_formats.py chose."""
    pil_format, _ = OUTPUT_FORMATS[image_format]
    buffer = io.BytesIO()
    if pil_format == "PNG" and image.mode == "P":
        # A palette heatmap: 1 byte a pixel, lossless, about 5x faster than RGB at level 3.
        image.save(buffer, format="PNG", compress_level=3)
    elif pil_format == "PNG":
        # Huffman-only deflate: 0.4x the time of level 3 on overlays at 0.9x the size.
        image.save(buffer, format="PNG", compress_level=1, compress_type=2)
    elif pil_format == "JPEG":
        # 4:4:4: chroma subsampling smears the saturated colours of a colour map.
        image.convert("RGB").save(buffer, format="JPEG", quality=90, subsampling=0)
    else:
        image.convert("RGB").save(buffer, format=pil_format, quality=90)
    return buffer.getvalue()


#: Bytes encoded to base64 at once (a multiple of 3, so the pieces join into one encoding):
#: about a millisecond, after which another thread may take the GIL. One call over a 14 MB
#: picture held it for 25 ms, and every request on the event loop waited.
_BASE64_PIECE = 3 << 18


def to_base64(data: bytes) -> str:
    if len(data) <= _BASE64_PIECE:
        return base64.b64encode(data).decode("ascii")
    view = memoryview(data)
    return "".join(
        base64.b64encode(view[start : start + _BASE64_PIECE]).decode("ascii")
        for start in range(0, len(data), _BASE64_PIECE)
    )
