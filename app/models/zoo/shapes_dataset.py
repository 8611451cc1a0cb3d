"""Seeded synthetic "shapes" dataset with exact object masks.

Every sample shows one target shape (one of :data:`CLASSES`) at a random position,
scale, rotation and colour, drawn with a contrasting outline on top of a textured
background (gradient, value noise or stripes, plus pixel noise) that already carries a
few distractors (small irregular blobs, strokes and dots that are not class shapes).

The object is rasterised at 2x resolution and box-downsampled to a coverage map
``alpha`` in [0, 1]. The image is the alpha composite of the object over the
background, and the mask is defined as ``alpha >= 0.5``. Distractors are drawn *under*
the object, so the mask is exactly the set of visible object pixels (edge pixels with
less than half coverage are blended but not part of the mask).

All randomness comes from the ``numpy.random.Generator`` passed in, so the output is a
pure function of the generator state: the same seed gives byte-identical datasets.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

__all__ = [
    "CLASSES",
    "DEFAULT_MEAN",
    "DEFAULT_STD",
    "PairSample",
    "ShapeSample",
    "ShapesDataset",
    "generate_pair",
    "generate_sample",
    "make_dataset",
    "make_pairs",
    "shape_polygons",
    "to_tensor_batch",
]

logger = logging.getLogger(__name__)

CLASSES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "ring",
    "hexagon",
    "heart",
)

#: Normalisation used to train the shipped model: ``(x / 255 - mean) / std``.
DEFAULT_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
DEFAULT_STD: tuple[float, float, float] = (0.25, 0.25, 0.25)

_SS = 2  # supersampling factor used to rasterise the object

Polygon = np.ndarray  # (K, 2) float array of x, y vertices


@dataclass(frozen=True)
class ShapeSample:
    """One generated image with its exact object mask and class label.

    ``background`` is the image as it was before the object was composited (textured
    background and distractors); it is kept for testing and visualisation.
    """

    image: np.ndarray  # uint8, (H, W, 3)
    mask: np.ndarray  # bool, (H, W)
    label: int
    label_name: str
    background: np.ndarray | None = None  # uint8, (H, W, 3)


# --------------------------------------------------------------------------- shapes


def _regular(n: int, phase: float = -math.pi / 2) -> Polygon:
    t = phase + np.arange(n) * (2 * math.pi / n)
    return np.stack([np.cos(t), np.sin(t)], axis=1)


def _star(points: int = 5, inner: float = 0.45) -> Polygon:
    t = -math.pi / 2 + np.arange(2 * points) * (math.pi / points)
    r = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _cross(arm: float = 0.34) -> Polygon:
    a = arm
    pts = [
        (-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a),
        (a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a), (-a, -a),
    ]  # fmt: skip
    return np.asarray(pts, dtype=np.float64) * 0.95


def _heart(n: int = 72) -> Polygon:
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    pts = np.stack([x, y], axis=1)
    pts -= (pts.max(axis=0) + pts.min(axis=0)) / 2
    return pts / np.abs(pts).max()


def shape_polygons(name: str) -> list[Polygon]:
    """Unit-size outline(s) of a class shape, centred on the origin, radius ~1.

    Returns a list of polygons: the first is the outer boundary, any further ones are
    holes (only ``ring`` has one).
    """
    if name == "circle":
        return [_regular(64)]
    if name == "square":
        return [_regular(4, math.pi / 4) * 1.05]
    if name == "triangle":
        return [_regular(3) * 1.1 + np.array([0.0, 0.15])]
    if name == "star":
        return [_star()]
    if name == "cross":
        return [_cross()]
    if name == "ring":
        return [_regular(64), _regular(64) * 0.55]
    if name == "hexagon":
        return [_regular(6, 0.0)]
    if name == "heart":
        return [_heart()]
    raise ValueError(f"unknown shape {name!r}")


_UNIT_POLYGONS: dict[str, list[Polygon]] = {name: shape_polygons(name) for name in CLASSES}


def _transform(poly: Polygon, cx: float, cy: float, radius: float, angle: float) -> Polygon:
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    return poly @ rot.T * radius + np.array([cx, cy])


# ----------------------------------------------------------------------- background


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-coordinate grids ``(yy, xx)`` as float32 (cached, treat as read-only)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    yy.flags.writeable = False
    xx.flags.writeable = False
    return yy, xx


def _random_colour(rng: np.random.Generator, lo: float = 0.0, hi: float = 255.0) -> np.ndarray:
    return rng.uniform(lo, hi, size=3)


def _luma(colour: np.ndarray) -> float:
    return float(0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2])


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Textured float32 background (H, W, 3) in [0, 255] with moderate contrast."""
    kind = int(rng.integers(0, 3))
    base = _random_colour(rng, 40, 215)
    other = np.clip(base + rng.uniform(-70, 70, size=3), 0, 255)
    yy, xx = _grid(size)
    yy, xx = yy / size, xx / size
    if kind == 0:  # linear gradient
        theta = rng.uniform(0, 2 * math.pi)
        t = (xx - 0.5) * math.cos(theta) + (yy - 0.5) * math.sin(theta) + 0.5
        t = np.clip(t, 0, 1)[..., None]
    elif kind == 1:  # smooth value noise
        cells = int(rng.integers(3, 9))
        grid = rng.uniform(0, 1, size=(cells, cells)).astype(np.float32)
        img = Image.fromarray(grid, mode="F").resize((size, size), Image.Resampling.BICUBIC)
        t = np.clip(np.asarray(img), 0, 1)[..., None]
    else:  # stripes
        theta = rng.uniform(0, math.pi)
        period = rng.uniform(6, 24) / size
        phase = rng.uniform(0, 2 * math.pi)
        proj = xx * math.cos(theta) + yy * math.sin(theta)
        t = (0.5 + 0.5 * np.sin(2 * math.pi * proj / period + phase))[..., None]
    bg = base.astype(np.float32) * (1 - t) + other.astype(np.float32) * t
    sigma = np.float32(rng.uniform(2, 10))
    bg += sigma * rng.standard_normal(size=(size, size, 1), dtype=np.float32)
    bg += (sigma / 3) * rng.standard_normal(size=bg.shape, dtype=np.float32)
    return np.clip(bg, 0, 255, out=bg)


