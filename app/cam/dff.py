"""Deep Feature Factorization: non-negative matrix factorization of a layer's activations.

Collins, Achanta and Süsstrunk, "Deep Feature Factorization for Concept Discovery", ECCV 2018
(arXiv:1806.10206). The activations of one image, A (C, H, W) >= 0, are read as a matrix
V (H*W, C) and factored as V ~ W H with W (H*W, K) >= 0 and H (K, C) >= 0: row k of H is a
concept (a direction in channel space), column k of W is where the image shows it (a map).

Each image is factored on its own: in the service, images of several requests share a pass, and
a concept must not depend on someone else's image.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from app.cam.activation import CAM, head_weight
from app.cam.core import positive_int
from app.cam.layers import LayerSpec
from app.cam.options import FC_LAYER, MethodOption
from app.cam.targets import Objective

#: Keeps the multiplicative updates away from 0/0; small against any activation worth a concept.
_EPS = 1e-10

N_COMPONENTS = MethodOption(
    "n_components",
    int,
    4,
    "concepts DFF factors the layer's activations into (at most the layer's channels)",
    1,
    16,
)


@dataclass(frozen=True)
class Factors:
    """An NMF V ~ W H of a batch of matrices V (N, P, C): W (N, P, K), H (N, K, C), both >= 0,
    with the relative error ||V - W H||_F / ||V||_F after each checked iteration."""

    w: Tensor
    h: Tensor
    errors: list[Tensor]


def relative_error(v: Tensor, w: Tensor, h: Tensor) -> Tensor:
    """||V - W H||_F / ||V||_F per matrix of the batch (N,)."""
    norm = v.flatten(1).norm(dim=1).clamp_min(_EPS)
    return (v - w @ h).flatten(1).norm(dim=1) / norm


def nmf(
    v: Tensor,
    k: int,
    iterations: int = 200,
    seed: int = 0,
    check_every: int = 10,
) -> Factors:
    """Lee and Seung's multiplicative updates for the Frobenius norm (NIPS 2000), batched:

    H <- H * (W^T V) / (W^T W H),  W <- W * (V H^T) / (W H H^T).

    Each update keeps the factors non-negative and does not increase ||V - W H||_F. ``v``
    (N, P, C) must be non-negative; the factors start from uniform noise drawn from ``seed``
    (the same on every device and for every matrix) scaled to V's mean, so a matrix gives the
    same factors alone, in a batch or on a GPU (up to rounding).
    """
    positive_int("k", k)
    positive_int("iterations", iterations)
    if v.ndim != 3:
        raise ValueError(f"nmf factors a batch of matrices (N, P, C), got shape {tuple(v.shape)}.")
    if bool((v < 0).any()):
        raise ValueError("nmf needs a non-negative matrix.")
    v = v.float()
    batch, rows, cols = v.shape
    # Drawn on the CPU, so that a GPU starts from the same factors; one draw shared by every
    # matrix, so that a matrix's factors do not depend on its batch companions.
    generator = torch.Generator().manual_seed(seed)
    scale = (v.mean(dim=(1, 2), keepdim=True) / k).sqrt()
    w = torch.rand(1, rows, k, generator=generator).to(v.device).expand(batch, -1, -1) * scale
    h = torch.rand(1, k, cols, generator=generator).to(v.device).expand(batch, -1, -1) * scale
    errors = []
    for step in range(1, iterations + 1):
        h = h * (w.transpose(1, 2) @ v) / (w.transpose(1, 2) @ w @ h + _EPS)
        w = w * (v @ h.transpose(1, 2)) / (w @ (h @ h.transpose(1, 2)) + _EPS)
        if step % check_every == 0 or step == iterations:
            errors.append(relative_error(v, w, h))
    return Factors(w, h, errors)


@dataclass(frozen=True)
class Concepts:
    """The concepts of one target layer, per image: ``maps`` (N, K, *S) where each concept lies
    (the columns of W, not normalised), ``embeddings``
    (N, K, C) the concepts in channel space, ``scores`` (N, K, classes) the head applied to each
    embedding, fc(H_k) = W_fc H_k + b."""

    layer: str
    maps: Tensor
    embeddings: Tensor
    scores: Tensor


class DFF(CAM):
    """Deep Feature Factorization (Collins et al., ECCV 2018, arXiv:1806.10206).

    Per image, V = ReLU(A) as (H*W, C) ~ W H (NMF, K = ``n_components``); concept k has the map
    W[:, k] (H, W) and the class scores fc(H_k) = W_fc H_k + b from the model's head. The map
    returned for class c is that of the concept whose score for c is highest, k* = argmax_k
    fc(H_k)_c; every concept, with its map and scores, is kept in ``concepts`` after a call.
    The head must take the layer's channels (the layer the head pools, as for CAM).

    Args:
        n_components: K, the number of concepts (at most the layer's channels).
        iterations: multiplicative updates of the NMF (a fixed count: the answer is repeatable).
        seed: the NMF's starting noise.
        fc_layer: the head (name or module), as for CAM.
    """

    gives_concepts = True
    #: its concepts are each image's own factorisation: six variants' concepts do not average
    aug_smoothable = False
    options = (N_COMPONENTS, FC_LAYER)  # type: ignore[assignment]

    def __init__(
        self,
        model: nn.Module,
        target_layer: LayerSpec = None,
        input_shape: Sequence[int] = (3, 224, 224),
        reshape_transform: Callable[[Tensor], Tensor] | None = None,
        *,
        n_components: int = 4,
        iterations: int = 200,
        seed: int = 0,
        fc_layer: str | nn.Module | None = None,
        enable_hooks: bool = True,
    ) -> None:
        self.n_components = positive_int("n_components", n_components)
        self.iterations = positive_int("iterations", iterations)
        self.seed = seed
        self.concepts: list[Concepts] = []
        try:
            super().__init__(
                model,
                target_layer,
                input_shape,
                reshape_transform,
                fc_layer=fc_layer,
                enable_hooks=enable_hooks,
            )
        except ValueError as error:
            if getattr(self, "_handles", None):  # CAM refused its layers after hooking them
                self.remove_hooks()
            raise ValueError(f"DFF reads the model's head as CAM does: {error}") from None

    @classmethod
    def option_problem(
        cls, layer_shapes: Sequence[Sequence[int]], options: Mapping[str, Any]
    ) -> str | None:
        """K past a target layer's channels."""
        k = int(options.get("n_components", N_COMPONENTS.default))
        for shape in layer_shapes:
            if len(shape) >= 2 and k > int(shape[1]):
                return (
                    f"n_components={k} is more concepts than the target layer's {shape[1]} "
                    f"channels: ask for n_components from 1 to {shape[1]}."
                )
        return None

    def _check_components(self, activation: Tensor) -> None:
        shapes = [tuple(activation.shape)]
        problem = self.option_problem(shapes, {"n_components": self.n_components})
        if problem is not None:
            raise ValueError(problem)

    def _maps(
        self,
        objective: Objective | None,
        scores: Any,
        retain_graph: bool,
        activations: list[Tensor],
    ) -> list[Tensor]:
        classes = objective.classes  # type: ignore[union-attr]
        weight = head_weight(self.fc)
        self._check_range(classes, weight.shape[0])  # type: ignore[arg-type]
        try:
            self._check_head(activations)
        except ValueError as error:
            if getattr(self, "_handles", None):  # CAM refused its layers after hooking them
                self.remove_hooks()
            raise ValueError(f"DFF reads the model's head as CAM does: {error}") from None
        activation = activations[0]
        self._check_components(activation)
        with torch.no_grad():
            batch, channels, *spatial = activation.shape
            v = torch.relu(activation.float()).flatten(2).transpose(1, 2)  # (N, P, C)
            factors = nmf(v, self.n_components, self.iterations, self.seed)
            maps = factors.w.transpose(1, 2).reshape(batch, self.n_components, *spatial)
            bias = getattr(self.fc, "bias", None)
            concept_scores = F.linear(
                factors.h,
                weight.float().to(factors.h.device),
                None if bias is None else bias.detach().float(),
            )
            best = concept_scores.gather(
                2,
                classes.to(concept_scores.device)[:, None, None].expand(-1, self.n_components, 1),  # type: ignore[union-attr]
            )[..., 0].argmax(dim=1)
            chosen = maps[torch.arange(batch, device=maps.device), best]
        self.concepts = [Concepts(self.target_names[0], maps, factors.h, concept_scores)]
        return [chosen]
