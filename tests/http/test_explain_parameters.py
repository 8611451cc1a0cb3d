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
    if option.type is list:
        return [int(option.low or 0)]
    if option.type is float:
        assert option.low is not None and option.high is not None, option
        return option.low + (option.high - option.low) / 20
    if option.type is int:
        return int(option.low if option.low is not None else 1)
    raise AssertionError(f"no valid value for {option}")


def out_of_bounds(option: MethodOption) -> Any:
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
    assert messages.pop().startswith(f"{method}: {option.name} must lie in [")
