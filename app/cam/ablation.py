"""Ablation-CAM: channel weights from the drop of the class score when a channel is zeroed.

Gradient-free, like the Score-CAM family: the forward may run under ``torch.inference_mode()``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from app.cam.core import (
    ExtraForwards,
    _SharedExtraForwards,
    finite_number,
    hooks_silenced,
    note_forward,
    positive_int,
)
from app.cam.layers import LayerSpec
from app.cam.options import BATCH_SIZE, MethodOption
from app.cam.tail import model_tail
from app.cam.targets import Objective


class AblationCAM(_SharedExtraForwards):
    """Ablation-CAM (Desai & Ramaswamy, WACV 2020).

    w_k = (y_c - y_c^(k)) / y_c, with y_c^(k) the class score when channel k of the target
    activation is set to zero (0 where y_c = 0); L = ReLU(sum_k w_k A_k).

    The ablated forwards replace the target layer's output by a hook with the recorded activation,
    one channel zeroed per input, and run in chunks of ``batch_size`` inputs with every extractor's
    hooks off: one forward input per (sample, channel). Where it is exact (``app.cam.tail``: the
    output depends on the input only through the layer, as after a ResNet's ``layer4``), only the
    part of the model after the layer runs, from the ablated activation. ``scores`` may be left
    out: the recorded input is re-run to read y_c.

    ``ablation_ratio`` < 1 ablates, per sample, only the ceil(ratio * K) channels with the
    largest mean activation (at least one); the others get w_k = 0. The cost shrinks in
    proportion (``bench/ablation_ratio.py`` measures time and the maps' rank correlation).

    Args:
        batch_size: ablated inputs per forward (memory grows with it; the result does not).
        fast_path: run only the model's tail after the layer when that is exact (torch.fx).
        ablation_ratio: the share of channels ablated, in (0, 1]; 1 ablates every channel.
    """

    uses_scores = True
    scores_optional = True
    uses_input = True
    masked_forwards = True
    options = (
        replace(BATCH_SIZE, help="ablated inputs per forward (memory, not the result)"),
        MethodOption(
            "ablation_ratio",
            float,
            1.0,
            "share of the channels ablated, those of largest mean activation (the rest weigh 0)",
            0.01,
            1.0,
        ),
    )

    @classmethod
    def extra_forwards(
        cls, layer_shapes: Sequence[Sequence[int]], options: Mapping[str, Any], images: int
    ) -> ExtraForwards:
        ratio = float(options.get("ablation_ratio", 1.0))
        channels = sum(
            ablated_channels(shape[1] if len(shape) >= 2 else 1, ratio) for shape in layer_shapes
        )
        return ExtraForwards(images, channels, 1)

    def __init__(
        self,
        model: nn.Module,
        target_layer: LayerSpec = None,
        input_shape: Sequence[int] = (3, 224, 224),
        reshape_transform: Callable[[Tensor], Tensor] | None = None,
        *,
        batch_size: int = 32,
        fast_path: bool = True,
        ablation_ratio: float = 1.0,
        enable_hooks: bool = True,
    ) -> None:
        positive_int("batch_size", batch_size)
        ratio = finite_number("ablation_ratio", ablation_ratio, above=True, high=1.0)
        super().__init__(model, target_layer, input_shape, reshape_transform, enable_hooks)
        self.batch_size = batch_size
        self.ablation_ratio = ratio
        self.fast_path = fast_path
        self._tails: dict[str, nn.Module | None] = {}

    def _tail(self, name: str) -> nn.Module | None:
        if not self.fast_path:
            return None
        if name not in self._tails:
            # The trace runs the forward's Python with proxies: extractors' hooks must not record.
            with hooks_silenced():
                self._tails[name] = model_tail(self.model, name)
        return self._tails[name]

    def _channel_positions(self, raw: Tensor) -> Tensor:
        """(K, P): the flat positions, in one sample of the raw output, of each channel of the
        transformed activation (a reshape transform only moves elements, so indices follow)."""
        index = torch.arange(raw[0].numel(), dtype=torch.float64, device=raw.device)
        grid = self._transformed(index.reshape(1, *raw.shape[1:]))
        return grid[0].flatten(1).round().long()

    def _ablate(self, ablated: Tensor, _module: nn.Module, _inputs: Any, _output: Any) -> Any:
        """The target layer's output in an ablated forward: ``ablated`` (None, the layer's own
        output, in the forward of another pass that runs in a pause of it)."""
        return ablated if self._in_scope() else None

    def chosen_channels(self, activation: Tensor) -> Tensor:
        """(N, K) bool: the channels each sample ablates, those of largest mean activation."""
        n_samples, n_channels = activation.shape[:2]
        count = ablated_channels(n_channels, self.ablation_ratio)
        chosen = torch.zeros(n_samples, n_channels, dtype=torch.bool, device=activation.device)
        if count >= n_channels:
            return chosen.fill_(True)
        means = activation.float().flatten(2).mean(dim=2)
        return chosen.scatter_(1, means.topk(count, dim=1).indices, True)

    def _ablated_scores(
        self,
        name: str,
        module: nn.Module,
        raw: Tensor,
        inputs: Tensor,
        objectives: Sequence[Objective],
        chosen: Tensor,
    ) -> Tensor:
        """y_c^(k) for every objective and every (sample, channel) that ``chosen`` (N, K) marks,
        from the same ablated forwards (their logits hold every class): (objectives, N, K)."""
        positions = self._channel_positions(raw)
        tail = self._tail(name)
        n_samples, n_channels = raw.shape[0], positions.shape[0]
        scores = torch.zeros(
            len(objectives), n_samples, n_channels, dtype=torch.float32, device=raw.device
        )
        jobs = torch.nonzero(chosen.to(raw.device)).reshape(-1, 2)
        for start in range(0, jobs.shape[0], self.batch_size):
            samples, channels = jobs[start : start + self.batch_size].unbind(1)
            ablated = raw.index_select(0, samples).flatten(1).clone()
            ablated.scatter_(1, positions.index_select(0, channels), 0)
            ablated = ablated.reshape(samples.shape[0], *raw.shape[1:])
            if tail is not None:
                with torch.inference_mode(), hooks_silenced(), self._work.pausable():
                    output = tail(ablated)
                    note_forward()
                    values = torch.stack([o(output, samples) for o in objectives])
            else:
                handle = module.register_forward_hook(partial(self._ablate, ablated))
                try:
                    with torch.inference_mode(), hooks_silenced(), self._work.pausable():
                        output = self.model(inputs.index_select(0, samples.to(inputs.device)))
                        values = torch.stack([o(output, samples) for o in objectives])
                finally:
                    handle.remove()
            scores[:, samples, channels] = values.to(scores.device)
            self._work.advance(samples.shape[0])
        return scores

    def _weights_many(
        self, objectives: Sequence[Objective], scores: Any, activations: list[Tensor]
    ) -> list[list[Tensor]]:
        """Per objective, per layer, the channel weights from the same ablated forwards."""
        inputs = self._recorded_input().detach()
        n_samples = inputs.shape[0]
        with torch.no_grad():
            base = torch.stack([o(scores, torch.arange(n_samples)) for o in objectives])
        chosen = [self.chosen_channels(a) for a in activations]
        self._work.begin(sum(int(c.sum()) for c in chosen))
        per_layer = []
        layers = zip(self.target_names, self._target_modules, self._activations, strict=True)
        for (name, module, raw), picked in zip(layers, chosen, strict=True):
            ablated = self._ablated_scores(name, module, raw.detach(), inputs, objectives, picked)  # type: ignore[union-attr]
            y = base.to(ablated.device)[:, :, None]
            safe = torch.where(y != 0, y, torch.ones_like(y))
            kept = (y != 0) & picked.to(ablated.device)[None]
            per_layer.append(torch.where(kept, (y - ablated) / safe, torch.zeros_like(ablated)))
        return [[weights[k] for weights in per_layer] for k in range(len(objectives))]


def ablated_channels(channels: int, ratio: float) -> int:
    """How many of ``channels`` a ratio ablates: ceil(ratio * channels), at least one."""
    return min(channels, max(1, math.ceil(ratio * channels - 1e-9)))
