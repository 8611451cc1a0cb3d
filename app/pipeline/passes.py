"""The model work of one pass: one forward (and one CAM call) over the images of several requests.

These functions run in a worker thread and hold the model's lock. Each pass runs in a hook scope
of its own (``app.cam.core.hook_scope``) and from a clean autograd state, because a short pass may
run on the thread of a chunked one, between two of its chunks (``Control.at_boundary``) or in a
pause inside a chunk's forward (``Control.at_pause``, see ``app.pipeline.scheduling``), while that
pass's hooks stay on the shared module. The caller (the
batcher) decides which requests share a pass; here each request's rows are taken from the batched
results by position.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch

from app.cam import Concepts, normalize_maps
from app.cam.core import _CAM, counting_forwards, hook_scope
from app.cam.hierarchical import layout_transform
from app.errors import MethodNotApplicable, ModelError, OutOfMemory
from app.models.device import release_cached_memory, synchronize
from app.models.loading import LoadedModel
from app.pipeline.classes import by_rank, per_image


class Control(Protocol):
    """What a pass asks of the requests it serves (``app.pipeline.batching.PassControl``)."""

    def should_stop(self) -> bool: ...

    def at_boundary(self) -> bool:
        """Between two chunks: let the passes whose turn it is run, then ``should_stop()``."""
        ...

    def at_pause(self) -> None:
        """Inside a chunk's forward (before a leaf module): let the passes whose turn it is run."""
        ...

    def progress(self, done: int, total: int) -> None: ...


@contextmanager
def own_pass(model: LoadedModel) -> Iterator[None]:
    """The model's lock, a hook scope of the pass's own and a clean autograd state (no inference
    mode, no gradients) for one pass, whatever pass it interrupts; accelerator OOM as a 503."""
    with model.lock, hook_scope(object()), torch.inference_mode(False), torch.no_grad():
        with model_faults(model):
            yield


@contextmanager
def model_faults(model: LoadedModel) -> Iterator[None]:
    """Turn an accelerator's out-of-memory error into a 503 that names it, after freeing the
    allocator's cache, so that the next request starts from a clean device."""
    try:
        yield
    except torch.OutOfMemoryError:
        release_cached_memory(model.device)
        raise OutOfMemory(
            f"The {model.device.type.upper()} ran out of memory for model {model.spec.name!r}; "
            "its cache was freed. Retry, with fewer images or a smaller batch_size.",
            headers={"Retry-After": "1"},
        ) from None


def check_finite(model: LoadedModel, logits: torch.Tensor) -> torch.Tensor:
    """``logits`` if every value is finite; else a model error (the schema has no NaN)."""
    if not bool(torch.isfinite(logits).all()):
        raise ModelError(
            f"Model {model.spec.name!r} produced NaN or infinite logits for this input; "
            "the model (weights or numerics) is at fault, not the request."
        )
    return logits


@dataclass(frozen=True)
class CamPlan:
    """What every request of a CAM pass shares; equal plans may share a pass."""

    method: str
    cls: type[_CAM]
    layers: tuple[str, ...]
    options: tuple[tuple[str, Any], ...]
    normalized: bool

    @property
    def batchable(self) -> bool:
        """The Score-CAM family costs one forward per channel and image whatever the batch, so
        batching gains nothing there and only makes a request wait for others' channels."""
        return not getattr(self.cls, "masked_forwards", False)

    @property
    def chunked(self) -> bool:
        """Whether the pass runs extra forwards in chunks, between which other passes on the
        model may run (``app.pipeline.scheduling``): the Score-CAM family, Ablation-CAM and
        SmoothGrad-CAM++."""
        return bool(self.cls.masked_forwards or self.cls.noisy_forwards)

    @property
    def call_options(self) -> dict[str, Any]:
        """The options that go to each call of the extractor (``MethodOption.at == "call"``);
        the others go to its constructor."""
        at_call = {o.name for o in self.cls.options if o.at == "call"}
        return {k: v for k, v in self.options if k in at_call}

    @property
    def shares_forward(self) -> bool:
        """Whether the method works from the one hooked forward (and its scores) alone: CAM and
        the gradient methods. The Score-CAM family and SmoothGradCAMpp run forwards of their own."""
        return not (
            getattr(self.cls, "masked_forwards", False) or getattr(self.cls, "uses_input", False)
        )

    @classmethod
    def each(
        cls,
        methods: Sequence[tuple[str, type[_CAM]]],
        per_method: Sequence[dict[str, Any]],
        layers: Sequence[str],
        normalized: bool,
    ) -> list[CamPlan]:
        """One plan per checked method, with its options (``checks.split_options``)."""
        return [
            cls(method, method_cls, tuple(layers), tuple(sorted(options.items())), normalized)
            for (method, method_cls), options in zip(methods, per_method, strict=True)
        ]


