"""Paths, bytes, PIL images and arrays as uploads; the image files of a folder."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from camserve.images import as_upload, find_images


def decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def test_every_kind_of_image_becomes_the_same_pixels(tmp_path: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    path = tmp_path / "x.png"
    Image.fromarray(pixels).save(path)
    for image in (path, str(path), path.read_bytes(), Image.open(path), pixels):
        name, data = as_upload(image)
        assert np.array_equal(decoded(data), pixels), type(image)
    assert as_upload(path)[0] == "x.png" and as_upload(b"..", "y.png")[0] == "y.png"


def test_float_arrays_in_0_1_are_scaled_and_bad_arrays_refused() -> None:
    _, data = as_upload(np.full((2, 3), 0.5))
    assert decoded(data).tolist() == [[128] * 3] * 2
    with pytest.raises(ValueError, match=r"\(H, W\), \(H, W, 3\) or \(H, W, 4\)"):
        as_upload(np.zeros((2, 3, 5), dtype=np.uint8))
    with pytest.raises(ValueError, match="uint8 or floats"):
        as_upload(np.zeros((2, 3), dtype=np.int64))


@pytest.mark.parametrize(
    ("value", "problem"),
    [(np.nan, "NaN or infinity"), (np.inf, "NaN or infinity"), (1.5, "to 1.5"), (-0.5, "-0.5")],
)
def test_float_arrays_outside_0_1_are_refused_not_clipped(value: float, problem: str) -> None:
    array = np.random.default_rng(0).random((32, 32, 3))
    array[3, 4, 1] = value
    with pytest.raises(ValueError, match=r"floats holds values in \[0, 1\]") as raised:
        as_upload(array)
    assert problem in str(raised.value)
    array[3, 4, 1], array[0, 0, 0] = 1.0, 0.0  # the edges themselves are fine
    _, data = as_upload(array)
    assert decoded(data).shape == (32, 32, 3)


def test_a_folder_gives_its_image_files_sorted(tmp_path: Path) -> None:
    for name in ("b.PNG", "a.jpg", "notes.txt", "c.webp"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub").mkdir()
    assert [p.name for p in find_images([tmp_path])] == ["a.jpg", "b.PNG", "c.webp"]
    assert find_images([tmp_path / "notes.txt"]) == [tmp_path / "notes.txt"]
