"""The explainer without HTTP: checks, passes per method group, priorities, timings, results."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from app.errors import InvalidParameter, OverBudget, UnsupportedMethod
from app.models.registry import ModelRegistry
from app.pipeline.admission import SlotLimiter
from app.pipeline.budget import Budget
from app.pipeline.decoding import Upload
from app.pipeline.explainer import Explainer, ExplainParams
from app.pipeline.rendering import RenderBudget, RenderStyle, render_cost
from app.pipeline.scheduling import Priority
from tests.conftest import image_bytes
from tests.fixtures_models import fixture_access


@pytest.fixture(scope="module")
def registry(store: Path) -> ModelRegistry:
    registry = ModelRegistry(store, torch.device("cpu"), "tiny", access=fixture_access(store))
    registry.discover()
    registry.load_all()
    return registry


class Seen:
    """What the explainer tells its observers."""

    def __init__(self) -> None:
        self.passes: list[tuple[str, int]] = []
        self.waits: list[tuple[str, Priority, float]] = []

    def on_pass(self, model: str, version: int, images: int, seconds: float) -> None:
        assert version == 1  # the tiny model's folder has no versions
        self.passes.append((model, images))

    def on_wait(self, model: str, priority: Priority, seconds: float) -> None:
        self.waits.append((model, priority, seconds))


@pytest.fixture
def seen() -> Seen:
    return Seen()


@pytest.fixture
def explainer(registry: ModelRegistry, seen: Seen) -> Iterator[Explainer]:
    yield Explainer(
        registry,
        SlotLimiter(max_running=1, max_waiting=4),
        10**7,
        on_pass=seen.on_pass,
        on_wait=seen.on_wait,
    )


def _uploads(*seeds: int) -> list[Upload]:
    return [Upload(f"{seed}.png", image_bytes(seed=seed)) for seed in seeds]


async def _explain(explainer: Explainer, params: ExplainParams, **kwargs: object):  # type: ignore[no-untyped-def]
    try:
        return await explainer.explain("tiny", _uploads(1, 2), params, **kwargs)  # type: ignore[arg-type]
    finally:
        await explainer.close()


def test_an_explanation_has_a_result_per_image_and_an_explanation_per_method(
    explainer: Explainer, seen: Seen
) -> None:
    params = ExplainParams(method="GradCAM,ScoreCAM", outputs=("raw",), class_idx=(1,))
    answer = asyncio.run(_explain(explainer, params))
    assert answer.method == "GradCAM,ScoreCAM" and answer.model == "tiny"
    assert [r.filename for r in answer.results] == ["1.png", "2.png"]
    for result in answer.results:
        assert [e.method for e in result.explanations] == ["GradCAM", "ScoreCAM"]
        assert {e.class_idx for e in result.explanations} == {1}
    # GradCAM works from the hooked forward; ScoreCAM runs masked forwards of its own: 2 passes.
    assert seen.passes == [("tiny", 2), ("tiny", 2)]
    timings = answer.timings
    assert set(timings.cam_ms_by_method) == {"GradCAM", "ScoreCAM"}
    assert timings.cam_ms == pytest.approx(sum(timings.cam_ms_by_method.values()), abs=0.01)
    assert 0 <= timings.queue_ms <= timings.total_ms
    assert timings.batch_images == 2


def test_several_passes_report_one_rising_progress(explainer: Explainer) -> None:
    reports: list[tuple[int, int]] = []
    params = ExplainParams(method="ScoreCAM,ISCAM", outputs=("raw",), options={"batch_size": 2})
    asyncio.run(_explain(explainer, params, progress=lambda d, t: reports.append((d, t))))
    done = [d for d, _ in reports]
    assert done == sorted(done) and done[-1] == reports[-1][1] > 0
    # The second pass counts on from the first one's total.
    assert len({t for _, t in reports if t}) == 2


@pytest.mark.parametrize("priority", ["interactive", "background"])
def test_the_request_waits_in_its_priority_class(
    explainer: Explainer, seen: Seen, priority: Priority
) -> None:
    asyncio.run(_explain(explainer, ExplainParams(method="GradCAM"), priority=priority))
    assert [(m, p) for m, p, _ in seen.waits] == [("tiny", priority)]
    assert seen.waits[0][2] >= 0


def test_bad_parameters_are_refused_before_any_pass(explainer: Explainer, seen: Seen) -> None:
    with pytest.raises(UnsupportedMethod, match="NoSuchCAM"):
        asyncio.run(_explain(explainer, ExplainParams(method="NoSuchCAM")))
    with pytest.raises(InvalidParameter):
        asyncio.run(_explain(explainer, ExplainParams(method="GradCAM", class_idx=(99,))))
    assert seen.passes == []


def test_predict_ranks_the_classes_of_each_image(explainer: Explainer) -> None:
    async def predict():  # type: ignore[no-untyped-def]
        try:
            return await explainer.predict("tiny", _uploads(3), top_k=2)
        finally:
            await explainer.close()

    answer = asyncio.run(predict())
    (result,) = answer.results
    probabilities = [p.probability for p in result.predictions]
    assert len(probabilities) == 2 and probabilities == sorted(probabilities, reverse=True)


class _RenderThreads(ThreadPoolExecutor):
    """Render threads that note, for every step, whether its request was still admitted."""

    def __init__(self, limiter: SlotLimiter, memory: Budget) -> None:
        super().__init__(max_workers=1)
        self.limiter = limiter
        self.memory = memory
        self.admitted: list[int] = []
        self.held: list[int] = []

    def submit(self, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def,override]
        self.admitted.append(self.limiter.in_flight)
        self.held.append(self.memory.held)
        return super().submit(fn, *args, **kwargs)


def test_a_request_stays_admitted_until_its_drawing_ends(registry: ModelRegistry) -> None:
    limiter = SlotLimiter(max_running=1, max_waiting=4)
    memory = Budget(10**9)
    with ThreadPoolExecutor(1) as images, _RenderThreads(limiter, memory) as drawing:
        explainer = Explainer(
            registry,
            limiter,
            10**7,
            image_threads=images,
            render_threads=drawing,
            render_memory=memory,
        )
        params = ExplainParams(method="GradCAM", outputs=("overlay", "heatmap"))
        answer = asyncio.run(_explain(explainer, params))
    assert len(answer.results) == 2
    # Drawing ran on its own threads (2 canvases, 2 pictures each, then the answer), every step
    # while the request still counted against the queue bound.
    assert drawing.admitted == [1] * 7
    assert limiter.in_flight == 0
    # The pictures were drawn holding their memory (two 40x32 uploads: 4 pictures of 1280 px).
    cost = render_cost([(40, 32)] * 2, 1, RenderStyle(outputs=("overlay", "heatmap")), (32, 32))
    assert cost.pixels == 4 * 40 * 32
    assert drawing.held == [cost.bytes] * 6 + [0] and memory.held == 0


def test_drawing_over_the_render_budget_is_refused_before_any_pass(
    registry: ModelRegistry, seen: Seen
) -> None:
    explainer = Explainer(
        registry,
        SlotLimiter(1, 4),
        10**7,
        on_pass=seen.on_pass,
        render_budget=RenderBudget(max_pixels=2 * 2 * 100 * 100, max_maps=4),
    )
    fits = ExplainParams(method="GradCAM", outputs=("overlay", "heatmap"), size="100")
    over_pixels = ExplainParams(method="GradCAM", size="200")
    over_maps = ExplainParams(method="GradCAM,GradCAMpp,XGradCAM")

    async def main() -> None:
        try:
            await explainer.explain("tiny", _uploads(1, 2), fits)  # 2 x 2 pictures of 100x80
            with pytest.raises(OverBudget, match="CAMSERVE_MAX_RENDER_PIXELS"):
                await explainer.explain("tiny", _uploads(1, 2), over_pixels)
            with pytest.raises(OverBudget, match="CAMSERVE_MAX_RENDER_MAPS"):
                await explainer.explain("tiny", _uploads(1, 2), over_maps)
        finally:
            await explainer.close()

    asyncio.run(main())
    assert seen.passes == [("tiny", 2)]


def test_parts_of_one_request_are_summed_against_its_budgets(explainer: Explainer) -> None:
    """KServe instances whose options differ run as separate calls, but count as one request."""
    part = ExplainParams(method="ScoreCAM", outputs=("raw",))  # 4 channels: 4 forwards an image
    explainer.max_cam_forwards = 10
    asyncio.run(explainer.check_together("tiny", [(_uploads(1, 2), part)]))
    with pytest.raises(OverBudget, match="12 masked or noisy forwards") as caught:
        asyncio.run(explainer.check_together("tiny", [(_uploads(1, 2), part), (_uploads(3), part)]))
    assert caught.value.details == {"forwards": 12, "limit": 10, "scoring": 0}
    explainer.max_cam_forwards = 10**6
    explainer.render_budget = RenderBudget(max_pixels=10**9, max_maps=2)
    with pytest.raises(OverBudget, match="3 maps"):
        asyncio.run(explainer.check_together("tiny", [(_uploads(1, 2), part), (_uploads(3), part)]))


@pytest.mark.parametrize(("heavy_from", "heavy"), [(10**6, False), (1000, True)])
def test_requests_that_draw_many_pixels_draw_in_the_heavy_lane(
    registry: ModelRegistry, heavy_from: int, heavy: bool
) -> None:
    seen: list[bool] = []
    explainer = Explainer(registry, SlotLimiter(1, 4), 10**7, heavy_render_pixels=heavy_from)

    class Threads(ThreadPoolExecutor):
        def submit(self, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def,override]
            lane = explainer._heavy_lane
            seen.append(lane is not None and lane.locked())
            return super().submit(fn, *args, **kwargs)

    with Threads(2) as threads:
        explainer.render_threads = threads
        asyncio.run(_explain(explainer, ExplainParams(method="GradCAM")))  # 2 x 1280 pixels
    assert seen[:-1] == [heavy] * 4  # every drawing step; the answer's assembly is no drawing


def test_heavy_drawings_draw_on_their_own_threads(registry: ModelRegistry) -> None:
    """The heavy lane draws on ``heavy_render_threads`` (the service's are of lower priority);
    the small requests keep the render threads."""
    used: list[str] = []

    class Threads(ThreadPoolExecutor):
        def __init__(self, name: str) -> None:
            super().__init__(1)
            self.name = name

        def submit(self, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def,override]
            used.append(self.name)
            return super().submit(fn, *args, **kwargs)

    with Threads("render") as render, Threads("heavy") as heavy:
        for heavy_from, lane in ((10**6, "render"), (1000, "heavy")):
            used.clear()
            explainer = Explainer(
                registry,
                SlotLimiter(1, 4),
                10**7,
                heavy_render_pixels=heavy_from,
                render_threads=render,
                heavy_render_threads=heavy,
            )
            asyncio.run(_explain(explainer, ExplainParams(method="GradCAM")))  # 2 x 1280 pixels
            assert used[:-1] == [lane] * 4 and used[-1] == "render"  # the answer's assembly


def test_drawing_steps_take_turns_among_clients(registry: ModelRegistry) -> None:
    # One render thread; client a has six requests drawing, client b one. First come first
    # served, b's steps (canvases, pictures, the answer's assembly) came one in seven, its last
    # one last; in turns, b gets one step in two whatever a's number of requests (b's next step
    # joins the queue only once its last one is done, after the thread went on to a's next: it
    # starts where the clock was when its last step left, or it came one in three).
    from app.observability.context import start_request
    from app.pipeline.fairness import current_caller

    steps: list[str] = []

    class Threads(ThreadPoolExecutor):
        def submit(self, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def,override]
            steps.append(current_caller())
            return super().submit(fn, *args, **kwargs)

    async def main(explainer: Explainer, pool: Threads) -> None:
        release = asyncio.Event()
        turns = explainer.turns_on(pool)

        async def blocker() -> None:
            start_request(None).caller = "x"
            await explainer.on_render_thread(lambda: release_seen.wait(10))

        async def request(client: str) -> None:
            start_request(None).caller = client
            await explainer.explain("tiny", _uploads(1, 2), ExplainParams(method="GradCAM"))

        import threading

        release_seen = threading.Event()
        held = asyncio.create_task(blocker())
        await asyncio.sleep(0.05)
        clients = [asyncio.create_task(request(c)) for c in ("a",) * 6 + ("b",)]
        async with asyncio.timeout(30):
            while turns._threads is not None and turns._threads.waiting < 7:
                await asyncio.sleep(0.01)  # every request waits to draw its first step
        release.set()
        release_seen.set()
        await asyncio.gather(held, *clients)
        await explainer.close()

    with Threads(1) as pool:
        explainer = Explainer(
            registry, SlotLimiter(max_running=4, max_waiting=8), 10**7, render_threads=pool
        )
        asyncio.run(main(explainer, pool))
    drawn = steps[1:]  # after the blocker
    assert drawn.count("b") * 6 == drawn.count("a") > 0  # the same steps per request
    last_b = max(i for i, client in enumerate(drawn) if client == "b")
    assert last_b < 2 * drawn.count("b"), " ".join(drawn)
