"""Decoding uploads: opening and checking images, converting them to RGB, large JPEGs decoded at
reduced scale, and the model input that stays exact."""

from __future__ import annotations

import io
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from app.errors import ImageTooLarge, InvalidImage, UnsupportedMediaType
from app.models.manifest import parse_manifest
from app.pipeline.decoding import (
    MAX_GIF_BLOCKS,
    MAX_JPEG_MARKERS,
    MAX_JPEG_SCANS,
    MAX_JPEG_STRAY_BYTES,
    MAX_PNG_CHUNKS,
    Upload,
    decode_cost,
    decode_image,
    decode_upload,
    open_image,
    preprocess_image,
    to_rgb,
)
from app.pipeline.tasks.common import decode_whole
from tests.conftest import image_bytes
from tests.fixtures_models import fixture_access

LIMIT = 10_000_000
SHAPES = Path(__file__).resolve().parents[2] / "model_store" / "shapes"


def _jpeg(size: tuple[int, int], **save: object) -> bytes:
    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    small.resize(size, Image.Resampling.BICUBIC).save(buffer, format="JPEG", quality=90, **save)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def spec():  # type: ignore[no-untyped-def]
    return parse_manifest(SHAPES)  # resize 128, crop 128


def test_large_jpeg_decodes_at_reduced_scale(spec) -> None:  # type: ignore[no-untyped-def]
    decoded = decode_upload(Upload("big.jpg", _jpeg((4000, 3000))), spec, 10**8, 1024)
    assert decoded.original_size == (4000, 3000)
    assert decoded.image.size == (1000, 750)  # 1/4: enough for a 1024-px picture (<= 1.25x)
    assert tuple(decoded.tensor.shape) == (3, 128, 128)
    # The crop box is in the reduced image's pixels: about the centred 750x750 square (the
    # crop is rounded to whole pixels of the 171x128 resized image).
    assert abs(decoded.box.left - 125) < 6 and abs(decoded.box.right - decoded.box.left - 750) < 2


def test_the_model_input_never_comes_from_too_small_a_decode(spec) -> None:  # type: ignore[no-untyped-def]
    decoded = decode_upload(Upload("big.jpg", _jpeg((4000, 3000))), spec, 10**8, 0)
    assert min(decoded.image.size) >= 128
    full = Image.open(io.BytesIO(_jpeg((4000, 3000)))).convert("RGB")
    exact, _ = preprocess_image(full, spec)
    # A DCT-scaled decode differs from a full decode + resize by a little, not by a lot.
    assert float((decoded.tensor - exact).abs().mean()) < 0.05


def test_original_size_decodes_the_whole_image(spec) -> None:  # type: ignore[no-untyped-def]
    decoded = decode_upload(Upload("big.jpg", _jpeg((4000, 3000))), spec, 10**8, None)
    assert decoded.image.size == (4000, 3000)


def test_small_and_non_jpeg_uploads_decode_whole(spec) -> None:  # type: ignore[no-untyped-def]
    assert decode_upload(Upload("s.jpg", _jpeg((640, 480))), spec, 10**8, 1024).image.size == (
        640,
        480,
    )
    buffer = io.BytesIO()
    Image.new("RGB", (3000, 2000)).save(buffer, format="PNG")
    png = decode_upload(Upload("p.png", buffer.getvalue()), spec, 10**8, 1024)
    assert png.image.size == (3000, 2000)


def test_rotated_jpeg_reports_its_upright_size(spec) -> None:  # type: ignore[no-untyped-def]
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    data = _jpeg((4000, 3000), exif=exif.tobytes())
    decoded = decode_upload(Upload("r.jpg", data), spec, 10**8, 1024)
    assert decoded.original_size == (3000, 4000)
    assert decoded.image.size == (750, 1000)


# Opening, checking and converting uploads.
def encode(image: Image.Image, fmt: str = "PNG", **save: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def test_rgb_png_roundtrip() -> None:
    data = image_bytes((40, 32))
    image = decode_image(data, "a.png", LIMIT)
    assert image.mode == "RGB" and image.size == (40, 32)
    assert np.array_equal(np.asarray(image), np.asarray(Image.open(io.BytesIO(data))))


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "1", "LA"])
def test_modes_become_rgb(mode: str) -> None:
    fmt = "TIFF" if mode == "CMYK" else "PNG"
    image = decode_image(image_bytes((20, 10), mode=mode, fmt=fmt), "x", LIMIT)
    assert image.mode == "RGB" and image.size == (20, 10)


