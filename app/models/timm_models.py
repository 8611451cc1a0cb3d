"""timm architectures (``architecture = "timm:NAME"``): building them and their preprocessing.

timm is an optional extra (``pip install 'camserve[timm]'``); without it, only the models that
ask for it fail, each with the command that installs it.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from app.models.manifest import ManifestError, ModelSpec
from app.models.timm_config import TimmError, import_timm
from app.models.weights import WeightsSource, torchvision_source


def build_timm(spec: ModelSpec) -> nn.Module:
    """``timm.create_model`` with the manifest's kwargs and class count; pretrained weights only
    when the manifest asks (they are downloaded into the Hugging Face hub cache once)."""
    name = spec.architecture.split(":", 1)[1]
    try:
        timm = import_timm(name)
    except TimmError as error:
        raise ManifestError(str(error)) from None
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
