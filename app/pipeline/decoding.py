"""Phase 1 of a request: uploads -> upright images and the model's input tensors.

Opening and checking an upload (format, pixels, aspect ratio), applying its EXIF orientation,
converting it to RGB and preprocessing it for a model all live here."""

from __future__ import annotations

import io
import logging
import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from app.errors import ImageTooLarge, InvalidImage, UnsupportedMediaType, clip
from app.models.manifest import ModelSpec

logger = logging.getLogger(__name__)

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
#: Pillow's names for JPEGs. MPO is a JPEG with more pictures after the first (phones and
#: cameras write depth maps and HDR gain maps there); its first picture is the photo.
JPEG_FORMATS = ("JPEG", "MPO")
#: Most scans a JPEG may have. Each scan of a progressive JPEG is a pass over the blocks of the
#: whole image, whatever the draft scale; an encoder writes about 10 (libjpeg's progression),
#: a few more per picture of an MPO. Counted as the SOS marker's bytes anywhere in the file,
#: which can only overcount.
MAX_JPEG_SCANS = 100
#: Most chunks a PNG may have. Pillow reads each one in Python (about 11 us a chunk, to open
#: and again to decode); an encoder writes a few and its pixels in 8 to 64 KiB chunks (65536 of
#: 8 KiB hold 512 MiB).
MAX_PNG_CHUNKS = 65536
#: Most marker segments a JPEG's header may have before its first scan. Pillow reads them (and
#: any 0xFF fill byte between them) one at a time in Python; an encoder writes about ten, a
#: camera a few more (EXIF, ICC profile and XMP pieces of 64 KiB).
MAX_JPEG_MARKERS = 1000
#: Most bytes a JPEG's header may have between its marker segments (0xFF fill, or junk), which
#: Pillow skips a byte at a time in Python (about 1 us each).
MAX_JPEG_STRAY_BYTES = 65536
#: Most blocks (extensions and their sub-blocks) a GIF may have before its first frame, which
#: Pillow reads one at a time in Python; an encoder writes a few (a loop count, a comment).
MAX_GIF_BLOCKS = 65536
#: A marker: fill bytes, then its code (0xFF 0x00 is no marker).
_NOT_FILL = re.compile(rb"[^\xff]")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
#: Longest side / shortest side beyond which an upload is refused: past it the model's square crop
#: sees under 1 % of the image, and the answer's pictures would be a line of pixels.
MAX_ASPECT_RATIO = 100

# Pillow's own bomb guard (Image.MAX_IMAGE_PIXELS, process-wide) warns past its limit and refuses
# past twice it, at open. The service's limit (CAMSERVE_MAX_IMAGE_PIXELS, checked right after the
# open, before any pixel is decoded) is the one that counts: ``open_image`` raises Pillow's to it
# where it is lower (it refused a 200M-pixel image that a 300M setting allows), and its warnings,
# for sizes that the service's check refuses or allows, are not logged.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
#: Peak bytes of memory per decoded pixel while an image of this mode is decoded and converted
#: to RGB (Pillow keeps RGB in 4 bytes a pixel; transparency is composited on a second RGBA
#: canvas; 16-bit and float images go through a float32 array). Measured with RSS at 9 MP.
PEAK_BYTES_PER_PIXEL = {"1": 6, "L": 6, "P": 6, "RGB": 8, "YCbCr": 8, "CMYK": 8, "LAB": 8}
#: For every other mode (RGBA, LA, PA, P with transparency, I, I;16, F, ...).
WORST_BYTES_PER_PIXEL = 16


@dataclass(frozen=True)
class Box:
    """Where the model's input crop lies in the original image, in original pixels."""

    left: float
    top: float
    right: float
    bottom: float


def shown(filename: str) -> str:
    """A filename as error messages show it: cut to a few dozen characters."""
    return clip(filename or "upload")


def decode_image(data: bytes, filename: str, max_pixels: int) -> Image.Image:
    """Bytes -> upright RGB image; raises InvalidImage, UnsupportedMediaType or ImageTooLarge."""
    return load_image(open_image(data, filename, max_pixels), filename)


