"""build_params: raw values as any protocol sends them -> ExplainParams, or one InvalidParameter."""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest

from app.cam import METHODS
from app.errors import InvalidParameter, MalformedParameter
from app.pipeline.explainer import ExplainParams
from app.pipeline.params import (
    GENERAL,
    MANY,
    OPTION_NAMES,
    PARAMETERS,
    build_params,
    one_value,
    read_text,
)


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
    assert PARAMETERS["aug_smooth"].kind == "bool" and PARAMETERS["eigen_smooth"].kind == "bool"
    assert PARAMETERS["aug_smooth"].json_schema()["type"] == "boolean"
    assert [p.name for p in GENERAL] == list(PARAMETERS)[: len(GENERAL)]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"top_k": 0}, "top_k must lie in [1, 1000], got 0."),
        ({"alpha": 1.5}, "alpha must lie in [0, 1], got 1.5."),
        ({"alpha": "high"}, "alpha must be a number, got 'high'."),
        ({"alpha": float("nan")}, "alpha must be a finite number in [0, 1], got 'nan'."),
        ({"top_k": True}, "top_k must be an integer, got 'True'."),
        ({"top_k": 2.5}, "top_k must be an integer, got '2.5'."),
        ({"normalized": "yes"}, "normalized must be true or false, got 'yes'."),
        ({"class_idx": ["one"]}, "class_idx must be integers (repeat the field, separate"),
        ({"class_idx": [1.5]}, "class_idx must be an integer or a list of integers, got '[1.5]'."),
        ({"method": 3}, "method must be a string or a list of strings, got '3'."),
        (
            {"faithfulness": True},  # a value of the wrong type hears the names it may take
            "faithfulness must be a string or a list of strings, got 'True'; the allowed values "
            "are deletion, insertion, confidence, road",
        ),
        ({"image_format": 5}, "image_format must be a string, got '5'; the allowed values are "),
        ({"size": [512]}, "size must be 'original', 'input' or a number of pixels"),
        ({"zebra": "red"}, "Unknown explain parameter 'zebra'; the parameters are method, "),
        ({"colour": "red"}, "Unknown explain parameter 'colour' (did you mean 'colormap'?)"),
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
    assert "the parameters are method, normalized, eigen_smooth, aug_smooth, num_samples" in (
        error.value.message
    )


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


@pytest.mark.parametrize("name", [n for n, p in PARAMETERS.items() if p.choices and p.kind in MANY])
def test_a_lists_choices_hold_each_of_its_strings_as_the_server_reads_them(name: str) -> None:
    """A list parameter's choices (``faithfulness``) hold its strings, in any case and comma
    lists: what the server takes validates, what it refuses does not (an enum on the array,
    as the schema once had, took nothing)."""
    parameter = PARAMETERS[name]
    first, second = parameter.choices[:2]
    taken = [[first], [f"{first.upper()}, {second}"], [f" {first},"], [""], [first, second]]
    refused = [["nothing-of-the-sort"], [f"{first}{second}"], [f"{first},unknown"]]
    for schema, wrap in (
        (parameter.form_schema(), lambda v: v),
        (parameter.json_schema(), lambda v: v),
        (parameter.json_schema(), lambda v: v[0]),  # one string, not a list
    ):
        for value in taken:
            jsonschema.validate(wrap(value), schema)
            assert build_params({name: wrap(value)}) is not None
        for value in refused:
            with pytest.raises(jsonschema.ValidationError):
                jsonschema.validate(wrap(value), schema)
            with pytest.raises(MalformedParameter):
                build_params({name: wrap(value)})


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


def test_an_unknown_name_is_refused_with_the_close_matches() -> None:
    with pytest.raises(MalformedParameter) as error:
        build_params({"methd": "ScoreCAM"})
    assert error.value.status_code == 400
    assert error.value.message.startswith(
        "Unknown explain parameter 'methd' (did you mean 'method'?); the parameters are method,"
    )
    assert error.value.details is not None and error.value.details["did_you_mean"] == ["method"]
    # The names a protocol reads itself are offered too, and case does not hide a match.
    with pytest.raises(MalformedParameter, match=r"\(did you mean 'model'\?\)"):
        build_params({"modle": "tiny"}, others=("model", "file"))
    with pytest.raises(MalformedParameter, match=r"did you mean 'num_samples'"):
        build_params({"Num_Samples": 4})
    with pytest.raises(MalformedParameter) as error:  # a long name is no typo
        build_params({"x" * 10_000: 1})
    assert "did you mean" not in error.value.message and len(error.value.message) < 600


def test_an_unknown_name_is_refused_even_from_text() -> None:
    with pytest.raises(MalformedParameter, match="did you mean 'method'"):
        build_params(read_text({"methd": "ScoreCAM"}))


