"""ShapleyCAM: Grad-CAM's weights corrected by the second-order (Hessian-vector) term."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from app.cam.core import hooks_only_for
from app.cam.gradient import _FREED_GRAPH_HINTS, _GradientCAM, _spatial_dims
from app.cam.layers import eval_mode
from app.cam.targets import Objective


def _no_second_derivative(exc: RuntimeError) -> bool:
    """Whether autograd refused the double backward: an op of the forward whose backward has
    no derivative of its own (PyTorch's fused attention kernels)."""
    text = str(exc)
    return "derivative for" in text and "is not implemented" in text


class ShapleyCAM(_GradientCAM):
    """ShapleyCAM (Cai et al., ICLR 2025, "CAMs as Shapley Value-based Explainers").

    The Shapley value of each activation under the second-order Taylor expansion of the score
    around A is A * (g - 1/2 H A), g = dS_c/dA and H A the Hessian-vector product; averaged
    over positions it gives the channel weights: w_k = mean_ij (g - 1/2 H A)_k(i,j);
    L = ReLU(sum_k w_k A_k). H A comes from a double backward (``create_graph``). After a
    piecewise-linear head (ReLU, pooling, Linear) H A is 0 for a logit and the map is Grad-CAM's;
    the term matters where the score is curved in A (a softmax-based score, smooth activations).
    """

    def _get_weights(
        self,
        objective: Objective | None,
        scores: Any,
        retain_graph: bool,
        activations: list[Tensor],
    ) -> list[Tensor]:
        if scores is None or objective is None:
            raise ValueError("ShapleyCAM needs the model's scores.")
        self._check_graph(scores)
        try:
            return self._shapley_weights(objective, scores, retain_graph, activations)
        except RuntimeError as exc:
            if not _no_second_derivative(exc):
                raise
            first_error = exc
        # A Vision Transformer's forward ran F.scaled_dot_product_attention on a fused kernel
        # (flash on CPU, flash or memory-efficient on CUDA), whose backward has no derivative:
        # run the recorded input again with the attention's plain formula, which has one (one
        # more forward). The flag sdpa_kernel sets is process-wide: another thread's forward
        # meanwhile takes the plain formula too (the same values, slower).
        inputs = self._recorded_input()
        saved = self._recorded_state()
        self.reset_hooks()
        try:
            with (
                sdpa_kernel(SDPBackend.MATH),
                hooks_only_for(self),
                eval_mode(self.model),
                torch.enable_grad(),
            ):
                again = self.model(inputs.detach())
                return self._shapley_weights(objective, again, retain_graph, activations)
        except RuntimeError as exc:
            if not _no_second_derivative(exc):
                raise
            raise RuntimeError(
                f"ShapleyCAM takes a second derivative (a Hessian-vector product), and PyTorch "
                f"has none for an operation of this model ({first_error}). Use GradCAM, or "
                "LayerCAM, which need the first derivative only."
            ) from exc
        finally:
            for name, value in saved.items():
                setattr(self, name, value)

    def _shapley_weights(
        self, objective: Objective, scores: Any, retain_graph: bool, activations: list[Tensor]
    ) -> list[Tensor]:
        recorded = self._recorded()
        target = objective(scores, torch.arange(len(objective))).sum()
        if not target.requires_grad:
            raise RuntimeError(
                "ShapleyCAM needs gradients, but the score to explain carries no autograd graph "
                "to the target layer: run the forward with gradients enabled."
            )
        try:
            first = torch.autograd.grad(target, recorded, create_graph=True, allow_unused=True)
        except RuntimeError as exc:
            if any(hint in str(exc) for hint in _FREED_GRAPH_HINTS):
                raise RuntimeError(
                    "The autograd graph of this forward was already used and freed by a previous "
                    "call. Pass retain_graph=True to every call but the last one, or run the "
                    "forward again."
                ) from exc
            raise
        grads = [
            torch.zeros_like(a) if g is None else g for g, a in zip(first, recorded, strict=True)
        ]
        curved = [(g, a) for g, a in zip(grads, recorded, strict=True) if g.requires_grad]
        products: dict[int, Tensor | None] = dict.fromkeys(range(len(recorded)))
        if curved:
            # d/dA <g, v> with v = A held fixed: the Hessian-vector product H A.
            hvps = torch.autograd.grad(
                [g for g, _ in curved],
                [a for _, a in curved],
                grad_outputs=[a.detach() for _, a in curved],
                retain_graph=retain_graph,
                allow_unused=True,
            )
            slots = [i for i, g in enumerate(grads) if g.requires_grad]
            products.update(zip(slots, hvps, strict=True))
        weights = []
        with torch.no_grad():
            for i, (grad, activation) in enumerate(zip(grads, activations, strict=True)):
                hvp = products[i]
                corrected = grad.detach() if hvp is None else grad.detach() - 0.5 * hvp
                corrected = self._transformed(corrected)
                weights.append(corrected.mean(dim=_spatial_dims(activation)))
        return weights
