"""The maps of a batch of images, one target each per rank (the pass stage of a task, run under
the model's lock)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any, NamedTuple

import torch

from app.cam import Target, normalize_maps
from app.cam.core import _CAM
from app.errors import MethodNotApplicable
from app.models.device import synchronize
from app.models.loading import LoadedModel
from app.pipeline.passes import CamPlan, extractor_for

#: The name of the map that fuses several layers' (as the classifier's answer calls it).
FUSED = "fused"


class LayerMaps(NamedTuple):
    """The maps of one layer (``kind="layer"``) or of the fusion of several (``"fused"``)."""

    layer: str
    kind: str
    cams: torch.Tensor
    """(N, h, w) on the CPU."""


@contextmanager
def hooked(model: LoadedModel, plans: Sequence[CamPlan], x: torch.Tensor) -> Iterator[list[_CAM]]:
    """The plans' extractors on the model, their hooks on, in the autograd mode their methods
    need: run the model's forward of ``x`` inside (one forward that every plan records), then
    ``plan_maps`` for each. Call under ``own_pass``."""
    needs_grad = any(plan.cls.requires_grad for plan in plans)
    with ExitStack() as stack:
        shape = tuple(x.shape[1:])
        extractors = [stack.enter_context(extractor_for(model, p, shape)) for p in plans]
        stack.enter_context(torch.enable_grad() if needs_grad else torch.inference_mode())
        yield extractors


def plan_maps(
    model: LoadedModel,
    plan: CamPlan,
    extractor: _CAM,
    scores: Any,
    ranks: Sequence[Sequence[Target]],
    calls: dict[str, Any],
    retain_graph: bool = False,
) -> list[list[LayerMaps]]:
    """The plan's maps, from the forward ``extractor`` hooked (``scores``, its output), for
    each rank of ``ranks`` (one target per image: image i for ``rank[i]``), the ranks sharing
    the method's extra forwards (``explain_classes``): per rank, one map per layer and, with
    several layers, their fusion last, as a classifier's answer has them (a one-map method's
    single map is the fusion of its layers). ``retain_graph`` keeps the forward's graph for
    another plan's backward."""
    try:
        per_rank = extractor.explain_classes(
            targets=[list(rank) for rank in ranks],
            scores=scores,
            normalized=plan.normalized,
            retain_graph=retain_graph,
            **plan.call_options,
            **calls,
        )
    except ValueError as error:
        raise MethodNotApplicable(
            f"{plan.method} cannot explain {', '.join(plan.layers)}: {error}"
        ) from None
    named = [_named(plan, cams, extractor.fuse_cams) for cams in per_rank]
    synchronize(model.device)
    return [
        [LayerMaps(m.layer, m.kind, m.cams.detach().float().cpu()) for m in rank] for rank in named
    ]


def batch_maps(
    model: LoadedModel,
    plan: CamPlan,
    x: torch.Tensor,
    ranks: Sequence[Sequence[Target]],
    calls: dict[str, Any],
) -> tuple[list[list[LayerMaps]], float]:
    """``plan_maps`` of the images ``x`` (N, C, H, W, all one size) from a hooked forward of
    their own, and the seconds it took. Call under ``own_pass``."""
    started = time.perf_counter()
    x = x.to(model.device)
    with hooked(model, [plan], x) as (extractor,):
        maps = plan_maps(model, plan, extractor, model.module(x), ranks, calls)
    return maps, time.perf_counter() - started


def _named(
    plan: CamPlan, cams: Sequence[torch.Tensor], fuse: Callable[[list[torch.Tensor]], torch.Tensor]
) -> list[LayerMaps]:
    """As a classifier's answer names its maps: a one-map method's (RefineCAM, D-RISE) is the
    fused one; several layers give one map each, then their fusion; one layer its map. Fused
    maps are normalised whatever was asked (the layers' raw scales differ)."""
    if plan.cls.one_map:
        return [LayerMaps(FUSED, "fused", normalize_maps(cams[0]))]
    if len(cams) == 1:
        return [LayerMaps(plan.layers[0], "layer", cams[0])]
    scaled = list(cams) if plan.normalized else [normalize_maps(c) for c in cams]
    per_layer = [LayerMaps(layer, "layer", c) for layer, c in zip(plan.layers, cams, strict=True)]
    return [*per_layer, LayerMaps(FUSED, "fused", fuse(scaled))]


def maps_per_image(plans: Sequence[CamPlan], explained: int) -> int:
    """How many maps ``_named`` gives for an image of ``explained`` things (boxes, classes)
    under every plan (the render budget's and the scoring's count)."""
    return explained * sum(_maps_per_explanation(plan) for plan in plans)


def _maps_per_explanation(plan: CamPlan) -> int:
    if plan.cls.one_map or len(plan.layers) == 1:
        return 1
    return len(plan.layers) + 1
