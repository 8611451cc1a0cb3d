"""The explainer without HTTP: checks, passes per method group, priorities, timings, results."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from app.errors import InvalidParameter, UnsupportedMethod
from app.models.registry import ModelRegistry
from app.pipeline.admission import SlotLimiter
from app.pipeline.decoding import Upload
from app.pipeline.explainer import Explainer, ExplainParams
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

    def on_pass(self, model: str, version: int, images: int) -> None:
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
