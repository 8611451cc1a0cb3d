"""KPCA-CAM: the first kernel principal component of a layer's activations."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from app.cam.core import _CAM, finite_number
from app.cam.layers import LayerSpec
from app.cam.options import MethodOption
from app.cam.targets import Objective

#: Most positions one map may have: the kernel matrix is P x P and its eigendecomposition
#: costs P^3 (4096 positions, a 64x64 grid, already take seconds on a CPU).
MAX_POSITIONS = 4096

KERNEL_GAMMA = MethodOption(
    "kernel_gamma",
    float,
    None,
    "gamma of KPCA-CAM's RBF kernel exp(-gamma d^2), d the distance of two positions' channel "
    "vectors (none: 1 / channels)",
    1e-6,
    1e3,
)


def kernel_component(features: Tensor, gamma: float | None = None) -> Tensor:
    """The projection (N, P) of each sample's positions on the first principal component of
    the centred RBF kernel matrix of its (P x K) activations, signed so that it correlates
    positively with the channel sum (as Eigen-CAM's; a zero correlation keeps eigh's sign)."""
    matrix = features.flatten(2).transpose(1, 2).double()  # (N, P, K)
    # A NaN or inf (from a non-finite input pixel) would fail the batch's eigh, every image's: it
    # counts as 0, as in the maps.
    matrix = torch.nan_to_num(matrix, nan=0.0, posinf=0.0, neginf=0.0)
    channels = matrix.shape[2]
    scale = 1.0 / channels if gamma is None else gamma
    kernel = torch.exp(-scale * torch.cdist(matrix, matrix).square())
    # Centre in feature space: K - 1K - K1 + 1K1, with 1 the P x P matrix of 1/P.
    row = kernel.mean(dim=1, keepdim=True)
    column = kernel.mean(dim=2, keepdim=True)
    centred = kernel - row - column + kernel.mean(dim=(1, 2), keepdim=True)
    values, vectors = torch.linalg.eigh(centred)  # ascending
    top, alpha = values[:, -1].clamp_min(0), vectors[:, :, -1]
    # A training point's projection on the component: (K_c alpha)_i / sqrt(lambda) = sqrt(lambda)
    # alpha_i, for alpha of unit norm.
    projection = alpha * top.sqrt()[:, None]
    total = matrix.sum(dim=2)
    agreement = (projection * (total - total.mean(dim=1, keepdim=True))).sum(dim=1)
    sign = torch.where(agreement < 0, -1.0, 1.0).to(projection.dtype)
    return (projection * sign[:, None]).to(features.dtype)


class KPCACAM(_CAM):
    """KPCA-CAM (Karmani et al., 2024, arXiv:2410.00267): Eigen-CAM with an RBF kernel.

    K_ij = exp(-gamma |a_i - a_j|^2) over the positions' channel vectors a_i; K_c = K centred in
    feature space; L = ReLU(sqrt(lambda_1) alpha_1), alpha_1 the top eigenvector of K_c, signed to
    correlate positively with sum_k A_k. Class-agnostic like Eigen-CAM: ``class_idx`` and
    ``targets`` are accepted and ignored. The kernel is P x P: at most 4096 positions.

    Args:
        kernel_gamma: the RBF kernel's gamma (``None``: 1 / channels).
    """

    class_agnostic = True
    options = (KERNEL_GAMMA,)

    def __init__(
        self,
        model: nn.Module,
        target_layer: LayerSpec = None,
        input_shape: Sequence[int] = (3, 224, 224),
        reshape_transform: Callable[[Tensor], Tensor] | None = None,
        *,
        kernel_gamma: float | None = None,
        enable_hooks: bool = True,
    ) -> None:
        if kernel_gamma is not None:
            kernel_gamma = finite_number("kernel_gamma", kernel_gamma, above=True)
        self.kernel_gamma = kernel_gamma
        super().__init__(model, target_layer, input_shape, reshape_transform, enable_hooks)

    def _maps(
        self,
        objective: Objective | None,
        scores: Any,
        retain_graph: bool,
        activations: list[Tensor],
    ) -> list[Tensor]:
        maps = []
        with torch.no_grad():
            for name, activation in zip(self.target_names, activations, strict=True):
                positions = activation[0, 0].numel()
                if positions > MAX_POSITIONS:
                    raise ValueError(
                        f"KPCA-CAM's kernel on layer {name!r} would be {positions} x {positions} "
                        f"(more than {MAX_POSITIONS} positions): pick a coarser layer."
                    )
                projection = kernel_component(activation, self.kernel_gamma)
                maps.append(
                    torch.relu(projection).reshape(activation.shape[0], *activation.shape[2:])
                )
        return maps
