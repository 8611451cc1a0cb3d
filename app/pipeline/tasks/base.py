"""The request flow of a task other than classification: admit, decode (whole), pass, render,
answer, as the classifier's ``Explainer`` does it, with what to explain and what to answer left
to the task (``detection``, ``segmentation``).

Each image is one item of the model's batcher (``app.pipeline.batching``), as the classifier's
requests are: images of one size whose plans are equal share a pass (one forward, and one map
call per plan and explained box or region, each image with its own target), whatever request
they came from; images of other sizes never do (a batch is one tensor, and a detector's answer
depends on its input's size). The admission, the decode and render budgets and the forward
budget are the explainer's.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Executor
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Any, ClassVar, Protocol, TypeVar

import torch

from app.cam import ProgressCallback, Target, UnknownMethod, find_method
from app.cam.core import ForwardCount, counting_forwards
from app.errors import InvalidTarget
from app.models.device import synchronize
from app.models.loading import LoadedModel
from app.models.tasks import task_of
from app.observability.context import note_work
from app.pipeline import checks, faithfulness
from app.pipeline.admission import SlotLimiter
from app.pipeline.batching import Batcher, PassControl, PassInfo
from app.pipeline.decoding import DecodedImage, Upload
from app.pipeline.passes import CamPlan, group_plans, own_pass
from app.pipeline.progress import ChainedProgress, chain_progress
from app.pipeline.rendering import (
    OUTPUT_FORMATS,
    RenderBudget,
    RenderStyle,
    render_cost,
)
from app.pipeline.results import (
    ExplainResponse,
    ExplainResult,
    ExplainTimings,
    Explanation,
    MapOutput,
    PredictResponse,
    PredictResult,
    PredictTimings,
)
from app.pipeline.scheduling import Priority
from app.pipeline.tasks.common import Outline, decode_whole, input_size, render_map
from app.pipeline.tasks.maps import (
    LayerMaps,
    batch_maps,
    hooked,
    maps_per_image,
    plan_maps,
)

T = TypeVar("T")


class ExplainParams(Protocol):
    """The explain parameters a task reads (``app.pipeline.explainer.ExplainParams``: the
    explainer imports this package, so a protocol keeps the package graph acyclic)."""

    @property
    def method(self) -> str | None: ...
    @property
    def class_idx(self) -> tuple[int, ...]: ...
    @property
    def target_layers(self) -> tuple[str, ...]: ...
    @property
    def outputs(self) -> tuple[str, ...]: ...
    @property
    def colormap(self) -> str: ...
    @property
    def alpha(self) -> float: ...
    @property
    def image_format(self) -> str: ...
    @property
    def normalized(self) -> bool: ...
    @property
    def size(self) -> str | None: ...
    @property
    def options(self) -> dict[str, Any]: ...
    @property
    def classes(self) -> tuple[int, ...]: ...
    @property
    def top_classes(self) -> int | None: ...
    @property
    def faithfulness(self) -> tuple[str, ...]: ...
    @property
    def faithfulness_steps(self) -> int: ...
    @property
    def boxes(self) -> tuple[str, ...]: ...
    @property
    def region(self) -> str | None: ...


class Explainer(Protocol):
    """What a task uses of the explainer (``app.pipeline.explainer.Explainer``): its limits,
    admission and threads."""

    @property
    def limiter(self) -> SlotLimiter: ...
    @property
    def max_pixels(self) -> int: ...
    @property
    def max_cam_forwards(self) -> int: ...
    @property
    def max_output_side(self) -> int: ...
    @property
    def model_threads(self) -> Executor | None: ...
    @property
    def image_threads(self) -> Executor | None: ...
    @property
    def render_budget(self) -> RenderBudget | None: ...
    def batcher(self, model: LoadedModel) -> Batcher: ...
    async def on_image_thread(self, func: Callable[[], T], cost: int | None = None) -> T: ...
    async def on_render_thread(self, func: Callable[[], T]) -> T: ...


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


@dataclass
class Explained:
    """One map a task computed, with what the answer says about it."""

    plan: CamPlan
    maps: list[tuple[str, str, torch.Tensor]]
    """(layer, kind, (h, w) on the CPU): one per layer, then their fusion (several layers)."""
    fields: dict[str, Any]
    """Explanation fields besides method and maps (class_idx, label, logit, box, ...)."""
    judged_by: Target
    """What its maps' faithfulness curves follow (``Wanted.judged_by``)."""
    outlines: list[Outline] = field(default_factory=list)
    cam_s: float = 0.0

    @property
    def cam(self) -> torch.Tensor:
        """The map that sums up the plan: the fusion of its layers, or its one layer's."""
        return self.maps[-1][2]