def _draw_distractors(rng: np.random.Generator, canvas: Image.Image, size: int) -> None:
    """Draw small blobs, strokes and dots that are not class shapes."""
    draw = ImageDraw.Draw(canvas)
    n = int(rng.integers(3, 9))
    for _ in range(n):
        kind = int(rng.integers(0, 3))
        colour = tuple(int(v) for v in _random_colour(rng))
        cx, cy = rng.uniform(0, size, size=2)
        if kind == 0:  # irregular blob, small
            k = int(rng.integers(5, 9))
            t = np.sort(rng.uniform(0, 2 * math.pi, size=k))
            r = rng.uniform(0.02, 0.07) * size * rng.uniform(0.4, 1.0, size=k)
            pts = np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)
            draw.polygon([tuple(p) for p in pts.tolist()], fill=colour)
        elif kind == 1:  # stroke: open polyline
            k = int(rng.integers(2, 5))
            steps = rng.normal(0, 0.12 * size, size=(k, 2))
            pts = np.cumsum(steps, axis=0) + np.array([cx, cy])
            width = int(rng.integers(1, 4))
            draw.line([tuple(p) for p in pts.tolist()], fill=colour, width=width)
        else:  # cluster of dots
            for _ in range(int(rng.integers(3, 8))):
                dx, dy = rng.normal(0, 0.05 * size, size=2)
                radius = rng.uniform(0.5, 1.8)
                box = [cx + dx - radius, cy + dy - radius, cx + dx + radius, cy + dy + radius]
                draw.ellipse(box, fill=colour)


# ----------------------------------------------------------------------------- object


def _rasterise(polys: list[Polygon], size: int, outline: float) -> tuple[np.ndarray, np.ndarray]:
    """Return (coverage, outline coverage) in [0, 1] at ``size`` for the given polygons.

    Polygons are in output-pixel coordinates; rasterisation happens at ``_SS``x and is
    box-downsampled. The outline band (``outline`` pixels wide, inside the shape) is the
    part of the object painted in the contrasting outline colour.
    """
    big = size * _SS
    label = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(label)
    width = max(1, round(outline * _SS))
    for i, poly in enumerate(polys):
        pts = [tuple(p) for p in (poly * _SS).tolist()]
        if i == 0:
            draw.polygon(pts, fill=128, outline=255, width=width)
        else:  # hole: clear it, then outline its edge (inside the hole area)
            draw.polygon(pts, fill=0, outline=255, width=width)
    arr = np.asarray(label)
    return _box_down(arr > 0), _box_down(arr == 255)


