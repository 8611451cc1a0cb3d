"""The two smoothing options every map method takes: ``eigen_smooth`` and ``aug_smooth``.

``eigen_smooth`` keeps, of the weighted activations X_k = w_k A_k of a layer (the terms whose sum
over channels k is the method's map), only their first principal component: the map becomes
ReLU((X - mean_positions X) v1), v1 the first right singular vector of the centred
(positions x channels) matrix of each image, signed so that the projection correlates positively
with sum_k X_k (the method's own map). One batched SVD per layer on the activations' device.

``aug_smooth`` explains six variants of each input, run as one batch: the input and its
horizontal flip, each scaled by 0.9, 1.0 and 1.1. The maps of the flipped variants are flipped
back, and the six are averaged (each min-max normalised first when normalised maps are asked
for). A variant may only be flipped back when its map lies on the input's grid: the same number
of spatial dimensions, the last one the input's width.
"""

from __future__ import annotations

import torch
from torch import Tensor

from app.cam.options import AUG_SCALES, AUG_VARIANTS


def first_component(features: Tensor) -> Tensor:
    """v1 (N, K) of each sample's centred (positions x K) matrix, signed so that the projection
    correlates positively with the channel sum (a zero correlation keeps the SVD's sign)."""
    exact = torch.float32 if features.device.type == "mps" else torch.float64
    matrix = features.flatten(2).transpose(1, 2).to(exact)  # (N, P, K)
    # A NaN or inf (from a non-finite input pixel) would fail the batch's SVD, every image's: it
    # counts as 0, as in the maps.
    matrix = torch.nan_to_num(matrix, nan=0.0, posinf=0.0, neginf=0.0)
    centred = matrix - matrix.mean(dim=1, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    v1 = vh[:, 0, :]  # (N, K)
    projection = torch.einsum("npk,nk->np", centred, v1)
    total = matrix.sum(dim=2)
    agreement = (projection * (total - total.mean(dim=1, keepdim=True))).sum(dim=1)
    sign = torch.where(agreement < 0, -1.0, 1.0).to(v1.dtype)
    return (v1 * sign[:, None]).to(features.dtype)


def principal_map(weighted: Tensor) -> Tensor:
    """ReLU of the projection of the weighted activations (N, K, *S) on their first principal
    component: (N, *S), centred over the positions."""
    v1 = first_component(weighted)
    v1 = v1.reshape(*v1.shape, *([1] * (weighted.ndim - 2)))
    projection = (v1 * weighted).sum(dim=1)
    spatial = tuple(range(1, projection.ndim))
    return torch.relu(projection - projection.mean(dim=spatial, keepdim=True))


def augmented(inputs: Tensor) -> Tensor:
    """The six variants of a batch (N, C, *S) as one batch (6N, C, *S), variant-major: the
    inputs scaled by each of ``AUG_SCALES``, then their horizontal flips (last axis) scaled so."""
    flipped = inputs.flip(-1)
    return torch.cat([source * scale for source in (inputs, flipped) for scale in AUG_SCALES])


def merged(maps: Tensor, images: int) -> Tensor:
    """The mean over the six variants of ``augmented``'s maps (6N, *S) -> (N, *S), the maps of
    the flipped variants flipped back."""
    variants = maps.reshape(AUG_VARIANTS, images, *maps.shape[1:])
    half = len(AUG_SCALES)
    return torch.cat([variants[:half], variants[half:].flip(-1)]).mean(dim=0)


def flip_refusal(inputs: object, map_ndim: int | None = None) -> str | None:
    """Why ``aug_smooth`` cannot flip this input (or flip its maps back), else ``None``.

    The input must be one tensor (N, C, *S) with at least one spatial axis (its last, the width,
    is flipped); a map must have the input's spatial dimensions (N, *S), so that its last axis is
    the input's width. A model with a fixed input size flips fine: a flip keeps the size."""
    if not isinstance(inputs, Tensor):
        return (
            "aug_smooth flips the model's input, but the model was called with "
            f"{type(inputs).__name__}, not one tensor"
        )
    if inputs.ndim < 3 or not inputs.is_floating_point():
        return (
            "aug_smooth flips the model's input along its width, but the input is a "
            f"{inputs.dtype} tensor of shape {tuple(inputs.shape)}, not images (N, C, H, W) or "
            "volumes (N, C, D, H, W) of floats"
        )
    if map_ndim is not None and map_ndim != inputs.ndim - 1:
        return (
            f"aug_smooth flips the maps back along the input's width, but the maps have "
            f"{map_ndim - 1} spatial dimension(s) and the input {inputs.ndim - 2}: the map does "
            "not lie on the input's grid (give a reshape_transform that lays tokens on it)"
        )
    return None
