"""FullGrad: the input-gradient and every bias-gradient of the network, summed as maps.

It reads the whole network rather than one layer: the model's input and the output of every
convolution and batch norm that has a bias. Its target layers are those, found by itself; the
``target_layer`` a caller passes is not used (the service refuses one, ``takes_layers``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from app.cam.core import resize_maps
from app.cam.gradient import _GradientCAM
from app.cam.layers import LayerSpec
from app.cam.targets import Objective

_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def bias_layers(model: nn.Module) -> list[str]:
    """The convolutions with a bias and the batch norms of ``model``, by name, in order."""
    return [
        name
        for name, module in model.named_modules()
        if name
        and (
            (isinstance(module, _CONVOLUTIONS) and module.bias is not None)
            or isinstance(module, _BatchNorm)
        )
    ]


def effective_bias(module: nn.Module) -> Tensor:
    """The bias a layer adds to each output channel: a convolution's own; a batch norm's
    beta - mean * gamma / sqrt(var + eps) from its running statistics (in eval mode it is the
    affine map x * scale + that)."""
    if isinstance(module, _BatchNorm):
        if module.training or module.running_mean is None or module.running_var is None:
            raise ValueError(
                "FullGrad reads the running statistics of batch norms: put the model in eval "
                "mode (model.eval()), with track_running_stats on."
            )
        mean, var = module.running_mean, module.running_var
        scale = torch.rsqrt(var + module.eps)
        if module.weight is not None:
            scale = scale * module.weight
        bias = -mean * scale
        return bias + module.bias if module.bias is not None else bias
    return module.bias  # type: ignore[return-value]


def rescale(terms: Tensor) -> Tensor:
    """psi before the resize: |x|, then min-max scaled per sample over channels and positions."""
    magnitude = terms.abs()
    flat = magnitude.flatten(1)
    low = flat.min(dim=1, keepdim=True).values
    span = flat.max(dim=1, keepdim=True).values - low
    scaled = (flat - low) / torch.where(span > 0, span, torch.ones_like(span))
    return scaled.reshape(terms.shape)


class FullGrad(_GradientCAM):
    """FullGrad (Srinivas & Fleuret, NeurIPS 2019, arXiv:1905.00780).

    S = psi(dS_c/dx * x) + sum_l sum_k psi(dS_c/dz_l * b_l)_k, over every convolution and batch
    norm l with output z_l and bias b_l (a batch norm's in eval mode); psi takes |.|, min-max
    scales each sample's tensor and resizes it to the input. For a ReLU network the terms add up
    to the class score (full-gradient completeness), so no part of it is left unexplained. It
    reads the whole network: no target layer, one map at input resolution.
    """

    uses_input = True
    one_map = True
    takes_layers = False
    reads_grids = False  # its bias layers' outputs, as they are

    def __init__(
        self,
        model: nn.Module,
        target_layer: LayerSpec = None,
        input_shape: Sequence[int] = (3, 224, 224),
        reshape_transform: Callable[[Tensor], Tensor] | None = None,
        enable_hooks: bool = True,
    ) -> None:
        # ``target_layer`` and ``reshape_transform`` are accepted for the common signature and
        # not used: FullGrad hooks every bias layer, whose outputs are grids already.
        layers = bias_layers(model) if isinstance(model, nn.Module) else []
        if isinstance(model, nn.Module) and not layers:
            raise ValueError(self._no_bias_reason())
        super().__init__(model, layers or None, input_shape, None, enable_hooks)

    @staticmethod
    def _no_bias_reason() -> str:
        return (
            "FullGrad needs convolutions with a bias or batch norms: this model has none, so "
            "only its input-gradient would be left. Use GradCAM or LayerCAM instead."
        )

    @classmethod
    def unavailable_reason(
        cls, model: nn.Module, target_layer: LayerSpec, input_shape: Sequence[int]
    ) -> str | None:
        return None if bias_layers(model) else cls._no_bias_reason()

    def _record_input(self, _module: nn.Module, args: tuple[Any, ...]) -> Any:
        if not (self._recording() and args and isinstance(args[0], Tensor)):
            return None
        x = args[0]
        if torch.is_grad_enabled() and x.is_floating_point() and not x.requires_grad:
            # The input-gradient term needs the graph from the input on (on a frozen model only
            # the part after the first layer would be recorded otherwise).
            x = x.detach().requires_grad_(True)
            self._input = x
            return (x, *args[1:])
        self._input = x
        return None

    def _record(self, idx: int, module: nn.Module, _inputs: Any, output: Any) -> Tensor | None:
        if not self._recording() or not isinstance(output, Tensor):
            return None
        self._activations[idx] = output
        # The next module may change its input in place (a BatchNorm followed by
        # ReLU(inplace=True)): hand it a copy, so the recorded tensor keeps its own gradient.
        return output.clone() if output.requires_grad else None

    def _called(self) -> list[nn.Module]:
        """The bias layers the hooked forward called, in the order of ``_recorded``."""
        return [
            module
            for module, output in zip(self._target_modules, self._activations, strict=True)
            if output is not None
        ]

    def _recorded(self) -> list[Tensor]:
        # A model may hold bias layers its forward does not call (GoogLeNet's and Inception
        # v3's auxiliary heads in eval mode): they add no term, and the caller chose none of
        # them, so only a forward that was not recorded at all is an error.
        recorded = [a for a in self._activations if a is not None]
        if not recorded or self._input is None:
            return super()._recorded()
        return recorded

    def _explain(self, *args: Any, **kwargs: Any) -> list[list[Tensor]]:
        # Before the base puts the model in eval mode for the call: the biases must be those of
        # the forward that was hooked, and a batch norm in train mode used its batch statistics.
        for module in self._called():
            effective_bias(module)
        return super()._explain(*args, **kwargs)

    def _maps(
        self,
        objective: Objective | None,
        scores: Any,
        retain_graph: bool,
        activations: list[Tensor],
    ) -> list[Tensor]:
        if scores is None or objective is None:
            raise ValueError("FullGrad needs the model's scores.")
        self._check_graph(scores)
        x = self._input
        if x is None or not x.requires_grad:
            raise RuntimeError(
                "FullGrad needs the gradient of the input: run the forward of the model with "
                "gradients enabled and the extractor's hooks on."
            )
        outputs = self._recorded()
        biases = [effective_bias(m).detach() for m in self._called()]
        target = objective(scores, torch.arange(len(objective))).sum()
        grads = torch.autograd.grad(
            target, [x, *outputs], retain_graph=retain_graph, allow_unused=True
        )
        size = x.shape[2:]
        with torch.no_grad():
            grad_x = torch.zeros_like(x) if grads[0] is None else grads[0]
            total = rescale(grad_x * x).sum(dim=1)
            for grad, output, bias in zip(grads[1:], outputs, biases, strict=True):
                if grad is None or output.ndim != x.ndim:
                    continue  # unused, or not a grid (a BatchNorm1d on features)
                shape = (1, -1, *([1] * (output.ndim - 2)))
                term = rescale(grad * bias.to(grad.dtype).reshape(shape)).sum(dim=1)
                total = total + resize_maps(term.float(), size).to(total.dtype)
        return [total]
