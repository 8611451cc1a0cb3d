"""Every declared option of every method, through every protocol: the form (/explain), /jobs,
KServe's :explain and OIP's infer. A valid value reaches the engine (the answer reports it as
an option the method ran with); a value out of its bounds gets one message everywhere."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from app.cam import METHODS, MethodOption
from app.errors import CamserveError
from camserve.request import ExplainRequest
from tests.conftest import files, image_bytes
from tests.fixtures_models import build_tiny, write_model, write_tiny_vit

#: The methods served for detectors only (D-RISE): a classifier refuses them, OIP serves no
#: detector, so their options are walked in tests/http/routes/test_drise.py.
DETECTOR_ONLY = {method for method, cls in METHODS.items() if cls.explains_detections}
#: (method, option) for every public option every method of a classifier declares.
DECLARED = [
    pytest.param(method, option, id=f"{method}-{option.name}")
    for method, cls in METHODS.items()
    for option in cls.options
    if option.public and method not in DETECTOR_ONLY
]
#: Sent with every request, so that a comparison class (FinerCAM) differs from the target.
CLASS_IDX = 1
#: The target layers a method needs on the tiny model (RefineCAM multiplies several layers' maps).
LAYERS: dict[str, list[str]] = {"RefineCAM": ["features.1", "features.3"]}
#: The model of a method that does not apply to the tiny one (served by ``own_client``).
MODELS: dict[str, str] = {"LeGrad": "vit"}


def valid_value(option: MethodOption) -> Any:
    """A value within the declared bounds, cheap to run (the low end for counts)."""
    if option.type is bool:
        return not option.default
    if option.choices:
        return next(choice for choice in option.choices if choice != option.default)
    if option.type is list:
        return [int(option.low or 0)]
    if option.type is float:
        assert option.low is not None and option.high is not None, option
        return option.low + (option.high - option.low) / 20
    if option.type is int:
        return int(option.low if option.low is not None else 1)
    raise AssertionError(f"no valid value for {option}")


def out_of_bounds(option: MethodOption) -> Any:
    if option.choices:
        return "no-such-" + option.name
    value = option.high + 1 if option.high is not None else (option.low or 0) - 1
    value = int(value) if option.type in (int, list) else float(value)
    return [value] if option.type is list else value


def _form_text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def _b64() -> str:
    return base64.b64encode(image_bytes(seed=5)).decode()


def _text_fields(method: str) -> dict[str, Any]:
    return {"target_layer": LAYERS[method]} if method in LAYERS else {}


def via_form(client: TestClient, method: str, name: str, value: Any) -> tuple[int, Any]:
    data = {"method": method, "class_idx": str(CLASS_IDX), "output": "raw", name: _form_text(value)}
    data.update(_text_fields(method))
    response = client.post("/explain", files=files(image_bytes(seed=5)), data=data)
    body = response.json()
    return response.status_code, body["options"] if response.is_success else body["error"][
        "message"
    ]


def via_jobs(client: TestClient, method: str, name: str, value: Any) -> tuple[int, Any]:
    data = {"method": method, "class_idx": str(CLASS_IDX), "output": "raw", name: _form_text(value)}
    data.update(_text_fields(method))
    response = client.post("/jobs", files=files(image_bytes(seed=5)), data=data)
    if not response.is_success:
        return response.status_code, response.json()["error"]["message"]
    deadline = time.monotonic() + 60
    while (view := client.get(response.headers["location"]).json())["status"] in (
        "queued",
        "running",
    ):
        assert time.monotonic() < deadline, view
        time.sleep(0.01)
    assert view["status"] == "succeeded", view
    return 200, view["result"]["options"]


def via_kserve(client: TestClient, method: str, name: str, value: Any) -> tuple[int, Any]:
    instance = {
        "image": {"b64": _b64()},
        "method": method,
        "class_idx": CLASS_IDX,
        "output": "raw",
        name: value,
        **_text_fields(method),
    }
    model = MODELS.get(method, "tiny")
    response = client.post(f"/v1/models/{model}:explain", json={"instances": [instance]})
    body = response.json()
    if not response.is_success:
        return response.status_code, body["error"]
    return 200, body["explanations"][0]["options"]


def via_oip(client: TestClient, method: str, name: str, value: Any) -> tuple[int, Any]:
    body = {
        "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [_b64()]}],
        "outputs": [{"name": "cam"}],
        "parameters": {
            "method": method,
            "class_idx": CLASS_IDX,
            name: value,
            **{k: ",".join(v) for k, v in _text_fields(method).items()},
        },
    }
    response = client.post(f"/v2/models/{MODELS.get(method, 'tiny')}/infer", json=body)
    answer = response.json()
    if not response.is_success:
        return response.status_code, answer["error"]
    (cam,) = answer["outputs"]
    assert cam["name"] == "cam" and cam["parameters"]["method"] == method
    # OIP parameters are scalars: a list option comes back comma-separated.
    sent = cam["parameters"].get(name)
    return 200, {name: [int(v) for v in sent.split(",")] if isinstance(value, list) else sent}


PROTOCOLS: dict[str, Callable[[TestClient, str, str, Any], tuple[int, Any]]] = {
    "form": via_form,
    "jobs": via_jobs,
    "kserve": via_kserve,
    "oip": via_oip,
}


def test_every_method_with_options_is_covered() -> None:
    covered = {param.values[0] for param in DECLARED}
    assert covered == {
        m for m, c in METHODS.items() if any(o.public for o in c.options) and m not in DETECTOR_ONLY
    }
    assert DETECTOR_ONLY == {"DRISE"}
    assert {"gamma", "num_references", "comparison_idx"} <= {p.values[1].name for p in DECLARED}
    # The smoothing options, declared once, reach every method that takes them.
    smoothing = {(p.values[0], p.values[1].name) for p in DECLARED}
    assert {
        (m, "aug_smooth") for m, c in METHODS.items() if c.aug_smoothable and m not in DETECTOR_ONLY
    } <= smoothing
    assert ("DFF", "aug_smooth") not in smoothing
    assert ("GradCAM", "eigen_smooth") in smoothing and (
        "EigenCAM",
        "eigen_smooth",
    ) not in smoothing


@pytest.fixture
def own_client(make_client: Callable[..., TestClient], tmp_path: Path) -> TestClient:
    """A client whose default model is a tiny ViT (for the methods of ``MODELS``)."""
    write_tiny_vit(tmp_path)
    return make_client(model_store=tmp_path, default_model="vit")


@pytest.mark.parametrize("protocol", list(PROTOCOLS))
@pytest.mark.parametrize(("method", "option"), DECLARED)
def test_a_valid_value_reaches_the_engine(
    request: pytest.FixtureRequest, protocol: str, method: str, option: MethodOption
) -> None:
    client = request.getfixturevalue("own_client" if method in MODELS else "client")
    value = valid_value(option)
    assert value != option.default  # the answer reports what was sent, not a default
    status, options = PROTOCOLS[protocol](client, method, option.name, value)
    assert status == 200, options
    assert options == {option.name: value}


#: The options with bounds (a bool has none: see the test of a wrong value below).
BOUNDED = [
    param
    for param in DECLARED
    if param.values[1].type is not bool and param.values[0] not in MODELS
]


@pytest.mark.parametrize(("method", "option"), BOUNDED)
def test_a_value_out_of_bounds_gets_one_message_everywhere(
    client: TestClient, method: str, option: MethodOption
) -> None:
    value = out_of_bounds(option)
    answers = {name: send(client, method, option.name, value) for name, send in PROTOCOLS.items()}
    assert {status for status, _ in answers.values()} == {422}, answers
    messages = {message for _, message in answers.values()}
    assert len(messages) == 1, answers
    bounds = "be one of " if option.choices else "lie in ["
    assert messages.pop().startswith(f"{method}: {option.name} must {bounds}")


#: The methods of issue #28, options or none: each runs on every protocol.
NEW_METHODS = ["FullGrad", "ShapleyCAM", "KPCACAM", "FEM", "RandomCAM"]


def test_the_new_methods_and_options_are_walked() -> None:
    walked = {(param.values[0], param.values[1].name) for param in DECLARED}
    assert {
        ("ISCAM", "schedule"),
        ("AblationCAM", "ablation_ratio"),
        ("KPCACAM", "kernel_gamma"),
        ("FEM", "k_std"),
        ("RandomCAM", "seed"),
    } <= walked
    assert set(NEW_METHODS) <= set(METHODS)


def _explanation_method(protocol: str, client: TestClient, method: str) -> tuple[int, Any]:
    """Send ``method`` with normalized=false (RandomCAM: a seed, which every protocol reports)."""
    if method == "RandomCAM":
        return PROTOCOLS[protocol](client, method, "seed", 3)
    return PROTOCOLS[protocol](client, method, "normalized", False)


@pytest.mark.parametrize("protocol", list(PROTOCOLS))
@pytest.mark.parametrize("method", NEW_METHODS)
def test_every_new_method_runs_on_every_protocol(
    client: TestClient, protocol: str, method: str
) -> None:
    status, answer = _explanation_method(protocol, client, method)
    assert status == 200, answer
    if method == "RandomCAM":
        assert answer == {"seed": 3}


def test_fullgrad_refuses_a_target_layer_with_one_message_everywhere(client: TestClient) -> None:
    answers = {
        "form": text_form(client, "/explain", {"method": "FullGrad", "target_layer": "features"}),
        "jobs": text_form(client, "/jobs", {"method": "FullGrad", "target_layer": "features"}),
        "kserve": json_kserve(client, {"method": "FullGrad", "target_layer": "features"}),
        "oip": json_oip(client, {"method": "FullGrad", "target_layer": "features"}),
    }
    assert {status for status, _ in answers.values()} == {422}, answers
    messages = {message for _, message in answers.values()}
    assert messages == {
        "FullGrad explain(s) the whole network and take(s) no target_layer. Drop "
        "target_layer, or add a method that takes one (e.g. GradCAM)."
    }, answers


def test_an_option_of_another_method_is_a_422_naming_its_takers(client: TestClient) -> None:
    for method, name, value in (
        ("GradCAM", "schedule", "linear"),
        ("ScoreCAM", "ablation_ratio", 0.5),
        ("FullGrad", "k_std", 1.0),
        ("EigenCAM", "kernel_gamma", 0.5),
    ):
        answers = {
            protocol: send(client, method, name, value) for protocol, send in PROTOCOLS.items()
        }
        assert {status for status, _ in answers.values()} == {422}, answers
        (message,) = {message for _, message in answers.values()}
        assert message.startswith(f"{method} does not take the option {name!r}"), message


# Malformed parameters: one rule (app.pipeline.params) refuses them with a 400 on every protocol.
# The form, /jobs and the command line send text; KServe and OIP send JSON values.


def _refusal(response: Any) -> tuple[int, str]:
    error = response.json()["error"]
    return response.status_code, error if isinstance(error, str) else error["message"]


def text_form(client: TestClient, path: str, fields: dict[str, Any]) -> tuple[int, str]:
    data = {"class_idx": str(CLASS_IDX), "output": "raw", **fields}
    response = client.post(path, files=files(image_bytes(seed=5)), data=data)
    assert response.status_code != 202 or client.delete(response.headers["location"]), "queued"
    return _refusal(response)


def text_local(fields: dict[str, Any]) -> tuple[int, str]:
    """The command line and the Python client's in-process path (``ExplainRequest.params``)."""
    methods = fields.pop("method", None)
    request = ExplainRequest(
        methods=(methods,) if methods else (), class_idx=(CLASS_IDX,), fields=fields
    )
    try:
        request.params()
    except CamserveError as error:
        return error.status_code, error.message
    raise AssertionError(f"accepted {fields}")


