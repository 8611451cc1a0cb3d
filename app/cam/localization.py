"""Localization metrics for class activation maps: does the map point at the object?

All functions are pure, batched and device-agnostic: they take a batch of maps ``cams``
of shape ``(N, h, w)`` (or ``(N, 1, h, w)``) and a batch of boolean ground-truth masks of
shape ``(N, H, W)`` at the image resolution, and return one value per sample. Maps at a
lower resolution than the mask are upsampled bilinearly (``align_corners=False``) to
``(H, W)`` first, as a CAM is overlaid on the image.

Metrics
-------
* :func:`pointing_game` -- Zhang et al., "Top-down Neural Attention by Excitation
  Backprop", ECCV 2016 (IJCV 2018).
* :func:`energy_pointing_game` -- Wang et al., "Score-CAM: Score-Weighted Visual
  Explanations for Convolutional Neural Networks", CVPR Workshops 2020, Sec. 4.2.
* :func:`mask_iou`, :func:`iou_sweep`, :func:`best_iou` -- intersection over union of the
  mask with the thresholded map, as in the weakly-supervised localization protocol of
  Zhou et al., "Learning Deep Features for Discriminative Localization", CVPR 2016
  (threshold at a fraction of the maximum), with the threshold sweep of Choe et al.,
  "Evaluating Weakly Supervised Object Localization Methods Right", CVPR 2020.
"""

from __future__ import annotations

import logging

import torch

from app.cam.core import normalize_maps, resize_maps

__all__ = [
    "DEFAULT_IOU_THRESHOLDS",
    "best_iou",
    "energy_pointing_game",
    "iou_sweep",
    "mask_iou",
    "minmax_normalize",
    "pointing_game",
    "upsample_maps",
]

logger = logging.getLogger(__name__)

#: Default threshold sweep for :func:`best_iou`: 0.05, 0.10, ..., 0.95 of the normalised map.
DEFAULT_IOU_THRESHOLDS: tuple[float, ...] = tuple(round(0.05 * k, 2) for k in range(1, 20))

_EPS = 1e-12


def _as_maps(cams: torch.Tensor) -> torch.Tensor:
    """Return ``cams`` as a float tensor of shape ``(N, h, w)``."""
    if cams.dim() == 4:
        if cams.shape[1] != 1:
            raise ValueError(f"expected maps of shape (N, 1, h, w), got {tuple(cams.shape)}")
        cams = cams[:, 0]
    if cams.dim() != 3:
        raise ValueError(f"expected maps of shape (N, h, w), got {tuple(cams.shape)}")
    return cams.float()


def _as_masks(masks: torch.Tensor, n: int) -> torch.Tensor:
    """Return ``masks`` as a bool tensor of shape ``(N, H, W)``, checking the batch size."""
    if masks.dim() == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if masks.dim() != 3 or masks.shape[0] != n:
        raise ValueError(f"expected masks of shape ({n}, H, W), got {tuple(masks.shape)}")
    return masks.bool()


