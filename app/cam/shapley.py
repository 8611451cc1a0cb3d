"""ShapleyCAM: Grad-CAM's weights corrected by the second-order (Hessian-vector) term."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from app.cam.gradient import _FREED_GRAPH_HINTS, _GradientCAM, _spatial_dims
from app.cam.targets import Objective


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