def open_image(data: bytes, filename: str, max_pixels: int) -> Image.Image:
    """Read the header only: the format and size are checked before any pixel is decoded."""
    name = shown(filename)
    if not data:
        raise InvalidImage(f"{name}: the file is empty; attach the image's bytes.")
    # Before Pillow's open, which reads every chunk or marker before the pixels in Python.
    signature = _signature(data)
    if signature == "PNG" and _png_chunks(data, MAX_PNG_CHUNKS) > MAX_PNG_CHUNKS:
        raise InvalidImage(
            f"{name}: the PNG has over {MAX_PNG_CHUNKS} chunks (an encoder writes a few, and its "
            "pixels in chunks of kilobytes); re-encode it."
        )
    if signature == "GIF" and _gif_blocks(data) > MAX_GIF_BLOCKS:
        raise InvalidImage(
            f"{name}: the GIF has over {MAX_GIF_BLOCKS} blocks before its first frame (an "
            "encoder writes a few); re-encode it."
        )
    markers, stray = _jpeg_header(data) if signature == "JPEG" else (0, 0)
    if markers > MAX_JPEG_MARKERS or stray > MAX_JPEG_STRAY_BYTES:
        raise InvalidImage(
            f"{name}: the JPEG has over {MAX_JPEG_MARKERS} marker segments or "
            f"{MAX_JPEG_STRAY_BYTES} stray bytes between them before its pixels (an encoder "
            "writes about ten segments, and no stray bytes); re-encode it."
        )
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels  # only ever raised: a request's limit holds below
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        if signature is None:
            raise UnsupportedMediaType(
                f"{name}: not a recognised image; send {', '.join(ACCEPTED_FORMATS)}."
            ) from None
        raise _corrupt_header(name, signature) from None
    except Image.DecompressionBombError:
        raise ImageTooLarge(
            f"{name}: the image declares far more pixels than the {max_pixels} allowed "
            "(CAMSERVE_MAX_IMAGE_PIXELS); downscale it."
        ) from None
    except Exception:
        raise _corrupt_header(name, signature) from None
    if image.format not in ACCEPTED_FORMATS and image.format not in JPEG_FORMATS:
        raise UnsupportedMediaType(
            f"{name}: {image.format} images are not supported; send {', '.join(ACCEPTED_FORMATS)}."
        )
    if image.format in JPEG_FORMATS and data.count(b"\xff\xda") > MAX_JPEG_SCANS:
        raise InvalidImage(
            f"{name}: the JPEG has over {MAX_JPEG_SCANS} scans, each a pass over the whole image "
            "(an encoder writes about 10); re-encode it."
        )
    width, height = image.size
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise InvalidImage(
            f"{name}: {width}x{height} is a degenerate aspect ratio (over {MAX_ASPECT_RATIO}:1); "
            "crop or pad the image to a shape the model can see."
        )
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"{name}: {width}x{height} = {width * height} pixels is over the limit of "
            f"{max_pixels} (CAMSERVE_MAX_IMAGE_PIXELS); downscale the image."
        )
    return image


