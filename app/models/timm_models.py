"""timm architectures (``architecture = "timm:NAME"``): building them and their preprocessing.

timm is an optional extra (``pip install 'camserve[timm]'``); without it, only the models that
ask for it fail, each with the command that installs it.
"""

from __future__ import annotations

import math
import os
from types import ModuleType
from typing import Any

from torch import nn

from app.models.loading import WeightsSource, torchvision_source
from app.models.manifest import Interpolation, ManifestError, ModelSpec, PreprocessTable

INSTALL = "pip install 'camserve[timm]'"


def _timm(name: str) -> ModuleType:
    try:
        import timm
    except ImportError:
        raise ManifestError(
            f"architecture 'timm:{name}' needs the timm package, which is not installed; "
            f"install it with {INSTALL}"
        ) from None
    if not timm.is_model(name):
        from app.cam import close_matches

        close = close_matches(name, timm.list_models())
        raise ManifestError(
            f"timm has no model {name!r}"
            + (f"; did you mean {', '.join(close)}?" if close else "")
            + " (any name of timm.list_models() works)"
        )
    return timm


def pretrained_preprocess(name: str) -> PreprocessTable:
    """The preprocessing of the model's pretrained config: input size, interpolation, crop
    percentage (the resize is the crop over it), mean and std."""
    _timm(name)
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None:
        raise ManifestError(
            f"timm's {name!r} has no pretrained config to take the preprocessing from; "
            "add a [preprocess] table"
        )
    channels, height, width = (int(v) for v in cfg.input_size)
    crop_pct = float(cfg.crop_pct or 1.0)
    interpolation: Interpolation = "bicubic" if cfg.interpolation == "bicubic" else "bilinear"
    return PreprocessTable(
        input_shape=[channels, height, width],
        resize=max(math.floor(min(height, width) / crop_pct), min(height, width)),
        mean=[float(v) for v in cfg.mean],
        std=[float(v) for v in cfg.std],
        interpolation=interpolation,
    )


def build_timm(spec: ModelSpec) -> nn.Module:
    """``timm.create_model`` with the manifest's kwargs and class count; pretrained weights only
    when the manifest asks (they are downloaded into the Hugging Face hub cache once)."""
    name = spec.architecture.split(":", 1)[1]
    timm = _timm(name)
    kwargs: dict[str, Any] = {"num_classes": spec.num_classes, **spec.kwargs}
    model: nn.Module = timm.create_model(name, pretrained=spec.pretrained, **kwargs)
    return model


def pretrained_source(spec: ModelSpec) -> WeightsSource:
    """Where timm downloads the model's pretrained weights from, and where they land."""
    from timm.models import get_pretrained_cfg

    name = spec.architecture.split(":", 1)[1]
    cfg = get_pretrained_cfg(name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if hub_id:
        hub = os.environ.get("HF_HUB_CACHE") or os.path.join(
            os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub"
        )
        folder = "models--" + hub_id.replace("/", "--")
        return WeightsSource(
            f"https://huggingface.co/{hub_id}/resolve/main/model.safetensors",
            f"{hub}/{folder} (the hub cache of {hub_id}, e.g. from `hf download {hub_id}`)",
        )
    url = str(getattr(cfg, "url", "") or "")
    return torchvision_source(url) if url else WeightsSource("(unknown)", "(unknown)")
