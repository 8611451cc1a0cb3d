"""``ExplainRequest``: the same request as form fields for a server and as ExplainParams here."""

from __future__ import annotations

import pytest

from app.errors import InvalidParameter
from camserve.request import ExplainRequest, split_names


def test_form_fields_are_the_ones_explain_reads() -> None:
    request = ExplainRequest(
        methods=("GradCAM", "ScoreCAM"),
        model="tiny",
        class_idx=(2,),
        target_layers=("features.0", "features.2"),
        outputs=("overlay", "raw"),
        image_format="png",
        size="64",
        fields={"num_samples": 4, "comparison_idx": [1, 2], "normalized": False},
    )
    assert request.form() == [
        ("method", "GradCAM,ScoreCAM"),
        ("model", "tiny"),
        ("class_idx", "2"),
        ("target_layer", "features.0"),
        ("target_layer", "features.2"),
        ("output", "overlay,raw"),
        ("image_format", "png"),
        ("size", "64"),
        ("num_samples", "4"),
        ("comparison_idx", "1,2"),
        ("normalized", "false"),
    ]


def test_params_type_each_field_as_the_form_does() -> None:
    fields = {
        "num_samples": "8",
        "std": "0.5",
        "comparison_idx": "1,2",
        "alpha": "0.25",
        "top_k": "3",
        "colormap": " Viridis ",
        "normalized": "false",
    }
    params = ExplainRequest(methods=("SSCAM",), fields=fields).params()
    assert params.options == {"num_samples": 8, "std": 0.5, "comparison_idx": (1, 2)}
    assert (params.alpha, params.top_k, params.colormap, params.normalized) == (
        0.25,
        3,
        "viridis",
        False,
    )
    assert params.method == "SSCAM" and params.outputs == ("overlay", "raw")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"nope": "1"}, "Unknown explain parameter 'nope'"),
        ({"num_samples": "many"}, "num_samples must be an integer"),
        ({"alpha": "half"}, "alpha must be a number"),
        ({"normalized": "maybe"}, "normalized must be true or false"),
    ],
)
def test_bad_fields_are_invalid_parameters(fields: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidParameter, match=message):
        ExplainRequest(fields=fields).params()


def test_long_methods_are_the_ones_that_run_many_forwards() -> None:
    assert ExplainRequest(methods=("gradcam", "scorecam")).runs_long
    assert ExplainRequest(methods=("SmoothGradCAMpp",)).runs_long
    assert not ExplainRequest(methods=("GradCAM", "CAM")).runs_long
    assert not ExplainRequest(methods=("Nope",)).runs_long
    assert split_names(["GradCAM, ScoreCAM", "CAM"]) == ("GradCAM", "ScoreCAM", "CAM")