#: The first bytes of the accepted formats (WebP's and BMP's are checked in ``_signature``).
_SIGNATURES = {
    "PNG": (b"\x89PNG\r\n\x1a\n",),
    "JPEG": (b"\xff\xd8\xff",),
    "GIF": (b"GIF87a", b"GIF89a"),
    "TIFF": (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"),
}


def _signature(data: bytes) -> str | None:
    """The accepted format whose signature ``data`` starts with, if any: Pillow cannot tell a
    damaged header from an unknown format, and a cut PNG is not a format to refuse."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:2] == b"BM" and data[6:10] == bytes(4):  # "BM", the file's size, 4 reserved zeros
        return "BMP"
    return next((fmt for fmt, starts in _SIGNATURES.items() if data.startswith(starts)), None)


def _png_chunks(data: bytes, most: int) -> int:
    """The chunks of a PNG up to its IEND (or its end), counted up to ``most + 1``: their
    lengths only, a step a chunk."""
    position, count = 8, 0
    while position + 8 <= len(data) and count <= most:
        count += 1
        if data[position + 4 : position + 8] == b"IEND":
            break
        position += 12 + int.from_bytes(data[position : position + 4], "big")
    return count


def _gif_blocks(data: bytes) -> int:
    """The extension blocks and sub-blocks of a GIF before its first frame, counted up to
    ``MAX_GIF_BLOCKS + 1``: a step a block."""
    flags = data[10] if len(data) > 10 else 0
    position = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)  # after the colour table
    count = 0
    while count <= MAX_GIF_BLOCKS and data[position : position + 1] == b"!":
        position += 2  # the introducer and the extension's label
        while count <= MAX_GIF_BLOCKS and position < len(data):
            count += 1
            size = data[position]
            position += 1 + size
            if not size:  # the block terminator
                break
    return count


def _jpeg_header(data: bytes) -> tuple[int, int]:
    """The marker segments of a JPEG before its first scan (counted to ``MAX_JPEG_MARKERS +
    1``), and the bytes between them that are not a marker's own two: a search a segment."""
    position = 2
    count = stray = 0
    while count <= MAX_JPEG_MARKERS:
        # Past the stray bytes still allowed, the answer is known: no need to look further.
        window = min(len(data), position + MAX_JPEG_STRAY_BYTES - stray + 2)
        marker = _next_marker(data, position, window)
        if marker is None:
            stray += window - position
            break
        code, end = marker
        stray += end - 2 - position
        if code in (0xDA, 0xD9):  # the first scan, or the end of the image
            break
        count += 1
        position = end
        if not (code == 0x01 or 0xD0 <= code <= 0xD7):  # those stand alone, without a length
            position += int.from_bytes(data[position : position + 2], "big")
    return count, stray


def _next_marker(data: bytes, position: int, end: int) -> tuple[int, int] | None:
    """The next marker between ``position`` and ``end``: its code and where it ends (after the
    code); None when there is none. A marker is a run of 0xFF fill bytes, then a code that is
    neither 0xFF nor 0x00 (0xFF 0x00 is a stuffed byte). Linear in the bytes read: each run is
    skipped once (a regex of a run then a code backtracked through every run that ends in
    0x00: 32 KB of 0xFF took 10 s, and 10 MB would take hours)."""
    while (start := data.find(b"\xff", position, end)) >= 0:
        after = _NOT_FILL.search(data, start, end)
        if after is None:
            return None
        if data[after.start()] != 0x00:
            return data[after.start()], after.end()
        position = after.end()
    return None


def _corrupt_header(name: str, signature: str | None) -> InvalidImage:
    return InvalidImage(
        f"{name}: the {signature or 'image'} header is truncated or corrupt; upload the "
        "complete file."
    )


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation tag of an image (1 when absent or unreadable). For a JPEG Pillow
    read it with the header; for a PNG it decodes the pixels first (call ``load_image`` before,
    so that a damaged one is refused rather than read again)."""
    try:
        return int(image.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception:  # an unreadable EXIF block is ignored by load_image as well
        return 1


def original_size(
    opened: Image.Image, stored: tuple[int, int], image: Image.Image
) -> tuple[int, int]:
    """(width, height) of an upload itself, upright: ``opened`` (``stored`` is its size as
    opened) once ``load_image`` made it the upright ``image``.

    That is ``image``'s size, unless a JPEG draft decoded it smaller: then the stored size,
    turned by the EXIF orientation. Never read before the pixels: Pillow reports a TIFF's size
    upright already (turning it again drew its pictures squashed), and it reads a PNG's EXIF by
    decoding the pixels (whose failure was swallowed there, and the second decode returned the
    image half black)."""
    if opened.size == stored:
        return image.size
    return upright(stored, exif_orientation(opened))


def upright(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    """(width, height) ``size`` as stored, once EXIF ``orientation`` is applied: 5 to 8 turn
    the image a quarter, swapping its sides."""
    width, height = size
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def load_image(image: Image.Image, filename: str) -> Image.Image:
    """Decode an opened image (at the scale a JPEG draft chose) -> upright 8-bit RGB."""
    name = shown(filename)
    try:
        image.load()
    except Exception:
        raise InvalidImage(
            f"{name}: the image data is truncated or corrupt; upload the complete file."
        ) from None
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a malformed EXIF block is no reason to refuse the pixels
        logger.debug("%s: ignoring unreadable EXIF orientation", name)
    try:
        return to_rgb(image)
    except Exception:
        raise UnsupportedMediaType(
            f"{name}: images in mode {image.mode} are not supported; save it as 8-bit RGB."
        ) from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB; transparency is composited on white."""
    if image.mode in _SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        image = Image.fromarray(_to_uint8(np.asarray(image)), "L")
    if image.mode == "RGB":
        return image
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return image.convert("RGB")


def _to_uint8(array: np.ndarray) -> np.ndarray:
    # float32, in place: a float64 copy and its temporaries took 44 bytes a pixel at 9 MP.
    values = array.astype(np.float32)
    if array.dtype.kind == "f":
        low, high = float(values.min()), float(values.max())
        if high > low:
            values -= low
            values *= np.float32(255 / (high - low))
        else:
            values[...] = 0
    elif values.max(initial=0) <= 255:
        pass
    elif values.max() <= 65535:
        values /= np.float32(257.0)
    else:
        values *= np.float32(255 / float(values.max()))
    np.rint(values, out=values)
    np.clip(values, 0, 255, out=values)
    return values.astype(np.uint8)


def preprocess_image(image: Image.Image, spec: ModelSpec) -> tuple[torch.Tensor, Box]:
    """Resize (shorter side), centre-crop and normalise one image: (C, H, W) and the crop box."""
    crop_h, crop_w = spec.crop
    width, height = image.size
    scale = max(spec.resize / min(width, height), crop_h / height, crop_w / width)
    new_w, new_h = max(crop_w, round(width * scale)), max(crop_h, round(height * scale))
    left, top = round((new_w - crop_w) / 2), round((new_h - crop_h) / 2)
    sx, sy = new_w / width, new_h / height
    box = Box(left / sx, top / sy, (left + crop_w) / sx, (top + crop_h) / sy)
    # Resampling only the crop's source region gives the pixels of resize-then-crop (to one level
    # of rounding) without resizing what the crop throws away: 33 ms instead of 54 ms at 12 MP.
    cropped = image.resize(
        (crop_w, crop_h),
        Image.Resampling[spec.interpolation.upper()],
        box=(box.left, box.top, box.right, box.bottom),
    )
    if spec.input_shape[0] == 1:
        cropped = cropped.convert("L")
    array = np.asarray(cropped, dtype=np.float32)
    if array.ndim == 2:
        array = array[:, :, None]
    # numpy, not torch: torch's elementwise ops would start an OpenMP team in this decode thread
    # whose spinning workers slow the model's forward in the pass thread (measured on 2 cores).
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    normalised = ((array / np.float32(255.0) - mean) / std).transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(normalised)), box