def group_plans(plans: Sequence[CamPlan]) -> list[tuple[CamPlan, ...]]:
    """The passes that several methods of one request take: the methods that can share a forward
    together, in one pass, then every other method alone."""
    shared = tuple(plan for plan in plans if plan.shares_forward)
    alone = [(plan,) for plan in plans if not plan.shares_forward]
    return ([shared] if shared else []) + alone


@dataclass(frozen=True)
class CamItem:
    """One request's share of a CAM pass."""

    batch: torch.Tensor
    """(n, C, H, W) on the CPU."""
    class_idx: tuple[int, ...] = ()
    """Empty: each image's top-1; one value: for all its images; else one per image."""
    classes: tuple[int, ...] = ()
    """Several classes for every image (``app.pipeline.classes``)."""
    top_classes: int | None = None
    """Each image's this many most probable classes (``app.pipeline.classes``)."""


@dataclass(frozen=True)
class CamOutcome:
    """One request's share of a CAM pass's results, on the CPU."""

    logits: torch.Tensor
    class_idx: list[int]
    cams: list[torch.Tensor]
    """One (n, h, w) tensor per layer."""
    fused: torch.Tensor | None
    forward_s: float
    cam_s: float
    forwards: int = 0
    """The model's forwards the pass ran (each batch once), shared with its other requests."""
    concepts: list[Concepts] | None = None
    """A method that finds concepts (DFF): per layer, each image's concepts (maps (n, K, h, w)
    at the layer's resolution, embeddings, head scores)."""
    others: tuple[CamOutcome, ...] = ()
    """The request's further classes (``classes``, ``top_classes``), in order, same pass."""

    def per_class(self) -> list[CamOutcome]:
        """This outcome, then one per further class."""
        return [self, *self.others]


@dataclass(frozen=True)
class ForwardOutcome:
    logits: torch.Tensor
    forward_s: float


def _offsets(sizes: Sequence[int]) -> list[slice]:
    slices, start = [], 0
    for size in sizes:
        slices.append(slice(start, start + size))
        start += size
    return slices


def run_forward_pass(
    model: LoadedModel, items: Sequence[torch.Tensor], control: Control | None = None
) -> list[ForwardOutcome]:
    """Logits for the images of every item, from one inference-mode forward."""
    with own_pass(model):
        batch = torch.cat(list(items)).to(model.device)
        started = time.perf_counter()
        with torch.inference_mode():
            logits = model.plain_forward(batch)
        synchronize(model.device)
        elapsed = time.perf_counter() - started
        logits = check_finite(model, logits.float().cpu())
    return [ForwardOutcome(logits[part], elapsed) for part in _offsets([len(t) for t in items])]


def run_cam_pass(
    model: LoadedModel, plan: CamPlan, items: Sequence[CamItem], control: Control | None = None
) -> list[CamOutcome]:
    """One forward and one CAM call with per-image classes over the images of every item.

    ``control`` reports the progress of the extra forwards and stops them between chunks."""
    return [outcomes[0] for outcomes in run_shared_cam_pass(model, (plan,), items, control)]


def extractor_for(
    model: LoadedModel, plan: CamPlan, input_shape: Sequence[int] | None = None
) -> _CAM:
    """The plan's extractor on the model (its hooks on once entered); ``input_shape`` of one
    input when it is not the manifest's (a detector takes an upload at its own size)."""
    call = plan.call_options
    try:
        # A Swin's (N, H, W, C) layers are read through a transform (app.cam.hierarchical).
        transform = layout_transform(model.channels_last, plan.layers)
        layout = {} if transform is None else {"reshape_transform": transform}
        # Layers go positionally: composite methods name them layers/layer/blocks.
        return plan.cls(
            model.module,
            list(plan.layers),
            input_shape=tuple(input_shape or model.spec.input_shape),
            **layout,
            **{k: v for k, v in plan.options if k not in call},
        )
    except ValueError as error:
        raise MethodNotApplicable(f"{plan.method} cannot run here: {error}") from None