def test_grayscale_keeps_values() -> None:
    gray = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16), "L")
    image = decode_image(encode(gray), "g.png", LIMIT)
    assert np.array_equal(np.asarray(image)[..., 0], np.asarray(gray))


def test_rgba_is_composited_on_white() -> None:
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    image = decode_image(encode(rgba), "t.png", LIMIT)
    assert image.getpixel((0, 0)) == (255, 0, 0)
    assert image.getpixel((1, 1)) == (255, 255, 255)


def test_palette_transparency_is_composited_on_white() -> None:
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 0, 255, 0])
    palette.putpixel((1, 0), 1)
    data = encode(palette, transparency=0)
    assert decode_image(data, "p.png", LIMIT).getpixel((0, 0)) == (255, 255, 255)
    assert decode_image(data, "p.png", LIMIT).getpixel((1, 0)) == (0, 255, 0)


def test_sixteen_bit_is_scaled_to_eight() -> None:
    values = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    sixteen = Image.fromarray(values)
    assert sixteen.mode == "I;16"
    image = decode_image(encode(sixteen), "16.png", LIMIT)
    assert np.asarray(image)[0, :, 0].tolist() == [0, 100, 255]


def test_float_images_are_scaled() -> None:
    image = to_rgb(Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "F"))
    assert np.asarray(image)[0, :, 0].tolist() == [0, 128, 255]


def test_exif_orientation_is_applied() -> None:
    upright = Image.open(io.BytesIO(image_bytes((30, 20))))
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a rotated camera writes
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    image = decode_image(encode(stored, "PNG", exif=exif), "r.png", LIMIT)
    assert image.size == (30, 20)
    assert np.array_equal(np.asarray(image), np.asarray(upright.convert("RGB")))


def test_empty_file() -> None:
    with pytest.raises(InvalidImage, match="empty"):
        decode_image(b"", "e.png", LIMIT)


def test_not_an_image() -> None:
    with pytest.raises(UnsupportedMediaType, match="not a recognised image"):
        decode_image(b"hello, world" * 10, "t.txt", LIMIT)


def test_unsupported_format() -> None:
    data = encode(Image.new("RGB", (4, 4)), "PPM")
    with pytest.raises(UnsupportedMediaType, match="PPM images are not supported"):
        decode_image(data, "x.ppm", LIMIT)


