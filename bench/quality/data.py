"""The quality benchmark's model and images: the served shapes model, the held-out set of one
shape per image, and the two-shape images of the class-sensitivity test."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from app.models.loading import build_model
from app.models.manifest import parse_manifest

ROOT = Path(__file__).resolve().parents[2]

#: Seed of the held-out set. Training used seeds listed in model_store/shapes/TRAINING.md.
HELD_OUT_SEED = 90_417
#: Seed of the two-shape images (class sensitivity); also checked against TRAINING.md.
PAIRS_SEED = 90_418


@dataclass
class BenchModel:
    """The classifier under test and what its manifest says about it."""

    model: nn.Module
    mean: tuple[float, ...]
    std: tuple[float, ...]
    target_layer: str
    image_size: int
    num_classes: int
    source: str
    weights_sha256: str | None = None

    @property
    def stand_in(self) -> bool:
        return self.source.startswith("STAND-IN")


def _freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def open_bench_model(model_dir: Path) -> BenchModel:
    """Build the model a ``model.toml`` manifest describes, with the service's own manifest
    parser and loader (weights through ``torch.load(weights_only=True)``), in eval mode with
    frozen parameters; the first ``[cam] target_layers`` entry is the benchmark's target layer.
    """
    spec = parse_manifest(model_dir)
    model, _ = build_model(spec)
    _, height, width = spec.input_shape
    if height != width:
        raise ValueError(f"square inputs expected, got input_shape {spec.input_shape}")
    return BenchModel(
        model=_freeze(model),
        mean=spec.mean,
        std=spec.std,
        target_layer=spec.target_layers[0] if spec.target_layers else "layer3",
        image_size=height,
        num_classes=spec.num_classes,
        source=f"{_rel(model_dir)} ({spec.architecture}, {spec.weights})",
        weights_sha256=hashlib.sha256((model_dir / spec.weights).read_bytes()).hexdigest(),
    )


def stand_in_model() -> BenchModel:
    """Random-weight shapes ResNet, to debug the benchmark before the trained model exists."""
    from app.models.zoo.shapes_resnet import build

    torch.manual_seed(0)
    return BenchModel(
        model=_freeze(build(num_classes=8)),
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        target_layer="layer3",
        image_size=128,
        num_classes=8,
        source=(
            "STAND-IN: app.models.zoo.shapes_resnet:build(num_classes=8), random weights (seed 0)"
        ),
    )


def to_input(images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 ``(N, H, W, 3)`` -> float ``(N, 3, H, W)``, ``(x / 255 - mean) / std``."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (x - m) / s


def training_seeds(model_dir: Path) -> list[int]:
    """Every integer on the lines of TRAINING.md that mention a seed (a guard, not a parser)."""
    path = model_dir / "TRAINING.md"
    if not path.exists():
        return []
    found: list[int] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if "seed" in line.lower():
            found += [int(v) for v in re.findall(r"(?<![\w.])(\d+)(?![\w.])", line)]
    return sorted(set(found))