@dataclass(frozen=True)
class Upload:
    """One uploaded file, already read and size-checked."""

    filename: str
    data: bytes


@dataclass(frozen=True)
class DecodedImage:
    """An upload ready for the model and for drawing its pictures."""

    filename: str
    image: Image.Image
    """Upright RGB; a large JPEG is decoded at a reduced scale (``image.size`` says which)."""
    original_size: tuple[int, int]
    """(width, height) of the upload itself, upright."""
    tensor: torch.Tensor
    """The normalised model input, (C, H, W)."""
    box: Box
    """Where the model's crop lies in ``image``, in its pixels."""
    pixels: torch.Tensor | None = None
    """``image`` as uint8 (3, H, W) on the device lane's device, where a lane decoded it there
    (``app.pipeline.lanes``); None on the CPU lane."""


def decode_upload(
    upload: Upload, spec: ModelSpec, max_pixels: int, picture_side: int | None
) -> DecodedImage:
    """Decode and preprocess one upload.

    ``picture_side`` is the longest side the answer's pictures need (``None``: the full image;
    0: none). A JPEG much larger than what the model and the pictures need is decoded at 1/2, 1/4
    or 1/8 scale by the decoder itself (Pillow's ``draft``), which is what makes a 12 MP photo
    cheap; other formats are decoded whole.
    """
    opened = open_image(upload.data, upload.filename, max_pixels)
    stored = opened.size
    _draft(opened, spec, picture_side)
    image = load_image(opened, upload.filename)
    tensor, box = preprocess_image(image, spec)
    return DecodedImage(upload.filename, image, original_size(opened, stored, image), tensor, box)


