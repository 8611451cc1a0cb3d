"""The model work of one pass: several requests' images in one forward (and one CAM call), each
request getting back exactly what it would have got alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from app.cam import METHODS
from app.errors import ModelError, OutOfMemory
from app.models.loading import LoadedModel, load_model
from app.models.manifest import parse_manifest
from app.pipeline.passes import (
    CamItem,
    CamPlan,
    check_finite,
    group_plans,
    model_faults,
    run_cam_pass,
    run_forward_pass,
    run_shared_cam_pass,
)
from tests.fixtures_models import fixture_access


@pytest.fixture(scope="module")
def tiny(store: Path) -> LoadedModel:
    return load_model(
        parse_manifest(store / "tiny", access=fixture_access(store)), torch.device("cpu")
    )


def images(count: int, seed: int) -> torch.Tensor:
    return torch.randn(count, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def plan(method: str, layers: tuple[str, ...] = ("features",), **options: object) -> CamPlan:
    return CamPlan(method, METHODS[method], layers, tuple(options.items()), normalized=True)


def test_one_forward_serves_each_request_its_own_rows(tiny: LoadedModel) -> None:
    a, b = images(2, 0), images(1, 1)
    together = run_forward_pass(tiny, [a, b])
    alone = [run_forward_pass(tiny, [x])[0] for x in (a, b)]
    assert [o.logits.shape for o in together] == [(2, 3), (1, 3)]
    for shared, single in zip(together, alone, strict=True):
        torch.testing.assert_close(shared.logits, single.logits, atol=1e-5, rtol=1e-5)


def test_a_cam_pass_splits_maps_and_classes_by_request(tiny: LoadedModel) -> None:
    a = CamItem(images(2, 0))  # each image's top-1
    b = CamItem(images(3, 1), class_idx=(2,))  # one class for all its images
    c = CamItem(images(2, 2), class_idx=(0, 1))  # one class per image
    out = run_cam_pass(tiny, plan("GradCAM"), [a, b, c])
    assert out[0].class_idx == out[0].logits.argmax(dim=1).tolist()
    assert out[1].class_idx == [2, 2, 2]
    assert out[2].class_idx == [0, 1]
    assert [o.cams[0].shape for o in out] == [(2, 32, 32), (3, 32, 32), (2, 32, 32)]
    alone = run_cam_pass(tiny, plan("GradCAM"), [b])[0]
    torch.testing.assert_close(out[1].cams[0], alone.cams[0], atol=1e-5, rtol=1e-5)
    assert out[0].fused is None  # one layer: nothing to fuse


def test_several_layers_are_fused(tiny: LoadedModel) -> None:
    [out] = run_cam_pass(tiny, plan("GradCAM", ("features.0", "features")), [CamItem(images(1, 0))])
    assert len(out.cams) == 2 and out.fused is not None
    assert out.fused.shape == (1, 32, 32) and 0 <= float(out.fused.min()) <= 1


def test_methods_that_share_a_forward_give_their_own_maps(tiny: LoadedModel) -> None:
    item = CamItem(images(2, 3))
    shared = run_shared_cam_pass(tiny, (plan("GradCAM"), plan("LayerCAM")), [item])[0]
    for outcome, method in zip(shared, ("GradCAM", "LayerCAM"), strict=True):
        alone = run_cam_pass(tiny, plan(method), [item])[0]
        torch.testing.assert_close(outcome.cams[0], alone.cams[0], atol=1e-5, rtol=1e-5)


def test_plans_are_grouped_by_what_they_can_share() -> None:
    grad, layer, score = plan("GradCAM"), plan("LayerCAM"), plan("ScoreCAM")
    smooth = plan("SmoothGradCAMpp")
    assert group_plans([grad, score, layer, smooth]) == [(grad, layer), (score,), (smooth,)]
    assert grad.batchable and not score.batchable
    assert smooth.batchable and not smooth.shares_forward


def test_non_finite_logits_are_the_models_fault(tiny: LoadedModel) -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    assert check_finite(tiny, logits) is logits
    with pytest.raises(ModelError, match="NaN or infinite"):
        check_finite(tiny, torch.tensor([[0.0, float("nan"), 1.0]]))


def test_out_of_memory_becomes_a_503_that_names_the_device(tiny: LoadedModel) -> None:
    with pytest.raises(OutOfMemory, match="The CPU ran out of memory") as caught:
        with model_faults(tiny):
            raise torch.OutOfMemoryError("CUDA out of memory")
    assert caught.value.headers == {"Retry-After": "1"}
