"""Every declared option of every method, through every protocol: the form (/explain), /jobs,
KServe's :explain and OIP's infer. A valid value reaches the engine (the answer reports it as
an option the method ran with); a value out of its bounds gets one message everywhere."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.cam import METHODS, MethodOption
from app.errors import CamserveError
from camserve.request import ExplainRequest
from tests.conftest import files, image_bytes

#: (method, option) for every public option every method declares.
DECLARED = [
    pytest.param(method, option, id=f"{method}-{option.name}")
    for method, cls in METHODS.items()
    for option in cls.options
    if option.public
]
#: Sent with every request, so that a comparison class (FinerCAM) differs from the target.
CLASS_IDX = 1


def valid_value(option: MethodOption) -> Any:
    """A value within the declared bounds, cheap to run (the low end for counts)."""
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
        return "not-" + option.choices[0]
    value = option.high + 1 if option.high is not None else (option.low or 0) - 1
    value = int(value) if option.type in (int, list) else float(value)
    return [value] if option.type is list else value


def _form_text(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def _b64() -> str:
    return base64.b64encode(image_bytes(seed=5)).decode()


def via_form(client: TestClient, method: str, name: str, value: Any) -> tuple[int, Any]:
    data = {"method": method, "class_idx": str(CLASS_IDX), "output": "raw", name: _form_text(value)}
    response = client.post("/explain", files=files(image_bytes(seed=5)), data=data)
    body = response.json()
    return response.status_code, body["options"] if response.is_success else body["error"][
        "message"
    ]


def via_jobs(client: TestClient, method: str, name: str, value: Any) -> tuple[int, Any]:
    data = {"method": method, "class_idx": str(CLASS_IDX), "output": "raw", name: _form_text(value)}
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
    }
    response = client.post("/v1/models/tiny:explain", json={"instances": [instance]})
    body = response.json()
    if not response.is_success:
        return response.status_code, body["error"]
    return 200, body["explanations"][0]["options"]


def via_oip(client: TestClient, method: str, name: str, value: Any) -> tuple[int, Any]:
    body = {
        "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [_b64()]}],
        "outputs": [{"name": "cam"}],
        "parameters": {"method": method, "class_idx": CLASS_IDX, name: value},
    }
    response = client.post("/v2/models/tiny/infer", json=body)
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
    assert covered == {m for m, c in METHODS.items() if any(o.public for o in c.options)}
    assert {"gamma", "num_references", "comparison_idx"} <= {p.values[1].name for p in DECLARED}


@pytest.mark.parametrize("protocol", list(PROTOCOLS))
@pytest.mark.parametrize(("method", "option"), DECLARED)
def test_a_valid_value_reaches_the_engine(
    client: TestClient, protocol: str, method: str, option: MethodOption
) -> None:
    value = valid_value(option)
    assert value != option.default  # the answer reports what was sent, not a default
    status, options = PROTOCOLS[protocol](client, method, option.name, value)
    assert status == 200, options
    assert options == {option.name: value}


@pytest.mark.parametrize(("method", "option"), DECLARED)
def test_a_value_out_of_bounds_gets_one_message_everywhere(
    client: TestClient, method: str, option: MethodOption
) -> None:
    value = out_of_bounds(option)
    answers = {name: send(client, method, option.name, value) for name, send in PROTOCOLS.items()}
    assert {status for status, _ in answers.values()} == {422}, answers
    messages = {message for _, message in answers.values()}
    assert len(messages) == 1, answers
    rule = "must be one of" if option.choices else "must lie in ["
    assert messages.pop().startswith(f"{method}: {option.name} {rule}")


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
