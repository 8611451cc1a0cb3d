"""Colour maps for heatmaps, computed here so that no plotting library is needed.

Each map turns values in [0, 1] into RGB in [0, 1]. ``jet``, ``hot``, ``cool`` and ``gray`` are
piecewise-linear by definition; ``viridis``, ``inferno`` and ``turbo`` are interpolated from
anchor colours sampled along the published maps (close to, not identical with, matplotlib's).
"""

from __future__ import annotations

from functools import cache

import numpy as np

_ANCHORS: dict[str, list[tuple[float, float, float]]] = {
    "viridis": [
        (0.267, 0.005, 0.329),
        (0.283, 0.141, 0.458),
        (0.254, 0.265, 0.530),
        (0.207, 0.372, 0.553),
        (0.164, 0.471, 0.558),
        (0.128, 0.567, 0.551),
        (0.135, 0.659, 0.518),
        (0.267, 0.749, 0.441),
        (0.478, 0.821, 0.318),
        (0.741, 0.873, 0.150),
        (0.993, 0.906, 0.144),
    ],
    "inferno": [
        (0.001, 0.000, 0.014),
        (0.087, 0.045, 0.225),
        (0.258, 0.039, 0.406),
        (0.416, 0.090, 0.433),
        (0.578, 0.148, 0.404),
        (0.735, 0.216, 0.330),
        (0.865, 0.317, 0.226),
        (0.954, 0.469, 0.098),
        (0.988, 0.645, 0.040),
        (0.964, 0.843, 0.273),
        (0.988, 0.998, 0.645),
    ],
    "turbo": [
        (0.190, 0.072, 0.232),
        (0.275, 0.405, 0.859),
        (0.158, 0.683, 0.937),
        (0.096, 0.897, 0.711),
        (0.394, 0.992, 0.365),
        (0.718, 0.965, 0.210),
        (0.951, 0.789, 0.228),
        (0.991, 0.527, 0.144),
        (0.859, 0.255, 0.031),
        (0.634, 0.085, 0.008),
        (0.480, 0.016, 0.011),
    ],
}


def _jet(v: np.ndarray) -> np.ndarray:
    r = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return np.stack([r, g, b], axis=-1)


def _hot(v: np.ndarray) -> np.ndarray:
    r = np.clip(v * 3, 0, 1)
    g = np.clip(v * 3 - 1, 0, 1)
    b = np.clip(v * 3 - 2, 0, 1)
    return np.stack([r, g, b], axis=-1)


def _cool(v: np.ndarray) -> np.ndarray:
    return np.stack([v, 1 - v, np.ones_like(v)], axis=-1)


def _gray(v: np.ndarray) -> np.ndarray:
    return np.stack([v, v, v], axis=-1)


_FUNCTIONS = {"jet": _jet, "hot": _hot, "cool": _cool, "gray": _gray}

COLORMAPS: tuple[str, ...] = tuple(sorted([*_FUNCTIONS, *_ANCHORS]))


def apply_colormap(values: np.ndarray, name: str = "jet") -> np.ndarray:
    """Map an array of values in [0, 1] to uint8 RGB (shape ``values.shape + (3,)``)."""
    v = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float32)), 0.0, 1.0)
    if name in _FUNCTIONS:
        rgb = _FUNCTIONS[name](v)
    elif name in _ANCHORS:
        anchors = np.asarray(_ANCHORS[name], dtype=np.float32)
        positions = np.linspace(0.0, 1.0, len(anchors))
        rgb = np.stack([np.interp(v, positions, anchors[:, c]) for c in range(3)], axis=-1)
    else:
        raise ValueError(f"Unknown colormap {name!r}; choose one of {list(COLORMAPS)}.")
    return np.round(rgb * 255).astype(np.uint8)


@cache
def colormap_lut(name: str = "jet") -> bytes:
    """The colour map sampled at the 256 levels ``i / 255``: a 768-byte RGB palette.

    Colouring a uint8 map through this table gives ``apply_colormap(level / 255)`` exactly, at the
    cost of one table look-up per pixel. An unknown name raises apply_colormap's ValueError."""
    return apply_colormap(np.arange(256, dtype=np.float32) / 255.0, name).tobytes()