@dataclass
class Wanted:
    """One thing to explain in an image: its target for a plan and what the answer says about
    it."""

    target: Callable[[CamPlan], Target]
    fields: dict[str, Any]
    judged_by: Target
    """The score in [0, 1] that its maps' faithfulness curves follow (a detection's
    similarity, a region's class probability: ``app.pipeline.faithfulness``)."""
    outlines: list[Outline] = field(default_factory=list)


@dataclass(frozen=True)
class TaskItem:
    """One image of a request, as the batcher carries it: the request's parameters travel with
    it (images of several requests may share a pass, each explained as its request asks)."""

    decoded: DecodedImage
    index: int
    """Its place in its request (a per-image ``class_idx`` is read there)."""
    params: ExplainParams | None = None
    outputs: tuple[str, ...] = ()
    """What /predict asked for (``mask``)."""


def _no_target(output: Any) -> torch.Tensor:
    """Nothing to explain: an image of a shared pass that has fewer boxes than another (its map
    of this call is dropped). Zero, on the output's graph."""
    tensor: torch.Tensor = output["scores"] if isinstance(output, dict) else output
    return tensor.sum() * 0


def ranked_targets(wants: Sequence[Sequence[Wanted]], plan: CamPlan) -> list[list[Target]]:
    """Per rank (every image's first thing explained, the second, ...), each image's target for
    ``plan``; an image with fewer things than another has ``_no_target`` for the ranks it
    lacks."""
    ranks = max((len(w) for w in wants), default=0)
    return [
        [w[rank].target(plan) if rank < len(w) else _no_target for w in wants]
        for rank in range(ranks)
    ]


def _keep(
    runs: Sequence[ImageRun],
    wants: Sequence[Sequence[Wanted]],
    plan: CamPlan,
    per_rank: Sequence[Sequence[LayerMaps]],
    cam_s: float,
) -> None:
    """Each image's explanations of ``plan`` from its maps of every rank; the call's seconds
    are shared by the things it explained."""
    share = cam_s / sum(len(w) for w in wants)
    for rank, named in enumerate(per_rank):
        for i, w in enumerate(wants):
            if rank >= len(w):
                continue
            runs[i].cam_s += share
            runs[i].explained.append(
                Explained(
                    plan,
                    [(m.layer, m.kind, m.cams[i]) for m in named],
                    w[rank].fields,
                    w[rank].judged_by,
                    w[rank].outlines,
                    share,
                )
            )


@dataclass
class ImageRun:
    """What one image's pass gave."""

    answer: dict[str, Any]
    """PredictResult fields of the task (detections, segments, mask)."""
    explained: list[Explained] = field(default_factory=list)
    forward_s: float = 0.0
    cam_s: float = 0.0
    counted: ForwardCount | None = None
    """The forwards of the pass that ran this image, shared by the pass's images."""


def pass_forwards(runs: Sequence[ImageRun]) -> int:
    """The model's forwards of the passes that ran ``runs``, each pass once."""
    passes = {id(run.counted): run.counted for run in runs if run.counted is not None}
    return sum(count.calls for count in passes.values())