def json_kserve(client: TestClient, fields: dict[str, Any]) -> tuple[int, str]:
    instance = {"image": {"b64": _b64()}, "class_idx": CLASS_IDX, "output": "raw", **fields}
    return _refusal(client.post("/v1/models/tiny:explain", json={"instances": [instance]}))


def json_oip(client: TestClient, fields: dict[str, Any]) -> tuple[int, str]:
    body = {
        "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [_b64()]}],
        "outputs": [{"name": "cam"}],
        "parameters": {"class_idx": CLASS_IDX, **fields},
    }
    return _refusal(client.post("/v2/models/tiny/infer", json=body))


def send_text(client: TestClient, fields: dict[str, Any]) -> dict[str, tuple[int, str]]:
    return {
        "form": text_form(client, "/explain", fields),
        "jobs": text_form(client, "/jobs", fields),
        "local": text_local(dict(fields)),
    }


def send_json(client: TestClient, fields: dict[str, Any]) -> dict[str, tuple[int, str]]:
    return {"kserve": json_kserve(client, fields), "oip": json_oip(client, fields)}


ARABIC_400 = "\u0664\u0660\u0660"  # ٤٠٠
BIG = 10**400  # a 401-digit integer, beyond a float's range
#: (case, text fields, JSON fields, the message's start as text, as JSON)
MALFORMED = [
    pytest.param(
        {"methd": "ScoreCAM"},
        {"methd": "ScoreCAM"},
        "Unknown explain parameter 'methd' (did you mean 'method'?); the parameters are ",
        "Unknown explain parameter 'methd' (did you mean 'method'?); the parameters are ",
        id="typo",
    ),
    pytest.param(
        {"normalized": ["true", "false"]},
        {"normalized": [True, False]},
        "normalized was sent 2 times; it takes one value. Send it once.",
        "normalized must be true or false, got '[True, False]'.",
        id="repeated-one-value",
    ),
    pytest.param(
        {"method": "FinerCAM", "comparison_idx": "\u0662"},
        {"method": "FinerCAM", "comparison_idx": "\u0662"},
        "comparison_idx must be written with ASCII digits (0-9), got '\u0662'.",
        "comparison_idx must be written with ASCII digits (0-9), got '\u0662'.",
        id="arabic-indic-digit",
    ),
    pytest.param(
        {"method": "SSCAM", "num_samples": "\uff14"},
        {"method": "SSCAM", "num_samples": True},
        "num_samples must be written with ASCII digits (0-9), got '\uff14'.",
        "num_samples must be an integer, got 'True'.",
        id="fullwidth-digit-or-boolean-option",
    ),
    pytest.param(
        {"method": "FinerCAM", "gamma": "1" + "0" * 309},
        {"method": "FinerCAM", "gamma": 10**309},
        "gamma must be a finite number in [0, 10], got '1000",
        "gamma must be a finite number in [0, 10], got an integer of about 310 digits.",
        id="1e309",
    ),
    pytest.param(
        {"method": "SmoothGradCAMpp", "std": str(BIG)},
        {"method": "SmoothGradCAMpp", "std": BIG},
        "std must be a finite number in [0, 10], got '1000",
        "std must be a finite number in [0, 10], got an integer of about 401 digits.",
        id="400-digit-integer",
    ),
]


