"""Gradient-based methods: Grad-CAM, Grad-CAM++, XGrad-CAM, Layer-CAM and SmoothGrad-CAM++.

Gradients are taken with ``torch.autograd.grad`` with respect to the hooked activations only: no
parameter ``.grad`` is written, and on a frozen model only the part after the target layer is
recorded during the forward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar, cast

import torch
from torch import Tensor, nn

from app.cam.core import (
    _CAM,
    _SharedExtraForwards,
    finite_number,
    hooks_only_for,
    optional_int,
    positive_int,
    seeded_generator,
)
from app.cam.layers import LayerSpec
from app.cam.options import SEED, noise_std, num_samples
from app.cam.targets import Objective

_FREED_GRAPH_HINTS = ("second time", "already been freed", "saved tensors after they have")


def _spatial_dims(tensor: Tensor) -> tuple[int, ...]:
    return tuple(range(2, tensor.ndim))


class _GradientCAM(_CAM):
    """Family base: one backward from the class score to the hooked activations."""

    requires_grad = True
    uses_scores = True
    #: ``explain_classes``: the classes' gradients from one batched vector-Jacobian product
    #: (``is_grads_batched``) instead of one backward per class from the retained graph.
    batched_class_grads: ClassVar[bool] = False

    def _check_graph(self, scores: Any) -> None:
        activations = [a for a in self._activations if a is not None]
        outputs = [scores] if isinstance(scores, Tensor) else []
        if any(t.is_inference() for t in outputs + activations):
            raise RuntimeError(
                f"{type(self).__name__} needs gradients, but the forward ran under "
                "torch.inference_mode(). Run the forward with gradients enabled (no "
                "inference_mode / no_grad; the model's parameters may stay frozen), or use an "
                "activation-based method (CAM, ScoreCAM, SSCAM, ISCAM)."
            )
        if any(not t.requires_grad for t in outputs + activations):
            raise RuntimeError(
                f"{type(self).__name__} needs gradients, but the scores carry no autograd graph "
                "to the target layer: the forward ran under torch.no_grad() (or the extractor's "
                "hooks were disabled). Run `scores = model(x)` with gradients enabled."
            )

    def _backprop(
        self, scores: Any, objective: Objective, samples: Tensor, retain_graph: bool
    ) -> list[Tensor]:
        """Gradients of the summed objective (row ``i`` of ``scores`` scored for sample
        ``samples[i]``) with respect to each hooked activation."""
        self._check_graph(scores)
        activations = self._recorded()
        target = objective(scores, samples).sum()
        if not target.requires_grad:
            raise RuntimeError(
                f"{type(self).__name__} needs gradients, but the score to explain carries no "
                "autograd graph to the target layer: run the forward with gradients enabled, and "
                "let targets return a tensor computed from the output (not a Python number)."
            )
        try:
            grads = torch.autograd.grad(
                target, activations, retain_graph=retain_graph, allow_unused=True
            )
        except RuntimeError as exc:
            if any(hint in str(exc) for hint in _FREED_GRAPH_HINTS):
                raise RuntimeError(
                    "The autograd graph of this forward was already used and freed by a previous "
                    "call. Pass retain_graph=True to every call but the last one when you explain "
                    "several classes after a single forward, or run the forward again."
                ) from exc
            raise
        return [
            self._transformed(torch.zeros_like(a) if g is None else g)
            for g, a in zip(grads, activations, strict=True)
        ]

    def _maps_many(
        self,
        objectives: Sequence[Objective | None],
        scores: Any,
        retain_graph: bool,
        activations: list[Tensor],
    ) -> list[list[Tensor]]:
        batched = (
            self.batched_class_grads
            and len(objectives) > 1
            and type(self)._get_weights is _GradientCAM._get_weights
            and type(self)._maps is _CAM._maps  # a method that makes its maps itself (Guided)
            and isinstance(scores, Tensor)
            and scores.ndim == 2
            and all(o is not None and o.classes is not None for o in objectives)
        )
        if not batched:
            return super()._maps_many(objectives, scores, retain_graph, activations)
        per_class = self._backprop_classes(scores, cast(list[Objective], objectives), retain_graph)
        with torch.no_grad():
            return [
                [
                    self._combine(self._weights_from(g, a), a)
                    for g, a in zip(grads, activations, strict=True)
                ]
                for grads in per_class
            ]

    def _backprop_classes(
        self, scores: Tensor, objectives: Sequence[Objective], retain_graph: bool
    ) -> list[list[Tensor]]:
        """Per objective (class indices), the gradients of its logits with respect to each
        hooked activation, from one batched vector-Jacobian product: the rows of the one-hot
        ``grad_outputs`` are the classes."""
        self._check_graph(scores)
        activations = self._recorded()
        rows = torch.arange(scores.shape[0], device=scores.device)
        one_hot = torch.zeros(
            (len(objectives), *scores.shape), dtype=scores.dtype, device=scores.device
        )
        for k, objective in enumerate(objectives):
            classes = cast(Tensor, objective.classes).to(scores.device)
            self._check_range(classes, scores.shape[1])
            one_hot[k, rows, classes] = 1
        grads = torch.autograd.grad(
            [scores],
            activations,
            grad_outputs=[one_hot],
            retain_graph=retain_graph,
            allow_unused=True,
            is_grads_batched=True,
        )
        return [
            [
                self._transformed(torch.zeros_like(a) if g is None else g[k])
                for g, a in zip(grads, activations, strict=True)
            ]
            for k in range(len(objectives))
        ]

    def _get_weights(
        self,
        objective: Objective | None,
        scores: Any,
        retain_graph: bool,
        activations: list[Tensor],
    ) -> list[Tensor]:
        if scores is None or objective is None:  # uses_scores: __call__ refused a call without
            raise ValueError(f"{type(self).__name__} needs the model's scores.")
        samples = torch.arange(len(objective))
        grads = self._backprop(scores, objective, samples, retain_graph)
        with torch.no_grad():
            return [self._weights_from(g, a) for g, a in zip(grads, activations, strict=True)]

    def _weights_from(self, grad: Tensor, activation: Tensor) -> Tensor:
        raise NotImplementedError


class GradCAM(_GradientCAM):
    """Grad-CAM (Selvaraju et al., ICCV 2017, arXiv:1610.02391).

    w_k = mean_ij dS_c/dA_k(i,j);  L = ReLU(sum_k w_k A_k).
    """

    def _weights_from(self, grad: Tensor, activation: Tensor) -> Tensor:
        return grad.mean(dim=_spatial_dims(grad))


def _gradcampp_alpha(second: Tensor, third: Tensor, activation_sum: Tensor) -> Tensor:
    """alpha = d2 / (2 d2 + sum_ab(A_ab) d3), and 0 where it is undefined (0/0 or x/0).

    No epsilon: late-layer gradients are ~1e-4, so d2 ~ 1e-8 would be swamped by one.
    """
    denominator = 2 * second + activation_sum * third
    defined = denominator != 0
    safe = torch.where(defined, denominator, torch.ones_like(denominator))
    return torch.where(defined, second / safe, torch.zeros_like(second))


class GradCAMpp(_GradientCAM):
    """Grad-CAM++ (Chattopadhyay et al., WACV 2018, arXiv:1710.11063), eq. 19 with exp(S_c).

    alpha_ij = g_ij^2 / (2 g_ij^2 + sum_ab A_ab g_ij^3) = 1 / (2 + sum_ab A_ab g_ij) for g_ij != 0;
    w_k = sum_ij alpha_ij ReLU(g_ij); L = ReLU(sum_k w_k A_k), with g = dS_c/dA_k. The common factor
    exp(S_c) of the paper's derivatives only rescales the map and is left out.
    """

    def _weights_from(self, grad: Tensor, activation: Tensor) -> Tensor:
        dims = _spatial_dims(grad)
        activation_sum = activation.sum(dim=dims, keepdim=True)
        # Dividing numerator and denominator by g^2 keeps alpha exact when g^2 or g^3 underflow.
        denominator = 2 + activation_sum * grad
        defined = (grad != 0) & (denominator != 0)
        safe = torch.where(defined, denominator, torch.ones_like(denominator))
        alpha = torch.where(defined, 1 / safe, torch.zeros_like(grad))
        return (alpha * torch.relu(grad)).sum(dim=dims)


class XGradCAM(_GradientCAM):
    """XGrad-CAM (Fu et al., BMVC 2020, arXiv:2008.02312).

    w_k = sum_ij (A_k(i,j) / sum_ab A_k(a,b)) dS_c/dA_k(i,j) (0 where sum_ab A_k = 0);
    L = ReLU(sum_k w_k A_k).
    """

    def _weights_from(self, grad: Tensor, activation: Tensor) -> Tensor:
        dims = _spatial_dims(grad)
        total = activation.sum(dim=dims)
        weighted = (activation * grad).sum(dim=dims)
        safe = torch.where(total != 0, total, torch.ones_like(total))
        return torch.where(total != 0, weighted / safe, torch.zeros_like(total))


class LayerCAM(_GradientCAM):
    """Layer-CAM (Jiang et al., IEEE TIP 2021).

    Position-wise weights: L = ReLU(sum_k ReLU(dS_c/dA_k(i,j)) A_k(i,j)). When layers are fused,
    each map is first rescaled by tanh(2 M / max M) as the paper does for shallow layers.
    """

    def _weights_from(self, grad: Tensor, activation: Tensor) -> Tensor:
        return torch.relu(grad)

    @staticmethod
    def _scale_cams(cams: Tensor) -> Tensor:
        peak = cams.flatten(1).amax(dim=1).reshape(-1, *([1] * (cams.ndim - 1)))
        safe = torch.where(peak > 0, peak, torch.ones_like(peak))
        return torch.tanh(2 * cams / safe)


class HiResCAM(_GradientCAM):
    """HiResCAM (Draelos & Carin, 2020, arXiv:2011.08891).

    Position-wise gradients times activations, without averaging: L = ReLU(sum_k g_k * A_k),
    g = dS_c/dA. For a last conv layer followed by pooling and a linear head it is exactly the
    part of the score each position contributes.
    """

    def _weights_from(self, grad: Tensor, activation: Tensor) -> Tensor:
        return grad


class GradCAMElementWise(_GradientCAM):
    """Element-wise Grad-CAM (as in the pytorch-grad-cam guide; cf. HiResCAM, arXiv:2011.08891).

    L = sum_k ReLU(g_k * A_k), g = dS_c/dA: the ReLU acts on each channel's product before the sum,
    so a channel that counts against the class cannot cancel one that counts for it.
    """

    def _weights_from(self, grad: Tensor, activation: Tensor) -> Tensor:
        # w = g where g*A > 0, else 0: then sum_k w_k A_k = sum_k ReLU(g_k A_k) and the outer ReLU
        # of the base does nothing.
        return torch.where(grad * activation > 0, grad, torch.zeros_like(grad))


class SmoothGradCAMpp(_SharedExtraForwards, _GradientCAM):
    """Smooth Grad-CAM++ (Omeiza et al., 2019, arXiv:1908.01224).

    Grad-CAM++ whose derivatives are averaged over ``num_samples`` noisy copies of the input
    x + N(0, std^2): D_n = mean_s g_s^n; alpha = D2 / (2 D2 + sum_ab A_ab D3);
    w_k = sum_ij alpha_ij ReLU(D1_ij); L = ReLU(sum_k w_k A_k), A from the clean forward.
    ``scores`` are not used: the noisy forwards are run by the extractor itself, several draws
    per batched forward (at most ``max_batch`` inputs; by default 8 on CPU, 64 elsewhere).

    Args:
        num_samples: number of noisy copies.
        std: standard deviation of the Gaussian noise, in the units of the model's input.
        seed: seeds the noise of every call (``None``: torch's global generator).
    """

    uses_scores = False
    uses_input = True
    noisy_forwards = True
    options = (
        num_samples(4, "noisy copies of the input"),
        noise_std(0.3, "standard deviation of the noise added to the input"),
        SEED,
    )
    #: most noisy inputs per forward (several draws share one batched forward and backward);
    #: None picks by device: 8 on CPU, where larger batches stop paying, 64 on accelerators.
    max_batch: int | None = None

    def __init__(
        self,
        model: nn.Module,
        target_layer: LayerSpec = None,
        input_shape: Sequence[int] = (3, 224, 224),
        reshape_transform: Callable[[Tensor], Tensor] | None = None,
        *,
        num_samples: int = 4,
        std: float = 0.3,
        seed: int | None = None,
        enable_hooks: bool = True,
    ) -> None:
        positive_int("num_samples", num_samples)
        self.std = finite_number("std", std)
        self.seed = optional_int("seed", seed)
        super().__init__(model, target_layer, input_shape, reshape_transform, enable_hooks)
        self.num_samples = num_samples

    def _weights_many(
        self, objectives: Sequence[Objective], scores: Any, activations: list[Tensor]
    ) -> list[list[Tensor]]:
        """Per objective, per layer, the weights: every objective takes its backward from the
        same noisy forwards (one backward each, the graph kept for the next)."""
        clean_input = self._recorded_input()
        clean_activations = list(self._activations)
        generator = seeded_generator(self.seed, clean_input.device)
        n_layers = len(clean_activations)
        moments: list[list[list[Tensor | None]]] = [
            [[None, None, None] for _ in range(n_layers)] for _ in objectives
        ]
        try:
            with torch.inference_mode(False), torch.enable_grad():
                base = clean_input.detach().clone()
                batch = base.shape[0]
                limit = self.max_batch or (8 if base.device.type == "cpu" else 64)
                per_pass = max(1, limit // batch)
                self._work.begin(self.num_samples * batch)
                for first in range(0, self.num_samples, per_pass):
                    draws = min(per_pass, self.num_samples - first)
                    # One noise draw per sample, shared by the batch: a map does not depend on
                    # its batch. Several draws go through one forward (draw-major order).
                    noise = torch.stack(
                        [
                            torch.randn(
                                base.shape[1:],
                                generator=generator,
                                device=base.device,
                                dtype=base.dtype,
                            )
                            for _ in range(draws)
                        ]
                    )
                    noisy = (base.unsqueeze(0) + self.std * noise.unsqueeze(1)).flatten(0, 1)
                    with hooks_only_for(self), self._work.pausable():
                        out = self.model(noisy)
                    samples = torch.arange(batch).repeat(draws)
                    last = len(objectives) - 1
                    for k, objective in enumerate(objectives):
                        grads = self._backprop(out, objective, samples, retain_graph=k < last)
                        with torch.no_grad():
                            for layer, grad in enumerate(grads):
                                grad = grad.unflatten(0, (draws, batch))
                                for power in range(3):
                                    term = (grad ** (power + 1)).sum(dim=0)
                                    acc = moments[k][layer][power]
                                    moments[k][layer][power] = term if acc is None else acc + term
                    self._work.advance(draws * batch)
        finally:
            # The noisy forwards were recorded by this extractor's hooks: put the clean forward
            # back, so that a second call (retain_graph=True) starts from the user's input again.
            self._activations = clean_activations
            self._input = clean_input
        return [self._moment_weights(per_layer, activations) for per_layer in moments]

    def _moment_weights(
        self, moments: list[list[Tensor | None]], activations: list[Tensor]
    ) -> list[Tensor]:
        weights = []
        with torch.no_grad():
            for sums, activation in zip(moments, activations, strict=True):
                # num_samples >= 1: every sum was accumulated at least once.
                d1, d2, d3 = (cast(Tensor, s) / self.num_samples for s in sums)
                dims = _spatial_dims(activation)
                activation_sum = activation.sum(dim=dims, keepdim=True)
                alpha = _gradcampp_alpha(d2, d3, activation_sum)
                weights.append((alpha * torch.relu(d1)).sum(dim=dims))
        return weights
