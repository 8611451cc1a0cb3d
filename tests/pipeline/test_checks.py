"""Explain parameters checked against a loaded model: each problem is its domain error, with a
message that names the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from app.cam import METHODS
from app.errors import InvalidParameter, MethodNotApplicable, OverBudget, UnsupportedMethod
from app.models.loading import LoadedModel, load_model
from app.models.manifest import parse_manifest
from app.pipeline.checks import (
    check_budget,
    check_classes,
    check_layers,
    check_options,
    check_rendering,
    check_total_budget,
    extra_forwards,
    resolve_method,
    resolve_methods,
    split_options,
)
from tests.fixtures_models import fixture_access


@pytest.fixture(scope="module")
def tiny(store: Path) -> LoadedModel:
    """3 classes; ``features`` (4 channels) is its target layer."""
    return load_model(
        parse_manifest(store / "tiny", access=fixture_access(store)), torch.device("cpu")
    )


def test_methods_are_found_case_insensitively(tiny: LoadedModel) -> None:
    assert resolve_method(tiny, " gradcampp ") == ("GradCAMpp", METHODS["GradCAMpp"])
    assert resolve_method(tiny, None)[0] == tiny.spec.default_method


def test_an_unknown_method_suggests_the_close_one(tiny: LoadedModel) -> None:
    with pytest.raises(UnsupportedMethod, match="Did you mean ScoreCAM") as caught:
        resolve_method(tiny, "ScoreCM")
    assert "GradCAM" in caught.value.details["methods"]


def test_a_method_that_does_not_apply_says_why(tiny: LoadedModel) -> None:
    with pytest.raises(MethodNotApplicable, match="at least two") as caught:
        resolve_method(tiny, "RefineCAM")
    assert "RefineCAM" not in caught.value.details["methods"]


def test_several_methods_keep_their_order_without_repeats(tiny: LoadedModel) -> None:
    names = [m for m, _ in resolve_methods(tiny, "ScoreCAM, gradcam,ScoreCAM")]
    assert names == ["ScoreCAM", "GradCAM"]


def test_options_are_checked_against_the_declarations() -> None:
    assert check_options("SSCAM", METHODS["SSCAM"], {"num_samples": 4}) == {"num_samples": 4}
    with pytest.raises(InvalidParameter, match="GradCAM does not take the option 'num_samples'"):
        check_options("GradCAM", METHODS["GradCAM"], {"num_samples": 4})
    with pytest.raises(InvalidParameter, match="SSCAM: ") as caught:
        check_options("SSCAM", METHODS["SSCAM"], {"num_samples": 0})
    assert caught.value.details == {"option": "num_samples"}


def test_options_of_several_methods_go_to_those_that_take_them() -> None:
    methods = [("GradCAM", METHODS["GradCAM"]), ("ISCAM", METHODS["ISCAM"])]
    assert split_options(methods, {"num_samples": 3}) == [{}, {"num_samples": 3}]
    with pytest.raises(InvalidParameter, match="None of GradCAM, ISCAM takes the option 'gamma'"):
        split_options(methods, {"gamma": 0.5})


def test_layers_default_dedupe_and_refuse_unknown_names(tiny: LoadedModel) -> None:
    assert check_layers(tiny, []) == ("features",)
    assert check_layers(tiny, ["features.0", "features", "features.0"]) == (
        "features.0",
        "features",
    )
    with pytest.raises(InvalidParameter, match="has no layer 'featurs'") as caught:
        check_layers(tiny, ["featurs"])
    assert "features" in caught.value.details["close_matches"]


def test_class_indices_one_for_all_or_one_per_image(tiny: LoadedModel) -> None:
    check_classes(tiny, [2], count=3)
    check_classes(tiny, [0, 1, 2], count=3)
    with pytest.raises(InvalidParameter, match="Got 2 class_idx values for 3 images"):
        check_classes(tiny, [0, 1], count=3)
    with pytest.raises(InvalidParameter, match=r"class_idx 3 is out of range.*0\.\.2"):
        check_classes(tiny, [3], count=1)


def test_extra_forwards_read_the_layers_of_the_model(tiny: LoadedModel) -> None:
    count = extra_forwards(tiny, METHODS["ScoreCAM"], ["features", "features.0"], {}, images=2)
    assert (count.images, count.channels, count.samples, count.total) == (2, 8, 1, 16)
    assert extra_forwards(tiny, METHODS["GradCAM"], ["features"], {}, images=2).total == 0


def test_the_budget_refuses_past_its_limit_and_names_the_cause(tiny: LoadedModel) -> None:
    score = METHODS["ScoreCAM"]
    check_budget(tiny, "ScoreCAM", score, ["features"], {}, images=2, limit=8)
    with pytest.raises(OverBudget, match=r"8 masked forwards \(2 image\(s\) x 4 channels") as c:
        check_budget(tiny, "ScoreCAM", score, ["features"], {}, images=2, limit=7)
    assert c.value.details == {"forwards": 8, "limit": 7}
    smooth = METHODS["SmoothGradCAMpp"]
    with pytest.raises(OverBudget, match="6 noisy forwards"):
        check_budget(tiny, "SmoothGradCAMpp", smooth, ["features"], {"num_samples": 3}, 2, 5)


def test_aug_smooth_counts_in_the_budget_six_times(tiny: LoadedModel) -> None:
    grad, score = METHODS["GradCAM"], METHODS["ScoreCAM"]
    aug = {"aug_smooth": True}
    check_budget(tiny, "GradCAM", grad, ["features"], aug, images=2, limit=12)
    with pytest.raises(OverBudget, match=r"12 augmented forwards \(aug_smooth's 6 variants"):
        check_budget(tiny, "GradCAM", grad, ["features"], aug, images=2, limit=11)
    # 6 variants x 2 images x (their own forward + 4 masked ones)
    with pytest.raises(OverBudget, match="60 masked and augmented forwards") as caught:
        check_budget(tiny, "ScoreCAM", score, ["features"], aug, images=2, limit=59)
    assert caught.value.details == {"forwards": 60, "limit": 59}


@pytest.mark.parametrize("method", ["GuidedBackprop", "GuidedGradCAM"])
def test_the_guided_pass_counts_in_the_budget(tiny: LoadedModel, method: str) -> None:
    cls = METHODS[method]
    # One guided forward (and backward) per image and class, on the recorded input.
    assert extra_forwards(tiny, cls, ["features"], {}, images=3).total == 3
    assert extra_forwards(tiny, cls, ["features"], {}, images=3, classes=2).total == 6
    # 6 variants x 2 images x (the variant's own forward + its guided one)
    aug = {"aug_smooth": True}
    assert extra_forwards(tiny, cls, ["features"], aug, images=2).total == 24
    check_budget(tiny, method, cls, ["features"], {}, images=3, limit=3)
    with pytest.raises(
        OverBudget, match=r"3 guided forwards \(3 image\(s\) x 1 guided pass\(es\)"
    ) as c:
        check_budget(tiny, method, cls, ["features"], {}, images=3, limit=2)
    assert c.value.details == {"forwards": 3, "limit": 2}
    with pytest.raises(OverBudget, match="24 guided and augmented forwards"):
        check_budget(tiny, method, cls, ["features"], aug, images=2, limit=23)


def test_several_methods_share_one_budget(tiny: LoadedModel) -> None:
    methods = [
        ("ScoreCAM", METHODS["ScoreCAM"], {}),
        ("ISCAM", METHODS["ISCAM"], {"num_samples": 2}),
        ("GradCAM", METHODS["GradCAM"], {}),
    ]
    check_total_budget(tiny, methods, ["features"], images=1, limit=12)
    with pytest.raises(OverBudget, match=r"12 masked forwards together \(ScoreCAM 4, ISCAM 8\)"):
        check_total_budget(tiny, methods, ["features"], images=1, limit=11)


def test_rendering_options_are_known() -> None:
    check_rendering(["overlay", "heatmap"], "png", "jet")
    with pytest.raises(InvalidParameter, match="output must be any of") as caught:
        check_rendering(["picture"], "png", "jet")
    assert "overlay" in caught.value.details["allowed"]
    with pytest.raises(InvalidParameter, match="image_format must be one of"):
        check_rendering(["overlay"], "gif", "jet")
    with pytest.raises(InvalidParameter, match="Unknown colormap 'nope'"):
        check_rendering(["overlay"], "png", "nope")
