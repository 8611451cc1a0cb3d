"""Guided Backpropagation and Guided Grad-CAM: maps at the input's resolution.

Both take the gradient of the class score with respect to the *input*, through a backward in
which every ReLU lets only positive gradients pass where its input was positive (the "guided"
rule). That rule must not leak into the model's ordinary backward, which other extractors on the
same forward rely on, so the guided gradient comes from a forward of its own on the recorded
input, run inside ``guided_relus()``: a scope that exists for that one forward and backward.

What the scope covers: every call of ``torch.nn.functional.relu`` / ``relu_``, ``torch.relu`` /
``relu_`` and ``Tensor.relu`` / ``relu_`` made in Python during the forward, which includes
``nn.ReLU`` modules (in place or not: their forward calls ``F.relu``) and ``F.relu`` written
inside a model's own ``forward`` (DenseNet). What it does not: other activations (ReLU6,
LeakyReLU, GELU, SiLU, ...) keep their ordinary backward, and ReLUs run inside TorchScript or
compiled graphs, or in C++ extensions, are not seen by a ``TorchFunctionMode`` and keep theirs.
The model's modules are never touched: no module hook and no attribute is changed; the only hooks
are tensor hooks on the outputs of that forward's ReLUs, which go with its graph.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from app.cam.core import _CAM, hooks_silenced, resize_maps
from app.cam.gradient import GradCAM
from app.cam.targets import Objective

#: The Python entry points of ReLU: ``nn.ReLU.forward`` calls ``F.relu``, which the mode sees.
_RELU_FUNCTIONS: frozenset[Callable[..., Any]] = frozenset(
    {F.relu, F.relu_, torch.relu, torch.relu_, Tensor.relu, Tensor.relu_}
)


def _positive_part(grad: Tensor) -> Tensor:
    return grad.clamp(min=0)


class _GuidedReLUs(TorchFunctionMode):
    """Hooks the output of every ReLU called while the mode is on: its gradient is clamped at 0
    before the ReLU's own backward masks it by ``input > 0``."""

    def __init__(self) -> None:
        super().__init__()
        self.hooked = 0

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        if func in _RELU_FUNCTIONS and isinstance(out, Tensor) and out.requires_grad:
            # Registered on the output as it is now: an in-place op that follows does not move
            # the hook, which still sees the gradient of the ReLU's own output.
            out.register_hook(_positive_part)
            self.hooked += 1
        return out


@contextmanager
def guided_relus() -> Iterator[_GuidedReLUs]:
    """Within this block, on this thread, every ReLU of a forward backpropagates by the guided
    rule: dL/dx = [x > 0] * max(dL/dy, 0). Leaves with the block, even on an error."""
    mode = _GuidedReLUs()
    with mode:
        yield mode


def guided_gradients(model: nn.Module, inputs: Tensor, objective: Objective) -> Tensor:
    """The guided gradient of ``objective``'s score of each sample with respect to ``inputs``,
    from a forward and backward of their own (every extractor's hooks silent): (N, C, *S)."""
    x = inputs.detach()
    with torch.inference_mode(False), torch.enable_grad(), hooks_silenced():
        # A clone made here is an ordinary tensor, even when the input was an inference tensor.
        x = x.clone().requires_grad_(True)
        with guided_relus():
            scores = model(x)
            target = objective(scores, torch.arange(len(objective))).sum()
        (grad,) = torch.autograd.grad(target, x)
    return grad.detach()


def channel_abs_max(gradients: Tensor) -> Tensor:
    """One map per image from an input-shaped gradient (N, C, *S): max_c |G_c| (N, *S)."""
    return gradients.abs().amax(dim=1)


class _InputResolution(_CAM):
    """Family base: a forward of its own on the recorded input, for the guided gradient."""

    uses_input = True
    #: the guided pass: one forward and backward per image, and per class (a class's guided
    #: gradient is a backward of its own), so its forwards grow with the classes asked
    own_forwards = 1
    shares_classes = False
    #: its maps have the input's spatial size, not the target layer's
    input_resolution: ClassVar[bool] = True
    #: the last call's guided gradient, per channel (N, C, *S): what the served map collapses
    input_gradients: Tensor | None = None

    def _guided(self, objective: Objective | None) -> Tensor:
        if objective is None:  # neither method is class-agnostic
            raise ValueError(f"{type(self).__name__} needs what to explain.")
        self.input_gradients = guided_gradients(self.model, self._recorded_input(), objective)
        return self.input_gradients


class GuidedBackprop(_InputResolution):
    """Guided Backpropagation (Springenberg et al., ICLR 2015 workshop, arXiv:1412.6806).

    G = dS_c/dx with every ReLU's backward replaced by R_in = [x > 0] * max(R_out, 0);
    L = max_c |G_c|, one map at the input's resolution. The target layers play no part: the map
    is the same for any of them (one map, served as ``fused``).
    """

    one_map = True
    reads_grids = False  # its target layers play no part in its map: a ViT's tokens will do

    def _maps(
        self,
        objective: Objective | None,
        scores: Any,
        retain_graph: bool,
        activations: list[Tensor],
    ) -> list[Tensor]:
        return [channel_abs_max(self._guided(objective))]


class GuidedGradCAM(_InputResolution, GradCAM):
    """Guided Grad-CAM (Selvaraju et al., ICCV 2017, arXiv:1610.02391, section 3.1).

    G ⊙ up(L_GradCAM): the guided-backpropagation gradient G (N, C, H, W) times the layer's
    Grad-CAM map bilinearly upsampled to the input; L = max_c |G_c ⋅ up(L_GradCAM)|, one map
    per target layer at the input's resolution.
    """

    def _maps(
        self,
        objective: Objective | None,
        scores: Any,
        retain_graph: bool,
        activations: list[Tensor],
    ) -> list[Tensor]:
        cams = GradCAM._maps(self, objective, scores, retain_graph, activations)
        guided = self._guided(objective)
        size = guided.shape[2:]
        with torch.no_grad():
            return [
                channel_abs_max(guided * resize_maps(cam.to(guided.dtype), size).unsqueeze(1))
                for cam in cams
            ]