@pytest.mark.parametrize(("text", "json_fields", "as_text", "as_json"), MALFORMED)
def test_a_malformed_parameter_is_a_400_with_one_message_everywhere(
    client: TestClient,
    text: dict[str, Any],
    json_fields: dict[str, Any],
    as_text: str,
    as_json: str,
) -> None:
    answers = {**send_text(client, text), **send_json(client, json_fields)}
    assert {status for status, _ in answers.values()} == {400}, answers
    for protocol, (_, message) in answers.items():
        start = as_json if protocol in ("kserve", "oip") else as_text
        assert message.startswith(start), (protocol, message)
    # The text protocols take the same names, so the same rule wrote the same message.
    assert len({answers[p][1] for p in ("form", "jobs", "local")}) == 1, answers


@pytest.mark.parametrize(
    ("text", "json_fields", "words"),
    [
        pytest.param(
            {"size": ARABIC_400},
            {"size": ARABIC_400},
            "size must be written with ASCII digits (0-9)",
            id="size",
        ),
        pytest.param(
            {"alpha": "1" + "0" * 309},
            {"alpha": 10**309},
            "alpha must be a finite number in [0, 1], got ",
            id="alpha-1e309",
        ),
        pytest.param(
            {"top_k": ["3", "4"]},
            {"top_k": [3, 4]},
            "top_k ",
            id="top_k-repeated",
        ),
    ],
)
def test_general_parameters_oip_does_not_take_are_malformed_elsewhere(
    client: TestClient, text: dict[str, Any], json_fields: dict[str, Any], words: str
) -> None:
    answers = {**send_text(client, text), "kserve": json_kserve(client, json_fields)}
    assert {status for status, _ in answers.values()} == {400}, answers
    assert all(message.startswith(words) for _, message in answers.values()), answers