def run_shared_cam_pass(
    model: LoadedModel,
    plans: Sequence[CamPlan],
    items: Sequence[CamItem],
    control: Control | None = None,
) -> list[list[CamOutcome]]:
    """One forward, then one CAM call per plan, over the images of every item: per item, one
    outcome per plan. Several plans must all share a forward (``CamPlan.shares_forward``)."""
    assert len(plans) == 1 or all(plan.shares_forward for plan in plans)
    parts = _offsets([len(item.batch) for item in items])
    calls: dict[str, Any] = (
        {}
        if control is None
        else {
            "progress": control.progress,
            "should_stop": control.at_boundary,
            "pause": control.at_pause,
        }
    )
    needs_grad = any(plan.cls.requires_grad for plan in plans)
    last_grad = max((i for i, p in enumerate(plans) if p.cls.requires_grad), default=-1)
    with own_pass(model), ExitStack() as hooks:
        counted = hooks.enter_context(counting_forwards(model.module))
        x = torch.cat([item.batch for item in items]).to(model.device)
        # Every extractor hooks the same forward: the first gradient one makes the layer's output
        # require grad and hands that tensor on, so the later ones record the very same tensor.
        extractors = [hooks.enter_context(extractor_for(model, plan)) for plan in plans]
        with torch.enable_grad() if needs_grad else torch.inference_mode():
            t0 = time.perf_counter()
            scores = model.module(x)
            synchronize(model.device)
            forward_s = time.perf_counter() - t0
            check_finite(model, scores.detach())
            detached = scores.detach()
            asked = [
                per_image(item, detached[part]) for item, part in zip(items, parts, strict=True)
            ]
            # K lists of one class per image of the pass (the requests' K may differ).
            ranks = by_rank([classes for lists in asked for classes in lists])
            computed = []
            for number, (plan, extractor) in enumerate(zip(plans, extractors, strict=True)):
                started = time.perf_counter()
                # The graph of the shared forward serves every gradient method's backward.
                maps = _maps(plan, extractor, ranks, scores, number < last_grad, calls)
                found = _concepts(plan, extractor)
                synchronize(model.device)
                computed.append((maps, found, time.perf_counter() - started))
        logits = scores.detach().float().cpu()
    return [
        [
            _outcome(
                logits, ranks, maps, found, part, len(lists[0]), forward_s, cam_s, counted.calls
            )
            for maps, found, cam_s in computed
        ]
        for part, lists in zip(parts, asked, strict=True)
    ]


def _outcome(
    logits: torch.Tensor,
    ranks: list[list[int]],
    maps: list[tuple[list[torch.Tensor], torch.Tensor | None]],
    found: list[Concepts] | None,
    part: slice,
    count: int,
    forward_s: float,
    cam_s: float,
    forwards: int,
) -> CamOutcome:
    """One request's outcome of a plan: its rows of the first ``count`` classes' maps (and of
    the concepts found, which every class shares)."""
    outcomes = [
        CamOutcome(
            logits=logits[part],
            class_idx=ranks[k][part],
            cams=[c[part] for c in cams],
            fused=None if fused is None else fused[part],
            forward_s=forward_s,
            cam_s=cam_s,
            forwards=forwards,
            concepts=None if found is None else [_rows(c, part) for c in found],
        )
        for k, (cams, fused) in enumerate(maps[:count])
    ]
    return replace(outcomes[0], others=tuple(outcomes[1:]))


def _concepts(plan: CamPlan, extractor: Any) -> list[Concepts] | None:
    """The concepts a method that finds them kept from its call, on the CPU (float32); the
    maps normalised per concept when the plan's maps are."""
    if not plan.cls.gives_concepts:
        return None
    found = []
    for concepts in extractor.concepts:
        maps = concepts.maps.detach().float()
        if plan.normalized:
            maps = normalize_maps(maps.flatten(0, 1)).reshape(maps.shape)
        found.append(
            Concepts(
                concepts.layer,
                maps.cpu(),
                concepts.embeddings.detach().float().cpu(),
                concepts.scores.detach().float().cpu(),
            )
        )
    return found


def _rows(concepts: Concepts, part: slice) -> Concepts:
    return Concepts(
        concepts.layer, concepts.maps[part], concepts.embeddings[part], concepts.scores[part]
    )


def _maps(
    plan: CamPlan,
    extractor: Any,
    ranks: list[list[int]],
    scores: torch.Tensor,
    retain_graph: bool,
    calls: dict[str, Any],
) -> list[tuple[list[torch.Tensor], torch.Tensor | None]]:
    """Per class (``ranks``: K lists of one class per image), the plan's maps (one per layer,
    on the CPU) and their fusion when there are several."""
    call_options = plan.call_options
    try:
        if len(ranks) == 1:
            per_class = [
                extractor(
                    ranks[0],
                    scores,
                    normalized=plan.normalized,
                    retain_graph=retain_graph,
                    **call_options,
                    **calls,
                )
            ]
        else:
            per_class = extractor.explain_classes(
                ranks,
                scores,
                normalized=plan.normalized,
                retain_graph=retain_graph,
                **call_options,
                **calls,
            )
        return [_fuse(plan, extractor, cams) for cams in per_class]
    except ValueError as error:
        # Class indices were checked before: what is left is about the layers/head.
        raise MethodNotApplicable(
            f"{plan.method} cannot explain {', '.join(plan.layers)}: {error}"
        ) from None


def _fuse(
    plan: CamPlan, extractor: Any, cams: list[torch.Tensor]
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    fused = None
    if plan.cls.one_map:
        # One map for all the layers (RefineCAM, LeGrad): it is the fused map.
        fused, cams = normalize_maps(cams[0]), []
    elif len(cams) > 1:
        # Fusion takes the per-pixel max, which only means something on a common
        # scale: fuse normalised maps even when raw ones were asked for.
        scaled = cams if plan.normalized else [normalize_maps(c) for c in cams]
        fused = extractor.fuse_cams(scaled)
    cams = [c.detach().float().cpu() for c in cams]
    return cams, None if fused is None else fused.detach().float().cpu()