#: A classifier's parameters that choose several classes: a task takes those among its
#: ``own_parameters`` (a segmenter's regions), and refuses the others.
CLASS_CHOOSERS = ("classes", "top_classes")


class TaskPipeline:
    """The flow; a task fills in ``answer`` (predict), ``check_params`` and ``wanted``."""

    task: ClassVar[str] = ""
    #: Explain parameters this task takes besides the common ones: its own (``box``,
    #: ``region``) and the ``CLASS_CHOOSERS`` it accepts (those it does not are a 400).
    own_parameters: ClassVar[tuple[str, ...]] = ()
    #: How a request picks what this task explains (named in the refusals).
    picked_by: ClassVar[str] = ""
    #: What ``output`` of /predict may ask for.
    predict_outputs: ClassVar[tuple[str, ...]] = ()

    # -------------------------------------------------------------- the task's part

    def answer(
        self, model: LoadedModel, decoded: DecodedImage, output: Any, outputs: Sequence[str]
    ) -> dict[str, Any]:
        raise NotImplementedError

    def check_params(self, model: LoadedModel, params: ExplainParams, images: int) -> int:
        """Refuse what cannot fit the task before decoding; the explanations per image and
        plan (the bound for the budgets)."""
        raise NotImplementedError

    def wanted(
        self,
        model: LoadedModel,
        decoded: DecodedImage,
        index: int,
        output: Any,
        params: ExplainParams,
    ) -> tuple[dict[str, Any], list[Wanted]]:
        """From one image's output on the explained pass: the answer's task fields
        (detections, segments) and what to explain, in the answer's order."""
        raise NotImplementedError

    # -------------------------------------------------------------- shared flow

    def forward(self, model: LoadedModel, decoded: DecodedImage) -> Any:
        """The model's output for one image (inference mode; call under ``own_pass``)."""
        return self.forward_many(model, [decoded])[0]

    def forward_many(self, model: LoadedModel, decoded: Sequence[DecodedImage]) -> list[Any]:
        """The model's output for each image, from one forward of the batch (all one size;
        inference mode; call under ``own_pass``)."""
        x = torch.stack([d.tensor for d in decoded]).to(model.device)
        with torch.inference_mode():
            output = model.module(x)
        return [output[i] for i in range(len(decoded))]

    def explain_images(
        self,
        model: LoadedModel,
        items: Sequence[TaskItem],
        plans: Sequence[CamPlan],
        calls: dict[str, Any],
    ) -> list[ImageRun]:
        """One pass over images of one size: the first plan's hooked forward gives the answers
        (detections, segments) too, and every plan that works from one forward records it;
        then per plan one map call for every rank of the things explained (the first box of
        every image, the second, ...; each image with its own target), the ranks sharing the
        method's extra forwards. A method with forwards of its own hooks another forward."""
        # One hook scope for the pass, so that its forwards are counted (``counting_forwards``).
        with own_pass(model), counting_forwards(model.module) as counted:
            return self._explain_counted(model, items, plans, calls, counted)

    def _explain_counted(
        self,
        model: LoadedModel,
        items: Sequence[TaskItem],
        plans: Sequence[CamPlan],
        calls: dict[str, Any],
        counted: ForwardCount,
    ) -> list[ImageRun]:
        x = torch.stack([item.decoded.tensor for item in items]).to(model.device)
        # The first group of plans that share a forward (``group_plans``: every method that
        # works from one forward, as a classifier's pass groups them) records the forward that
        # gives the answers; a method with forwards of its own hooks another.
        together = group_plans(plans)[0]
        maps: dict[CamPlan, tuple[list[list[LayerMaps]], float]] = {}
        with hooked(model, together, x) as extractors:
            started = time.perf_counter()
            scores = model.module(x)
            synchronize(model.device)
            forward_s = (time.perf_counter() - started) / len(items)
            runs, wants = [], []
            for index, item in enumerate(items):
                assert item.params is not None
                answer, wanted = self.wanted(
                    model, item.decoded, item.index, scores[index], item.params
                )
                runs.append(ImageRun(answer, forward_s=forward_s, counted=counted))
                wants.append(wanted)
            if not any(wants):
                return runs
            last_grad = max((i for i, p in enumerate(together) if p.cls.requires_grad), default=-1)
            for number, (plan, extractor) in enumerate(zip(together, extractors, strict=True)):
                started = time.perf_counter()
                ranks = ranked_targets(wants, plan)
                # The forward's graph serves every gradient method's backward.
                kept = plan_maps(model, plan, extractor, scores, ranks, calls, number < last_grad)
                maps[plan] = kept, time.perf_counter() - started
        for plan in plans:
            if plan not in maps:
                maps[plan] = batch_maps(model, plan, x, ranked_targets(wants, plan), calls)
            _keep(runs, wants, plan, *maps[plan])
        return runs

    def explain_image(
        self,
        model: LoadedModel,
        decoded: DecodedImage,
        index: int,
        plans: Sequence[CamPlan],
        params: ExplainParams,
        calls: dict[str, Any],
    ) -> ImageRun:
        """One image alone (the quality benchmark's call)."""
        return self.explain_images(model, [TaskItem(decoded, index, params)], plans, calls)[0]

    def _explain_pass(
        self,
        model: LoadedModel,
        plans: Sequence[CamPlan],
        items: Sequence[TaskItem],
        control: PassControl,
    ) -> list[ImageRun]:
        calls = {
            "progress": control.progress,
            "should_stop": control.at_boundary,
            "pause": control.at_pause,
        }
        return self.explain_images(model, items, plans, calls)

    def _predict_pass(
        self, model: LoadedModel, items: Sequence[TaskItem], control: PassControl
    ) -> list[tuple[dict[str, Any], float]]:
        started = time.perf_counter()
        with own_pass(model):
            outputs = self.forward_many(model, [item.decoded for item in items])
        forward_s = time.perf_counter() - started
        return [
            (self.answer(model, item.decoded, output, item.outputs), forward_s)
            for item, output in zip(items, outputs, strict=True)
        ]

    async def _submit_each(
        self,
        explainer: Explainer,
        model: LoadedModel,
        admit: bool,
        key: Hashable,
        items: Sequence[TaskItem],
        run: Callable[[Sequence[Any], PassControl], Sequence[Any]],
        plans: Sequence[CamPlan] = (),
        progress: ChainedProgress | None = None,
        priority: Priority = "interactive",
    ) -> tuple[list[Any], list[PassInfo]]:
        """Every image to the model's batcher (admitted, unless ``admit`` is False): images of
        one size under one ``key`` may share a pass, with each other and with other
        requests'. A long (chunked) pass at a time, its progress counted on from the last."""
        batcher = explainer.batcher(model)
        chunked = any(plan.chunked for plan in plans)
        batchable = all(plan.batchable for plan in plans)

        async def one(item: TaskItem) -> tuple[Any, PassInfo]:
            size = tuple(item.decoded.tensor.shape)
            return await batcher.submit(
                (key, size), item, 1, run, batchable, progress, chunked=chunked, priority=priority
            )

        with explainer.limiter.admit() if admit else nullcontext():
            if chunked:  # a long pass at a time: the request's images one after the other
                done = []
                for item in items:
                    done.append(await one(item))
                    if progress is not None:
                        progress.next_pass()
            else:
                done = list(await asyncio.gather(*(one(item) for item in items)))
                if progress is not None:
                    progress.next_pass()
        return [result for result, _ in done], [info for _, info in done]

    async def _decode(
        self, explainer: Explainer, model: LoadedModel, uploads: Sequence[Upload]
    ) -> tuple[list[DecodedImage], float]:
        """Decode on the image threads (the explainer has checked and holds the decode cost)."""

        def work() -> tuple[list[DecodedImage], float]:
            started = time.perf_counter()
            decoded = [decode_whole(u, model.spec, explainer.max_pixels) for u in uploads]
            return decoded, time.perf_counter() - started

        return await explainer.on_image_thread(work)

    def check_predict_outputs(self, outputs: Sequence[str]) -> None:
        """``output`` of /predict: only ``mask``, and only for a segmenter."""
        wrong = [o for o in outputs if o not in self.predict_outputs]
        if wrong:
            allowed = ", ".join(self.predict_outputs) or "none"
            raise InvalidTarget(
                f"/predict of a {self.task} model takes output {allowed}; got {wrong[0][:40]!r}.",
                details={"parameter": "output"},
            )

    async def predict(
        self,
        explainer: Explainer,
        model: LoadedModel,
        uploads: Sequence[Upload],
        outputs: Sequence[str] = (),
        priority: Priority = "interactive",
    ) -> PredictResponse:
        started = time.perf_counter()
        decoded, decode_s = await self._decode(explainer, model, uploads)
        items = [TaskItem(image, i, outputs=tuple(outputs)) for i, image in enumerate(decoded)]
        done, infos = await self._submit_each(
            explainer,
            model,
            True,
            ("task-forward", self.task),
            items,
            partial(self._predict_pass, model),
            priority=priority,
        )
        answers = [answer for answer, _ in done]
        forward_s = max(seconds for _, seconds in done)
        queue_s = max(info.queue_s for info in infos)
        note_work(
            model.spec.name,
            None,
            len(decoded),
            {"decode": decode_s, "queue": queue_s, "forward": forward_s},
            version=model.spec.version,
        )
        return PredictResponse(
            model=model.spec.name,
            version=model.spec.version,
            device=str(model.device),
            timings=PredictTimings(
                decode_ms=_ms(decode_s),
                queue_ms=_ms(queue_s),
                forward_ms=_ms(forward_s),
                total_ms=_ms(time.perf_counter() - started),
                batch_images=max(info.batch_images for info in infos),
            ),
            results=[
                PredictResult(
                    filename=d.filename,
                    width=d.original_size[0],
                    height=d.original_size[1],
                    predictions=[],
                    **answer,
                )
                for d, answer in zip(decoded, answers, strict=True)
            ],
        )

    def check(
        self,
        explainer: Explainer,
        model: LoadedModel,
        params: ExplainParams,
        images: int,
        job: bool = False,
    ) -> tuple[list[CamPlan], RenderStyle]:
        """Every parameter against the model and the task, before any pixel is decoded
        (``job``: the request runs as a job, where what only jobs may ask for is allowed)."""
        task = task_of(model.spec.task)
        for name in CLASS_CHOOSERS:
            if getattr(params, name) and name not in self.own_parameters:
                raise InvalidTarget(
                    f"{name} is for classifiers and segmenters; {model.spec.name!r} is a "
                    f"{model.spec.task} model. Leave {name} out and pick what to explain with "
                    f"{self.picked_by}.",
                    details={"parameter": name},
                )
        for wanted in (params.method or model.spec.default_method).split(","):
            try:
                method, _ = find_method(wanted)
            except UnknownMethod:
                continue  # resolve_methods names the close matches
            reason = task.method_reason(method)
            if reason is not None:
                raise InvalidTarget(f"{reason}.", details={"methods": model.applicable_methods})
        methods = checks.resolve_methods(model, params.method, bool(params.target_layers))
        per_method = checks.split_options(methods, params.options)
        layers = checks.check_layers(model, params.target_layers)
        checks.check_spatial_layers(model, params.target_layers)
        checks.check_rendering(params.outputs, params.image_format, params.colormap)
        per_image = self.check_params(model, params, images)
        checks.check_total_budget(
            model,
            [(m, cls, o) for (m, cls), o in zip(methods, per_method, strict=True)],
            layers,
            images,
            explainer.max_cam_forwards,
            classes=per_image,  # the things explained of an image share its extra forwards
        )
        style = RenderStyle.of(params, explainer.max_output_side)
        plans = CamPlan.each(methods, per_method, layers, params.normalized)
        faithfulness.check(
            faithfulness.scoring(params.faithfulness, params.faithfulness_steps),
            maps_per_image(plans, per_image),
            images,
            checks.plans_forwards(model, plans, images, per_image),
            explainer.max_cam_forwards,
            job,
        )
        return plans, style

    def forwards(
        self, model: LoadedModel, params: ExplainParams, plans: Sequence[CamPlan], images: int
    ) -> tuple[int, int]:
        """The masked and the scoring forwards a request may run (its bound: ``box=all``
        counts its most boxes), for the sum over a request's parts."""
        per_image = self.check_params(model, params, images)
        wanted = faithfulness.scoring(params.faithfulness, params.faithfulness_steps)
        maps = maps_per_image(plans, per_image)
        scoring = 0 if wanted is None else wanted.forwards(maps, images)
        return checks.plans_forwards(model, plans, images, per_image), scoring

    def check_sizes(
        self,
        explainer: Explainer,
        model: LoadedModel,
        params: ExplainParams,
        plans: Sequence[CamPlan],
        style: RenderStyle,
        sizes: Sequence[tuple[int, int]],
    ) -> None:
        """What the uploads' sizes (read from their headers, before decoding) decide: the
        drawing against the render budget, and the pixels ROAD would impute
        (``faithfulness.check_road``), at the model input's size."""
        maps = maps_per_image(plans, self.check_params(model, params, len(sizes)))
        inputs = [input_size(size, model.spec) for size in sizes]
        if explainer.render_budget is not None and style.draws_pictures and sizes:
            width, height = inputs[0]  # size=input: the first image's input, as when drawn
            explainer.render_budget.check(render_cost(sizes, maps, style, (height, width)))
        wanted = faithfulness.scoring(params.faithfulness, params.faithfulness_steps)
        faithfulness.check_road(wanted, maps * sum(width * height for width, height in inputs))

    async def explain(
        self,
        explainer: Explainer,
        model: LoadedModel,
        uploads: Sequence[Upload],
        params: ExplainParams,
        plans: Sequence[CamPlan],
        style: RenderStyle,
        *,
        progress: ProgressCallback | None = None,
        admit: bool = True,
        priority: Priority = "interactive",
    ) -> ExplainResponse:
        """The request's explanations, once ``check`` gave its ``plans`` and ``style``: its
        images' passes, the faithfulness stage when asked for, and the drawing. ``progress``
        counts every pass of the request as one count; ``priority``: its class on the model
        (``app.pipeline.scheduling``)."""
        started = time.perf_counter()
        # Admitted from the decoding to the drawing, as a classifier's request is: the scoring
        # and the drawing are work the queue bound counts.
        with explainer.limiter.admit() if admit else nullcontext():
            # The drawing was checked against the render budget from the headers
            # (``check_sizes``, before the decode budget was taken).
            decoded, decode_s = await self._decode(explainer, model, uploads)
            chained = chain_progress(progress)
            runs, infos = await self._submit_each(
                explainer,
                model,
                False,
                ("task-cam", self.task, tuple(plans)),
                [TaskItem(image, i, params) for i, image in enumerate(decoded)],
                partial(self._explain_pass, model, plans),
                plans,
                chained,
                priority,
            )
            queue_s = max(info.queue_s for info in infos)
            scored = await self._score(explainer, model, params, decoded, runs, chained, priority)
            encode_started = time.perf_counter()
            results = await explainer.on_render_thread(
                lambda: self._results(model, decoded, runs, style)
            )
            encode_s = time.perf_counter() - encode_started
        for result, image_scored in zip(results, scored, strict=True):
            faithfulness.attach([result], image_scored)
        forward_s = sum(run.forward_s for run in runs)
        cam_s = sum(run.cam_s for run in runs)
        note_work(
            model.spec.name,
            ",".join(plan.method for plan in plans),
            len(decoded),
            {
                "decode": decode_s,
                "queue": queue_s,
                "forward": forward_s,
                "cam": cam_s,
                "encode": encode_s,
            },
            # The extra forwards of each image's explanations (its boxes share them).
            sum(
                checks.plans_forwards(model, plans, 1, max(1, len(run.explained) // len(plans)))
                for run in runs
                if run.explained
            ),
            version=model.spec.version,
        )
        return ExplainResponse(
            model=model.spec.name,
            version=model.spec.version,
            device=str(model.device),
            method=",".join(plan.method for plan in plans),
            target_layers=list(plans[0].layers),
            options={k: v for plan in plans for k, v in plan.options if k in params.options},
            image_format=style.image_format,
            media_type=OUTPUT_FORMATS[style.image_format][1],
            timings=ExplainTimings(
                decode_ms=_ms(decode_s),
                queue_ms=_ms(queue_s),
                forward_ms=_ms(forward_s),
                cam_ms=_ms(cam_s),
                encode_ms=_ms(encode_s),
                total_ms=_ms(time.perf_counter() - started),
                batch_images=max(info.batch_images for info in infos),
                forwards=pass_forwards(runs),
                faithfulness_ms=(
                    None
                    if not any(scored)
                    else _ms(sum(one.seconds for one in scored if one is not None))
                ),
                cam_ms_by_method={
                    plan.method: _ms(
                        sum(e.cam_s for run in runs for e in run.explained if e.plan == plan)
                    )
                    for plan in plans
                },
            ),
            results=results,
        )

    async def _score(
        self,
        explainer: Explainer,
        model: LoadedModel,
        params: ExplainParams,
        decoded: Sequence[DecodedImage],
        runs: Sequence[ImageRun],
        progress: ChainedProgress | None,
        priority: Priority,
    ) -> list[faithfulness.Scored | None]:
        """The faithfulness stage (``app.pipeline.faithfulness``), when asked for: each image's
        maps, in the answer's order, scored in a pass of its own after the CAM passes (a task's
        images may differ in size, so they are no one batch); None for an image without."""
        wanted = faithfulness.scoring(params.faithfulness, params.faithfulness_steps)
        if wanted is None:
            return [None] * len(runs)
        scored: list[faithfulness.Scored | None] = []
        for image, run in zip(decoded, runs, strict=True):
            maps = [
                (cam[None], (explained.judged_by,))
                for explained in run.explained
                for _, _, cam in explained.maps
            ]
            if not maps:
                scored.append(None)
                continue
            scored.append(
                await faithfulness.score_maps(
                    explainer.batcher(model),
                    model,
                    wanted,
                    image.tensor[None],
                    maps,
                    progress=progress,
                    priority=priority,
                    threads=explainer.image_threads,
                )
            )
            if progress is not None:
                progress.next_pass()
        return scored

    def _results(
        self,
        model: LoadedModel,
        decoded: Sequence[DecodedImage],
        runs: Sequence[ImageRun],
        style: RenderStyle,
    ) -> list[ExplainResult]:
        results = []
        for image, run in zip(decoded, runs, strict=True):
            explanations = []
            for item in run.explained:
                maps = [
                    MapOutput(
                        layer=layer,
                        kind=kind,
                        **render_map(
                            image,
                            cam,
                            item.plan.normalized or kind == "fused",
                            style,
                            item.outlines,
                        ),
                    )
                    for layer, kind, cam in item.maps
                ]
                explanations.append(Explanation(method=item.plan.method, maps=maps, **item.fields))
            results.append(
                ExplainResult(
                    filename=image.filename,
                    width=image.original_size[0],
                    height=image.original_size[1],
                    predictions=[],
                    logits=[],
                    explanations=explanations,
                    **run.answer,
                )
            )
        return results