def test_a_json_boolean_is_no_class_index(client: TestClient) -> None:
    kserve = json_kserve(client, {"class_idx": True})
    oip = json_oip(client, {"class_idx": True})
    assert kserve[0] == oip[0] == 400, (kserve, oip)
    assert "class_idx" in kserve[1] and "integer" in kserve[1]
    assert oip[1] == "class_idx must be an integer or a list of integers, got 'True'."
    predict = client.post(
        "/v1/models/tiny:predict", json={"instances": [{"image": {"b64": _b64()}, "top_k": True}]}
    )
    assert predict.status_code == 400 and "top_k" in predict.json()["error"]
    # As text, "true" is no integer either.
    form = text_form(client, "/explain", {"class_idx": "true"})
    assert form == (
        400,
        "class_idx must be integers (repeat the field, separate by commas or "
        "send a list), got 'true'.",
    )


def test_the_form_refuses_a_repeated_field_of_its_own_and_suggests_its_names(
    client: TestClient,
) -> None:
    assert text_form(client, "/explain", {"model": ["tiny", "vgg"]}) == (
        400,
        "model was sent 2 times; it takes one value. Send it once.",
    )
    assert text_form(client, "/jobs", {"version": ["1", "1"]})[0] == 400
    status, message = text_form(client, "/explain", {"modle": "tiny"})
    assert status == 400 and "(did you mean 'model'?)" in message
    # A repeatable field still repeats, and an empty part is a field not sent.
    response = client.post(
        "/explain",
        files=files(image_bytes(seed=5)),
        data={"method": ["GradCAM", "GradCAMpp"], "output": "raw", "colormap": ""},
    )
    assert response.status_code == 200, response.text
    assert response.json()["method"] == "GradCAM,GradCAMpp"


