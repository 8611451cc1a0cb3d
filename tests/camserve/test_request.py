"""``ExplainRequest``: the same request as form fields for a server and as ExplainParams here."""

from __future__ import annotations

import pytest

from app.errors import InvalidParameter, MalformedParameter
from camserve.cli.common import build_request
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
        ({"colormp": "jet"}, r"Unknown explain parameter 'colormp' \(did you mean 'colormap'\?\)"),
        ({"top_k": ["3", "4"]}, "top_k was sent 2 times; it takes one value"),
        ({"num_samples": "\u0668"}, r"num_samples must be written with ASCII digits \(0-9\)"),
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


def test_an_option_given_several_times_is_sent_as_repeated_fields() -> None:
    request = build_request((), None, None, (), None, "jpeg", False, ("top_k=3", "top_k=4"))
    assert request.fields == {"top_k": ["3", "4"]}
    assert request.form()[-2:] == [("top_k", "3"), ("top_k", "4")]  # the service refuses it
    with pytest.raises(MalformedParameter, match="top_k was sent 2 times"):
        request.params()  # and so does the pipeline here
    repeated = ("comparison_idx=1", "comparison_idx=2", "gamma=0.5")
    request = build_request(("FinerCAM",), None, None, (), None, "jpeg", False, repeated)
    assert request.params().options == {"comparison_idx": (1, 2), "gamma": 0.5}


def test_the_command_lines_text_options_reach_the_new_options() -> None:
    """``-O schedule=linear -O k_std=1.5``: read by each option's kind, as /explain does."""
    request = ExplainRequest(
        methods=("ISCAM", "FEM"), fields={"schedule": "linear", "k_std": "1.5", "seed": "4"}
    )
    assert request.params().options == {"schedule": "linear", "k_std": 1.5, "seed": 4}