def upsample_maps(cams: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Upsample maps ``(N, h, w)`` to ``(N, *size)`` bilinearly (``align_corners=False``)."""
    return resize_maps(_as_maps(cams), size)


def minmax_normalize(cams: torch.Tensor) -> torch.Tensor:
    """Rescale each map to ``[0, 1]``; a constant map becomes all zeros."""
    return normalize_maps(_as_maps(cams))


def pointing_game(cams: torch.Tensor, masks: torch.Tensor, tolerance: float = 0.0) -> torch.Tensor:
    """Pointing game (Zhang et al., ECCV 2016): is the map's maximum on the object?

    The map is upsampled bilinearly to the mask size and its maximum point
    ``p* = argmax_p L(p)`` is located; the sample is a *hit* when some mask pixel ``q``
    lies within the tolerance, ``min_{q in mask} ||p* - q||_2 <= tolerance`` (pixels,
    Euclidean). ``tolerance=0`` (the default here) requires ``p*`` itself to be inside
    the mask; Zhang et al. used a 15-pixel tolerance on PASCAL/COCO-sized images.
    Pointing accuracy over a data set is ``hits / N``.

    Ties for the maximum (e.g. the 2x2 pixel plateau that bilinear upsampling creates
    around a low-resolution peak, or a constant map) are broken by taking the first
    maximal pixel in row-major order. A sample with an empty mask is always a miss.

    Args:
        cams: maps ``(N, h, w)`` or ``(N, 1, h, w)``.
        masks: boolean object masks ``(N, H, W)`` at the image resolution.
        tolerance: hit radius in pixels of the mask resolution, ``>= 0``.

    Returns:
        Bool tensor ``(N,)``: ``True`` for a hit.
    """
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    cams = _as_maps(cams)
    masks = _as_masks(masks, cams.shape[0])
    n, h, w = masks.shape
    up = upsample_maps(cams.to(masks.device), (h, w))
    flat_idx = up.flatten(1).argmax(dim=1)  # first maximum in row-major order
    if tolerance == 0:
        return masks.flatten(1).gather(1, flat_idx[:, None])[:, 0]
    y0 = torch.div(flat_idx, w, rounding_mode="floor").float()
    x0 = (flat_idx % w).float()
    ys = torch.arange(h, device=masks.device, dtype=torch.float32)
    xs = torch.arange(w, device=masks.device, dtype=torch.float32)
    d2 = (ys[None, :, None] - y0[:, None, None]) ** 2 + (xs[None, None, :] - x0[:, None, None]) ** 2
    return (masks & (d2 <= float(tolerance) ** 2)).flatten(1).any(dim=1)


def energy_pointing_game(cams: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Energy-based pointing game (Wang et al., Score-CAM, CVPRW 2020): mass inside the mask.

    ``Proportion = sum_{p in mask} L(p) / sum_p L(p)``, with ``L`` the map upsampled
    bilinearly to the mask size and negative values clipped to zero (energy is
    non-negative). The map is not min-max normalised first: a map with a constant offset
    spreads part of its energy over the background and is scored accordingly. Wang et al.
    used the bounding box; with a segmentation mask the measure is stricter. An all-zero
    map carries no location information and is scored as a uniform map, i.e. its
    proportion is the mask's area fraction (the chance level).

    Args:
        cams: maps ``(N, h, w)`` or ``(N, 1, h, w)``.
        masks: boolean object masks ``(N, H, W)``.

    Returns:
        Float tensor ``(N,)`` in ``[0, 1]``.
    """
    cams = _as_maps(cams)
    masks = _as_masks(masks, cams.shape[0])
    up = upsample_maps(cams.to(masks.device), (masks.shape[-2], masks.shape[-1])).clamp_min(0.0)
    total = up.flatten(1).sum(dim=1)
    inside = (up * masks).flatten(1).sum(dim=1)
    area = masks.flatten(1).float().mean(dim=1)
    return torch.where(total > 0, inside / total.clamp_min(_EPS), area)


def _binary_iou(pred: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    inter = (pred & masks).flatten(1).sum(dim=1).float()
    union = (pred | masks).flatten(1).sum(dim=1).float()
    return torch.where(union > 0, inter / union.clamp_min(1.0), torch.zeros_like(union))


def _normalized_upsampled(cams: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    return minmax_normalize(
        upsample_maps(cams.to(masks.device), (masks.shape[-2], masks.shape[-1]))
    )


def mask_iou(cams: torch.Tensor, masks: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """IoU of the object mask with the map thresholded at a fraction of its maximum.

    The map is upsampled bilinearly to the mask size and min-max normalised per sample,
    ``L' = (L - min L) / (max L - min L)``; the predicted region is ``R = {p : L'(p) >=
    threshold}`` and ``IoU = |R & M| / |R | M|``. With the default ``threshold=0.5`` the
    region is where the map reaches at least half of its (normalised) maximum; Zhou et al.
    (CAM, CVPR 2016) used 0.2 of the maximum to draw boxes. A constant map normalises to
    zero and selects nothing for a threshold above 0; an empty union scores 0.

    Args:
        cams: maps ``(N, h, w)`` or ``(N, 1, h, w)``.
        masks: boolean object masks ``(N, H, W)``.
        threshold: level in ``[0, 1]`` of the normalised map.

    Returns:
        Float tensor ``(N,)`` in ``[0, 1]``.
    """
    cams = _as_maps(cams)
    masks = _as_masks(masks, cams.shape[0])
    norm = _normalized_upsampled(cams, masks)
    return _binary_iou(norm >= threshold, masks)


def iou_sweep(
    cams: torch.Tensor,
    masks: torch.Tensor,
    thresholds: torch.Tensor | tuple[float, ...] = DEFAULT_IOU_THRESHOLDS,
) -> torch.Tensor:
    """IoU (as in :func:`mask_iou`) for every threshold of a sweep.

    Args:
        cams: maps ``(N, h, w)`` or ``(N, 1, h, w)``.
        masks: boolean object masks ``(N, H, W)``.
        thresholds: ``T`` levels in ``[0, 1]`` of the min-max normalised map.

    Returns:
        Float tensor ``(N, T)``: ``out[i, t]`` is sample ``i``'s IoU at ``thresholds[t]``.
    """
    cams = _as_maps(cams)
    masks = _as_masks(masks, cams.shape[0])
    norm = _normalized_upsampled(cams, masks)
    ts = torch.as_tensor(thresholds, dtype=torch.float32).flatten().tolist()
    return torch.stack([_binary_iou(norm >= t, masks) for t in ts], dim=1)


def best_iou(
    cams: torch.Tensor,
    masks: torch.Tensor,
    thresholds: torch.Tensor | tuple[float, ...] = DEFAULT_IOU_THRESHOLDS,
    per_sample: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best IoU over a threshold sweep, and the threshold that achieves it.

    With ``per_sample=False`` (default) one threshold is chosen for the whole batch, the
    one maximising the mean IoU, ``t* = argmax_t (1/N) sum_i IoU_i(t)`` -- the data-set
    level calibration of Choe et al. (CVPR 2020), which removes the dependence of
    :func:`mask_iou` on an arbitrary threshold. With ``per_sample=True`` each sample gets
    its own best threshold (an oracle upper bound). Ties pick the lowest threshold.

    Args:
        cams: maps ``(N, h, w)`` or ``(N, 1, h, w)``.
        masks: boolean object masks ``(N, H, W)``.
        thresholds: ``T`` levels in ``[0, 1]`` of the min-max normalised map (default
            0.05, 0.10, ..., 0.95).
        per_sample: choose the threshold per sample instead of per batch.

    Returns:
        ``(best, threshold)``: 0-d tensors (mean IoU at ``t*``, ``t*``) when
        ``per_sample=False``, else two ``(N,)`` tensors.
    """
    ts = torch.as_tensor(thresholds, dtype=torch.float32).flatten()
    ious = iou_sweep(cams, masks, ts)
    ts = ts.to(ious.device)
    if per_sample:
        idx = ious.argmax(dim=1)  # first maximum: the lowest threshold among ties
        return ious.gather(1, idx[:, None])[:, 0], ts[idx]
    mean = ious.mean(dim=0)
    best = int(mean.argmax())
    logger.debug("best_iou: mean IoU per threshold %s", mean.tolist())
    return mean[best], ts[best]