def test_predict_refuses_an_unknown_or_repeated_field_of_its_form(client: TestClient) -> None:
    def predict(data: dict[str, Any]) -> tuple[int, str]:
        return _refusal(client.post("/predict", files=files(image_bytes(seed=5)), data=data))

    status, message = predict({"topk": "3"})
    assert status == 400 and message.startswith("Unknown field 'topk' (did you mean 'top_k'?)")
    assert predict({"top_k": ["3", "4"]}) == (
        400,
        "top_k was sent 2 times; it takes one value. Send it once.",
    )
    ok = client.post("/predict", files=files(image_bytes(seed=5)), data={"top_k": "2"})
    assert ok.status_code == 200 and len(ok.json()["results"][0]["predictions"]) == 2


def test_eigen_smooth_on_a_method_without_it_is_refused_everywhere(client: TestClient) -> None:
    # EigenCAM's map already is a first principal component (every method takes aug_smooth).
    answers = {
        name: send(client, "EigenCAM", "eigen_smooth", True) for name, send in PROTOCOLS.items()
    }
    assert {status for status, _ in answers.values()} == {422}, answers
    (message,) = {message for _, message in answers.values()}
    assert message.startswith("EigenCAM does not take the option 'eigen_smooth'; CAM, GradCAM")


def test_a_smoothing_option_that_is_no_bool_is_a_400_everywhere(client: TestClient) -> None:
    fields = {"method": "GradCAM", "aug_smooth": "maybe"}
    answers = {**send_text(client, dict(fields)), **send_json(client, dict(fields))}
    assert {status for status, _ in answers.values()} == {400}, answers
    assert {message for _, message in answers.values()} == {
        "aug_smooth must be true or false, got 'maybe'."
    }, answers


def test_aug_smooth_on_a_model_that_cannot_be_flipped_is_refused_everywhere(
    make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    torch.manual_seed(0)
    write_model(
        tmp_path,
        "tiny",
        build_tiny(),
        architecture="tests.fixtures_models:build_tiny",
        num_classes=3,
        input_size=32,
        target_layers=["features"],
        extra_cam="flip = false",
    )
    client = make_client(model_store=tmp_path, default_model="tiny")
    answers = {
        name: send(client, "GradCAM", "aug_smooth", True) for name, send in PROTOCOLS.items()
    }
    assert {status for status, _ in answers.values()} == {422}, answers
    (message,) = {message for _, message in answers.values()}
    assert message.startswith("aug_smooth averages the maps of horizontally flipped inputs, but")
    assert "[cam] flip = false" in message
    # eigen_smooth needs no flip.
    assert send_ok(client, "eigen_smooth") == (200, {"eigen_smooth": True})


def send_ok(client: TestClient, option: str) -> tuple[int, Any]:
    return via_kserve(client, "GradCAM", option, True)


def test_shapleycam_shares_the_gradient_pass_and_fullgrad_runs_beside(client: TestClient) -> None:
    """GradCAM and ShapleyCAM share one forward (the graph serves both backwards, the double one
    too); on the tiny model's piecewise-linear head the Hessian term is 0, so their maps agree."""
    data = {"method": "GradCAM,ShapleyCAM,FullGrad", "class_idx": str(CLASS_IDX), "output": "raw"}
    response = client.post("/explain", files=files(image_bytes(seed=5)), data=data)
    assert response.status_code == 200, response.text
    explanations = response.json()["results"][0]["explanations"]
    assert [e["method"] for e in explanations] == ["GradCAM", "ShapleyCAM", "FullGrad"]
    grad, shapley, full = (e["maps"] for e in explanations)
    np.testing.assert_allclose(grad[0]["raw"]["values"], shapley[0]["raw"]["values"], atol=1e-5)
    assert [m["layer"] for m in full] == ["fused"]  # one map of the whole network
