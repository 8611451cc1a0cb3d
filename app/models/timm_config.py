"""timm's side of a manifest: whether timm has the architecture, and the preprocessing of its
pretrained config. It names no manifest type, so that the manifest can read it (and
``timm_models``, which builds the models, can read the manifest)."""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

INSTALL = "pip install 'camserve[timm]'"


class TimmError(ValueError):
    """timm is missing, or has no such model or no pretrained config; the message says which."""


def import_timm(name: str) -> ModuleType:
    """timm, once it is known to have the architecture ``name``."""
    try:
        import timm
    except ImportError:
        raise TimmError(
            f"architecture 'timm:{name}' needs the timm package, which is not installed; "
            f"install it with {INSTALL}"
        ) from None
    if not timm.is_model(name):
        from app.cam import close_matches

        close = close_matches(name, timm.list_models())
        raise TimmError(
            f"timm has no model {name!r}"
            + (f"; did you mean {', '.join(close)}?" if close else "")
            + " (any name of timm.list_models() works)"
        )
    return timm


def pretrained_preprocess(name: str) -> dict[str, Any]:
    """The preprocessing of the model's pretrained config, as a ``[preprocess]`` table would
    give it: input size, interpolation, crop percentage (the resize is the crop over it), mean
    and std."""
    import_timm(name)
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None:
        raise TimmError(
            f"timm's {name!r} has no pretrained config to take the preprocessing from; "
            "add a [preprocess] table"
        )
    channels, height, width = (int(v) for v in cfg.input_size)
    crop_pct = float(cfg.crop_pct or 1.0)
    return {
        "input_shape": [channels, height, width],
        "resize": max(math.floor(min(height, width) / crop_pct), min(height, width)),
        "mean": [float(v) for v in cfg.mean],
        "std": [float(v) for v in cfg.std],
        "interpolation": "bicubic" if cfg.interpolation == "bicubic" else "bilinear",
    }
