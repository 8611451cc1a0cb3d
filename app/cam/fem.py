"""FEM: channels weighted by their mean, where they fire well above it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from app.cam.core import _CAM, finite_number
from app.cam.layers import LayerSpec
from app.cam.options import MethodOption
from app.cam.targets import Objective

K_STD = MethodOption(
    "k_std",
    float,
    2.0,
    "FEM's threshold: standard deviations above a channel's mean where it counts",
    0.0,
    10.0,
)


def fem_map(activation: Tensor, k: float) -> Tensor:
    """sum_k mu_k * 1[A_k >= mu_k + k sigma_k] for (N, K, *S) activations: (N, *S). mu and sigma
    are each channel's spatial mean and (population) standard deviation."""
    spatial = tuple(range(2, activation.ndim))
    values = activation.float()
    mean = values.mean(dim=spatial, keepdim=True)
    std = values.std(dim=spatial, keepdim=True, correction=0)
    mask = (values >= mean + k * std).to(values.dtype)
    return (mean * mask).sum(dim=1).to(activation.dtype)


class FEM(_CAM):
    """FEM, Feature Explanation Method (Fuad et al., IPTA 2020; Bourroux et al., ICPRAI 2022).

    mu_k, sigma_k: the spatial mean and (population) standard deviation of channel k;
    B_k = 1[A_k >= mu_k + k sigma_k] keeps where a channel fires far above its own level;
    L = ReLU(sum_k mu_k B_k). Class-agnostic: the statistics of the activations alone, so
    ``class_idx`` and ``targets`` are accepted and ignored.

    Args:
        k_std: the threshold k, in standard deviations (the paper's 2).
    """

    class_agnostic = True
    options = (K_STD,)

    def __init__(
        self,
        model: nn.Module,
        target_layer: LayerSpec = None,
        input_shape: Sequence[int] = (3, 224, 224),
        reshape_transform: Callable[[Tensor], Tensor] | None = None,
        *,
        k_std: float = 2.0,
        enable_hooks: bool = True,
    ) -> None:
        self.k_std = finite_number("k_std", k_std)
        super().__init__(model, target_layer, input_shape, reshape_transform, enable_hooks)

    def _maps(
        self,
        objective: Objective | None,
        scores: Any,
        retain_graph: bool,
        activations: list[Tensor],
    ) -> list[Tensor]:
        with torch.no_grad():
            return [torch.relu(fem_map(a, self.k_std)) for a in activations]
