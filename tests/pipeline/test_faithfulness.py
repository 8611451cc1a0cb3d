"""The faithfulness stage: scores against a direct computation, forwards counted, budgets, ROAD."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from app.cam.faithfulness import gaussian_blur
from app.errors import BadRequest, MalformedParameter, OverBudget
from app.models.registry import ModelRegistry
from app.pipeline import faithfulness
from app.pipeline.admission import SlotLimiter
from app.pipeline.decoding import Upload
from app.pipeline.explainer import Explainer, ExplainParams
from app.pipeline.faithfulness import (
    DEFAULT_STEPS,
    MAX_STEPS,
    METRICS,
    ScoreItem,
    Scoring,
    road_item,
    run_scoring_pass,
)
from app.pipeline.params import build_params
from app.pipeline.progress import chain_progress
from tests.conftest import image_bytes
from tests.fixtures_models import fixture_access


@pytest.fixture(scope="module")
def registry(store: Path) -> ModelRegistry:
    registry = ModelRegistry(store, torch.device("cpu"), "tiny", access=fixture_access(store))
    registry.discover()
    registry.load_all()
    return registry


def _explainer(registry: ModelRegistry, limit: int = 20_000) -> Explainer:
    return Explainer(registry, SlotLimiter(max_running=1, max_waiting=4), 10**7, limit)


def _uploads(*seeds: int) -> list[Upload]:
    return [Upload(f"{seed}.png", image_bytes(seed=seed)) for seed in seeds]


async def _explain(explainer: Explainer, params: ExplainParams, seeds=(1, 2), **kwargs):  # type: ignore[no-untyped-def]
    try:
        return await explainer.explain("tiny", _uploads(*seeds), params, **kwargs)
    finally:
        await explainer.close()


class Forwards:
    """The batch size of every forward of a model, counted by a hook."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.sizes: list[int] = []
        self.handle = module.register_forward_pre_hook(self._seen)

    def _seen(self, _module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        self.sizes.append(len(args[0]))


@pytest.fixture
def forwards(registry: ModelRegistry) -> Iterator[Forwards]:
    counted = Forwards(registry.get("tiny").module)
    yield counted
    counted.handle.remove()


def _direct_auc(
    model: torch.nn.Module, image: torch.Tensor, order: list[int], cls: int, steps: int, mode: str
) -> float:
    """The RISE curve's area by hand: pixel by pixel, one input at a time, trapezoids summed."""
    _, h, w = image.shape
    blurred = gaussian_blur(image[None])[0]
    probs = []
    for k in range(steps + 1):
        count = round(k * h * w / steps)
        x = image.clone() if mode == "deletion" else blurred.clone()
        for pixel in order[:count]:
            row, col = divmod(pixel, w)
            x[:, row, col] = 0.0 if mode == "deletion" else image[:, row, col]
        with torch.no_grad():
            probs.append(float(torch.softmax(model(x[None]), dim=1)[0, cls]))
    return sum((probs[k] + probs[k + 1]) / 2 / steps for k in range(steps))


def test_the_scores_equal_a_direct_computation(registry: ModelRegistry) -> None:
    model = registry.get("tiny")
    torch.manual_seed(3)
    images = torch.randn(2, 3, 32, 32)
    cams = torch.rand(2, 32, 32)  # distinct values: one order, no ties
    classes = (2, 0)
    item = ScoreItem(images, ((cams, classes),))
    [[scores]] = run_scoring_pass(model, Scoring(("deletion", "insertion"), 4), [item])
    for i, score in enumerate(scores):
        order = sorted(range(32 * 32), key=lambda p: -float(cams[i].flatten()[p]))
        for mode in ("deletion", "insertion"):
            direct = _direct_auc(model.module, images[i], order, classes[i], 4, mode)
            assert getattr(score, f"{mode}_auc") == pytest.approx(direct, abs=1e-5)
        assert score.steps == 4 and score.road_morf is None


def test_each_curve_is_one_forward_of_steps_plus_one(
    registry: ModelRegistry, forwards: Forwards
) -> None:
    model = registry.get("tiny")
    item = ScoreItem(torch.randn(2, 3, 32, 32), ((torch.rand(2, 8, 8), (0, 1)),))
    run_scoring_pass(model, Scoring(("deletion", "insertion"), 5), [item])
    assert forwards.sizes == [6, 6, 6, 6]  # 2 images x 2 curves, one forward each


def test_an_explanation_runs_its_pass_then_two_curves_per_map_and_image(
    registry: ModelRegistry, forwards: Forwards
) -> None:
    params = build_params(
        {"method": "GradCAM", "output": "raw", "faithfulness": "deletion,insertion"}
    )
    answer = asyncio.run(_explain(_explainer(registry), params))
    steps = DEFAULT_STEPS + 1
    assert forwards.sizes == [2, steps, steps, steps, steps]  # 1 + 34 forwards' worth per image
    for result in answer.results:
        [explanation] = result.explanations
        [map_] = explanation.maps
        assert map_.faithfulness is not None
        assert 0 <= map_.faithfulness.deletion_auc <= 1
        assert 0 <= map_.faithfulness.insertion_auc <= 1
        assert map_.faithfulness.steps == DEFAULT_STEPS
    assert answer.timings.faithfulness_ms is not None


def test_without_faithfulness_nothing_more_runs(
    registry: ModelRegistry, forwards: Forwards
) -> None:
    answer = asyncio.run(_explain(_explainer(registry), ExplainParams(method="GradCAM")))
    assert forwards.sizes == [2]
    assert answer.results[0].explanations[0].maps[0].faithfulness is None
    assert answer.timings.faithfulness_ms is None


def test_every_map_of_every_method_is_scored(registry: ModelRegistry) -> None:
    params = build_params(
        {
            "method": "GradCAM,ScoreCAM",
            "output": "raw",
            "target_layer": ["features.0", "features.2"],
            "faithfulness": ["insertion"],
            "faithfulness_steps": 2,
        }
    )
    answer = asyncio.run(_explain(_explainer(registry), params))
    for result in answer.results:
        for explanation in result.explanations:
            assert [m.layer for m in explanation.maps] == ["features.0", "features.2", "fused"]
            for map_ in explanation.maps:
                assert map_.faithfulness is not None
                assert map_.faithfulness.insertion_auc is not None
                assert map_.faithfulness.deletion_auc is None


def test_the_forwards_count_toward_the_budget_with_the_methods(registry: ModelRegistry) -> None:
    # ScoreCAM on the tiny model: 4 channels x 2 images = 8 masked forwards; the curves 2 x 2 x 5.
    params = ExplainParams(
        method="ScoreCAM", faithfulness=("deletion", "insertion"), faithfulness_steps=4
    )
    asyncio.run(_explain(_explainer(registry, limit=8 + 20), params))
    with pytest.raises(OverBudget, match="CAMSERVE_MAX_CAM_FORWARDS") as refused:
        asyncio.run(_explain(_explainer(registry, limit=8 + 19), params))
    assert refused.value.details == {"forwards": 28, "limit": 27}


def test_progress_counts_the_scoring_forwards(registry: ModelRegistry) -> None:
    seen: list[tuple[int, int]] = []
    params = ExplainParams(method="ScoreCAM", faithfulness=("deletion",), faithfulness_steps=3)
    asyncio.run(_explain(_explainer(registry), params, progress=lambda d, t: seen.append((d, t))))
    assert seen[-1] == (8 + 2 * 4, 8 + 2 * 4)  # the masked forwards, then the curves'


def test_road_on_explain_is_refused_and_runs_in_a_job(registry: ModelRegistry) -> None:
    params = ExplainParams(method="GradCAM", outputs=("raw",), faithfulness=("road",))
    with pytest.raises(BadRequest, match="/jobs"):
        asyncio.run(_explain(_explainer(registry), params))
    answer = asyncio.run(_explain(_explainer(registry), params, seeds=(1,), job=True))
    score = answer.results[0].explanations[0].maps[0].faithfulness
    assert score is not None and score.deletion_auc is None and score.steps is None
    assert 0 <= score.road_morf <= 1 and 0 <= score.road_lerf <= 1
    assert score.road_percentiles == [10, 20, 30, 40, 50, 60, 70, 80, 90]
    again = asyncio.run(_explain(_explainer(registry), params, seeds=(1,), job=True))
    assert again.results[0].explanations[0].maps[0].faithfulness == score  # seeded noise


def test_road_is_bounded_by_the_pixels_it_imputes(
    registry: ModelRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ROAD's imputation is bounded per request (images x maps x the crop's pixels), before
    any image is decoded."""
    monkeypatch.setattr(faithfulness, "ROAD_MAX_PIXELS", 2 * 32 * 32)
    params = ExplainParams(method="GradCAM", outputs=("raw",), faithfulness=("road",))
    asyncio.run(_explain(_explainer(registry), params, seeds=(1, 2), job=True))  # 2 maps: at it
    with pytest.raises(OverBudget, match="would impute 3,072 input pixels"):
        asyncio.run(_explain(_explainer(registry), params, seeds=(1, 2, 3), job=True))


def test_road_runs_two_forwards_of_nine_per_map(
    registry: ModelRegistry, forwards: Forwards
) -> None:
    model = registry.get("tiny")
    images, cams = torch.randn(1, 3, 32, 32), torch.rand(1, 8, 8)
    item = ScoreItem(images, ((cams, (1,)),), road_item(images, [cams]))
    run_scoring_pass(model, Scoring(("road",)), [item])
    assert forwards.sizes == [9, 9]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"faithfulness": "deletion,sufficiency"}, "deletion, insertion, confidence, road"),
        ({"faithfulness": ["insertion", 3]}, "a string"),
        ({"faithfulness_steps": MAX_STEPS + 1}, f"[1, {MAX_STEPS}]"),
        ({"faithfulness_steps": 0}, f"[1, {MAX_STEPS}]"),
        ({"faithfulness_steps": "16"}, "an integer"),
    ],
)
def test_bad_faithfulness_is_a_400_naming_what_is_allowed(values: dict, message: str) -> None:
    with pytest.raises(MalformedParameter) as refused:
        build_params(values)
    assert MalformedParameter.status_code == 400
    assert message in refused.value.message


def test_the_metrics_are_read_case_insensitively_without_repeats() -> None:
    params = build_params({"faithfulness": ["Deletion", "insertion,deletion"]})
    assert params.faithfulness == ("deletion", "insertion")
    assert build_params({}).faithfulness == () and build_params({}).faithfulness_steps == 16
    assert set(METRICS) == {"deletion", "insertion", "confidence", "road"}


def test_a_model_without_2d_image_inputs_is_refused_clearly() -> None:
    from app.errors import InvalidParameter
    from app.pipeline.faithfulness import check

    wanted = Scoring(("deletion",), 4)
    assert check(wanted, 2, 3, 0, 100, job=False) == 2 * 3 * 5
    with pytest.raises(InvalidParameter, match="2-D image"):
        check(wanted, 1, 1, 0, 100, job=False, image_input=False)
    assert check(None, 1, 1, 0, 100, job=False, image_input=False) == 0


def test_a_large_input_splits_its_curves_into_forwards_of_fewer_inputs(
    registry: ModelRegistry, forwards: Forwards, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A forward holds at most PIXELS_PER_FORWARD input pixels (a detector's 1333-px uploads
    cannot make one forward of 65 of them): the curves and ROAD's percentiles go in parts, with
    the same scores."""
    model = registry.get("tiny")
    images, cams = torch.randn(1, 3, 32, 32), torch.rand(1, 8, 8)
    item = ScoreItem(images, ((cams, (1,)),), road_item(images, [cams]))
    assert faithfulness.inputs_per_forward(65, 1000, 1333) == 2
    assert faithfulness.inputs_per_forward(65, 224, 224) == 65
    assert faithfulness.inputs_per_forward(65, 4000, 4000) == 1
    wanted = Scoring(("deletion", "insertion", "confidence", "road"), 6)
    [[whole]] = run_scoring_pass(model, wanted, [item])
    assert forwards.sizes == [7, 7, 2, 9, 9]
    forwards.sizes.clear()
    monkeypatch.setattr(faithfulness, "PIXELS_PER_FORWARD", 3 * 32 * 32)
    [[parts]] = run_scoring_pass(model, wanted, [item])
    assert forwards.sizes == [3, 3, 1] * 2 + [2] + [3, 3, 3] * 2
    forwards.sizes.clear()
    monkeypatch.setattr(faithfulness, "PIXELS_PER_FORWARD", 32 * 32)
    plain = ScoreItem(images, item.maps)
    [[single]] = run_scoring_pass(model, Scoring(("confidence",)), [plain])
    assert forwards.sizes == [1, 1] and single[0].confidence_drop == whole[0].confidence_drop
    names = ("deletion_auc", "insertion_auc", "confidence_drop", "road_morf", "road_lerf")
    for name in names:
        assert getattr(parts[0], name) == pytest.approx(getattr(whole[0], name), abs=1e-6)


def _direct_confidence(
    model: torch.nn.Module, image: torch.Tensor, cam: torch.Tensor, cls: int
) -> tuple[float, bool]:
    """Grad-CAM++'s per-image drop and increase by hand: the map min-max scaled, upsampled to
    the image, multiplied into it; the class's softmax before and after."""
    scaled = (cam - cam.min()) / (cam.max() - cam.min())
    mask = torch.nn.functional.interpolate(
        scaled[None, None], size=image.shape[-2:], mode="bilinear", align_corners=False
    )[0]
    with torch.no_grad():
        before = float(torch.softmax(model(image[None]), dim=1)[0, cls])
        after = float(torch.softmax(model((image * mask)[None]), dim=1)[0, cls])
    return max(0.0, before - after) / before, after > before


def test_confidence_equals_a_direct_computation_in_one_forward_per_map(
    registry: ModelRegistry, forwards: Forwards
) -> None:
    model = registry.get("tiny")
    torch.manual_seed(5)
    images = torch.randn(3, 3, 32, 32)
    cams = (torch.rand(3, 8, 8), torch.rand(3, 8, 8) * 7 - 2)  # one raw, not in [0, 1]
    classes = (2, 0, 1)
    item = ScoreItem(images, tuple((c, classes) for c in cams))
    scored = run_scoring_pass(model, Scoring(("confidence",)), [item])[0]
    assert forwards.sizes == [6, 6]  # per map, every image with its explanation map
    for per_image, cam in zip(scored, cams, strict=True):
        for i, score in enumerate(per_image):
            drop, increase = _direct_confidence(model.module, images[i], cam[i], classes[i])
            assert score.confidence_drop == pytest.approx(drop, abs=1e-5)
            assert score.confidence_increase is increase
            assert 0 <= score.confidence_drop <= 1
            assert score.deletion_auc is None and score.steps is None
    increases = {s.confidence_increase for per_image in scored for s in per_image}
    assert increases == {True, False}  # the seeded case sees both outcomes


def test_confidence_is_two_forwards_a_map_in_the_budget_and_the_progress(
    registry: ModelRegistry, forwards: Forwards
) -> None:
    wanted = Scoring(("confidence",))
    assert wanted.forwards_per_map == 2 and wanted.forwards(3, 2) == 12
    assert Scoring(("deletion", "confidence"), 4).forwards_per_map == 5 + 2
    params = ExplainParams(method="ScoreCAM", outputs=("raw",), faithfulness=("confidence",))
    seen: list[tuple[int, int]] = []
    answer = asyncio.run(
        _explain(_explainer(registry), params, progress=lambda d, t: seen.append((d, t)))
    )
    assert seen[-1] == (8 + 2 * 2, 8 + 2 * 2)  # ScoreCAM's 8 masked forwards, then 2 x 2
    assert forwards.sizes[-1] == 4  # the two images with their explanation maps, one forward
    score = answer.results[0].explanations[0].maps[0].faithfulness
    assert score is not None and score.confidence_drop is not None
    assert score.confidence_increase is not None and score.insertion_auc is None
    with pytest.raises(OverBudget, match="CAMSERVE_MAX_CAM_FORWARDS"):
        asyncio.run(_explain(_explainer(registry, limit=8 + 3), params))


def test_the_budget_refusal_names_the_fixes_that_apply() -> None:
    """Steps only when a curve was asked for; confidence alone as the cheap way out when more
    was asked; the boxes and classes that multiply the maps."""
    from app.pipeline.faithfulness import check

    with pytest.raises(OverBudget) as alone:
        check(Scoring(("confidence",)), 10, 1, 0, 5, job=False)
    assert "faithfulness_steps" not in alone.value.message
    assert "fewer metrics" not in alone.value.message
    assert "classes or boxes (box=all counts" in alone.value.message
    with pytest.raises(OverBudget) as curves:
        check(Scoring(("deletion",), 8), 10, 1, 0, 5, job=False)
    assert curves.value.message.count("Lower faithfulness_steps") == 1
    assert "confidence alone (2 forwards a map)" in curves.value.message


def test_a_cancelled_request_stops_roads_imputation_at_its_next_piece(
    registry: ModelRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ROAD imputes each map's two orders on the image threads before its pass; a cancelled job
    went on imputing every map (20 s of two cores in a hostile review, its slot held). Now the
    imputation asks between pieces and stops at the next one."""
    model = registry.get("tiny")
    pieces: list[int] = []
    impute = faithfulness.road_inputs

    def slow(*args: object, **kwargs: object) -> torch.Tensor:
        pieces.append(1)
        time.sleep(0.2)
        return impute(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(faithfulness, "road_inputs", slow)

    async def main() -> None:
        explainer = _explainer(registry)
        maps = [(torch.rand(1, 8, 8), (0,)) for _ in range(5)]  # 10 pieces: 5 maps x 2 orders
        scoring = asyncio.create_task(
            faithfulness.score_maps(
                explainer.batcher(model), model, Scoring(("road",)), torch.randn(1, 3, 32, 32), maps
            )
        )
        while not pieces:
            await asyncio.sleep(0.01)
        scoring.cancel()
        with pytest.raises(asyncio.CancelledError):
            await scoring
        await explainer.close()

    asyncio.run(main())
    assert 1 <= len(pieces) <= 2  # the piece under way (and at most one that began meanwhile)


def test_a_road_job_shows_its_scoring_forwards_while_it_imputes(registry: ModelRegistry) -> None:
    """ROAD imputes for seconds before its pass: the progress said 0 of 0 then (the pass had not
    begun its count). It now says 0 of the pass's forwards from the start (the pass's opening
    report does not take that back), then counts them."""
    model = registry.get("tiny")
    wanted = Scoring(("road",))
    reports: list[tuple[int, int]] = []

    async def main() -> None:
        explainer = _explainer(registry)
        maps = [(torch.rand(1, 8, 8), (0,)) for _ in range(2)]
        await faithfulness.score_maps(
            explainer.batcher(model),
            model,
            wanted,
            torch.randn(1, 3, 32, 32),
            maps,
            progress=chain_progress(lambda done, total: reports.append((done, total))),
        )
        await explainer.close()

    asyncio.run(main())
    total = wanted.forwards(2, 1)
    assert total == 2 * 2 * 9
    assert reports[0] == (0, total)
    assert reports[-1] == (total, total)
    assert all(t == total for _, t in reports), reports
