"""RandomCAM: a map of noise, the floor a method must beat to show it reads the model."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from app.cam.core import _CAM, optional_int, seeded_generator
from app.cam.layers import LayerSpec
from app.cam.options import SEED
from app.cam.targets import Objective


class RandomCAM(_CAM):
    """RandomCAM, the sanity baseline (cf. Adebayo et al., NeurIPS 2018, arXiv:1810.03292).

    L ~ U(-1, 1) independently at every position of the target layer's grid: it reads neither
    the model, the class nor the image. A method whose score does not beat it on a metric says
    nothing there. Each sample of a batch gets a draw of its own (a grid shared by the batch
    would point every image at the same place), so with a seed sample i's map is the i-th draw
    and depends on its place in the batch, unlike every other method's. Raw maps lie in
    [-1, 1] (the one method whose raw map is not ReLU'd: it is the draw itself); normalised ones
    in [0, 1].

    Args:
        seed: seeds the draws of every call (``None``: torch's global generator). A seed restarts
            them at each call: one-image calls with one seed all get the same map.
    """

    class_agnostic = True
    options = (SEED,)

    def __init__(
        self,
        model: nn.Module,
        target_layer: LayerSpec = None,
        input_shape: Sequence[int] = (3, 224, 224),
        reshape_transform: Callable[[Tensor], Tensor] | None = None,
        *,
        seed: int | None = None,
        enable_hooks: bool = True,
    ) -> None:
        self.seed = optional_int("seed", seed)
        super().__init__(model, target_layer, input_shape, reshape_transform, enable_hooks)

    def _maps(
        self,
        objective: Objective | None,
        scores: Any,
        retain_graph: bool,
        activations: list[Tensor],
    ) -> list[Tensor]:
        maps = []
        device = activations[0].device
        generator = seeded_generator(self.seed, device)
        for activation in activations:
            shape = (activation.shape[0], *activation.shape[2:])
            draw = torch.rand(shape, generator=generator, device=device, dtype=torch.float32)
            maps.append(2 * draw - 1)
        return maps
