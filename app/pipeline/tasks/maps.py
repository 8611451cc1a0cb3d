"""The maps of a batch of images, one target each, under the model's lock (the pass stage of a
task)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from app.cam import Target, normalize_maps
from app.errors import MethodNotApplicable
from app.models.device import synchronize
from app.models.loading import LoadedModel
from app.pipeline.decoding import DecodedImage
from app.pipeline.passes import CamPlan, own_pass


def batch_maps(
    model: LoadedModel,
    plan: CamPlan,
    x: torch.Tensor,
    targets: Sequence[Target],
    calls: dict[str, Any],
) -> tuple[torch.Tensor, float]:
    """The plan's maps of the images ``x`` (N, C, H, W, all one size), image i for
    ``targets[i]``: (N, h, w) on the CPU (the fusion when the plan has several layers), from one
    hooked forward of the batch; and the seconds it took."""
    at_call = {o.name for o in plan.cls.options if o.at == "call"}
    started = time.perf_counter()
    with own_pass(model):
        x = x.to(model.device)
        try:
            extractor = plan.cls(
                model.module,
                list(plan.layers),
                input_shape=tuple(x.shape[1:]),
                **{k: v for k, v in plan.options if k not in at_call},
            )
        except ValueError as error:
            raise MethodNotApplicable(f"{plan.method} cannot run here: {error}") from None
        with extractor, torch.enable_grad() if plan.cls.requires_grad else torch.inference_mode():
            scores = model.module(x)
            try:
                cams = extractor(
                    scores=scores,
                    targets=list(targets),
                    normalized=plan.normalized,
                    **{k: v for k, v in plan.options if k in at_call},
                    **calls,
                )
            except ValueError as error:
                raise MethodNotApplicable(
                    f"{plan.method} cannot explain {', '.join(plan.layers)}: {error}"
                ) from None
            if len(cams) > 1:
                scaled = cams if plan.normalized else [normalize_maps(c) for c in cams]
                cam = extractor.fuse_cams(scaled)
            else:
                cam = cams[0]
        synchronize(model.device)
    return cam.detach().float().cpu(), time.perf_counter() - started


def one_map(
    model: LoadedModel,
    plan: CamPlan,
    decoded: DecodedImage,
    target: Target,
    calls: dict[str, Any],
) -> tuple[torch.Tensor, float]:
    """The plan's map of ``decoded`` for ``target``: (h, w) on the CPU, and the seconds."""
    cams, seconds = batch_maps(model, plan, decoded.tensor[None], [target], calls)
    return cams[0], seconds