@pytest.mark.parametrize("name", [p.name for p in PARAMETERS.values() if p.kind not in MANY])
def test_a_one_value_parameter_sent_twice_is_refused(name: str) -> None:
    with pytest.raises(MalformedParameter) as error:
        read_text({name: ["1", "2"]})
    assert error.value.message == f"{name} was sent 2 times; it takes one value. Send it once."
    assert error.value.status_code == 400


def test_repeatable_parameters_keep_every_value_and_empty_parts_are_not_sent() -> None:
    read = read_text({"method": ["GradCAM", "ScoreCAM"], "comparison_idx": ["1", "2"]})
    params = build_params(read)
    assert params.method == "GradCAM,ScoreCAM" and params.options == {"comparison_idx": (1, 2)}
    assert read_text({"top_k": ["", "3"], "colormap": ""}) == {"top_k": 3, "colormap": None}
    assert one_value("model", ["tiny"]) == "tiny" and one_value("model", []) is None
    with pytest.raises(MalformedParameter, match="model was sent 2 times"):
        one_value("model", ["tiny", "vgg"])


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"size": "\u0664\u0660\u0660"}, "size must be written with ASCII digits (0-9)"),  # ٤٠٠
        ({"top_k": "\u0663"}, "top_k must be written with ASCII digits (0-9)"),
        ({"alpha": "\u0660.\u0665"}, "alpha must be written with ASCII digits (0-9)"),
        ({"num_samples": "\uff18"}, "num_samples must be written with ASCII digits"),  # fullwidth 8
        ({"class_idx": "1,\u0662"}, "class_idx must be written with ASCII digits (0-9)"),
        ({"seed": "\u00b2"}, "seed must be written with ASCII digits (0-9)"),  # superscript two
        ({"top_k": "1_0"}, "top_k must be an integer"),
        ({"alpha": "inf"}, "alpha must be a number"),
        ({"alpha": "1" + "0" * 400}, "alpha must be a finite number in [0, 1], got '1000"),
        ({"std": "1e999"}, "std must be a finite number in [0, 10], got '1e999'."),
        ({"top_k": "9" * 5000}, "top_k must be a finite number in [1, 1000], got a number of"),
    ],
)
def test_numbers_in_text_are_ascii_and_within_their_kind(
    values: dict[str, str], message: str
) -> None:
    with pytest.raises(MalformedParameter) as error:
        build_params(read_text(values))
    assert error.value.message.startswith(message), error.value.message
    assert error.value.status_code == 400


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"class_idx": True}, "class_idx must be an integer or a list of integers, got 'True'."),
        ({"class_idx": [1, False]}, "class_idx must be an integer or a list of integers"),
        ({"num_samples": True}, "num_samples must be an integer, got 'True'."),
        ({"alpha": False}, "alpha must be a number, got 'False'."),
        ({"gamma": True}, "gamma must be a number, got 'True'."),
        ({"size": True}, "size must be 'original', 'input' or a number of pixels"),
        ({"size": "\u0664\u0660\u0660"}, "size must be written with ASCII digits (0-9)"),
        ({"alpha": 10**309}, "alpha must be a finite number in [0, 1], got an integer of about"),
        ({"std": 10**400}, "std must be a finite number in [0, 10], got an integer of about 401"),
        ({"gamma": -(10**400)}, "gamma must be a finite number in [0, 10]"),
        ({"alpha": float("inf")}, "alpha must be a finite number in [0, 1], got 'inf'."),
    ],
)
def test_json_booleans_and_numbers_beyond_a_float_are_malformed(
    values: dict[str, Any], message: str
) -> None:
    with pytest.raises(MalformedParameter) as error:
        build_params(values)
    assert error.value.message.startswith(message), error.value.message


def test_a_huge_integer_out_of_bounds_is_named_by_its_length() -> None:
    with pytest.raises(InvalidParameter) as error:
        build_params({"top_k": 10**400})
    assert error.value.message == "top_k must lie in [1, 1000], got an integer of about 401 digits."
    assert not isinstance(error.value, MalformedParameter)  # readable, out of bounds: 422


def test_a_bool_option_is_read_from_text_and_json() -> None:
    assert build_params(read_text({"aug_smooth": "true"})).options == {"aug_smooth": True}
    assert build_params(read_text({"eigen_smooth": "off"})).options == {"eigen_smooth": False}
    assert build_params({"aug_smooth": True}).options == {"aug_smooth": True}
    with pytest.raises(MalformedParameter, match="aug_smooth must be true or false, got '1'"):
        build_params({"aug_smooth": 1})