def test_truncated() -> None:
    data = image_bytes((64, 64), fmt="JPEG")
    with pytest.raises(InvalidImage, match="truncated"):
        decode_image(data[: len(data) // 2], "t.jpg", LIMIT)


def test_too_many_pixels_is_refused_before_decoding() -> None:
    data = encode(Image.new("L", (4000, 4000)))  # compresses to a few KB
    assert len(data) < 100_000
    with pytest.raises(ImageTooLarge, match="16000000 pixels"):
        decode_image(data, "bomb.png", 1_000_000)


def test_preprocess_resizes_and_crops(store) -> None:  # type: ignore[no-untyped-def]
    spec = parse_manifest(store / "tiny", access=fixture_access(store))  # resize 32, crop 32
    wide = Image.new("RGB", (80, 40), (255, 255, 255))
    prepared = [preprocess_image(image, spec) for image in (wide, Image.new("RGB", (32, 32)))]
    batch = torch.stack([tensor for tensor, _ in prepared])
    boxes = [box for _, box in prepared]
    assert batch.shape == (2, 3, 32, 32)
    assert torch.allclose(batch[0], torch.full((3, 32, 32), 2.0))  # (1 - 0.5) / 0.25
    assert boxes[0].left == pytest.approx(20) and boxes[0].right == pytest.approx(60)
    assert (boxes[0].top, boxes[0].bottom) == (0, 40)
    assert (boxes[1].left, boxes[1].top, boxes[1].right, boxes[1].bottom) == (0, 0, 32, 32)


@pytest.mark.parametrize("cut", [8, 30, 100, 1000])
@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"])
def test_any_damage_is_a_client_error(fmt: str, cut: int) -> None:
    data = image_bytes((48, 40), fmt=fmt)
    for damaged in (data[:cut], data[:cut] + bytes(64), bytes(reversed(data[:cut])) + data[cut:]):
        try:
            decode_image(damaged, "d", LIMIT)
        except (InvalidImage, UnsupportedMediaType):
            pass  # anything else (a crash) fails the test


def _flat(size: tuple[int, int], mode: str = "RGB", fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format=fmt)
    return buffer.getvalue()


def test_the_decode_cost_comes_from_the_headers_by_mode() -> None:
    spec = parse_manifest(SHAPES)
    uploads = [
        Upload("rgb.png", _flat((300, 200))),
        Upload("l.png", _flat((100, 100), "L")),
        Upload("rgba.png", _flat((100, 100), "RGBA")),
    ]
    cost = decode_cost(uploads, spec, LIMIT, picture_side=None)
    assert cost.pixels == 300 * 200 + 2 * 100 * 100
    assert cost.bytes == 300 * 200 * 8 + 100 * 100 * 6 + 100 * 100 * 16
    with pytest.raises(ImageTooLarge, match="CAMSERVE_MAX_IMAGE_PIXELS"):
        decode_cost(uploads, spec, 300 * 200 - 1, picture_side=None)


def test_a_large_jpeg_costs_what_its_reduced_decode_takes() -> None:
    spec = parse_manifest(SHAPES)
    photo = Upload("photo.jpg", _jpeg((4000, 3000)))
    small = decode_cost([photo], spec, 20_000_000, picture_side=0)
    full = decode_cost([photo], spec, 20_000_000, picture_side=None)
    assert full.pixels == 4000 * 3000
    assert small.pixels <= 4000 * 3000 // 16  # decoded at 1/4 or 1/8
    decoded = decode_upload(photo, spec, 20_000_000, picture_side=0)
    assert decoded.image.size[0] * decoded.image.size[1] == small.pixels


def test_a_long_filename_is_clipped_in_errors() -> None:
    with pytest.raises(UnsupportedMediaType) as caught:
        decode_image(b"not an image", "x" * 1000, LIMIT)
    assert len(caught.value.message) < 200 and "1000 characters" in caught.value.message


def test_the_decode_cost_decodes_no_pixel(monkeypatch: pytest.MonkeyPatch) -> None:
    loaded: list[str] = []
    real = ImageFile.ImageFile.load

    def spy(self: ImageFile.ImageFile) -> object:
        loaded.append(self.format or "")
        return real(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    spec = parse_manifest(SHAPES)
    uploads = [Upload("a.png", _flat((300, 200))), Upload("b.jpg", _jpeg((400, 300)))]
    decode_cost(uploads, spec, LIMIT, picture_side=None)
    assert loaded == []


def _damaged_png() -> bytes:
    """A PNG whose compressed pixels are damaged halfway through: zlib stops there."""
    data = bytearray(image_bytes((300, 200)))
    middle = len(data) // 2
    data[middle : middle + 50] = bytes(255 - b for b in data[middle : middle + 50])
    return bytes(data)


def test_damaged_pixels_are_refused_on_every_decode_path() -> None:
    # Reading a PNG's EXIF decodes its pixels: the orientation was read first, its failed decode
    # swallowed, and the second decode returned the image with its lower half black.
    spec = parse_manifest(SHAPES)
    segmenter = parse_manifest(SHAPES.parent / "shapes-segment")
    damaged = _damaged_png()
    for decode in (
        lambda: decode_image(damaged, "d.png", LIMIT),
        lambda: decode_upload(Upload("d.png", damaged), spec, LIMIT, 1024),
        lambda: decode_whole(Upload("d.png", damaged), segmenter, LIMIT),
    ):
        with pytest.raises(InvalidImage, match="truncated or corrupt"):
            decode()


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "TIFF"])
def test_the_original_size_is_upright_in_every_format(fmt: str, orientation: int) -> None:
    # Pillow opens a TIFF at its upright size already: turning that size again reported 80x60
    # for an upright 60x80 image, and drew its pictures squashed to 80x60.
    spec = parse_manifest(SHAPES)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = image_bytes((80, 60), fmt=fmt, exif=exif.tobytes())
    upright = (60, 80) if orientation in (6, 8) else (80, 60)
    decoded = decode_upload(Upload(f"r.{fmt.lower()}", data), spec, LIMIT, 1024)
    assert decoded.image.size == upright
    assert decoded.original_size == upright
    segmenter = parse_manifest(SHAPES.parent / "shapes-segment")
    assert decode_whole(Upload("r", data), segmenter, LIMIT).original_size == upright


def _mpo(size: tuple[int, int]) -> bytes:
    """A multi-picture JPEG (what phones write with a depth map or an HDR gain map after the
    photo): Pillow opens it as format MPO."""
    first = Image.open(io.BytesIO(_jpeg(size)))
    buffer = io.BytesIO()
    first.save(buffer, format="MPO", save_all=True, append_images=[Image.new("RGB", (64, 48))])
    return buffer.getvalue()


def test_a_multi_picture_jpeg_is_decoded_as_its_first_picture(spec) -> None:  # type: ignore[no-untyped-def]
    # It was refused with 415 "MPO images are not supported; send ... JPEG".
    data = _mpo((4000, 3000))
    assert Image.open(io.BytesIO(data)).format == "MPO"
    decoded = decode_upload(Upload("photo.jpg", data), spec, 10**8, 1024)
    assert decoded.original_size == (4000, 3000)
    assert decoded.image.size == (1000, 750)  # at the draft scale, as a JPEG
    cost = decode_cost([Upload("photo.jpg", data)], spec, 10**8, 1024)
    assert cost.pixels == 1000 * 750


def _progressive(scans: int) -> bytes:
    """A progressive JPEG whose last scan is repeated until it has ``scans`` scans (libjpeg
    warns of a bogus progression and decodes each one over the whole image)."""
    data = _jpeg((64, 48), progressive=True)
    last = data[data.rindex(b"\xff\xda") : -2]  # the last scan, up to the end-of-image marker
    extra = scans - data.count(b"\xff\xda")
    return data[:-2] + last * extra + data[-2:]


def test_a_jpeg_of_too_many_scans_is_refused_from_its_bytes() -> None:
    # Each scan is a pass over every block of the image: a 1.1 MB file of 20,000 scans of a
    # 6000x6000 image (under the pixel limit) took 55 s of a core to decode, and a 10 MB one
    # would take minutes, past any deadline, on a decode thread that nothing can stop.
    assert decode_image(_progressive(MAX_JPEG_SCANS), "ok.jpg", LIMIT).size == (64, 48)
    with pytest.raises(InvalidImage, match=f"over {MAX_JPEG_SCANS} scans"):
        decode_image(_progressive(MAX_JPEG_SCANS + 1), "scans.jpg", LIMIT)
    with pytest.raises(InvalidImage, match="scans"):
        decode_cost([Upload("scans.jpg", _progressive(1000))], parse_manifest(SHAPES), LIMIT, 0)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"])
def test_a_truncated_header_is_corrupt_not_unsupported(fmt: str) -> None:
    # Pillow cannot tell a damaged header from an unknown format: a PNG, GIF or TIFF cut in
    # its header was refused with 415 "not a recognised image; send PNG, JPEG, ...".
    data = image_bytes((48, 40), fmt=fmt)
    for cut in range(12, 60):
        with pytest.raises(InvalidImage, match="truncated or corrupt"):
            decode_image(data[:cut], "cut", LIMIT)
    with pytest.raises(InvalidImage, match=f"the {fmt} header is truncated or corrupt"):
        decode_image(data[:12], "cut", LIMIT)


def test_an_image_of_no_pixels_is_corrupt() -> None:
    empty = _flat((1, 1)).replace(b"IHDR\x00\x00\x00\x01", b"IHDR\x00\x00\x00\x00", 1)
    with pytest.raises(InvalidImage, match="the PNG header is truncated or corrupt"):
        decode_image(empty, "0x1.png", LIMIT)


def _png_of_chunks(chunks: int) -> bytes:
    """A 4x4 PNG with ``chunks`` empty private chunks before its pixels."""
    data = _flat((4, 4))
    private = b"\x00\x00\x00\x00abCd" + zlib.crc32(b"abCd").to_bytes(4, "big")
    header = 8 + 25  # the signature and IHDR
    return data[:header] + private * (chunks - 3) + data[header:]


def test_a_png_of_too_many_chunks_is_refused_from_its_bytes() -> None:
    # Pillow reads each chunk in Python: a 10 MB PNG of 833,000 empty chunks (a 64x64 image)
    # took 9 s to open, at admission and again to decode: 19 s of a core for one file.
    assert decode_image(_png_of_chunks(MAX_PNG_CHUNKS), "ok.png", LIMIT).size == (4, 4)
    with pytest.raises(InvalidImage, match=f"over {MAX_PNG_CHUNKS} chunks"):
        decode_image(_png_of_chunks(MAX_PNG_CHUNKS + 1), "chunks.png", LIMIT)


def test_a_jpeg_header_of_too_many_markers_is_refused_from_its_bytes() -> None:
    # Pillow reads a JPEG's header a marker (and a fill byte) at a time in Python: a 10 MB JPEG
    # of 2.5 million empty comments took 6.7 s to open, one of 10 million 0xFF fill bytes 11 s,
    # at admission and again to decode.
    data = _jpeg((64, 48))
    comment = b"\xff\xfe\x00\x02"
    fill = b"\xff" * (MAX_JPEG_STRAY_BYTES // 2)
    junk = b"\x00" * (MAX_JPEG_STRAY_BYTES // 2)
    fine = data[:2] + comment * (MAX_JPEG_MARKERS - 10) + fill + junk + data[2:]
    assert decode_image(fine, "ok.jpg", LIMIT).size == (64, 48)
    for bad in (
        data[:2] + comment * MAX_JPEG_MARKERS + data[2:],
        data[:2] + b"\xff" * (MAX_JPEG_STRAY_BYTES + 2) + data[2:],
        data[:2] + comment + b"\x00" * (MAX_JPEG_STRAY_BYTES + 1) + data[2:],
    ):
        with pytest.raises(InvalidImage, match=f"over {MAX_JPEG_MARKERS} marker segments"):
            decode_image(bad, "markers.jpg", LIMIT)


@pytest.mark.parametrize("run", [MAX_JPEG_STRAY_BYTES // 2, 2_000_000])
def test_a_run_of_fill_bytes_is_read_once(run: int) -> None:
    """The header's scan found a marker with a regex (a run of 0xFF, then a code) that went back
    through every run ending in 0x00: 32 KB of 0xFF then 0x00 took 10 s, and this test's 2 MB
    run would take most of an hour. Each run is read once now; the long one is refused, and the
    short one costs no more than the bytes it has."""
    data = _jpeg((64, 48))
    fill = data[:2] + b"\xff" * run + b"\x00" + data[2:]
    if run > MAX_JPEG_STRAY_BYTES:
        with pytest.raises(InvalidImage, match="stray bytes"):
            decode_image(fill, "fill.jpg", LIMIT)
    else:
        assert decode_image(fill, "fill.jpg", LIMIT).size == (64, 48)


def _gif_with_blocks(blocks: int) -> bytes:
    """A 4x4 GIF with a comment of ``blocks`` one-byte sub-blocks before its first frame."""
    data = encode(Image.new("P", (4, 4)), "GIF")
    flags = data[10]
    start = 13 + (3 * 2 ** ((flags & 7) + 1) if flags & 0x80 else 0)
    return data[:start] + b"!\xfe" + b"\x01x" * blocks + b"\x00" + data[start:]


def test_a_gif_of_too_many_blocks_before_its_frame_is_refused_from_its_bytes() -> None:
    # Pillow reads a GIF's blocks before its first frame in Python: a 10 MB GIF of 5 million
    # one-byte comment blocks took 2.3 s to open, at admission and again to decode.
    assert decode_image(_gif_with_blocks(MAX_GIF_BLOCKS - 1), "ok.gif", LIMIT).size == (4, 4)
    with pytest.raises(InvalidImage, match=f"over {MAX_GIF_BLOCKS} blocks"):
        decode_image(_gif_with_blocks(MAX_GIF_BLOCKS), "blocks.gif", LIMIT)


def _png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` (its pixels are never read)."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    header = b"IHDR" + width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes(data[24:29])
    data[12:29] = header
    data[29:33] = zlib.crc32(header).to_bytes(4, "big")
    return bytes(data)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # pytest resets filters
def test_the_services_pixel_limit_holds_past_pillows_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pillow refuses an image of over twice its MAX_IMAGE_PIXELS (about 179M) at open, so a
    CAMSERVE_MAX_IMAGE_PIXELS of 300M still refused a 225M-pixel upload, in Pillow's words.
    The service's limit is the one that counts now, in its own words, above or below Pillow's."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 89_478_485)  # Pillow's default, restored after
    opened = open_image(_png_declaring(15_000, 15_000), "wide.png", 300_000_000)
    assert opened.size == (15_000, 15_000)  # the header only: nothing decoded
    with pytest.raises(ImageTooLarge, match=r"= 361000000 pixels is over the limit of 300000000"):
        open_image(_png_declaring(19_000, 19_000), "wider.png", 300_000_000)
    with pytest.raises(ImageTooLarge, match="CAMSERVE_MAX_IMAGE_PIXELS"):
        open_image(_png_declaring(15_000, 15_000), "wide.png", 40_000_000)
    with pytest.raises(ImageTooLarge, match="the 40000000 allowed .CAMSERVE_MAX_IMAGE_PIXELS"):
        open_image(_png_declaring(30_000, 30_000), "huge.png", 40_000_000)  # past Pillow's 2x
