"""Several classes in one request: the rule (``app.pipeline.classes``), the pass that computes
them from one forward, and the explainer's answer with one explanation per class and method."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi import FastAPI

from app.cam import METHODS
from app.errors import MalformedParameter, OverBudget
from app.models.loading import LoadedModel, load_model
from app.models.manifest import parse_manifest
from app.models.registry import ModelRegistry
from app.pipeline.admission import SlotLimiter
from app.pipeline.classes import MAX_CLASSES, by_rank, check_choice, class_count, per_image
from app.pipeline.decoding import Upload
from app.pipeline.explainer import Explainer, ExplainParams
from app.pipeline.jobs.work import estimate_result_bytes, params_from_json, params_to_json
from app.pipeline.params import build_params
from app.pipeline.passes import CamItem, CamPlan, run_cam_pass, run_shared_cam_pass
from app.pipeline.rendering import RenderBudget
from tests.conftest import image_bytes
from tests.fixtures_models import fixture_access

# ----------------------------------------------------------------------------- the rule


def test_the_classes_of_each_image() -> None:
    scores = torch.tensor([[0.1, 0.9, 0.5], [0.7, 0.2, 0.4]])
    assert per_image(ExplainParams(), scores) == [[1], [0]]
    assert per_image(ExplainParams(class_idx=(2,)), scores) == [[2], [2]]
    assert per_image(ExplainParams(class_idx=(2, 0)), scores) == [[2], [0]]
    assert per_image(ExplainParams(classes=(2, 0)), scores) == [[2, 0], [2, 0]]
    assert per_image(ExplainParams(top_classes=2), scores) == [[1, 2], [0, 2]]
    assert class_count(ExplainParams(classes=(2, 0))) == 2
    assert class_count(ExplainParams(top_classes=3)) == 3
    assert class_count(ExplainParams(class_idx=(1, 2))) == 1


def test_requests_of_several_class_counts_share_ranks() -> None:
    assert by_rank([[1, 2], [0], [2, 1]]) == [[1, 0, 2], [2, 0, 1]]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (ExplainParams(class_idx=(1,), top_classes=2), "class_idx and top_classes"),
        (ExplainParams(class_idx=(1,), classes=(0, 1)), "class_idx and classes"),
        (ExplainParams(classes=(0, 1), top_classes=2), "classes and top_classes"),
        (ExplainParams(top_classes=4), "has 3 classes"),
        (ExplainParams(classes=(0, 1, 2, 0)), "has 3 classes"),
        (ExplainParams(classes=(0, 0)), "twice"),
        (ExplainParams(classes=(0, 3)), r"out of range.*\(0\.\.2\)"),
    ],
)
def test_bad_choices_are_refused_with_400(params: ExplainParams, message: str) -> None:
    with pytest.raises(MalformedParameter, match=message) as caught:
        check_choice(params, "tiny", 3)
    assert caught.value.status_code == 400


def test_the_bound_of_a_large_model_is_max_classes() -> None:
    with pytest.raises(MalformedParameter, match=f"at most {MAX_CLASSES}"):
        check_choice(ExplainParams(classes=tuple(range(MAX_CLASSES + 1))), "big", 1000)
    check_choice(ExplainParams(top_classes=MAX_CLASSES), "big", 1000)


def test_every_protocol_reads_classes_and_top_classes() -> None:
    assert build_params({"classes": "2, 0"}).classes == (2, 0)
    assert build_params({"classes": [2, 0]}).classes == (2, 0)
    assert build_params({"top_classes": 3}).top_classes == 3
    assert build_params({}).classes == () and build_params({}).top_classes is None


# ----------------------------------------------------------------------------- the pass


@pytest.fixture(scope="module")
def tiny(store: Path) -> LoadedModel:
    return load_model(
        parse_manifest(store / "tiny", access=fixture_access(store)), torch.device("cpu")
    )


def _images(count: int, seed: int) -> torch.Tensor:
    return torch.randn(count, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _plan(method: str, **options: object) -> CamPlan:
    return CamPlan(method, METHODS[method], ("features",), tuple(options.items()), True)


@pytest.mark.parametrize("method", ["GradCAM", "GradCAMpp", "LayerCAM", "CAM", "EigenGradCAM"])
def test_k_classes_take_one_forward(tiny: LoadedModel, method: str) -> None:
    [out] = run_cam_pass(tiny, _plan(method), [CamItem(_images(2, 0), classes=(2, 0, 1))])
    assert out.forwards == 1
    assert [one.class_idx for one in out.per_class()] == [[2, 2], [0, 0], [1, 1]]
    for one in out.per_class():
        item = CamItem(_images(2, 0), class_idx=(one.class_idx[0],))
        [alone] = run_cam_pass(tiny, _plan(method), [item])
        assert alone.forwards == 1
        torch.testing.assert_close(one.cams[0], alone.cams[0], atol=1e-5, rtol=1e-5)


def test_score_cam_runs_its_masked_forwards_once_for_k_classes(tiny: LoadedModel) -> None:
    plan = _plan("ScoreCAM", batch_size=4)
    [one] = run_cam_pass(tiny, plan, [CamItem(_images(1, 0), class_idx=(0,))])
    [three] = run_cam_pass(tiny, plan, [CamItem(_images(1, 0), top_classes=3)])
    assert one.forwards == three.forwards > 1
    assert len(three.per_class()) == 3


def test_requests_with_other_class_counts_share_a_pass(tiny: LoadedModel) -> None:
    items = [
        CamItem(_images(1, 0), top_classes=2),
        CamItem(_images(2, 1)),
        CamItem(_images(1, 2), classes=(1, 0, 2)),
    ]
    outs = run_shared_cam_pass(tiny, (_plan("GradCAM"),), items)
    assert [len(out[0].per_class()) for out in outs] == [2, 1, 3]
    assert {out[0].forwards for out in outs} == {1}
    top = outs[0][0].logits.topk(2, dim=1).indices.tolist()[0]
    assert [one.class_idx for one in outs[0][0].per_class()] == [[top[0]], [top[1]]]
    [alone] = run_cam_pass(tiny, _plan("GradCAM"), [CamItem(_images(1, 2), class_idx=(2,))])
    torch.testing.assert_close(outs[2][0].others[1].cams[0], alone.cams[0], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- the answer


@pytest.fixture(scope="module")
def registry(store: Path) -> ModelRegistry:
    registry = ModelRegistry(store, torch.device("cpu"), "tiny", access=fixture_access(store))
    registry.discover()
    registry.load_all()
    return registry


@pytest.fixture
def explainer(registry: ModelRegistry) -> Iterator[Explainer]:
    yield _explainer(registry)


def _explainer(registry: ModelRegistry) -> Explainer:
    return Explainer(
        registry,
        SlotLimiter(max_running=1, max_waiting=4),
        10**7,
        max_cam_forwards=40,
        render_budget=RenderBudget(10**8, 12),
    )


def _explain(explainer: Explainer, params: ExplainParams, images: int = 2):  # type: ignore[no-untyped-def]
    """The answer of a fresh explainer like ``explainer`` (its batchers live in one loop)."""
    uploads = [Upload(f"{seed}.png", image_bytes(seed=seed)) for seed in range(images)]
    fresh = _explainer(explainer.registry)

    async def run():  # type: ignore[no-untyped-def]
        try:
            return await fresh.explain("tiny", uploads, params)
        finally:
            await fresh.close()

    return asyncio.run(run())


def test_one_explanation_per_class_and_method(explainer: Explainer) -> None:
    params = ExplainParams(method="GradCAM,CAM", outputs=("raw",), top_classes=3)
    answer = _explain(explainer, params)
    assert answer.timings.forwards == 1  # both methods share the one forward, for 3 classes
    for result in answer.results:
        ranked = [p.class_idx for p in result.predictions]
        got = [(e.method, e.class_idx) for e in result.explanations]
        assert got == [(m, c) for m in ("GradCAM", "CAM") for c in ranked]
        assert all(len(e.maps) == 1 and e.maps[0].raw for e in result.explanations)


def test_listed_classes_for_every_image(explainer: Explainer) -> None:
    answer = _explain(explainer, ExplainParams(method="GradCAM", classes=(2, 0)))
    for result in answer.results:
        assert [e.class_idx for e in result.explanations] == [2, 0]
        assert [e.label for e in result.explanations] == [
            explainer.registry.get("tiny").labels[c] for c in (2, 0)
        ]


def test_the_render_budget_counts_every_class(explainer: Explainer) -> None:
    # 2 images x 2 methods x 3 classes = 12 maps: at the bound; 3 images go past it.
    _explain(explainer, ExplainParams(method="GradCAM,CAM", top_classes=3))
    with pytest.raises(OverBudget, match="classes"):
        _explain(explainer, ExplainParams(method="GradCAM,CAM", top_classes=3), images=3)


def test_noisy_forwards_serve_every_class(explainer: Explainer) -> None:
    # SmoothGrad-CAM++ draws 4 noisy copies per image, whatever the classes: 4 images x 4 = 16.
    params = ExplainParams(method="SmoothGradCAMpp", outputs=("raw",), top_classes=3)
    answer = _explain(explainer, params, images=4)
    # The hooked forward, then one batched forward of the noisy copies (8 a batch on the CPU).
    assert answer.timings.forwards == 1 + 2


def test_a_method_that_does_not_share_counts_its_forwards_per_class(
    explainer: Explainer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(METHODS["SmoothGradCAMpp"], "shares_classes", False)
    # 4 noisy copies per image and class: 4 images x 4 x 3 classes = 48 are over the budget
    # of 40, though 16 for one class would not be.
    params = ExplainParams(method="SmoothGradCAMpp", outputs=("raw",), top_classes=3)
    with pytest.raises(OverBudget, match="48 noisy forwards"):
        _explain(explainer, params, images=4)
    answer = _explain(explainer, params, images=1)
    # The hooked forward, then per class one batched forward of its 4 noisy copies.
    assert answer.timings.forwards == 1 + 3


# ----------------------------------------------------------------------------- jobs


def test_a_job_keeps_its_classes_and_prices_every_class(app: FastAPI, client: object) -> None:
    for params in (ExplainParams(classes=(2, 0)), ExplainParams(top_classes=3)):
        assert params_from_json(params_to_json(params)) == params
    uploads = [Upload("a.png", image_bytes(size=(400, 320)))]
    one = estimate_result_bytes(app.state.explainer, None, uploads, ExplainParams())
    three = estimate_result_bytes(app.state.explainer, None, uploads, ExplainParams(top_classes=3))
    assert three > 2.5 * one