def _draft(opened: Image.Image, spec: ModelSpec, picture_side: int | None) -> None:
    """Have a large JPEG decoded at the smallest scale the model and the pictures need. Its size
    as stored serves: the scale depends on the shorter and the longer side only, which a
    rotation keeps (and Pillow reads a PNG's EXIF by decoding the whole image)."""
    if opened.format in JPEG_FORMATS and picture_side is not None:
        width, height = opened.size
        scale = _needed_scale((width, height), spec, picture_side)
        if scale <= 0.5:
            opened.draft(None, (math.ceil(width * scale), math.ceil(height * scale)))


@dataclass(frozen=True)
class DecodeCost:
    """What decoding some uploads will take, read from their headers."""

    pixels: int
    """Pixels decoded (a JPEG's at its draft scale)."""
    bytes: int
    """Peak memory of decoding them, held until the request's answer is ready."""
    sizes: tuple[tuple[int, int], ...] = ()
    """(width, height) of each upload as stored (a rotation keeps the area the pictures take)."""

    def __add__(self, other: DecodeCost) -> DecodeCost:
        return DecodeCost(
            self.pixels + other.pixels, self.bytes + other.bytes, self.sizes + other.sizes
        )


def decode_cost(
    uploads: Sequence[Upload], spec: ModelSpec, max_pixels: int, picture_side: int | None
) -> DecodeCost:
    """Open each upload's header (the per-image checks of ``open_image`` included) and add up
    the pixels and memory its decoding will take; no pixel is decoded."""
    pixels = peak = 0
    sizes = []
    for upload in uploads:
        opened = open_image(upload.data, upload.filename, max_pixels)
        sizes.append(opened.size)
        _draft(opened, spec, picture_side)
        width, height = opened.size
        has_alpha = "transparency" in opened.info
        per_pixel = (
            WORST_BYTES_PER_PIXEL
            if has_alpha
            else PEAK_BYTES_PER_PIXEL.get(opened.mode, WORST_BYTES_PER_PIXEL)
        )
        pixels += width * height
        peak += width * height * per_pixel
    return DecodeCost(pixels, peak, tuple(sizes))


def stack_inputs(decoded: list[DecodedImage]) -> torch.Tensor:
    """The model inputs of a request as one (N, C, H, W) batch (stacked by numpy: no torch
    thread pool is started outside the pass thread)."""
    return torch.from_numpy(np.stack([d.tensor.numpy() for d in decoded]))


# Pictures may be drawn from a decode up to this much smaller than their size (a 4000-px photo
# decoded at 1/4 to 1000 px for a 1024-px overlay): invisible there, and 2x faster than 1/2.
_PICTURE_UPSCALE = 1.25


def _needed_scale(size: tuple[int, int], spec: ModelSpec, picture_side: int) -> float:
    """The smallest fraction of the upload's size that still serves the model and the pictures.

    The model's input is never upscaled from a reduced decode: its need is exact."""
    shortest, longest = min(size), max(size)
    for_model = max(spec.resize, *spec.crop) / shortest
    for_pictures = picture_side / longest / _PICTURE_UPSCALE
    return max(for_model, for_pictures)
