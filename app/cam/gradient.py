"""Gradient-based methods: Grad-CAM, Grad-CAM++, XGrad-CAM, Layer-CAM and SmoothGrad-CAM++.

Gradients are taken with ``torch.autograd.grad`` with respect to the hooked activations only: no
parameter ``.grad`` is written, and on a frozen model only the part after the target layer is
recorded during the forward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from app.cam.core import _CAM, hooks_only_for, positive_int, seeded_generator
from app.cam.layers import LayerSpec

_FREED_GRAPH_HINTS = ("second time", "already been freed", "saved tensors after they have")


def _spatial_dims(tensor: Tensor) -> tuple[int, ...]:
    return tuple(range(2, tensor.ndim))


class _GradientCAM(_CAM):
    """Family base: one backward from the class score to the hooked activations."""

    requires_grad = True
    uses_scores = True

    def _check_graph(self, scores: Tensor) -> None:
        activations = [a for a in self._activations if a is not None]
        if scores.is_inference() or any(a.is_inference() for a in activations):
            raise RuntimeError(
                f"{type(self).__name__} needs gradients, but the forward ran under "
                "torch.inference_mode(). Run the forward with gradients enabled (no "
                "inference_mode / no_grad; the model's parameters may stay frozen), or use an "
                "activation-based method (CAM, ScoreCAM, SSCAM, ISCAM)."
            )
        if not scores.requires_grad or any(not a.requires_grad for a in activations):
            raise RuntimeError(
                f"{type(self).__name__} needs gradients, but the scores carry no autograd graph "
                "to the target layer: the forward ran under torch.no_grad() (or the extractor's "
                "hooks were disabled). Run `scores = model(x)` with gradients enabled."
            )

    def _backprop(self, scores: Tensor, class_idx: Tensor, retain_graph: bool) -> list[Tensor]:
        """Gradients of the summed class scores with respect to each hooked activation."""
        self._check_graph(scores)
        activations = list(self._activations)
        target = scores.gather(1, class_idx.to(scores.device)[:, None]).sum()
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

    def _get_weights(
        self,
        class_idx: Tensor,
        scores: Tensor | None,
        retain_graph: bool,
        activations: list[Tensor],
    ) -> list[Tensor]:
        grads = self._backprop(scores, class_idx, retain_graph)  # type: ignore[arg-type]
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


class SmoothGradCAMpp(_GradientCAM):
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
    option_names = ("num_samples", "std", "seed")
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
        if not std >= 0:
            raise ValueError(f"std must be >= 0, got {std!r}.")
        super().__init__(model, target_layer, input_shape, reshape_transform, enable_hooks)
        self.num_samples = num_samples
        self.std = float(std)
        self.seed = seed

    def _get_weights(
        self,
        class_idx: Tensor,
        scores: Tensor | None,
        retain_graph: bool,
        activations: list[Tensor],
    ) -> list[Tensor]:
        if self._input is None:
            raise RuntimeError(
                "SmoothGradCAMpp recorded no model input: run the forward of the model with the "
                "extractor's hooks enabled before calling it."
            )
        clean_input = self._input
        clean_activations = list(self._activations)
        generator = seeded_generator(self.seed, clean_input.device)
        n_layers = len(clean_activations)
        moments: list[list[Tensor | None]] = [[None, None, None] for _ in range(n_layers)]
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
                    with hooks_only_for(self):
                        out = self.model(noisy)
                    if out.ndim != 2:
                        raise ValueError(
                            "The model's output must be logits of shape (N, classes), got "
                            f"{tuple(out.shape)}."
                        )
                    self._check_range(class_idx, out.shape[1])
                    grads = self._backprop(out, class_idx.repeat(draws), retain_graph=False)
                    with torch.no_grad():
                        for layer, grad in enumerate(grads):
                            grad = grad.unflatten(0, (draws, batch))
                            for power in range(3):
                                term = (grad ** (power + 1)).sum(dim=0)
                                acc = moments[layer][power]
                                moments[layer][power] = term if acc is None else acc + term
                    self._work.advance(draws * batch)
        finally:
            # The noisy forwards were recorded by this extractor's hooks: put the clean forward
            # back, so that a second call (retain_graph=True) starts from the user's input again.
            self._activations = clean_activations
            self._input = clean_input
        weights = []
        with torch.no_grad():
            for (d1, d2, d3), activation in zip(moments, activations, strict=True):
                d1, d2, d3 = (d / self.num_samples for d in (d1, d2, d3))  # type: ignore[operator]
                dims = _spatial_dims(activation)
                activation_sum = activation.sum(dim=dims, keepdim=True)
                alpha = _gradcampp_alpha(d2, d3, activation_sum)
                weights.append((alpha * torch.relu(d1)).sum(dim=dims))
        return weights
