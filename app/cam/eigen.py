"""Principal-component methods: Eigen-CAM and EigenGrad-CAM.

Both project the centred (positions x channels) matrix X of a layer on its first right singular
vector v1: p = (X - mean_positions X) v1, and the map is ReLU(p). An SVD leaves v1's sign to
chance, so half of the maps would come out inverted (the object dark, the background lit). The sign
is chosen so that p correlates positively with sum_k X_k, the map every channel agrees on.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from app.cam.core import _CAM
from app.cam.gradient import _GradientCAM
from app.cam.smoothing import first_component
from app.cam.targets import Objective


class _EigenMap(_CAM):
    """Shared step: ReLU of the projection minus its spatial mean, i.e. of the centred data.

    Their map already is a first principal component, so they do not take ``eigen_smooth``."""

    eigen_smoothable = False

    @staticmethod
    def _combine(weights: Tensor, activation: Tensor) -> Tensor:
        if weights.ndim == 2:
            weights = weights.reshape(*weights.shape, *([1] * (activation.ndim - 2)))
        projection = (weights.to(activation.dtype) * activation).sum(dim=1)
        spatial = tuple(range(1, projection.ndim))
        return torch.relu(projection - projection.mean(dim=spatial, keepdim=True))


class EigenCAM(_EigenMap):
    """Eigen-CAM (Muhammad & Yeasin, IJCNN 2020, arXiv:2008.00299).

    L = ReLU((A - mean A) v1), v1 the first right singular vector of the centred (HW x K)
    activations, signed to correlate positively with sum_k A_k. Class-agnostic: it needs neither
    the class, the scores nor gradients, so the forward may run under ``torch.inference_mode()``;
    ``class_idx`` and ``targets`` are accepted and ignored (every class gets the same map).
    """

    class_agnostic = True

    def _get_weights(
        self,
        objective: Objective | None,
        scores: Any,
        retain_graph: bool,
        activations: list[Tensor],
    ) -> list[Tensor]:
        with torch.no_grad():
            return [first_component(a) for a in activations]


class EigenGradCAM(_EigenMap, _GradientCAM):
    """EigenGrad-CAM (Eigen-CAM, arXiv:2008.00299, on Grad-CAM's class-weighted activations).

    X = g * A with g = dS_c/dA; L = ReLU((X - mean X) v1), v1 the first right singular vector of
    the centred (HW x K) matrix X, signed to correlate positively with sum_k X_k.
    """

    def _weights_from(self, grad: Tensor, activation: Tensor) -> Tensor:
        # The weights are v1_k * g, so that sum_k w_k A_k = sum_k v1_k X_k.
        v1 = first_component(grad * activation)
        return v1.reshape(*v1.shape, *([1] * (grad.ndim - 2))) * grad
