"""Heavy drawings in processes of their own: the threads' pictures, abandoned after one step,
a dead process a 503 (never a hang), and no process left after the pool closes."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
from collections.abc import Iterator
from concurrent.futures import Executor, Future
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from app.errors import RenderUnavailable
from app.http.app import create_app
from app.models.registry import ModelRegistry
from app.pipeline.admission import SlotLimiter
from app.pipeline.budget import FairThreads
from app.pipeline.decoding import Box, DecodedImage
from app.pipeline.explainer import Explainer, ExplainParams
from app.pipeline.render_processes import RenderProcesses
from app.pipeline.rendering import NamedMap, PictureSize, RenderStyle, draw_maps, render_image
from app.settings import Settings
from tests.conftest import image_bytes, wait_ready
from tests.fixtures_models import fixture_access
from tests.pipeline.test_explainer import _uploads

CROP = (32, 32)


@pytest.fixture(scope="module")
def pool() -> Iterator[RenderProcesses]:
    """One drawing process for the module's tests (spawning one imports torch: seconds)."""
    processes = RenderProcesses(1)
    yield processes
    processes.close()


def _drawing() -> tuple[list[DecodedImage], list[list[NamedMap]], RenderStyle]:
    """Two uploads, one with the model's crop inside it, and two maps (one to normalise)."""
    from PIL import Image

    rng = np.random.default_rng(0)

    def noise(width: int, height: int) -> Image.Image:
        return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")

    decoded = [
        DecodedImage(
            "a.png",
            noise(60, 40),
            (60, 40),
            torch.zeros(0),
            Box(10, 0, 50, 40),
        ),
        DecodedImage(
            "b.png",
            noise(30, 30),
            (30, 30),
            torch.zeros(0),
            Box(0, 0, 30, 30),
        ),
    ]
    cams = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(0))
    maps = [[NamedMap("a", "layer", cams, True)], [NamedMap("b", "layer", cams.flip(0) * 3, False)]]
    style = RenderStyle(
        outputs=("overlay", "heatmap", "raw"), image_format="png", size=PictureSize("side", 96)
    )
    return decoded, maps, style


def _by_threads(decoded, maps, style):  # type: ignore[no-untyped-def]
    return [
        [render_image(d, i, group, style, CROP) for group in maps] for i, d in enumerate(decoded)
    ]


async def _in_process(pool: RenderProcesses, threads: Executor | None = None, **kwargs: Any):  # type: ignore[no-untyped-def]
    decoded, maps, style = _drawing()
    async with pool.painter() as painter:
        return await draw_maps(
            FairThreads(threads or pool.threads), decoded, maps, style, CROP, painter, **kwargs
        )


@pytest.mark.parametrize("image_format", ["png", "jpeg"])
def test_a_drawing_process_draws_the_threads_bytes(
    pool: RenderProcesses, image_format: str
) -> None:
    decoded, maps, style = _drawing()
    style = RenderStyle(outputs=style.outputs, image_format=image_format, size=style.size)

    async def main() -> Any:
        async with pool.painter() as painter:
            return await draw_maps(FairThreads(pool.threads), decoded, maps, style, CROP, painter)

    assert asyncio.run(main()) == _by_threads(decoded, maps, style)
    assert len(pool.pids) == 1


class _Counting(Executor):
    """The pool's threads, counting the steps; cancels ``victim`` as the ``cancel_at``-th
    starts."""

    def __init__(self, inner: Executor, cancel_at: int) -> None:
        self.inner, self.cancel_at, self.steps = inner, cancel_at, 0
        self.victim: asyncio.Task[Any] | None = None

    def submit(self, fn, /, *args, **kwargs) -> Future[Any]:  # type: ignore[no-untyped-def,override]
        self.steps += 1
        if self.steps == self.cancel_at and self.victim is not None:
            self.victim.get_loop().call_soon_threadsafe(self.victim.cancel)
        return self.inner.submit(fn, *args, **kwargs)


