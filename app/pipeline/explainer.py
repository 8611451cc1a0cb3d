"""Answer /predict and /explain: admit, decode, pass, render, answer, off the event loop.

Each stage lives in its own module (``admission``, ``decoding``, ``batching`` with ``passes``,
``rendering``), with its own budget and pool: admission prices the whole chain (forwards,
decoded pixels and bytes, pixels drawn) before any pixel is decoded, and a request stays
admitted until its rendering ends. This one checks the parameters against the model, runs the
stages in order and puts the answer together.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Executor
from contextlib import asynccontextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import torch

from app.cam import ProgressCallback, class_probabilities
from app.errors import InvalidTarget
from app.models.device import default_batch_size
from app.models.loading import LoadedModel
from app.models.registry import ModelRegistry
from app.observability.context import note_work
from app.observability.metrics import Metrics
from app.pipeline import checks, faithfulness
from app.pipeline.admission import SlotLimiter
from app.pipeline.batching import Batcher
from app.pipeline.budget import Budget, FairThreads
from app.pipeline.cache import ExplanationCache, Lookup, model_build
from app.pipeline.classes import check_choice, class_count
from app.pipeline.concepts import (
    CONCEPT,
    concept_answers,
    concept_maps,
    concepts_per_image,
)
from app.pipeline.cpu_share import fit_of
from app.pipeline.decoding import DecodeCost, DecodedImage, Upload, decode_cost
from app.pipeline.faithfulness import DEFAULT_STEPS
from app.pipeline.lanes import DeviceLane, lane_for
from app.pipeline.lanes.cpu import CpuLane
from app.pipeline.passes import (
    CamItem,
    CamOutcome,
    CamPlan,
    group_plans,
    run_cam_pass,
    run_forward_pass,
    run_shared_cam_pass,
)
from app.pipeline.progress import ChainedProgress, chain_progress
from app.pipeline.render_processes import RenderProcesses
from app.pipeline.rendering import (
    DEFAULT_ALPHA,
    DEFAULT_COLORMAP,
    DEFAULT_IMAGE_FORMAT,
    OUTPUT_FORMATS,
    NamedMap,
    Painter,
    RenderBudget,
    RenderCost,
    RenderStyle,
    draw_maps,
    render_cost,
)
from app.pipeline.results import (
    ExplainResponse,
    ExplainResult,
    ExplainTimings,
    Explanation,
    MapOutput,
    Prediction,
    PredictResponse,
    PredictResult,
    PredictTimings,
)
from app.pipeline.scheduling import Priority, TurnRules
from app.pipeline.tasks import pipeline_for, refuse_task_parameters
from app.settings import Settings

FUSED = "fused"
T = TypeVar("T")

_decoding: ContextVar[int] = ContextVar("camserve_decoding_bytes", default=1)
"""The bytes the current request's images decode to (from their headers): the weight of its
decoding's turn on the image threads."""


@dataclass(frozen=True)
class ExplainParams:
    """Validated-by-type explain parameters; the explainer checks them against the model."""

    method: str | None = None
    class_idx: tuple[int, ...] = ()
    top_k: int = 5
    target_layers: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ("overlay",)
    colormap: str = DEFAULT_COLORMAP
    alpha: float = DEFAULT_ALPHA
    image_format: str = DEFAULT_IMAGE_FORMAT
    normalized: bool = True
    size: str | None = None
    """``original``, ``input`` or a longest side; None: CAMSERVE_MAX_OUTPUT_SIDE as a cap."""
    options: dict[str, Any] = field(default_factory=dict)
    classes: tuple[int, ...] = ()
    """Classes explained for every image, one explanation each (``app.pipeline.classes``)."""
    top_classes: int | None = None
    """Explain each image's ``top_classes`` most probable classes (``app.pipeline.classes``)."""
    faithfulness: tuple[str, ...] = ()
    """Metrics that score each map (``app.pipeline.faithfulness``); empty: none."""
    faithfulness_steps: int = DEFAULT_STEPS
    boxes: tuple[str, ...] = ()
    """Detection: the detections to explain (indices, or ``all``); default the top one."""
    region: str | None = None
    """Segmentation: ``mask`` (default), ``box:x0,y0,x1,y1`` or ``png:<base64>``."""


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


