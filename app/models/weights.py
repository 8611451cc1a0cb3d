"""Where pretrained weights are downloaded from, and the file that, put in place, spares the
download (for the offline message of a model whose weights cannot be fetched)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch


@dataclass(frozen=True)
class WeightsSource:
    """Where downloaded weights come from and the file that, put in place, spares the download."""

    url: str
    file: str


def torchvision_source(url: str) -> WeightsSource:
    """torch.hub keeps a download as ``$TORCH_HOME/hub/checkpoints/<the URL's file name>``."""
    name = os.path.basename(urlparse(url).path)
    return WeightsSource(url, str(Path(torch.hub.get_dir()) / "checkpoints" / name))