def test_a_cancelled_drawing_stops_after_the_picture_being_drawn(pool: RenderProcesses) -> None:
    counting = _Counting(pool.threads, cancel_at=3)

    async def main() -> None:
        task = asyncio.ensure_future(_in_process(pool, counting))
        counting.victim = task
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert counting.steps == 3  # of 10 (a canvas and 4 pictures per image)
    (process,) = pool._idle
    assert not process.connection.poll()  # no answer left behind for the next drawing
    # The same process draws the next request, and draws it right.
    decoded, maps, style = _drawing()
    assert asyncio.run(_in_process(pool)) == _by_threads(decoded, maps, style)


def test_a_dead_drawing_process_gives_503_and_the_next_drawing_a_fresh_one() -> None:
    pool = RenderProcesses(1)
    decoded, maps, style = _drawing()

    async def killed_midway() -> None:
        async with pool.painter() as painter:
            canvas = await asyncio.get_running_loop().run_in_executor(
                pool.threads, painter.canvas, decoded[0], style.size, CROP
            )
            (pid,) = pool.pids
            os.kill(pid, signal.SIGKILL)
            await asyncio.get_running_loop().run_in_executor(
                pool.threads, painter.render, "overlay", maps[0][0].cams[0], True, canvas, style
            )

    try:
        with pytest.raises(RenderUnavailable) as caught:
            asyncio.run(killed_midway())
        assert caught.value.status_code == 503 and caught.value.headers == {"Retry-After": "1"}
        assert pool.pids == []  # the dead one is gone
        assert asyncio.run(_in_process(pool)) == _by_threads(decoded, maps, style)
    finally:
        pool.close()


def test_closing_the_pool_leaves_no_process() -> None:
    pool = RenderProcesses(2)

    async def two_at_once() -> None:
        await asyncio.gather(_in_process(pool), _in_process(pool))

    asyncio.run(two_at_once())
    processes = [p.process for p in pool._idle]
    assert len(processes) == 2
    pool.close()
    assert all(p.exitcode is not None for p in processes)
    assert not set(processes) & set(multiprocessing.active_children())


@pytest.fixture
def registry(store: Path) -> ModelRegistry:
    registry = ModelRegistry(store, torch.device("cpu"), "tiny", access=fixture_access(store))
    registry.discover()
    registry.load_all()
    return registry


def test_heavy_requests_draw_in_a_process_and_answer_as_on_a_thread(
    registry: ModelRegistry, pool: RenderProcesses
) -> None:
    params = ExplainParams(method="GradCAM", outputs=("overlay", "heatmap"), image_format="png")

    async def explain(processes: RenderProcesses | None) -> Any:
        explainer = Explainer(
            registry, SlotLimiter(1, 4), 10**7, heavy_render_pixels=1000, render_processes=processes
        )
        try:
            return await explainer.explain("tiny", _uploads(1, 2), params)
        finally:
            await explainer.close()

    drawn_before = pool._idle[0].process.pid if pool._idle else None
    in_process, on_thread = asyncio.run(explain(pool)), asyncio.run(explain(None))
    assert in_process.results == on_thread.results
    assert pool.pids and (drawn_before is None or pool.pids == [drawn_before])


def test_the_service_stops_its_drawing_processes(settings: Settings) -> None:
    changed = Settings(
        **{**settings.model_dump(), "max_render_pixels": 65_536, "render_processes": 1}
    )
    with TestClient(create_app(changed)) as client:
        wait_ready(client)
        answer = client.post(
            "/explain",
            files={"file": ("a.png", image_bytes(seed=3), "image/png")},
            data={"method": "GradCAM", "size": "200", "model": "tiny"},
        )
        assert answer.status_code == 200, answer.text
        processes = client.app.state.explainer.render_processes  # type: ignore[attr-defined]
        assert len(processes.pids) == 1  # 200 x 200 px is heavy: over a quarter of 65,536
        children = [p.process for p in processes._idle]
    assert all(p.exitcode is not None for p in children)