class Explainer:
    """Turns uploads into predictions and explanations for one registry of models."""

    def __init__(
        self,
        registry: ModelRegistry,
        limiter: SlotLimiter,
        max_pixels: int,
        max_cam_forwards: int = 20_000,
        *,
        max_output_side: int = 1024,
        max_batch_size: int | None = None,
        batch_timeout_s: float = 0.005,
        model_threads: Executor | None = None,
        image_threads: Executor | None = None,
        on_pass: Callable[[str, int, int, float], None] | None = None,
        max_request_pixels: int | None = None,
        decode_budget: Budget | None = None,
        turns: TurnRules = TurnRules(),
        on_wait: Callable[[str, Priority, float], None] | None = None,
        on_yield: Callable[[str], None] | None = None,
        render_threads: Executor | None = None,
        render_budget: RenderBudget | None = None,
        render_memory: Budget | None = None,
        heavy_render_pixels: int | None = None,
        heavy_render_threads: Executor | None = None,
        render_processes: RenderProcesses | None = None,
        cache: ExplanationCache | None = None,
        image_lane: str = "device",
    ) -> None:
        self.registry = registry
        self.cache = cache
        """The explanation cache stage (None: every explanation is computed)."""
        self.image_lane = image_lane
        """``device``: each model's image work runs in its device's lane; ``cpu``: on the CPU."""
        self._lanes: dict[torch.device, DeviceLane] = {}
        self.limiter = limiter
        self.max_pixels = max_pixels
        self.max_request_pixels = max_request_pixels
        """Most pixels the images of one request may decode to (None: no bound)."""
        self.decode_budget = decode_budget
        """Memory that decoding may hold at once, shared by all requests (None: no bound)."""
        self.max_cam_forwards = max_cam_forwards
        self.max_output_side = max_output_side
        self.max_batch_size = max_batch_size
        self.batch_timeout_s = batch_timeout_s
        self.model_threads = model_threads
        self.image_threads = image_threads
        """Bounded threads for decoding (None: the event loop's default pool)."""
        self._turns: dict[int, FairThreads] = {}
        """Each pool's ``FairThreads`` (``turns_on``), by the pool's id."""
        self.render_threads = render_threads if render_threads is not None else image_threads
        """Bounded threads for drawing, apart from decoding's so that neither stage starves the
        other (None: the decoding threads)."""
        self.render_budget = render_budget
        """The most one request may have drawn (None: no bound)."""
        self.render_memory = render_memory
        """Memory that drawing may hold at once, shared by all requests (None: no bound)."""
        self.heavy_render_pixels = heavy_render_pixels
        """A request that draws more pixels than this is heavy: the heavy ones draw one at a
        time, so the others always find a render thread and room in the render memory (None:
        all alike)."""
        self.heavy_render_threads = heavy_render_threads
        """Where the heavy drawings draw (None: the render threads): the service gives them a
        thread of lower CPU priority, so that on a busy machine the small requests' passes and
        pictures go first (``rendering.lower_thread_priority``)."""
        self.render_processes = render_processes
        """Where the heavy drawings that Pillow draws go instead (None: the heavy thread): in
        processes of their own, outside the service's GIL (``app.pipeline.render_processes``)."""
        self._heavy_lane: asyncio.Semaphore | None = None
        self._batchers: weakref.WeakKeyDictionary[LoadedModel, Batcher] = (
            weakref.WeakKeyDictionary()
        )
        """One per loaded model, not per name: during a swap the old and the new model of a
        name never share a pass, and a retired model's batcher goes with it."""
        self.on_pass = on_pass
        """Told (model, version, images) for every pass that ran."""
        self.turns = turns
        """How a chunked pass shares its model with the short passes offered to it."""
        self.on_wait = on_wait
        """Told (model, priority, seconds) for every request's wait for its pass."""
        self.on_yield = on_yield
        """Told (model), from a pass thread, whenever a chunked pass let other passes run."""

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        registry: ModelRegistry,
        *,
        model_threads: Executor,
        image_threads: Executor | None = None,
        metrics: Metrics | None = None,
        render_threads: Executor | None = None,
        heavy_render_threads: Executor | None = None,
        render_processes: RenderProcesses | None = None,
    ) -> Explainer:
        """The explainer ``settings`` describe: the service's lifespan and the local pipeline of
        ``camserve explain`` both build theirs here, so they answer alike."""
        return cls(
            registry,
            SlotLimiter(
                settings.max_model_slots,
                settings.queue_size,
                on_displace=metrics.observe_displaced if metrics else None,
            ),
            settings.max_image_pixels,
            settings.max_cam_forwards,
            max_output_side=settings.max_output_side,
            max_batch_size=settings.max_batch_size,
            batch_timeout_s=settings.batch_timeout_ms / 1000,
            model_threads=model_threads,
            image_threads=image_threads,
            on_pass=metrics.observe_pass if metrics else None,
            max_request_pixels=settings.max_request_pixels,
            decode_budget=Budget(settings.decode_budget_bytes),
            turns=TurnRules(
                settings.background_every, settings.background_share, settings.pause_in_forwards
            ),
            on_wait=metrics.observe_wait if metrics else None,
            on_yield=metrics.observe_yield if metrics else None,
            render_threads=render_threads,
            render_budget=RenderBudget(
                settings.max_render_pixels, settings.max_render_maps, settings.render_budget_bytes
            ),
            render_memory=Budget(settings.render_budget_bytes),
            # A quarter of what one request may draw: four default pictures draw alongside.
            heavy_render_pixels=settings.max_render_pixels // 4,
            heavy_render_threads=heavy_render_threads,
            render_processes=render_processes,
            cache=ExplanationCache.from_settings(
                settings,
                threads=image_threads,
                on_event=metrics.observe_cache if metrics else None,
            ),
            image_lane=settings.image_lane,
        )

    def lane(self, model: LoadedModel) -> DeviceLane:
        """The image lane of a model's device, made once per device."""
        device = model.device if self.image_lane == "device" else torch.device("cpu")
        if device not in self._lanes:
            self._lanes[device] = CpuLane(device) if device.type == "cpu" else lane_for(device)
        return self._lanes[device]

    def batcher(self, model: LoadedModel) -> Batcher:
        """The model's batcher, made on first use (inside the running event loop)."""
        batcher = self._batchers.get(model)
        if batcher is None:
            size = self.max_batch_size or default_batch_size(model.device)
            name = model.spec.name
            batcher = Batcher(
                name,
                self.limiter,
                size,
                self.batch_timeout_s,
                self.model_threads,
                on_pass=(
                    None
                    if self.on_pass is None
                    else partial(self.on_pass, name, model.spec.version)
                ),
                turns=self.turns,
                on_wait=None if self.on_wait is None else partial(self.on_wait, name),
                on_yield=None if self.on_yield is None else partial(self.on_yield, name),
                fit=fit_of(self.model_threads),
            )
            self._batchers[model] = batcher
        return batcher

    @property
    def waiting(self) -> int:
        """Requests waiting for a pass, over all models."""
        return sum(batcher.waiting for batcher in list(self._batchers.values()))

    async def close(self) -> None:
        """Stop every batcher (at shutdown)."""
        for batcher in list(self._batchers.values()):
            await batcher.close()

    def turns_on(self, threads: Executor | None) -> FairThreads:
        """``threads`` in fair turns among clients: one ``FairThreads`` per pool, so that every
        stage that uses a pool takes the same turns."""
        turns = self._turns.get(id(threads))
        if turns is None or turns.executor is not threads:
            turns = self._turns[id(threads)] = FairThreads(threads)
        return turns

    async def on_image_thread(self, func: Callable[[], T], cost: int | None = None) -> T:
        """Run decoding work on the bounded image threads, to the end, in its turn among
        clients (``FairThreads``); ``cost`` weighs the turn (default: the bytes the current
        request's images decode to, held since ``_room_to_decode``)."""
        turns = self.turns_on(self.image_threads)
        return await turns.run(func, _decoding.get() if cost is None else cost)

    async def on_render_thread(self, func: Callable[[], T]) -> T:
        """Run drawing work on the render threads, to the end, in its turn among clients (a
        turn is one step: a picture, or an answer's assembly)."""
        return await self.turns_on(self.render_threads).run(func)

    # ------------------------------------------------------------------ phase 1: decode

    async def _decode(
        self, model: LoadedModel, uploads: Sequence[Upload], picture_side: int | None
    ) -> tuple[list[DecodedImage], float]:
        def work() -> tuple[list[DecodedImage], float]:
            started = time.perf_counter()
            decoded = self.lane(model).decode(uploads, model.spec, self.max_pixels, picture_side)
            return decoded, time.perf_counter() - started

        return await self.on_image_thread(work)

    async def _decode_cost(
        self, model: LoadedModel, uploads: Sequence[Upload], picture_side: int | None
    ) -> DecodeCost:
        """What decoding the uploads takes, from their headers; refused when over a limit."""
        cost = await self.on_image_thread(
            lambda: decode_cost(uploads, model.spec, self.max_pixels, picture_side), cost=1
        )
        capacity = None if self.decode_budget is None else self.decode_budget.capacity
        checks.check_decode_cost(cost, self.max_request_pixels, capacity)
        return cost

    async def check_uploads(
        self,
        model_name: str | None,
        uploads: Sequence[Upload],
        params: ExplainParams,
        version: int | None = None,
        *,
        job: bool = False,
    ) -> None:
        """Every error an explanation can be refused with before its images are decoded: the
        parameters, and the uploads' headers (a job checks this when it is created, so that it
        cannot fail later for a bad parameter or an image over a limit; ``job``: it is one)."""
        await self.check_together(model_name, [(uploads, params)], version, job=job)

    async def check_together(
        self,
        model_name: str | None,
        requests: Sequence[tuple[Sequence[Upload], ExplainParams]],
        version: int | None = None,
        *,
        job: bool = False,
    ) -> None:
        """``check_uploads`` for several explanations that one client request asks for (KServe
        instances whose options differ), with their forwards, decoded pixels and drawing summed
        against the budgets of one request."""
        model = self.registry.get(model_name, version)
        task = pipeline_for(model.spec.task)
        masked, scoring, decoding, drawing = 0, 0, DecodeCost(0, 0), RenderCost()
        for uploads, params in requests:
            if task is not None:  # a detector's or segmenter's checks are its task's
                plans, style = task.check(self, model, params, len(uploads), job)
                cost = await self._decode_cost(model, uploads, None)
                task.check_sizes(self, model, params, plans, style, cost.sizes)
                methods, scored = task.forwards(model, params, plans, len(uploads))
                masked, scoring = masked + methods, scoring + scored
            else:
                plans, style = self._check(model, params, len(uploads), job)
                count = class_count(params)
                masked += checks.plans_forwards(model, plans, len(uploads), count)
                scoring += _scoring_forwards(params, plans, len(uploads) * count)
                side = style.size.decode_side if style.draws_pictures else 0
                cost = await self._decode_cost(model, uploads, side)
                drawing += self._render_cost(model, plans, style, cost, count)
            decoding += cost
        if len(requests) > 1:
            checks.check_forward_sum(masked, scoring, self.max_cam_forwards, len(requests))
            capacity = None if self.decode_budget is None else self.decode_budget.capacity
            checks.check_decode_cost(decoding, self.max_request_pixels, capacity)
            if self.render_budget is not None:
                self.render_budget.check(drawing)

    def _render_cost(
        self,
        model: LoadedModel,
        plans: Sequence[CamPlan],
        style: RenderStyle,
        cost: DecodeCost,
        classes: int = 1,
    ) -> RenderCost:
        """The drawing a request asks for (``classes`` explained per image), refused (422) when
        over the render budget."""
        maps = classes * sum(_maps_per_image(plan) for plan in plans)
        drawing = render_cost(cost.sizes, maps, style, model.spec.crop)
        if self.render_budget is not None:
            self.render_budget.check(drawing)
        return drawing

    @asynccontextmanager
    async def _room_to_decode(
        self,
        model: LoadedModel,
        uploads: Sequence[Upload],
        picture_side: int | None,
        drawing: tuple[Sequence[CamPlan], RenderStyle, int] | None = None,
        sized: Callable[[Sequence[tuple[int, int]]], None] | None = None,
    ) -> AsyncIterator[None]:
        """Read the uploads' headers (every per-image check), refuse a request whose images
        decode to too many pixels or bytes, or whose ``drawing`` (plans, style, classes per
        image) is over the render budget, or that ``sized`` refuses (told the uploads' sizes),
        then hold the bytes their decoding takes in the process's decode budget for the
        block."""
        cost = await self._decode_cost(model, uploads, picture_side)
        if drawing is not None:
            plans, style, classes = drawing
            self._render_cost(model, plans, style, cost, classes)
        if sized is not None:
            sized(cost.sizes)
        decoding = _decoding.set(max(1, cost.bytes))
        try:
            if self.decode_budget is None:
                yield
                return
            async with self.decode_budget.hold(cost.bytes):
                yield
        finally:
            _decoding.reset(decoding)

    # ------------------------------------------------------------------ /predict

    async def predict(
        self,
        model_name: str | None,
        uploads: Sequence[Upload],
        top_k: int,
        version: int | None = None,
        priority: Priority = "interactive",
        outputs: tuple[str, ...] = (),
    ) -> PredictResponse:
        """Top-k classes for each upload, from one (possibly shared) batched forward; a
        detector's boxes or a segmenter's classes (``outputs``: ``mask``) from its task.

        The memory its decoding takes is held first, then admission (503 when the queue is
        full) comes, both before any pixel is decoded. ``priority``: the request's class on
        the model (``app.pipeline.scheduling``)."""
        started = time.perf_counter()
        model = self.registry.get(model_name, version)
        task = pipeline_for(model.spec.task)
        if task is not None:
            task.check_predict_outputs(outputs)
            async with self._room_to_decode(model, uploads, picture_side=None):
                return await task.predict(self, model, uploads, outputs, priority)
        if outputs:
            raise InvalidTarget(
                f"output={outputs[0]} is for segmentation models; a classifier's /predict "
                "answers its top-k classes.",
                details={"parameter": "output"},
            )
        async with self._room_to_decode(model, uploads, picture_side=0):
            return await self._predict(model, uploads, top_k, started, priority)

    async def _predict(
        self,
        model: LoadedModel,
        uploads: Sequence[Upload],
        top_k: int,
        started: float,
        priority: Priority = "interactive",
    ) -> PredictResponse:
        with self.limiter.admit():
            decoded, decode_s = await self._decode(model, uploads, picture_side=0)
            batch = self.lane(model).stack(decoded)
            outcome, info = await self.batcher(model).submit(
                ("forward",),
                batch,
                len(batch),
                partial(run_forward_pass, model),
                priority=priority,
            )
        results = [
            PredictResult(
                filename=d.filename,
                width=d.original_size[0],
                height=d.original_size[1],
                predictions=_predictions(model, row, top_k),
            )
            for d, row in zip(decoded, outcome.logits, strict=True)
        ]
        timings = PredictTimings(
            decode_ms=_ms(decode_s),
            queue_ms=_ms(info.queue_s),
            forward_ms=_ms(outcome.forward_s),
            total_ms=_ms(time.perf_counter() - started),
            batch_images=info.batch_images,
        )
        note_work(
            model.spec.name,
            None,
            len(decoded),
            {"decode": decode_s, "queue": info.queue_s, "forward": outcome.forward_s},
            version=model.spec.version,
        )
        return PredictResponse(
            model=model.spec.name,
            version=model.spec.version,
            device=str(model.device),
            timings=timings,
            results=results,
        )

    # ------------------------------------------------------------------ /explain

    async def explain(
        self,
        model_name: str | None,
        uploads: Sequence[Upload],
        params: ExplainParams,
        *,
        progress: ProgressCallback | None = None,
        admit: bool = True,
        version: int | None = None,
        priority: Priority = "interactive",
        scope: str | None = None,
        job: bool = False,
    ) -> ExplainResponse:
        """Predictions and class activation maps for every upload, with one or several methods.

        ``progress(done, total)`` hears from the pass thread how far the masked or noisy forwards
        got (each pass of a several-method request counts its own). ``admit=False`` skips the
        admission check (jobs, bounded by their own count, wait for a slot instead of being
        refused). ``priority``: the request's class on the model (``app.pipeline.scheduling``).
        ``scope``: whose cached answers the request may be given and whose it makes, such as the
        name of the client's API key (None: everyone's), so that one client cannot learn what
        another sent. ``job``: it runs as a job (what only jobs may ask for is allowed)."""
        started = time.perf_counter()
        model = self.registry.get(model_name, version)
        task = pipeline_for(model.spec.task)
        if task is None:
            refuse_task_parameters(params)
            plans, style = self._check(model, params, len(uploads), job)
        else:  # a detector or a segmenter: its task's checks, then its task's flow
            plans, style = task.check(self, model, params, len(uploads), job)
        lookup = await self._look_up(model, uploads, params, plans, style, started, scope)
        if lookup.answer is not None:
            spec = model.spec
            note_work(spec.name, lookup.answer.method, len(uploads), {}, version=spec.version)
            return lookup.answer
        if task is not None:
            sized = partial(task.check_sizes, self, model, params, plans, style)
            async with self._room_to_decode(model, uploads, None, sized=sized):
                answer = await task.explain(
                    self,
                    model,
                    uploads,
                    params,
                    plans,
                    style,
                    progress=progress,
                    admit=admit,
                    priority=priority,
                )
        else:
            side = style.size.decode_side if style.draws_pictures else 0
            drawing = (plans, style, class_count(params))
            async with self._room_to_decode(model, uploads, side, drawing):
                answer = await self._explain(
                    model, uploads, params, plans, style, side, started, progress, admit, priority
                )
        return answer if self.cache is None else await self.cache.keep(lookup, answer)

    async def _look_up(
        self,
        model: LoadedModel,
        uploads: Sequence[Upload],
        params: ExplainParams,
        plans: Sequence[CamPlan],
        style: RenderStyle,
        started: float,
        scope: str | None,
    ) -> Lookup:
        """The cache stage, before admission and decoding: a hit is the whole answer."""
        if self.cache is None:
            return Lookup("off")
        spec = model.spec
        identity = (spec.name, spec.version, str(model.device), model_build(self.registry, model))
        return await self.cache.look_up(identity, uploads, params, plans, style, started, scope)

    async def _explain(
        self,
        model: LoadedModel,
        uploads: Sequence[Upload],
        params: ExplainParams,
        plans: list[CamPlan],
        style: RenderStyle,
        side: int | None,
        started: float,
        progress: ProgressCallback | None,
        admit: bool,
        priority: Priority,
    ) -> ExplainResponse:
        """The explanation once its decoding memory is held: the stages and the answer. The
        request stays admitted until its drawing ends: rendering is work the queue bound counts."""
        with self.limiter.admit() if admit else nullcontext():
            decoded, decode_s = await self._decode(model, uploads, side)
            item = CamItem(
                self.lane(model).stack(decoded),
                params.class_idx,
                params.classes,
                params.top_classes,
            )
            ran = await self._run_plans(model, plans, item, progress, priority)
            scored = await self._score(model, plans, item, ran, params, priority)
            results, encode_s = await self._render(
                model, decoded, ran.outcomes, plans, style, params
            )
            faithfulness.attach(results, scored)
        cam_s = sum(outcome.cam_s for outcome in ran.outcomes.values())
        stages = {"decode": decode_s, "queue": ran.queue_s, "forward": ran.forward_s}
        self._note(
            model,
            plans,
            len(decoded),
            {**stages, "cam": cam_s, "encode": encode_s},
            class_count(params),
        )
        timings = ExplainTimings(
            decode_ms=_ms(decode_s),
            queue_ms=_ms(ran.queue_s),
            forward_ms=_ms(ran.forward_s),
            cam_ms=_ms(cam_s),
            encode_ms=_ms(encode_s),
            total_ms=_ms(time.perf_counter() - started),
            batch_images=ran.batch_images,
            cam_ms_by_method={plan.method: _ms(ran.outcomes[plan].cam_s) for plan in plans},
            forwards=ran.forwards,
            faithfulness_ms=None if scored is None else _ms(scored.seconds),
        )
        return self._explain_response(model, plans, params, style, timings, results)

    async def _run_plans(
        self,
        model: LoadedModel,
        plans: Sequence[CamPlan],
        item: CamItem,
        progress: ProgressCallback | None,
        priority: Priority,
    ) -> _PlansRun:
        """Phase 2: the passes of every plan, one after the other (the methods that can share a
        forward in one pass, every other method alone), each batched with other requests."""
        ran = _PlansRun()
        chained = ran.progress = chain_progress(progress)
        for group in group_plans(plans):
            run = (
                partial(run_cam_pass, model, group[0])
                if len(group) == 1
                else partial(run_shared_cam_pass, model, group)
            )
            outcome, info = await self.batcher(model).submit(
                ("cam", group[0] if len(group) == 1 else group),
                item,
                len(item.batch),
                run,
                batchable=all(plan.batchable for plan in group),
                progress=chained,
                priority=priority,
                chunked=any(plan.chunked for plan in group),
            )
            shared = [outcome] if len(group) == 1 else outcome
            ran.outcomes.update(zip(group, shared, strict=True))
            ran.queue_s += info.queue_s
            ran.forward_s += shared[0].forward_s
            ran.forwards += shared[0].forwards
            ran.batch_images = max(ran.batch_images, info.batch_images)
            if chained is not None:
                chained.next_pass()
        return ran

    async def _score(
        self,
        model: LoadedModel,
        plans: Sequence[CamPlan],
        item: CamItem,
        ran: _PlansRun,
        params: ExplainParams,
        priority: Priority,
    ) -> faithfulness.Scored | None:
        """The faithfulness stage (``app.pipeline.faithfulness``), when asked for: every map
        scored in a pass of its own on the model, after the CAM passes."""
        wanted = faithfulness.scoring(params.faithfulness, params.faithfulness_steps)
        if wanted is None:
            return None
        # In the answer's order: method by method, class by class, then the maps.
        maps = [
            (named.cams, faithfulness.class_objective(model, one.class_idx))
            for plan in plans
            for one in ran.outcomes[plan].per_class()
            for named in _named_maps(plan, one)
        ]
        return await faithfulness.score_maps(
            self.batcher(model),
            model,
            wanted,
            item.batch,
            maps,
            progress=ran.progress,
            priority=priority,
            threads=self.image_threads,
        )

    async def _render(
        self,
        model: LoadedModel,
        decoded: Sequence[DecodedImage],
        outcomes: dict[CamPlan, CamOutcome],
        plans: Sequence[CamPlan],
        style: RenderStyle,
        params: ExplainParams,
    ) -> tuple[list[ExplainResult], float]:
        """The render stage, in steps on the render threads: the results and their seconds."""
        started = time.perf_counter()
        maps = [
            _named_maps(plan, one) + concept_maps(one, plan.normalized)
            for plan in plans
            for one in outcomes[plan].per_class()
        ]
        sizes = [image.original_size for image in decoded]
        cost = render_cost(sizes, sum(len(group) for group in maps), style, model.spec.crop)
        painter = self.lane(model).painter
        async with (
            self._heavy_lane_if(cost, painter) as (threads, painter),
            self._room_to_draw(cost.bytes),
        ):
            drawn = await draw_maps(threads, decoded, maps, style, model.spec.crop, painter)
        results = await self.on_render_thread(
            lambda: self._results(model, decoded, outcomes, plans, drawn, params.top_k)
        )
        return results, time.perf_counter() - started

    @asynccontextmanager
    async def _heavy_lane_if(
        self, cost: RenderCost, painter: Painter | None
    ) -> AsyncIterator[tuple[FairThreads, Painter | None]]:
        """The heavy drawings' lane for the block, when ``cost`` makes a drawing heavy: the
        threads to draw on (in turns among clients), and the painter (the device lane's
        ``painter``, or a drawing process's where Pillow would draw)."""
        if self.heavy_render_pixels is None or cost.pixels <= self.heavy_render_pixels:
            yield self.turns_on(self.render_threads), painter
            return
        if self._heavy_lane is None:
            self._heavy_lane = asyncio.Semaphore(1)
        async with self._heavy_lane:
            if painter is None and self.render_processes is not None:
                async with self.render_processes.painter() as drawing:
                    yield self.turns_on(self.render_processes.threads), drawing
                return
            yield self.turns_on(self.heavy_render_threads or self.render_threads), painter

    @asynccontextmanager
    async def _room_to_draw(self, amount: int) -> AsyncIterator[None]:
        """Hold ``amount`` bytes of the render memory for the block (admission refused more than
        all of it; the cap covers a rotated upload priced from its header)."""
        if self.render_memory is None or amount == 0:
            yield
            return
        async with self.render_memory.hold(min(amount, self.render_memory.capacity)):
            yield

    @staticmethod
    def _note(
        model: LoadedModel,
        plans: Sequence[CamPlan],
        images: int,
        stages: dict[str, float],
        classes: int = 1,
    ) -> None:
        """What the request did, for its access log line and the metrics."""
        note_work(
            model.spec.name,
            ",".join(plan.method for plan in plans),
            images,
            stages,
            checks.plans_forwards(model, plans, images, classes),
            version=model.spec.version,
        )

    @staticmethod
    def _explain_response(
        model: LoadedModel,
        plans: Sequence[CamPlan],
        params: ExplainParams,
        style: RenderStyle,
        timings: ExplainTimings,
        results: list[ExplainResult],
    ) -> ExplainResponse:
        return ExplainResponse(
            model=model.spec.name,
            version=model.spec.version,
            device=str(model.device),
            method=",".join(plan.method for plan in plans),
            target_layers=list(plans[0].layers),
            options={k: v for plan in plans for k, v in plan.options if k in params.options},
            image_format=style.image_format,
            media_type=OUTPUT_FORMATS[style.image_format][1],
            timings=timings,
            results=results,
        )

    def _check(
        self, model: LoadedModel, params: ExplainParams, images: int, job: bool = False
    ) -> tuple[list[CamPlan], RenderStyle]:
        """Every parameter against the model, before any pixel is decoded: one plan per method."""
        own_layers = bool(params.target_layers) and (
            tuple(dict.fromkeys(params.target_layers)) != model.target_layers
        )
        methods = checks.resolve_methods(model, params.method, own_layers)
        checks.check_layers_taken(methods, params.target_layers)
        per_method = checks.split_options(methods, params.options)
        checks.check_flip(model, per_method)
        for (_, cls), options in zip(methods, per_method, strict=True):
            if cls.reads_head and model.spec.fc_layer:
                options.setdefault("fc_layer", model.spec.fc_layer)
        own_default = None
        if not params.target_layers and len(methods) == 1:
            # A method with layers of its own (LeGrad: a ViT's blocks) explains those by default.
            own_default = methods[0][1].default_layers(model.module)
        layers = checks.check_layers(model, params.target_layers or own_default or ())
        checks.check_classes(model, params.class_idx, images)
        check_choice(params, model.spec.name, model.spec.num_classes)
        checks.check_rendering(params.outputs, params.image_format, params.colormap)
        checks.check_spatial_layers(model, params.target_layers)
        for (method, cls), options in zip(methods, per_method, strict=True):
            checks.check_option_fit(model, method, cls, layers, options)
        checks.check_total_budget(
            model,
            [(m, cls, o) for (m, cls), o in zip(methods, per_method, strict=True)],
            layers,
            images,
            self.max_cam_forwards,
            class_count(params),
        )
        style = RenderStyle.of(params, self.max_output_side)
        plans = CamPlan.each(methods, per_method, layers, params.normalized)
        wanted = faithfulness.scoring(params.faithfulness, params.faithfulness_steps)
        maps = sum(_maps_per_image(plan) for plan in plans) * class_count(params)
        faithfulness.check(
            wanted,
            maps,
            images,
            checks.plans_forwards(model, plans, images, class_count(params)),
            self.max_cam_forwards,
            job,
            image_input=len(model.spec.input_shape) == 3,
        )
        height, width = model.spec.crop  # every classifier input is the crop
        faithfulness.check_road(wanted, images * maps * height * width)
        return plans, style

    # ------------------------------------------------------------------ the answer

    def _results(
        self,
        model: LoadedModel,
        decoded: Sequence[DecodedImage],
        outcomes: dict[CamPlan, CamOutcome],
        plans: Sequence[CamPlan],
        drawn: list[list[list[dict[str, Any]]]],
        top_k: int,
    ) -> list[ExplainResult]:
        first = outcomes[plans[0]]
        results = []
        for i, image in enumerate(decoded):
            logits = first.logits[i]
            explanations = []
            asked = [(plan, one) for plan in plans for one in outcomes[plan].per_class()]
            for (plan, outcome), rendered in zip(asked, drawn[i], strict=True):
                target = outcome.class_idx[i]
                explanations.append(
                    Explanation(
                        method=plan.method,
                        class_idx=target,
                        label=model.labels[target],
                        logit=float(outcome.logits[i][target]),
                        probability=float(
                            class_probabilities(outcome.logits[i], model.spec.probabilities)[target]
                        ),
                        maps=[MapOutput(**f) for f in rendered if f["kind"] != CONCEPT],
                        concepts=concept_answers(
                            model,
                            outcome.concepts,
                            i,
                            [f for f in rendered if f["kind"] == CONCEPT],
                            top_k,
                        ),
                    )
                )
            results.append(
                ExplainResult(
                    filename=image.filename,
                    width=image.original_size[0],
                    height=image.original_size[1],
                    predictions=_predictions(model, logits, top_k),
                    logits=logits.tolist(),
                    explanations=explanations,
                )
            )
        return results


