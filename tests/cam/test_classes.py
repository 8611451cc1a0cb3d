"""Several classes after one forward (``explain_classes``): the maps equal one call per class,
and the model's forward runs once."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from app.cam import _CAM, METHODS
from app.cam.core import counting_forwards, hook_scope
from app.cam.gradient import _GradientCAM
from tests.fixtures_models import build_tiny, build_tiny_vit

#: Classes asked, as explain_classes takes them: one for the batch, then one per sample.
CLASSES: list[Any] = [2, [0, 1], 1, [4, 3]]
SEEDED = {
    "SSCAM": {"seed": 3, "num_samples": 2},
    "SmoothGradCAMpp": {"seed": 3},
    "RandomCAM": {"seed": 3},
    "DRISE": {"seed": 3, "masks": 16, "grid": 4},
}
SHAPE = (3, 12, 12)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return build_tiny(num_classes=5, width=4).eval()


def _extractor(name: str, model: nn.Module, **extra: Any) -> _CAM:
    cls = METHODS[name]
    options = {**SEEDED.get(name, {}), **extra}
    layers: Any = ["features.1", "features.3"] if name == "RefineCAM" else "features.3"
    return cls(model, layers, input_shape=SHAPE, **options)


def _forward(extractor: _CAM, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.enable_grad() if extractor.requires_grad else torch.inference_mode():
        return model(x)


CNN_METHODS = [name for name in METHODS if name != "LeGrad"]


@pytest.mark.parametrize("name", CNN_METHODS)
def test_k_classes_equal_k_single_class_calls(name: str) -> None:
    model = _model()
    x = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(1))
    with _extractor(name, model) as extractor:
        scores = _forward(extractor, model, x)
        together = extractor.explain_classes(CLASSES, scores)
    assert len(together) == len(CLASSES)
    for asked, maps in zip(CLASSES, together, strict=True):
        with _extractor(name, model) as extractor:
            alone = extractor(asked, _forward(extractor, model, x))
        assert len(maps) == len(alone)
        for got, want in zip(maps, alone, strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_legrad_k_classes_equal_k_single_class_calls() -> None:
    torch.manual_seed(0)
    vit = build_tiny_vit(num_classes=3).eval()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with METHODS["LeGrad"](vit, input_shape=(3, 32, 32)) as extractor:
        together = extractor.explain_classes([0, 2], vit(x))
    for asked, maps in zip([0, 2], together, strict=True):
        with METHODS["LeGrad"](vit, input_shape=(3, 32, 32)) as extractor:
            alone = extractor(asked, vit(x))
        torch.testing.assert_close(maps[0], alone[0], atol=1e-5, rtol=1e-5)


def _pick(k: int) -> Any:
    return lambda output: output[k]


def _contrast(output: torch.Tensor) -> torch.Tensor:
    return output[1] - output[0]


#: Targets asked, as explain_classes(targets=) takes them: one for the batch, then one per sample.
TARGETS: list[Any] = [_pick(2), [_contrast, _pick(4)], _contrast]
TARGET_METHODS = [name for name in CNN_METHODS if METHODS[name].supports_targets]


@pytest.mark.parametrize("name", TARGET_METHODS)
def test_k_targets_equal_k_single_target_calls(name: str) -> None:
    model = _model()
    x = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(1))
    with _extractor(name, model) as extractor:
        together = extractor.explain_classes(targets=TARGETS, scores=_forward(extractor, model, x))
    assert len(together) == len(TARGETS)
    for asked, maps in zip(TARGETS, together, strict=True):
        with _extractor(name, model) as extractor:
            alone = extractor(scores=_forward(extractor, model, x), targets=asked)
        assert len(maps) == len(alone)
        for got, want in zip(maps, alone, strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["ScoreCAM", "DRISE"])
def test_masked_forwards_serve_every_target(name: str) -> None:
    model = _model()
    x = torch.randn(1, *SHAPE)
    counts = []
    for targets in ([_pick(0)], [_pick(0), _contrast, _pick(3)]):
        counter = _Counting(model)
        with _extractor(name, model, batch_size=1) as extractor:
            extractor.explain_classes(targets=targets, scores=_forward(extractor, model, x))
        counts.append(counter.calls)
    assert counts[0] == counts[1] > 1


def test_explain_classes_takes_exactly_one_of_classes_and_targets() -> None:
    model = _model()
    with _extractor("GradCAM", model) as extractor:
        scores = _forward(extractor, model, torch.randn(1, *SHAPE))
        with pytest.raises(ValueError, match="exactly one of classes"):
            extractor.explain_classes([0], scores, targets=[_pick(0)])
        with pytest.raises(ValueError, match="exactly one of classes"):
            extractor.explain_classes(scores=scores)
        with pytest.raises(TypeError, match="one entry per target"):
            extractor.explain_classes(targets=_pick(0), scores=scores)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="targets is empty"):
            extractor.explain_classes(targets=[], scores=scores)
    with _extractor("CAM", model) as extractor:
        scores = _forward(extractor, model, torch.randn(1, *SHAPE))
        with pytest.raises(ValueError, match="does not take targets"):
            extractor.explain_classes(targets=[_pick(0)], scores=scores)


GRADIENT = [n for n, c in METHODS.items() if issubclass(c, _GradientCAM) and c.shares_classes]


@pytest.mark.parametrize("name", GRADIENT)
def test_batched_gradients_equal_one_backward_per_class(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _model()
    x = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(2))
    results = []
    for batched in (False, True):
        monkeypatch.setattr(_GradientCAM, "batched_class_grads", batched)
        with _extractor(name, model) as extractor:
            results.append(extractor.explain_classes(CLASSES, _forward(extractor, model, x)))
    for loop, batch in zip(*results, strict=True):
        for a, b in zip(loop, batch, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


class _Counting:
    def __init__(self, model: nn.Module) -> None:
        self.calls = 0
        model.register_forward_hook(self._count)

    def _count(self, *_: Any) -> None:
        self.calls += 1


@pytest.mark.parametrize("name", ["GradCAM", "GradCAMpp", "LayerCAM", "HiResCAM", "CAM"])
def test_k_gradient_classes_run_one_forward(name: str) -> None:
    model = _model()
    counter = _Counting(model)
    x = torch.randn(1, *SHAPE)
    with _extractor(name, model) as extractor:
        scores = _forward(extractor, model, x)
        maps = extractor.explain_classes([0, 1, 2, 3, 4], scores)
    assert len(maps) == 5
    assert counter.calls == 1


def test_score_cam_masked_forwards_serve_every_class() -> None:
    model = _model()
    x = torch.randn(1, *SHAPE)
    counts = []
    for classes in ([0], [0, 1, 2, 3, 4]):
        counter = _Counting(model)
        with _extractor("ScoreCAM", model, batch_size=1) as extractor:
            extractor.explain_classes(classes, _forward(extractor, model, x))
        counts.append(counter.calls)
    assert counts[0] == counts[1] > 1


@pytest.mark.parametrize("name", ["SmoothGradCAMpp", "AblationCAM", "SSCAM"])
def test_extra_forwards_serve_every_class(name: str) -> None:
    model = _model()
    x = torch.randn(1, *SHAPE)
    counts = []
    for classes in ([0], [0, 1, 2]):
        counter = _Counting(model)
        with (
            _extractor(name, model, fast_path=False)
            if name == "AblationCAM"
            else _extractor(name, model) as extractor
        ):
            extractor.explain_classes(classes, _forward(extractor, model, x))
        counts.append(counter.calls)
    assert counts[0] == counts[1] > 1


def test_a_method_that_does_not_share_makes_one_call_per_class(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = _model()
    x = torch.randn(1, *SHAPE)
    monkeypatch.setattr(METHODS["SmoothGradCAMpp"], "shares_classes", False)
    counts = []
    for classes in ([0], [0, 1]):
        counter = _Counting(model)
        with _extractor("SmoothGradCAMpp", model) as extractor:
            extractor.explain_classes(classes, _forward(extractor, model, x))
        counts.append(counter.calls)
    assert counts[1] - 1 == 2 * (counts[0] - 1)


def test_class_agnostic_method_computes_one_map_for_every_class() -> None:
    model = _model()
    with _extractor("EigenCAM", model) as extractor:
        scores = _forward(extractor, model, torch.randn(1, *SHAPE))
        first, second = extractor.explain_classes([0, 3], scores)
    torch.testing.assert_close(first[0], second[0])


def test_explain_classes_refuses_a_bad_list() -> None:
    model = _model()
    with _extractor("GradCAM", model) as extractor:
        scores = _forward(extractor, model, torch.randn(1, *SHAPE))
        with pytest.raises(TypeError, match="one entry per class"):
            extractor.explain_classes(3, scores)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="empty"):
            extractor.explain_classes([], scores)
        with pytest.raises(ValueError, match="out of range"):
            extractor.explain_classes([0, 7], scores)


def test_counting_forwards_counts_this_scope_and_the_tails() -> None:
    model = _model()
    x = torch.randn(1, *SHAPE)
    with hook_scope(object()), counting_forwards(model) as count:
        with torch.inference_mode():
            model(x)
            with hook_scope(object()):  # another pass, run in a pause of this one
                model(x)
        assert count.calls == 1
        with _extractor("AblationCAM", model, batch_size=2) as extractor:
            extractor([0], _forward(extractor, model, x))
        # The hooked forward, then 4 channels in batches of 2 through the model's tail.
        assert count.calls == 1 + 1 + 2


@pytest.mark.parametrize("name", ["GradCAM", "ScoreCAM"])
@pytest.mark.parametrize("smoothing", ["eigen_smooth", "aug_smooth"])
def test_smoothed_classes_equal_smoothed_single_class_calls(name: str, smoothing: str) -> None:
    # A smoothing switch makes explain_classes one call per class, with the switch on each.
    model = _model()
    x = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(1))
    with _extractor(name, model) as extractor:
        scores = _forward(extractor, model, x)
        together = extractor.explain_classes([2, [0, 1]], scores, **{smoothing: True})
    with _extractor(name, model) as extractor:
        alone = []
        for classes in ([2, 2], [0, 1]):
            scores = _forward(extractor, model, x)
            alone.append(extractor(classes, scores, **{smoothing: True}))
    assert not METHODS[name].shares_classes_with({smoothing: True})
    assert METHODS[name].shares_classes_with({smoothing: False})
    for got, want in zip(together, alone, strict=True):
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
