"""D-RISE: a black-box saliency map of one detection, from the detector's answers on randomly
masked copies of the image. It hooks no layer: it reads the model's input and output only."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from app.cam.chunking import ChunkSizer
from app.cam.core import (
    _CAM,
    ExtraForwards,
    finite_number,
    hooks_silenced,
    optional_int,
    positive_int,
    seeded_generator,
)
from app.cam.layers import LayerSpec
from app.cam.options import BATCH_SIZE, CHUNK_MS, MAX_TIMED_CHUNK, SEED, MethodOption
from app.cam.targets import Objective

MASKS = MethodOption(
    "masks",
    int,
    1000,
    "random masks, one masked forward each per image (the paper used 5000; fewer give a noisier "
    "map)",
    1,
    20_000,
)
GRID = MethodOption(
    "grid", int, 16, "cells per side of a mask before it is upsampled (the paper's 16)", 2, 64
)
KEEP = MethodOption(
    "keep",
    float,
    0.5,
    "the share of a mask's cells that keep the image (the paper's 0.5)",
    0.05,
    0.95,
)


def random_masks(
    count: int,
    grid: int,
    keep: float,
    size: Sequence[int],
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
) -> tuple[Tensor, Tensor]:
    """RISE's masks, drawn once: ``count`` binary (grid, grid) grids whose cells are 1 with
    probability ``keep``, and each one's shift (dy, dx) within a cell. ``masks_at`` turns them
    into (H, W) masks; drawing first and upsampling per chunk keeps a seeded map the same
    whatever the chunk size."""
    device = device or torch.device("cpu")
    cells = torch.rand((count, grid, grid), generator=generator, device=device) < keep
    cell_h, cell_w = math.ceil(size[0] / grid), math.ceil(size[1] / grid)
    shift = torch.rand((count, 2), generator=generator, device=device)
    shifts = (shift * torch.tensor([cell_h, cell_w], device=device)).long()
    return cells.float(), shifts


def masks_at(cells: Tensor, shifts: Tensor, size: Sequence[int]) -> Tensor:
    """(B, grid, grid) cells and their (B, 2) shifts as (B, H, W) smooth masks in [0, 1]: each
    grid bilinearly upsampled to (grid + 1) cells of ceil(H / grid) x ceil(W / grid) pixels and
    cropped at its shift (RISE, Petsiuk et al. 2018, section 3.2)."""
    height, width = int(size[0]), int(size[1])
    grid = cells.shape[-1]
    cell_h, cell_w = math.ceil(height / grid), math.ceil(width / grid)
    up = F.interpolate(
        cells[:, None], size=((grid + 1) * cell_h, (grid + 1) * cell_w), mode="bilinear"
    )[:, 0]
    rows = torch.arange(height, device=cells.device)[None, :] + shifts[:, :1]
    cols = torch.arange(width, device=cells.device)[None, :] + shifts[:, 1:]
    picked = up.gather(1, rows[:, :, None].expand(-1, -1, up.shape[2]))
    return picked.gather(2, cols[:, None, :].expand(-1, height, -1))


class DRISE(_CAM):
    """D-RISE (Petsiuk et al., CVPR 2021, arXiv:2006.03204): black-box saliency of a detection.

    S = ReLU((1 / N) sum_i w_i M_i) over N random masks M_i (RISE's upsampled, shifted binary
    grids), with w_i = max_j IoU(L_t, L_j) x cos(P_t, P_j) x O_j over the detections j of the
    masked image I * M_i (``app.cam.task_targets.DetectionSimilarity``). It hooks no layer and
    needs no gradient; each mask costs one forward per image, run in chunks of ``batch_size``.

    Its target is any scalar of one image's output (``targets=``): with a
    ``DetectionSimilarity`` it is D-RISE, with a class index it is RISE on a classifier. The
    service serves it for detectors only.

    Args:
        masks: the number N of random masks.
        grid: cells per side of a mask.
        keep: the probability that a cell keeps the image.
        seed: seeds the masks of every call (``None``: torch's global generator).
        batch_size: masked inputs per forward (memory, not the result).
        chunk_ms: on CUDA, the device time a chunk aims at (``app.cam.chunking``).
    """

    uses_input = True
    masked_forwards = True
    one_map = True
    takes_layers = False
    hooks_layers = False
    reads_grids = False  # the recorded input
    explains_detections = True
    eigen_smoothable = False
    # A flipped image's detections lie elsewhere: its target box would no longer match them.
    aug_smoothable = False
    options: ClassVar[tuple[MethodOption, ...]] = (MASKS, GRID, KEEP, SEED, BATCH_SIZE, CHUNK_MS)

    def __init__(
        self,
        model: nn.Module,
        target_layer: LayerSpec = None,
        input_shape: Sequence[int] = (3, 224, 224),
        reshape_transform: Callable[[Tensor], Tensor] | None = None,
        *,
        masks: int = 1000,
        grid: int = 16,
        keep: float = 0.5,
        seed: int | None = None,
        batch_size: int = 32,
        chunk_ms: float = 20.0,
        enable_hooks: bool = True,
    ) -> None:
        # ``target_layer`` and ``reshape_transform`` are taken for the common signature and not
        # used: D-RISE reads no layer.
        positive_int("masks", masks)
        positive_int("batch_size", batch_size)
        positive_int("grid", grid, low=2)
        if not 0.0 < keep < 1.0:
            raise ValueError(f"keep must lie strictly between 0 and 1, got {keep!r}.")
        optional_int("seed", seed)
        chunk_ms = finite_number("chunk_ms", chunk_ms, above=True)
        super().__init__(model, None, input_shape, None, enable_hooks)
        self.masks = masks
        self.grid = grid
        self.keep = float(keep)
        self.seed = seed
        self.batch_size = batch_size
        self.chunk_ms = chunk_ms
        self.chunk_sizes: list[int] = []
        """Inputs per chunk of the last call's masked forwards."""

    @classmethod
    def extra_forwards(
        cls, layer_shapes: Sequence[Sequence[int]], options: Mapping[str, Any], images: int
    ) -> ExtraForwards:
        """One masked forward per image and mask, whatever the layers."""
        return ExtraForwards(images, 1, int(options.get("masks", MASKS.default)))

    def _recorded(self) -> list[Tensor]:
        """The model's input of the hooked forward (D-RISE records nothing else)."""
        return [self._recorded_input()]

    def _maps(
        self,
        objective: Objective | None,
        scores: Any,
        retain_graph: bool,
        activations: list[Tensor],
    ) -> list[Tensor]:
        return self._maps_many([objective], scores, retain_graph, activations)[0]

    def _maps_many(
        self,
        objectives: Sequence[Objective | None],
        scores: Any,
        retain_graph: bool,
        activations: list[Tensor],
    ) -> list[list[Tensor]]:
        """Every objective weighs the same masked forwards."""
        with torch.inference_mode(False):
            inputs = activations[0].detach().clone()
        n_images, size = inputs.shape[0], inputs.shape[2:]
        if len(size) != 2:
            raise ValueError(
                f"DRISE masks images (N, C, H, W); the input is {tuple(inputs.shape)}."
            )
        generator = seeded_generator(self.seed, inputs.device)
        cells, shifts = random_masks(
            self.masks, self.grid, self.keep, size, generator, inputs.device
        )
        sums = torch.zeros(len(objectives), n_images, *size, device=inputs.device)
        jobs = torch.cartesian_prod(
            torch.arange(n_images, device=inputs.device),
            torch.arange(self.masks, device=inputs.device),
        ).reshape(-1, 2)
        self._work.begin(jobs.shape[0])
        sizer = ChunkSizer(self.batch_size, self.chunk_ms, inputs.device, MAX_TIMED_CHUNK)
        self.chunk_sizes = sizer.sizes
        for part in sizer.slices(jobs.shape[0]):
            samples, which = jobs[part, 0], jobs[part, 1]
            with sizer.timing(samples.shape[0]):
                masks = masks_at(cells[which], shifts[which], size)
                masked = inputs[samples] * masks[:, None].to(inputs.dtype)
                with torch.inference_mode(), hooks_silenced(), self._work.pausable():
                    output = self.model(masked)
                with torch.inference_mode():
                    for k, objective in enumerate(objectives):
                        if objective is None:
                            raise ValueError("DRISE needs a target to compare detections with.")
                        weights = objective(output, samples).float().to(masks.device)
                        sums[k].index_add_(0, samples, weights[:, None, None] * masks)
            self._work.advance(samples.shape[0])
        # ReLU as every map's: a classifier's logit as the weight (RISE) may be negative.
        return [[torch.relu(sums[k] / self.masks)] for k in range(len(objectives))]
