"""build_params: raw values as any protocol sends them -> ExplainParams, or one InvalidParameter."""

from __future__ import annotations

from typing import Any

import pytest

from app.cam import METHODS
from app.errors import InvalidParameter
from app.pipeline.explainer import ExplainParams
from app.pipeline.params import GENERAL, OPTION_NAMES, PARAMETERS, build_params, read_text


def test_nothing_sent_gives_the_defaults() -> None:
    assert build_params({}) == ExplainParams()
    assert build_params({"top_k": None, "method": None}) == ExplainParams()  # None: not sent


def test_form_strings_and_json_values_build_the_same_params() -> None:
    form = {
        "method": ["GradCAM, ScoreCAM"],
        "class_idx": ["1", "2"],
        "target_layer": ["layer3,layer4"],
        "output": ["RAW,overlay"],
        "colormap": " Viridis ",
        "image_format": "PNG",
        "size": "512",
        "comparison_idx": ["0,2"],
    }
    json = {
        "method": ["GradCAM", "ScoreCAM"],
        "class_idx": [1, 2],
        "target_layer": ["layer3", "layer4"],
        "output": "raw,overlay",
        "colormap": "viridis",
        "image_format": "png",
        "size": 512,
        "comparison_idx": [0, 2],
    }
    params = build_params(form)
    assert params == build_params(json)
    assert params.method == "GradCAM,ScoreCAM"
    assert params.class_idx == (1, 2)
    assert params.target_layers == ("layer3", "layer4")
    assert params.outputs == ("raw", "overlay")
    assert (params.colormap, params.image_format, params.size) == ("viridis", "png", "512")
    assert params.options == {"comparison_idx": (0, 2)}


def test_method_options_are_kept_for_the_explainer_to_check_per_method() -> None:
    # Bounds depend on the method, which only the model can settle (its default method).
    params = build_params({"num_samples": 1000, "gamma": 0.5, "seed": 0})
    assert params.options == {"num_samples": 1000, "gamma": 0.5, "seed": 0}


def test_every_public_option_of_every_method_is_a_parameter() -> None:
    declared = {o.name for cls in METHODS.values() for o in cls.options if o.public}
    assert set(OPTION_NAMES) == declared
    assert all(PARAMETERS[name].option for name in declared)
    assert "fc_layer" not in PARAMETERS  # from the manifest, never from a client
    assert [p.name for p in GENERAL] == list(PARAMETERS)[: len(GENERAL)]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"top_k": 0}, "top_k must lie in [1, 1000], got 0."),
        ({"alpha": 1.5}, "alpha must lie in [0, 1], got 1.5."),
        ({"alpha": "high"}, "alpha must be a number, got 'high'."),
        ({"alpha": float("nan")}, "alpha must be a finite number, got 'nan'."),
        ({"top_k": True}, "top_k must be an integer, got 'True'."),
        ({"top_k": 2.5}, "top_k must be an integer, got '2.5'."),
        ({"normalized": "yes"}, "normalized must be true or false, got 'yes'."),
        ({"class_idx": ["one"]}, "class_idx must be integers (repeat the field, separate"),
        ({"class_idx": [1.5]}, "class_idx must be an integer or a list of integers, got '[1.5]'."),
        ({"method": 3}, "method must be a string or a list of strings, got '3'."),
        ({"size": [512]}, "size must be 'original', 'input' or a number of pixels"),
        ({"colour": "red"}, "Unknown explain parameter 'colour'; the parameters are method, "),
        ({"fc_layer": "fc"}, "Unknown explain parameter 'fc_layer'"),
    ],
)
def test_bad_values_are_refused_with_a_message_naming_them(
    values: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidParameter) as error:
        build_params(values)
    assert error.value.message.startswith(message), error.value.message


def test_accepted_narrows_the_general_parameters_but_never_the_options() -> None:
    accepted = ("method", "normalized")
    assert build_params({"gamma": 1.0}, accepted=accepted).options == {"gamma": 1.0}
    with pytest.raises(InvalidParameter) as error:
        build_params({"colormap": "jet"}, accepted=accepted)
    assert "the parameters are method, normalized, num_samples" in error.value.message


def test_fixed_values_override_the_client_after_its_check() -> None:
    params = build_params({"output": "raw"}, fixed={"output": "overlay"})
    assert params.outputs == ("overlay",)
    with pytest.raises(InvalidParameter):  # a value the protocol fixes is still not the client's
        build_params({"output": "raw"}, accepted=(), fixed={"output": "overlay"})


def test_json_schema_documents_types_bounds_and_defaults() -> None:
    assert PARAMETERS["top_k"].json_schema() == {
        "type": "integer",
        "description": "predictions returned per image",
        "minimum": 1,
        "maximum": 1000,
        "default": 5,
    }
    gamma = PARAMETERS["gamma"].json_schema()
    assert gamma["type"] == "number" and "FinerCAM (0.6)" in gamma["description"]
    assert PARAMETERS["image_format"].json_schema()["enum"] == ["png", "jpeg", "webp"]


def test_text_values_are_typed_by_their_kind_as_the_form_types_them() -> None:
    text = {"top_k": " 3", "alpha": "0.25", "normalized": "off", "batch_size": "8", "nope": "x"}
    assert read_text(text) == {
        "top_k": 3,
        "alpha": 0.25,
        "normalized": False,
        "batch_size": 8,
        "nope": "x",
    }
    assert build_params(read_text({"batch_size": "8", "comparison_idx": "1,2"})).options == {
        "batch_size": 8,
        "comparison_idx": (1, 2),
    }
    for values, message in [
        ({"top_k": "three"}, "top_k must be an integer"),
        ({"alpha": "half"}, "alpha must be a number"),
        ({"normalized": "maybe"}, "normalized must be true or false"),
    ]:
        with pytest.raises(InvalidParameter, match=message):
            read_text(values)
