"""Methods built on another extractor: RefineCAM (a product over layers) and FinerCAM
(a contrast against the nearest classes)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from app.cam.core import (
    _CAM,
    ClassIndex,
    PauseCallback,
    ProgressCallback,
    StopCheck,
    finite_number,
    normalize_maps,
    positive_int,
    resize_maps,
)
from app.cam.gradient import GradCAM, GradCAMpp, _GradientCAM
from app.cam.layers import LayerSpec
from app.cam.options import COMPARISON_IDX, GAMMA, NUM_REFERENCES
from app.cam.targets import Target, not_logits
from app.digits import number_text

_CAPABILITIES = (
    "requires_grad",
    "uses_scores",
    "scores_optional",
    "uses_input",
    "masked_forwards",
    "noisy_forwards",
    "class_agnostic",
    "supports_targets",
)


class _Composite(_CAM):
    """An extractor that runs another one (``self.base``) which owns the hooks."""

    base: _CAM

    def _adopt(self, base: _CAM) -> None:
        self.base = base
        self.model = base.model
        self.input_shape = base.input_shape
        self.reshape_transform = base.reshape_transform
        self.target_names = base.target_names

    @property
    def base_cam(self) -> _CAM:
        """The extractor this one wraps (it owns the hooks, removed when this one exits)."""
        return self.base

    def enable_hooks(self) -> None:
        self.base.enable_hooks()

    def disable_hooks(self) -> None:
        self.base.disable_hooks()

    def reset_hooks(self) -> None:
        self.base.reset_hooks()

    def remove_hooks(self) -> None:
        self.base.remove_hooks()

    def __repr__(self) -> str:
        base = type(self.base).__name__
        return f"{type(self).__name__}(base_method={base}, target_layer={self.target_names})"


def _check_base(
    base_method: object, allowed: type = _CAM, example: str = "GradCAMpp"
) -> type[_CAM]:
    if (
        not isinstance(base_method, type)
        or not issubclass(base_method, allowed)
        or issubclass(base_method, _Composite)
    ):
        raise TypeError(
            f"base_method must be a CAM extractor class such as {example}, not {base_method!r}."
        )
    return cast(type[_CAM], base_method)


class RefineCAM(_Composite):
    """RefineCAM: a multi-layer product of a base method's maps (as in TorchCAM's guide).

    Each layer's map M_l of ``base_method`` is min-max normalised and resized to the largest;
    L = prod_l M_l. Where the coarse, semantic layers and the fine, early ones agree, the map stays;
    what only one of them lights goes. Returns one fused map (a list of one tensor). ``targets``
    work when the base method takes them.

    Args:
        layers: at least two target layers.
        base_method: the extractor class run on every layer (default ``GradCAMpp``).
        base_kwargs: passed on to it (``input_shape``, ``reshape_transform``, its options).
    """

    requires_grad = GradCAMpp.requires_grad
    uses_scores = GradCAMpp.uses_scores
    one_map = True

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[str | nn.Module],
        base_method: type[_CAM] = GradCAMpp,
        **base_kwargs: Any,
    ) -> None:
        base_method = _check_base(base_method)
        if isinstance(layers, str | nn.Module) or len(layers) < 2:
            raise ValueError(
                "RefineCAM multiplies the maps of several layers: pass at least two target "
                f"layers, got {layers!r}."
            )
        self._adopt(base_method(model, list(layers), **base_kwargs))
        for name in _CAPABILITIES:
            setattr(self, name, getattr(base_method, name))

    @classmethod
    def unavailable_reason(
        cls, model: nn.Module, target_layer: LayerSpec, input_shape: Sequence[int]
    ) -> str | None:
        if (
            isinstance(target_layer, str | nn.Module)
            or target_layer is None
            or len(target_layer) < 2
        ):
            return "RefineCAM multiplies the maps of several layers: it needs at least two."
        return None

    def __call__(
        self,
        class_idx: ClassIndex | None = None,
        scores: Any = None,
        normalized: bool = True,
        retain_graph: bool = False,
        *,
        targets: Target | Sequence[Target] | None = None,
        progress: ProgressCallback | None = None,
        should_stop: StopCheck | None = None,
        pause: PauseCallback | None = None,
        eigen_smooth: bool = False,
        aug_smooth: bool = False,
    ) -> list[Tensor]:
        """One fused map (N, *S) in a list: the product of the layers' normalised maps (each
        smoothed as asked by the base method)."""
        maps = self.base(
            class_idx,
            scores,
            True,
            retain_graph,
            targets=targets,
            progress=progress,
            should_stop=should_stop,
            pause=pause,
            eigen_smooth=eigen_smooth,
            aug_smooth=aug_smooth,
        )
        size = max((tuple(m.shape[1:]) for m in maps), key=lambda s: math.prod(s))
        product = torch.stack([resize_maps(m.float(), size) for m in maps]).prod(dim=0)
        return [normalize_maps(product) if normalized else product]


class FinerCAM(_Composite):
    """Finer-CAM (Zhang et al., CVPR 2025, arXiv:2501.11309): contrast with similar classes.

    The base method (GradCAM, GradCAMpp or LayerCAM) explains y_c - gamma * mean_t y_{d_t}
    instead of y_c, where the references d_t are the ``num_references`` classes whose logits are
    closest to y_c (c excluded), or those given by ``comparison_idx``. What c shares with its
    look-alikes cancels; what sets it apart stays. ``gamma=0`` gives the base method's map. It
    needs class indices (the references are classes), so it takes no ``targets``.

    Args:
        layer: the target layer.
        base_method: a gradient method that reads the scores (default ``GradCAM``).
        gamma: weight of the references' mean logit, >= 0.
        num_references: how many nearest classes to contrast with when none are given.
    """

    requires_grad = True
    uses_scores = True
    supports_targets = False
    options = (GAMMA, NUM_REFERENCES, COMPARISON_IDX)

    def __init__(
        self,
        model: nn.Module,
        layer: LayerSpec = None,
        base_method: type[_CAM] = GradCAM,
        gamma: float = 0.6,
        num_references: int = 3,
        *,
        input_shape: Sequence[int] = (3, 224, 224),
        reshape_transform: Callable[[Tensor], Tensor] | None = None,
        enable_hooks: bool = True,
    ) -> None:
        base_method = _check_base(base_method, _GradientCAM, "GradCAM")
        if not base_method.uses_scores:
            raise TypeError(f"FinerCAM needs a base that reads the scores, not {base_method}.")
        self.gamma = finite_number("gamma", gamma)
        positive_int("num_references", num_references)
        self.num_references = num_references
        self._adopt(
            base_method(
                model,
                layer,
                input_shape=input_shape,
                reshape_transform=reshape_transform,
                enable_hooks=enable_hooks,
            )
        )

    def references(
        self, classes: Tensor, scores: Tensor, comparison_idx: Any = None
    ) -> list[list[int]]:
        """The reference classes of each sample: given, or the nearest logits."""
        batch, num_classes = scores.shape
        if comparison_idx is None:
            count = min(self.num_references, num_classes - 1)
            distance = (
                scores.detach().float() - scores.detach().float().gather(1, classes[:, None])
            ).abs()
            distance.scatter_(1, classes[:, None], math.inf)
            return distance.topk(count, dim=1, largest=False).indices.tolist()
        rows = _reference_rows(comparison_idx, batch)
        for row, cls in zip(rows, classes.tolist(), strict=True):
            if not row:
                raise ValueError("comparison_idx holds an empty row: give at least one class.")
            if any(c < 0 or c >= num_classes for c in row):
                shown = ", ".join(number_text(c) for c in row)
                raise ValueError(
                    f"comparison_idx [{shown}] out of range: the model has {num_classes} classes."
                )
            if cls in row:
                raise ValueError(f"comparison_idx {row} holds the explained class {cls}.")
        return rows

    def __call__(  # type: ignore[override]
        self,
        class_idx: ClassIndex | None = None,
        scores: Any = None,
        comparison_idx: int | Sequence[int] | Sequence[Sequence[int]] | Tensor | None = None,
        normalized: bool = True,
        retain_graph: bool = False,
        *,
        targets: Target | Sequence[Target] | None = None,
        progress: ProgressCallback | None = None,
        should_stop: StopCheck | None = None,
        pause: PauseCallback | None = None,
        eigen_smooth: bool = False,
        aug_smooth: bool = False,
    ) -> list[Tensor]:
        """Maps of y_c - gamma * mean(y_refs); ``comparison_idx``: an int, a list shared by the
        batch, or one list per sample (``None``: the ``num_references`` nearest logits)."""
        if targets is not None:
            raise ValueError(
                "FinerCAM explains class indices only (its references are classes), so it does "
                "not take targets=: pass class_idx."
            )
        if class_idx is None:
            raise ValueError("FinerCAM needs class_idx: the class to explain.")
        batch = self.base._batch_size()
        if scores is None:
            raise ValueError(
                "FinerCAM needs the model's logits: call extractor(class_idx, scores) with "
                "scores = model(input), a tensor of shape (N, classes)."
            )
        if not isinstance(scores, Tensor) or scores.ndim != 2:
            raise ValueError(not_logits(scores, takes_targets=False))
        classes = self.base._class_tensor(class_idx, batch, scores.device)
        self._check_range(classes, scores.shape[1])
        refs = self.references(classes, scores, comparison_idx)
        gamma = self.gamma
        contrasts = [_contrast(c, r, gamma) for c, r in zip(classes.tolist(), refs, strict=True)]
        return self.base(
            None,
            scores,
            normalized,
            retain_graph,
            targets=contrasts,
            progress=progress,
            should_stop=should_stop,
            pause=pause,
            eigen_smooth=eigen_smooth,
            aug_smooth=aug_smooth,
        )


def _contrast(cls: int, refs: list[int], gamma: float) -> Target:
    def target(logits: Tensor) -> Tensor:
        if not refs:
            return logits[cls]
        # The index is made here, in the backward's grad mode: one made in the caller's
        # ``torch.inference_mode()`` could not be saved for the backward.
        index = torch.tensor(refs, dtype=torch.long, device=logits.device)
        return logits[cls] - gamma * logits[index].mean()

    return target


def _reference_rows(comparison_idx: Any, batch: int) -> list[list[int]]:
    if isinstance(comparison_idx, Tensor):
        if comparison_idx.is_floating_point():
            raise TypeError("comparison_idx must hold integers.")
        comparison_idx = comparison_idx.tolist()
    if isinstance(comparison_idx, bool):
        raise TypeError("comparison_idx must be an int or a list of ints, not a bool.")
    if isinstance(comparison_idx, int):
        return [[comparison_idx]] * batch
    if not isinstance(comparison_idx, Sequence) or isinstance(comparison_idx, str):
        raise TypeError(f"comparison_idx must be an int or a list, not {type(comparison_idx)}.")
    items = list(comparison_idx)
    if items and all(isinstance(i, Sequence) and not isinstance(i, str) for i in items):
        if len(items) != batch:
            raise ValueError(
                f"comparison_idx has {len(items)} rows but the batch has {batch} samples: give "
                "one row per sample, or one flat list shared by the batch."
            )
        rows = [list(row) for row in items]
    else:
        rows = [items] * batch
    if any(isinstance(c, bool) or not isinstance(c, int) for row in rows for c in row):
        raise TypeError("comparison_idx must hold ints.")
    return rows