def _box_down(binary: np.ndarray) -> np.ndarray:
    """Fraction of set sub-pixels in each ``_SS`` x ``_SS`` block (float32)."""
    b = binary.view(np.uint8)
    total = np.zeros((b.shape[0] // _SS, b.shape[1] // _SS), dtype=np.uint8)
    for dy in range(_SS):
        for dx in range(_SS):
            total += b[dy::_SS, dx::_SS]
    return total.astype(np.float32) * np.float32(1.0 / (_SS * _SS))


def _pick_fill(rng: np.random.Generator, bg_mean: np.ndarray) -> np.ndarray:
    """A saturated colour whose luma or hue clearly differs from the local background."""
    for _ in range(20):
        colour = _random_colour(rng)
        if np.abs(colour - bg_mean).max() > 90 or abs(_luma(colour) - _luma(bg_mean)) > 60:
            return colour
    return np.where(bg_mean > 127, 20.0, 235.0)


def generate_sample(rng: np.random.Generator, image_size: int = 128) -> ShapeSample:
    """Generate one image of a random class shape with its exact binary mask.

    Args:
        rng: source of all randomness; the output is a pure function of its state.
        image_size: side of the square output image in pixels (>= 32).

    Returns:
        A :class:`ShapeSample`; ``mask`` is ``True`` exactly on object pixels whose
        (supersampled) coverage is at least 0.5.
    """
    if image_size < 32:
        raise ValueError("image_size must be >= 32")
    size = image_size
    label = int(rng.integers(0, len(CLASSES)))
    name = CLASSES[label]

    bg = _background(rng, size)
    canvas = Image.fromarray(bg.astype(np.uint8), mode="RGB")
    _draw_distractors(rng, canvas, size)
    background = np.asarray(canvas)

    radius = rng.uniform(0.2, 0.34) * size
    margin = radius * 1.3
    cx, cy = rng.uniform(margin, size - margin, size=2)
    image, mask = _draw_object(rng, background, name, cx, cy, radius)
    return ShapeSample(image=image, mask=mask, label=label, label_name=name, background=background)


def _draw_object(
    rng: np.random.Generator,
    background: np.ndarray,
    name: str,
    cx: float,
    cy: float,
    radius: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Composite one class shape centred on (cx, cy) over ``background``: (image, mask)."""
    size = background.shape[0]
    angle = rng.uniform(0, 2 * math.pi)
    aspect = rng.uniform(0.9, 1.1)
    polys = [p * np.array([aspect, 1 / aspect]) for p in _UNIT_POLYGONS[name]]
    polys = [_transform(p, cx, cy, radius, angle) for p in polys]
    outline_px = rng.uniform(1.0, 2.5) * size / 128
    coverage, edge = _rasterise(polys, size, outline_px)

    mask = coverage >= 0.5
    if not mask.any():  # cannot happen with the radius range above, but stay safe
        raise RuntimeError("generated an empty mask")
    bg_mean = background[mask].mean(axis=0).astype(np.float64)
    fill = _pick_fill(rng, bg_mean)
    line = np.full(3, 15.0) if _luma(fill) > 110 else np.full(3, 240.0)

    # Object appearance: fill colour with a soft shading gradient, outline band on top.
    yy, xx = _grid(size)
    theta = rng.uniform(0, 2 * math.pi)
    shade = ((xx - cx) * math.cos(theta) + (yy - cy) * math.sin(theta)) / (2 * radius)
    fg = fill + rng.uniform(10, 35) * shade[..., None]
    edge_frac = np.divide(edge, coverage, out=np.zeros_like(edge), where=coverage > 0)
    fg = fg * (1 - edge_frac[..., None]) + line * edge_frac[..., None]

    alpha = coverage[..., None]
    image = background.astype(np.float32) * (1 - alpha) + fg * alpha
    image = np.where(alpha > 0, np.clip(np.rint(image), 0, 255), background).astype(np.uint8)
    return image, mask


@dataclass(frozen=True)
class PairSample:
    """One image holding two shapes of different classes, with each one's exact mask."""

    image: np.ndarray  # uint8, (H, W, 3)
    masks: np.ndarray  # bool, (2, H, W), disjoint
    labels: tuple[int, int]


def generate_pair(rng: np.random.Generator, image_size: int = 128) -> PairSample:
    """Two shapes of two different classes, one in each half (left/right or top/bottom) of
    one textured background, smaller than in :func:`generate_sample` so that both fit."""
    if image_size < 64:
        raise ValueError("image_size must be >= 64")
    size = image_size
    first, second = (int(v) for v in rng.choice(len(CLASSES), size=2, replace=False))
    bg = _background(rng, size)
    canvas = Image.fromarray(bg.astype(np.uint8), mode="RGB")
    _draw_distractors(rng, canvas, size)
    image = np.asarray(canvas)
    vertical = bool(rng.integers(0, 2))
    masks = []
    for half, label in enumerate((first, second)):
        radius = rng.uniform(0.16, 0.2) * size
        margin = radius * 1.15
        along = rng.uniform(margin, size / 2 - margin) + half * size / 2
        across = rng.uniform(margin, size - margin)
        cx, cy = (across, along) if vertical else (along, across)
        image, mask = _draw_object(rng, image, CLASSES[label], cx, cy, radius)
        masks.append(mask)
    own = np.stack(masks)
    own[0] &= ~own[1]  # the second is drawn on top (the halves keep them apart anyway)
    return PairSample(image=image, masks=own, labels=(first, second))


def make_pairs(
    n: int, seed: int, image_size: int = 128
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` two-shape images from ``seed``: images (n, H, W, 3) uint8, masks (n, 2, H, W) bool,
    labels (n, 2) int64 (two different classes per image)."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    masks = np.empty((n, 2, image_size, image_size), dtype=bool)
    labels = np.empty((n, 2), dtype=np.int64)
    for i in range(n):
        sample = generate_pair(rng, image_size)
        images[i], masks[i], labels[i] = sample.image, sample.masks, sample.labels
    return images, masks, labels


def make_dataset(
    n: int, seed: int, image_size: int = 128
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Generate ``n`` samples deterministically from ``seed``.

    Returns:
        ``(images, masks, labels)`` with shapes ``(n, H, W, 3)`` uint8, ``(n, H, W)``
        bool and ``(n,)`` int64. The same ``(n, seed, image_size)`` always gives
        byte-identical arrays.
    """
    rng = np.random.default_rng(seed)
    images = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    masks = np.empty((n, image_size, image_size), dtype=bool)
    labels = np.empty(n, dtype=np.int64)
    for i in range(n):
        sample = generate_sample(rng, image_size)
        images[i] = sample.image
        masks[i] = sample.mask
        labels[i] = sample.label
    logger.debug("generated %d shape samples (seed=%d, size=%d)", n, seed, image_size)
    return images, masks, labels


def to_tensor_batch(
    images: np.ndarray,
    mean: tuple[float, ...] | list[float] = DEFAULT_MEAN,
    std: tuple[float, ...] | list[float] = DEFAULT_STD,
) -> torch.Tensor:
    """Convert uint8 images ``(N, H, W, 3)`` to a normalised float tensor ``(N, 3, H, W)``.

    Applies exactly the service preprocessing: ``(x / 255 - mean) / std``.
    """
    arr = np.ascontiguousarray(images)
    if not arr.flags.writeable:  # torch.from_numpy warns on read-only arrays
        arr = arr.copy()
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (x - m) / s


class ShapesDataset(Dataset[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    """In-memory torch ``Dataset`` over :func:`make_dataset`.

    Items are ``(image, label, mask)``: a normalised float tensor ``(3, H, W)``, an int64
    label and a bool mask tensor ``(H, W)``. The data is generated once at construction.
    """

    def __init__(
        self,
        n: int,
        seed: int,
        image_size: int = 128,
        mean: tuple[float, ...] = DEFAULT_MEAN,
        std: tuple[float, ...] = DEFAULT_STD,
    ) -> None:
        self.images, self.masks, self.labels = make_dataset(n, seed, image_size)
        self.mean = mean
        self.std = std

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image = to_tensor_batch(self.images[index : index + 1], self.mean, self.std)[0]
        label = torch.tensor(self.labels[index], dtype=torch.int64)
        return image, label, torch.from_numpy(self.masks[index].copy())