@dataclass
class _PlansRun:
    """What the passes of one request gave: an outcome per plan, and how they ran."""

    outcomes: dict[CamPlan, CamOutcome] = field(default_factory=dict)
    queue_s: float = 0.0
    forward_s: float = 0.0
    batch_images: int = 0
    forwards: int = 0
    progress: ChainedProgress | None = None
    """The request's progress over its passes; the faithfulness pass goes on counting it."""


def _scoring_forwards(params: ExplainParams, plans: Sequence[CamPlan], images: int) -> int:
    """The faithfulness stage's forwards for a request (0 when it asks for none)."""
    wanted = faithfulness.scoring(params.faithfulness, params.faithfulness_steps)
    maps = sum(_maps_per_image(plan) for plan in plans)
    return 0 if wanted is None else wanted.forwards(maps, images)


def _maps_per_image(plan: CamPlan) -> int:
    """The maps ``plan`` gives for each image: one per layer and their fusion, or one alone;
    and its concepts' maps (DFF)."""
    if plan.cls.one_map:
        return 1 + concepts_per_image(plan)
    return len(plan.layers) + (1 if len(plan.layers) > 1 else 0) + concepts_per_image(plan)


def _named_maps(plan: CamPlan, outcome: CamOutcome) -> list[NamedMap]:
    # A one-map method (RefineCAM, LeGrad) has no per-layer maps, only the fused one.
    per_layer = zip(plan.layers, outcome.cams, strict=True) if outcome.cams else ()
    maps = [NamedMap(layer, "layer", cams, plan.normalized) for layer, cams in per_layer]
    if outcome.fused is not None:
        maps.append(NamedMap(FUSED, "fused", outcome.fused, True))
    return maps


def _predictions(model: LoadedModel, logits: torch.Tensor, k: int) -> list[Prediction]:
    probs = class_probabilities(logits, model.spec.probabilities)
    top = probs.topk(min(k, logits.numel()))
    return [
        Prediction(
            class_idx=int(i),
            label=model.labels[int(i)],
            logit=float(logits[int(i)]),
            probability=float(p),
        )
        for p, i in zip(top.values, top.indices, strict=True)
    ]
