"""Faithfulness metrics for saliency maps: does the map reflect what the model uses?

* :func:`deletion_curve`, :func:`insertion_curve`, :func:`deletion_auc`,
  :func:`insertion_auc` -- the causal metrics of Petsiuk et al., "RISE: Randomized Input
  Sampling for Explanation of Black-box Models", BMVC 2018, Sec. 4.1.
* :func:`explanation_map_inputs`, :func:`confidence_change`, :func:`confidence_drop`,
  :func:`confidence_increase` -- the score on the image multiplied by its map, against the
  image's: the Average Drop and Increase in Confidence of Chattopadhyay et al., "Grad-CAM++",
  WACV 2018, Sec. 5.1, per sample.
* :func:`noisy_linear_imputation`, :func:`road_inputs`, :func:`road_curve` -- ROAD, "remove
  and debias", of Rong et al., "A Consistent and Efficient Evaluation Strategy for Attribution
  Methods", ICML 2022.
* :func:`spearman_correlation`, :func:`randomize_model`, :func:`randomization_check` --
  the model-parameter randomisation test of Adebayo et al., "Sanity Checks for Saliency
  Maps", NeurIPS 2018, Sec. 3.

All functions are batched and device-agnostic (tensors stay on the device of their
inputs); the model is used as given (put it in ``eval()`` mode first), and its forwards
for the deletion/insertion curves run under :func:`torch.inference_mode`.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from app.cam.core import normalize_maps, resize_maps
from app.cam.targets import Objective, Target, class_probabilities, target_list

__all__ = [
    "ROAD_PERCENTILES",
    "Forward",
    "MapFn",
    "auc",
    "confidence_change",
    "confidence_drop",
    "confidence_increase",
    "deletion_auc",
    "deletion_curve",
    "explanation_map_inputs",
    "gaussian_blur",
    "insertion_auc",
    "insertion_curve",
    "noisy_linear_imputation",
    "perturbation_curve",
    "randomization_check",
    "randomize_model",
    "rankdata",
    "road_curve",
    "road_inputs",
    "road_probabilities",
    "scored_probability",
    "spearman_correlation",
]

logger = logging.getLogger(__name__)

#: ``map_fn(model, images, class_idx) -> maps (N, h, w)`` for :func:`randomization_check`.
MapFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
#: What the curves call for the model's output: a model, or any ``forward(x)`` (a caller that
#: counts, pauses or schedules its forwards wraps the model in one). With ``class_idx`` the
#: output is logits ``(B, K)``; with ``targets`` it is anything the targets read.
Forward = Callable[[torch.Tensor], Any]
#: ``probability(output, samples) -> (B,)``: what a curve reads from a forward of perturbed
#: inputs, row ``i`` a copy of sample ``samples[i]``.
Probability = Callable[[Any, torch.Tensor], torch.Tensor]


def scored_probability(
    class_idx: torch.Tensor | Sequence[int] | None,
    targets: Target | Sequence[Target] | None,
    batch: int,
) -> Probability:
    """What the faithfulness metrics follow for each perturbed input of a batch of ``batch``
    samples: with ``class_idx``, the softmax probability of its sample's class; with
    ``targets`` (one callable for all samples or one per sample, as the extractors take them),
    its sample's target applied to its row of the model's output -- a detector's or a
    segmenter's score. The curves' areas lie in [0, 1] when the targets' scores do (a
    detection's similarity or score, a region's mean class probability); logits or sums do not
    make comparable areas."""
    if (class_idx is None) == (targets is None):
        raise ValueError("pass either class_idx (a classifier's classes) or targets, not both")
    if targets is not None:
        return Objective(targets=target_list(targets, batch))
    cls = torch.as_tensor(class_idx, dtype=torch.long).flatten()
    if cls.numel() != batch:
        raise ValueError("images, saliency and class_idx must have the same batch size")

    def probability(output: Any, samples: torch.Tensor) -> torch.Tensor:
        p = class_probabilities(output)
        picked = cls.to(p.device).index_select(0, samples.to(p.device))
        return p.gather(1, picked[:, None])[:, 0]

    return probability


# --------------------------------------------------------------------------------------
# Deletion / insertion (RISE)
# --------------------------------------------------------------------------------------


def gaussian_blur(images: torch.Tensor, kernel_size: int = 11, sigma: float = 5.0) -> torch.Tensor:
    """Blur ``(N, C, H, W)`` images with a separable Gaussian (replicate padding).

    The defaults (11x11 kernel, sigma 5) are the blur RISE uses as the insertion start.
    """
    if kernel_size % 2 != 1:
        raise ValueError(f"kernel_size must be odd, got {kernel_size}")
    c = images.shape[1]
    r = kernel_size // 2
    t = torch.arange(kernel_size, device=images.device, dtype=images.dtype) - r
    k = torch.exp(-(t**2) / (2.0 * sigma**2))
    k = k / k.sum()
    x = F.pad(images, (r, r, r, r), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def _saliency_ranks(saliency: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Rank of every pixel in decreasing saliency order: ``(N, H*W)``, 0 = most salient."""
    if saliency.dim() == 4:
        saliency = saliency[:, 0]
    sal = saliency.float()
    if tuple(sal.shape[-2:]) != tuple(size):
        sal = F.interpolate(sal[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    order = torch.argsort(sal.flatten(1), dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ar = torch.arange(order.shape[1], device=order.device).expand_as(order)
    ranks.scatter_(1, order, ar)
    return ranks


def perturbation_curve(
    model: nn.Module | Forward,
    images: torch.Tensor,
    saliency: torch.Tensor,
    class_idx: torch.Tensor | list[int] | None,
    mode: str,
    n_steps: int = 32,
    baseline: torch.Tensor | str | None = None,
    batch_size: int | None = 32,
    *,
    targets: Target | Sequence[Target] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class probability while pixels are deleted from / inserted into the image (RISE).

    Pixels are ordered by decreasing saliency (the map upsampled bilinearly to the image
    size; ties keep row-major order) and all channels of a pixel move together. With
    ``M = H*W`` pixels, step ``k = 0..n_steps`` changes the ``m_k = round(k*M/n_steps)``
    most salient pixels:

    * ``mode="deletion"``: ``x_k = x`` with those pixels replaced by the baseline;
      default baseline ``"zeros"`` -- zero in the *normalised* input space, i.e. the
      data-set mean colour (RISE deleted to zero / grey).
    * ``mode="insertion"``: ``x_k`` = the baseline with those pixels copied from ``x``;
      default baseline ``"blur"`` -- the image blurred with an 11x11, sigma-5 Gaussian,
      as in RISE.

    ``p_k = softmax(model(x_k))[c]`` for the class ``c`` being explained, or, for a model
    whose output is no logits (a detector, a segmenter), ``p_k = target(model(x_k))`` for the
    sample's target (:func:`scored_probability`). The ``N * (n_steps + 1)`` perturbed inputs
    are built chunk by chunk and forwarded in batches of ``batch_size`` under
    :func:`torch.inference_mode`.

    Args:
        model: classifier returning logits ``(B, K)``; used as given (call ``eval()``).
        images: model inputs ``(N, C, H, W)`` (already normalised).
        saliency: maps ``(N, h, w)`` or ``(N, 1, h, w)``.
        class_idx: class per sample, ``(N,)``; None with ``targets``.
        mode: ``"deletion"`` or ``"insertion"``.
        n_steps: number of steps (RISE's curve has ``n_steps + 1`` points); ``>= 1``.
        baseline: ``"zeros"``, ``"blur"``, or a tensor broadcastable to ``images``;
            ``None`` picks the mode's default.
        batch_size: forwards per model call; ``None``: ``n_steps + 1``, one call per curve
            (the inputs are ordered image by image, so each call is one image's whole curve).
        targets: instead of ``class_idx``, a callable (or one per sample) from one sample's
            output to its score in [0, 1], e.g. ``app.cam.task_targets.DetectionSimilarity``.

    Returns:
        ``(fractions, probs)``: ``fractions`` ``(n_steps + 1,)`` is ``m_k / M`` and
        ``probs`` ``(N, n_steps + 1)`` holds ``p_k``.
    """
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode must be 'deletion' or 'insertion', got {mode!r}")
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    if batch_size is None:
        batch_size = n_steps + 1
    n, c, h, w = images.shape
    device = images.device
    probability = scored_probability(class_idx, targets, n)
    if saliency.shape[0] != n:
        raise ValueError("images, saliency and class_idx must have the same batch size")
    if baseline is None:
        baseline = "zeros" if mode == "deletion" else "blur"
    if isinstance(baseline, str):
        if baseline == "zeros":
            base = torch.zeros_like(images)
        elif baseline == "blur":
            base = gaussian_blur(images)
        else:
            raise ValueError(f"unknown baseline {baseline!r}")
    else:
        base = baseline.to(device=device, dtype=images.dtype).expand_as(images)

    m = h * w
    ranks = _saliency_ranks(saliency.to(device), (h, w))
    counts = torch.round(torch.linspace(0, m, n_steps + 1, dtype=torch.float64)).long()
    counts = counts.to(device)
    fractions = counts.double().div(m).float()
    steps = n_steps + 1
    total = n * steps
    probs = torch.empty(total, device=device, dtype=torch.float32)
    with torch.inference_mode():
        for start in range(0, total, batch_size):
            items = torch.arange(start, min(start + batch_size, total), device=device)
            img_i = torch.div(items, steps, rounding_mode="floor")
            step_i = items % steps
            changed = (ranks[img_i] < counts[step_i][:, None]).view(-1, 1, h, w)
            if mode == "deletion":
                x = torch.where(changed, base[img_i], images[img_i])
            else:
                x = torch.where(changed, images[img_i], base[img_i])
            probs[start : start + len(items)] = probability(model(x), img_i).to(device)
    return fractions, probs.view(n, steps).clone()


def deletion_curve(
    model: nn.Module,
    images: torch.Tensor,
    saliency: torch.Tensor,
    class_idx: torch.Tensor | list[int] | None,
    n_steps: int = 32,
    baseline: torch.Tensor | str = "zeros",
    batch_size: int = 32,
    *,
    targets: Target | Sequence[Target] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deletion curve (RISE): :func:`perturbation_curve` with ``mode="deletion"``."""
    return perturbation_curve(
        model,
        images,
        saliency,
        class_idx,
        "deletion",
        n_steps,
        baseline,
        batch_size,
        targets=targets,
    )


def insertion_curve(
    model: nn.Module,
    images: torch.Tensor,
    saliency: torch.Tensor,
    class_idx: torch.Tensor | list[int] | None,
    n_steps: int = 32,
    baseline: torch.Tensor | str = "blur",
    batch_size: int = 32,
    *,
    targets: Target | Sequence[Target] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Insertion curve (RISE): :func:`perturbation_curve` with ``mode="insertion"``."""
    return perturbation_curve(
        model,
        images,
        saliency,
        class_idx,
        "insertion",
        n_steps,
        baseline,
        batch_size,
        targets=targets,
    )


def auc(fractions: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Area under ``probs`` (``(N, S)``) over ``fractions`` (``(S,)``) by the trapezoid rule.

    ``AUC = sum_k (f_{k+1} - f_k) * (p_k + p_{k+1}) / 2``; with fractions running from 0
    to 1 the AUC lies in ``[0, 1]``.
    """
    return torch.trapezoid(probs, x=fractions.to(probs.device, probs.dtype), dim=-1)


def deletion_auc(
    model: nn.Module,
    images: torch.Tensor,
    saliency: torch.Tensor,
    class_idx: torch.Tensor | list[int] | None,
    n_steps: int = 32,
    baseline: torch.Tensor | str = "zeros",
    batch_size: int = 32,
    *,
    targets: Target | Sequence[Target] | None = None,
) -> torch.Tensor:
    """Deletion AUC per sample (Petsiuk et al., BMVC 2018) -- lower is better.

    A faithful map puts first the pixels the prediction depends on, so deleting them
    makes the class probability drop fast and the area under the curve small.
    See :func:`perturbation_curve` for the protocol and :func:`auc` for the integral.
    """
    curve = deletion_curve(
        model, images, saliency, class_idx, n_steps, baseline, batch_size, targets=targets
    )
    return auc(*curve)


def insertion_auc(
    model: nn.Module,
    images: torch.Tensor,
    saliency: torch.Tensor,
    class_idx: torch.Tensor | list[int] | None,
    n_steps: int = 32,
    baseline: torch.Tensor | str = "blur",
    batch_size: int = 32,
    *,
    targets: Target | Sequence[Target] | None = None,
) -> torch.Tensor:
    """Insertion AUC per sample (Petsiuk et al., BMVC 2018) -- higher is better.

    Restoring the most salient pixels first into a blurred copy should bring the class
    probability back quickly, giving a large area under the curve.
    See :func:`perturbation_curve` for the protocol and :func:`auc` for the integral.
    """
    curve = insertion_curve(
        model, images, saliency, class_idx, n_steps, baseline, batch_size, targets=targets
    )
    return auc(*curve)


# --------------------------------------------------------------------------------------
# Average Drop and Increase in Confidence (Grad-CAM++)
# --------------------------------------------------------------------------------------


def explanation_map_inputs(images: torch.Tensor, saliency: torch.Tensor) -> torch.Tensor:
    """Each image multiplied by its map: Grad-CAM++'s "explanation map" ``E = I * L``.

    The map (``(N, h, w)`` or ``(N, 1, h, w)``; ``(N, d, h, w)`` for volumes ``(N, C, D, H, W)``)
    is min-max normalised to [0, 1] per sample (a flat map becomes zeros, as
    :func:`app.cam.core.normalize_maps` has it), upsampled (bi- or trilinearly) to the images'
    size and multiplied into every channel: where the map is 0 the input becomes 0, the data
    set's mean colour in the normalised input space, as deletion's."""
    if saliency.dim() == images.dim():  # a channel dimension of one
        saliency = saliency[:, 0]
    if saliency.shape[0] != images.shape[0]:
        raise ValueError("images and saliency must have the same batch size")
    maps = normalize_maps(saliency.to(images.device).float())
    mask = resize_maps(maps, images.shape[2:]).clamp_(0.0, 1.0)
    return images * mask[:, None].to(images.dtype)


def confidence_change(
    model: nn.Module | Forward,
    images: torch.Tensor,
    saliency: torch.Tensor,
    class_idx: torch.Tensor | Sequence[int] | None,
    *,
    targets: Target | Sequence[Target] | None = None,
    batch_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The score of each image and of its explanation map (:func:`explanation_map_inputs`):
    ``Y = softmax(model(x))[c]`` and ``O = softmax(model(x * L))[c]``, or the sample's target's
    score as in :func:`perturbation_curve`.

    Each image goes with its explanation map (``2 N`` inputs, an image's two side by side), in
    one forward, or in forwards of ``batch_size`` inputs. :func:`confidence_drop` and
    :func:`confidence_increase` read the pair.

    Returns:
        ``(before, after)``, ``(N,)`` each.
    """
    n = images.shape[0]
    probability = scored_probability(class_idx, targets, n)
    pairs = torch.stack((images, explanation_map_inputs(images, saliency)), dim=1).flatten(0, 1)
    samples = torch.arange(n, device=images.device).repeat_interleave(2)
    step = len(pairs) if batch_size is None else max(1, batch_size)
    found = torch.empty(len(pairs), device=images.device, dtype=torch.float32)
    with torch.inference_mode():
        for start in range(0, len(pairs), step):
            end = start + step
            found[start:end] = probability(model(pairs[start:end]), samples[start:end]).to(
                images.device
            )
    found = found.view(n, 2)
    return found[:, 0].clone(), found[:, 1].clone()


def confidence_drop(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """``max(0, Y - O) / Y`` per sample (0 where ``Y`` is 0): the share of the score lost when
    only what the map shows is kept. Its mean over a data set is Grad-CAM++'s Average Drop
    (as a fraction); lower is better."""
    safe = torch.where(before > 0, before, torch.ones_like(before))
    return torch.where(before > 0, torch.relu(before - after) / safe, torch.zeros_like(before))


def confidence_increase(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """``O > Y`` per sample: what the map shows scores higher than the whole image. Its mean
    over a data set is Grad-CAM++'s Increase in Confidence; higher is better."""
    return after > before


# --------------------------------------------------------------------------------------
# ROAD: remove and debias (Rong et al.)
# --------------------------------------------------------------------------------------

#: The removal percentiles at which ROAD reads the model (10 % to 90 % in steps of 10, as the
#: curves of Rong et al., ICML 2022, are drawn).
ROAD_PERCENTILES: tuple[int, ...] = (10, 20, 30, 40, 50, 60, 70, 80, 90)

# Noisy linear imputation: a removed pixel is the weighted mean of its eight neighbours, the four
# that share an edge weighing twice the four that share a corner (1/6 and 1/12: they sum to 1).
_NEIGHBOUR_WEIGHTS = ((1 / 12, 1 / 6, 1 / 12), (1 / 6, 0.0, 1 / 6), (1 / 12, 1 / 6, 1 / 12))


def noisy_linear_imputation(
    images: torch.Tensor,
    removed: torch.Tensor,
    noise_std: float = 0.01,
    generator: torch.Generator | None = None,
    tolerance: float = 1e-3,
    max_iterations: int = 200,
) -> torch.Tensor:
    """Fill the ``removed`` pixels of ``images`` from the pixels kept (Rong et al., Sec. 4).

    Each removed pixel ``i`` must equal the weighted mean of its neighbours ``j`` in the image
    (edge neighbours weigh 1/6, corner ones 1/12; at the border the mean is over the neighbours
    that exist): ``d_i x_i - sum_j w_ij x_j = 0`` with ``d_i = sum_j w_ij``. The kept pixels are
    known, so this is a sparse linear system in the removed ones; with the terms of the kept
    neighbours moved to the right it is symmetric and positive definite (every connected hole
    borders a kept pixel, unless the whole image is removed), and conjugate gradients solve it,
    every image and channel at once, each from the solution at half the resolution. Zero-mean
    Gaussian noise of ``noise_std`` is then added to the imputed pixels only, so that a smooth
    fill does not give the removed region away by its smoothness.

    Args:
        images: ``(N, C, H, W)``.
        removed: ``(N, H, W)`` or ``(N, 1, H, W)`` booleans, True where a pixel is removed.
        noise_std: standard deviation of the noise, in the units of ``images``.
        generator: the noise's random numbers (seed it for reproducible scores).
        tolerance: stop once every system's residual is under this fraction of its right side.
        max_iterations: conjugate-gradient iterations at most, on the coarsest level (a level
            of twice the side gets half as many, down to 20).

    Returns:
        ``(N, C, H, W)``: the kept pixels unchanged, the removed ones imputed.
    """
    n, c, h, w = images.shape
    hole = removed.reshape(n, 1, h, w).to(images.device, images.dtype)
    filled = _solve_holes(images, hole, tolerance, max_iterations)
    noise = torch.randn(images.shape, generator=generator, dtype=images.dtype)
    return filled + hole * noise.to(images.device) * noise_std


#: Sides under which the holes are solved outright rather than from a coarser solution first.
_COARSEST = 16


def _solve_holes(
    images: torch.Tensor, hole: torch.Tensor, tolerance: float, max_iterations: int
) -> torch.Tensor:
    """The linear system of :func:`noisy_linear_imputation`, by conjugate gradients started from
    the solution at half the resolution (cascadic multigrid): a large hole's fill is smooth, so
    the coarse solution is most of it and the fine iterations only add the detail."""
    n, c, h, w = images.shape
    kept = 1.0 - hole
    if min(h, w) > _COARSEST:
        coarse_kept = F.avg_pool2d(kept, 2, ceil_mode=True)
        coarse_images = F.avg_pool2d(images * kept, 2, ceil_mode=True) / coarse_kept.clamp_min(1e-6)
        coarse_hole = (coarse_kept == 0).to(images.dtype)  # a coarse pixel with no kept pixel
        coarse = _solve_holes(coarse_images, coarse_hole, tolerance, max_iterations)
        guess = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    else:
        blurred_kept = gaussian_blur(kept.contiguous(), 5, 2.0)
        guess = gaussian_blur(images * kept, 5, 2.0) / blurred_kept.clamp_min(1e-6)
    kernel = torch.tensor(_NEIGHBOUR_WEIGHTS, device=images.device, dtype=images.dtype)
    per_channel = kernel.expand(c, 1, 3, 3)

    def neighbours(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, per_channel, padding=1, groups=c)  # zeros outside: no neighbour there

    ones = torch.ones(1, 1, h, w, device=images.device, dtype=images.dtype)
    degree = F.conv2d(ones, kernel.view(1, 1, 3, 3), padding=1)

    def system(v: torch.Tensor) -> torch.Tensor:  # A v, for v zero on the kept pixels
        return hole * (degree * v - neighbours(v))

    right = hole * neighbours(images * kept)
    x = hole * guess
    residual = right - system(x)
    direction = residual.clone()
    rho = (residual * residual).sum(dim=(2, 3), keepdim=True)
    floor = (tolerance**2) * (right * right).sum(dim=(2, 3), keepdim=True).clamp_min(1e-30)
    # A finer level starts closer (its error is mostly detail, which conjugate gradients remove
    # first) and costs more per iteration: it gets fewer, down to 20.
    iterations = max(20, max_iterations * _COARSEST // max(min(h, w), _COARSEST))
    for _ in range(iterations):
        if bool((rho <= floor).all()):
            break
        pushed = system(direction)
        curvature = (direction * pushed).sum(dim=(2, 3), keepdim=True)
        step = torch.where(curvature > 0, rho / curvature.clamp_min(1e-30), 0.0)
        x = x + step * direction
        residual = residual - step * pushed
        rho_next = (residual * residual).sum(dim=(2, 3), keepdim=True)
        ratio = torch.where(rho > 0, rho_next / rho.clamp_min(1e-30), 0.0)
        direction = residual + ratio * direction
        rho = rho_next
    return images * kept + x * hole


def road_inputs(
    images: torch.Tensor,
    saliency: torch.Tensor,
    order: str,
    percentiles: Sequence[int] = ROAD_PERCENTILES,
    noise_std: float = 0.01,
    seed: int = 0,
) -> torch.Tensor:
    """The images ROAD shows the model (Rong et al., ICML 2022): ``(N, P, C, H, W)``.

    Pixels are ranked by the map as in :func:`perturbation_curve`. At each percentile ``p`` the
    ``round(p * M / 100)`` pixels of ``M`` that ``order`` picks are removed, all channels
    together -- ``"morf"``: the most relevant first; ``"lerf"``: the least relevant first -- and
    imputed by :func:`noisy_linear_imputation` (the "debias" step: the fill carries no trace of
    the removal mask's shape, which a constant fill leaks to the model). The noise is seeded
    (``seed``), so the same request gives the same inputs.
    """
    if order not in ("morf", "lerf"):
        raise ValueError(f"order must be 'morf' or 'lerf', got {order!r}")
    if not percentiles or not all(0 < p < 100 for p in percentiles):
        raise ValueError(f"percentiles must lie in (0, 100), got {list(percentiles)}")
    n, c, h, w = images.shape
    if saliency.shape[0] != n:
        raise ValueError("images and saliency must have the same batch size")
    m = h * w
    ranks = _saliency_ranks(saliency.to(images.device), (h, w))
    counts = torch.tensor([round(p * m / 100) for p in percentiles], device=images.device)
    generator = torch.Generator().manual_seed(seed)
    rows = []
    with torch.inference_mode():
        for i in range(n):
            if order == "morf":
                removed = ranks[i][None, :] < counts[:, None]
            else:
                removed = ranks[i][None, :] >= (m - counts)[:, None]
            batch = images[i : i + 1].expand(len(percentiles), -1, -1, -1)
            rows.append(
                noisy_linear_imputation(batch, removed.view(-1, h, w), noise_std, generator)
            )
    return torch.stack(rows)


def road_curve(
    model: nn.Module | Forward,
    images: torch.Tensor,
    saliency: torch.Tensor,
    class_idx: torch.Tensor | list[int] | None,
    order: str,
    percentiles: Sequence[int] = ROAD_PERCENTILES,
    noise_std: float = 0.01,
    seed: int = 0,
    *,
    targets: Target | Sequence[Target] | None = None,
) -> torch.Tensor:
    """Class probability after ROAD removes each share of the pixels (Rong et al., ICML 2022):
    ``p_k = softmax(model(x_k))[c]`` for the inputs of :func:`road_inputs`, each image's
    percentiles in one forward; ``targets`` in place of ``class_idx`` as in
    :func:`perturbation_curve`.

    Returns:
        ``(N, len(percentiles))`` probabilities. A faithful map makes MoRF fall fast (a low
        mean) and LeRF stay high (a high mean).
    """
    scored_probability(class_idx, targets, images.shape[0])  # refuses a wrong pairing early
    inputs = road_inputs(images, saliency, order, percentiles, noise_std, seed)
    return road_probabilities(model, inputs, class_idx, targets=targets)


def road_probabilities(
    model: nn.Module | Forward,
    inputs: torch.Tensor,
    class_idx: torch.Tensor | Sequence[int] | None,
    *,
    targets: Target | Sequence[Target] | None = None,
    batch_size: int | None = None,
) -> torch.Tensor:
    """``softmax(model(x))[c]`` (or the sample's target's score) for :func:`road_inputs`'
    ``(N, P, C, H, W)``: ``(N, P)``, one forward per image, or per ``batch_size`` of an image's
    inputs."""
    n, percentiles = inputs.shape[:2]
    probability = scored_probability(class_idx, targets, n)
    step = percentiles if batch_size is None else max(1, batch_size)
    probs = torch.empty((n, percentiles), device=inputs.device, dtype=torch.float32)
    with torch.inference_mode():
        for i in range(n):
            for start in range(0, percentiles, step):
                part = inputs[i, start : start + step]
                samples = torch.full((len(part),), i, dtype=torch.long)
                found = probability(model(part), samples).to(inputs.device)
                probs[i, start : start + len(part)] = found
    return probs


# --------------------------------------------------------------------------------------
# Model-parameter randomisation test (Adebayo et al.)
# --------------------------------------------------------------------------------------


def rankdata(x: torch.Tensor) -> torch.Tensor:
    """Ranks along the last dimension, 1-based, ties given their average rank.

    E.g. ``[10, 20, 20, 5] -> [2, 3.5, 3.5, 1]`` (as ``scipy.stats.rankdata``'s
    ``"average"`` method). Works on any leading batch shape; returns float64.
    """
    shape = x.shape
    flat = x.reshape(-1, shape[-1]) if x.dim() > 0 else x.reshape(1, 1)
    rows, length = flat.shape
    if length == 0:
        return torch.empty(shape, dtype=torch.float64, device=x.device)
    sorted_vals, order = torch.sort(flat, dim=1, stable=True)
    new_group = torch.ones_like(sorted_vals, dtype=torch.bool)
    new_group[:, 1:] = sorted_vals[:, 1:] != sorted_vals[:, :-1]
    group = torch.cumsum(new_group.long(), dim=1) - 1  # group id within a row
    gid = group + torch.arange(rows, device=x.device)[:, None] * length  # unique over rows
    pos = torch.arange(length, device=x.device, dtype=torch.float64).expand(rows, -1)
    n_groups = rows * length
    first = torch.full((n_groups,), float("inf"), dtype=torch.float64, device=x.device)
    last = torch.full((n_groups,), -float("inf"), dtype=torch.float64, device=x.device)
    first = first.scatter_reduce(0, gid.flatten(), pos.flatten(), reduce="amin")
    last = last.scatter_reduce(0, gid.flatten(), pos.flatten(), reduce="amax")
    avg_sorted = (first[gid] + last[gid]) / 2.0 + 1.0
    ranks = torch.empty_like(avg_sorted)
    ranks.scatter_(1, order, avg_sorted)
    return ranks.reshape(shape)


def spearman_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation per sample between two batches of maps.

    Each sample's values are flattened and ranked (:func:`rankdata`, ties averaged);
    ``rho = cov(R_a, R_b) / (std(R_a) * std(R_b))``, the Pearson correlation of the ranks
    (which equals ``1 - 6 sum d^2 / (n (n^2 - 1))`` when there are no ties). A constant
    map has no ranking; its correlation is defined as 0 here (no shared structure).

    Args:
        a, b: tensors of the same shape ``(N, ...)``.

    Returns:
        Float tensor ``(N,)`` in ``[-1, 1]``.
    """
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")
    ra = rankdata(a.reshape(a.shape[0], -1).to(b.device))
    rb = rankdata(b.reshape(b.shape[0], -1))
    ra = ra - ra.mean(dim=1, keepdim=True)
    rb = rb - rb.mean(dim=1, keepdim=True)
    num = (ra * rb).sum(dim=1)
    den = torch.sqrt((ra * ra).sum(dim=1) * (rb * rb).sum(dim=1))
    rho = torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))
    return rho.clamp(-1.0, 1.0).float()


def _param_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules that own parameters directly, in registration (roughly forward) order."""
    return [
        (name, mod)
        for name, mod in model.named_modules()
        if any(True for _ in mod.parameters(recurse=False))
    ]


def _reset(name: str, module: nn.Module) -> None:
    reset = getattr(module, "reset_parameters", None)
    if callable(reset):
        with torch.no_grad():
            reset()
    else:
        logger.warning("module %r has parameters but no reset_parameters(); left as is", name)


def randomize_model(model: nn.Module, seed: int = 0, modules: list[str] | None = None) -> nn.Module:
    """A deep copy of ``model`` with re-initialised weights (the original is untouched).

    Every module that owns parameters (or only those named in ``modules``) is reset with
    its own ``reset_parameters()`` -- PyTorch's default initialisation for that layer
    type (Kaiming-uniform for conv/linear; BatchNorm to weight 1, bias 0 and fresh
    running statistics) -- under ``torch.manual_seed(seed)`` inside a forked RNG, so the
    result is reproducible and the global RNG state is unchanged. ``requires_grad`` flags
    and the train/eval mode are kept.
    """
    rnd = copy.deepcopy(model)
    targets = _param_modules(rnd)
    if modules is not None:
        wanted = set(modules)
        unknown = wanted - {name for name, _ in targets}
        if unknown:
            raise ValueError(f"no parameterised modules named {sorted(unknown)}")
        targets = [(name, mod) for name, mod in targets if name in wanted]
    devices = sorted({p.device.index or 0 for p in rnd.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for name, mod in targets:
            _reset(name, mod)
    return rnd


def randomization_check(
    model: nn.Module,
    map_fn: MapFn,
    images: torch.Tensor,
    class_idx: torch.Tensor | list[int],
    mode: str = "full",
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Model-parameter randomisation test (Adebayo et al., NeurIPS 2018).

    The maps of the trained model, ``S = map_fn(model, images, c)``, are compared with the
    maps of the same architecture with re-initialised weights, ``S' = map_fn(model', images,
    c)``, for the same classes ``c``, by the per-sample Spearman rank correlation
    (:func:`spearman_correlation`). A method that explains the *model* gives maps that
    change when the weights are destroyed, i.e. a low correlation; a high correlation
    means the map mostly reflects the input (an edge detector passes this test badly).

    * ``mode="full"``: every parameterised module is re-initialised at once
      (:func:`randomize_model`, seeded). Returns ``{"full": rho}``.
    * ``mode="cascading"``: as in Adebayo et al., modules are re-initialised one after
      another from the top (logits) down, cumulatively; returns one entry per module, in
      that order, with the correlation after that module and all above it were reset.
      "Top" is the reverse of the module registration order, which matches the forward
      order for sequential architectures such as ResNets.

    Args:
        model: the trained classifier (left untouched).
        map_fn: ``map_fn(model, images, class_idx) -> (N, h, w)`` maps; it must set up
            whatever the method needs (hooks, grad mode).
        images: model inputs ``(N, C, H, W)``.
        class_idx: class per sample ``(N,)``, the same for both models.
        mode: ``"full"`` or ``"cascading"``.
        seed: seed of the re-initialisation.

    Returns:
        Dict of name -> Spearman correlations ``(N,)``.
    """
    if mode not in ("full", "cascading"):
        raise ValueError(f"mode must be 'full' or 'cascading', got {mode!r}")
    cls = torch.as_tensor(class_idx, dtype=torch.long, device=images.device).flatten()
    reference = map_fn(model, images, cls).detach()
    if mode == "full":
        rnd = randomize_model(model, seed=seed)
        return {"full": spearman_correlation(reference, map_fn(rnd, images, cls).detach())}
    out: dict[str, torch.Tensor] = {}
    rnd = copy.deepcopy(model)
    names = [name for name, _ in _param_modules(rnd)][::-1]
    modules = dict(rnd.named_modules())
    devices = sorted({p.device.index or 0 for p in rnd.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for name in names:
            _reset(name, modules[name])
            out[name] = spearman_correlation(reference, map_fn(rnd, images, cls).detach())
    return out
