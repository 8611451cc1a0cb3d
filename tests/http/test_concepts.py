"""DFF's concepts and the guided methods through every protocol: the form (/explain), /jobs,
KServe's :explain and OIP's infer (the extra outputs ``concepts`` and ``concept_labels``)."""

from __future__ import annotations

import base64
import time

import pytest
from fastapi.testclient import TestClient

from tests.conftest import assert_error, files, image_bytes


def _b64() -> str:
    return base64.b64encode(image_bytes(seed=5)).decode()


def _check_concepts(explanation: dict, k: int) -> None:  # type: ignore[type-arg]
    concepts = explanation["concepts"]
    assert [c["index"] for c in concepts] == list(range(k))
    for concept in concepts:
        assert concept["map"]["kind"] == "concept" and concept["map"]["raw"]["shape"] == [32, 32]
        assert 1 <= len(concept["top_labels"]) <= 3
        assert {"class_idx", "label", "score", "probability"} <= set(concept["top_labels"][0])


def test_the_form_answers_dff_concepts(client: TestClient) -> None:
    data = {"method": "DFF", "output": "raw,overlay", "n_components": "2", "top_k": "2"}
    response = client.post("/explain", files=files(image_bytes(seed=5)), data=data)
    assert response.status_code == 200, response.text
    (explanation,) = response.json()["results"][0]["explanations"]
    _check_concepts(explanation, 2)
    assert all(c["map"]["overlay"] for c in explanation["concepts"])


def test_a_job_answers_dff_concepts(client: TestClient) -> None:
    data = {"method": "DFF", "output": "raw", "n_components": "3"}
    response = client.post("/jobs", files=files(image_bytes(seed=5)), data=data)
    assert response.status_code == 202, response.text
    deadline = time.monotonic() + 60
    while (view := client.get(response.headers["location"]).json())["status"] in (
        "queued",
        "running",
    ):
        assert time.monotonic() < deadline, view
        time.sleep(0.01)
    assert view["status"] == "succeeded", view
    _check_concepts(view["result"]["results"][0]["explanations"][0], 3)


def test_kserve_answers_dff_concepts(client: TestClient) -> None:
    instance = {"image": {"b64": _b64()}, "method": "DFF", "output": "raw", "n_components": 2}
    response = client.post("/v1/models/tiny:explain", json={"instances": [instance]})
    assert response.status_code == 200, response.text
    _check_concepts(response.json()["explanations"][0]["explanations"][0], 2)


def _infer(client: TestClient, outputs: list[str], method: str = "DFF"):  # type: ignore[no-untyped-def]
    body = {
        "inputs": [{"name": "image", "shape": [2], "datatype": "BYTES", "data": [_b64()] * 2}],
        "outputs": [{"name": name} for name in outputs],
        "parameters": {"method": method, "n_components": 3},
    }
    if method != "DFF":
        del body["parameters"]["n_components"]  # type: ignore[attr-defined]
    return client.post("/v2/models/tiny/infer", json=body)


def test_oip_answers_the_concepts_as_extra_outputs(client: TestClient) -> None:
    response = _infer(client, ["cam", "concepts", "concept_labels"])
    assert response.status_code == 200, response.text
    cam, concepts, labels = response.json()["outputs"]
    assert cam["shape"] == [2, 32, 32]
    assert concepts["name"] == "concepts" and concepts["datatype"] == "FP32"
    assert concepts["shape"] == [2, 3, 32, 32] and len(concepts["data"]) == 2 * 3 * 32 * 32
    assert concepts["parameters"]["method"] == "DFF"
    assert labels["datatype"] == "BYTES" and labels["shape"] == [2, 3, 3]
    probability, index, label = labels["data"][0].split(":")
    assert 0 <= float(probability) <= 1 and int(index) in range(3) and label


def test_oip_concepts_alone_imply_an_explanation(client: TestClient) -> None:
    response = _infer(client, ["concept_labels"])
    assert response.status_code == 200, response.text
    (labels,) = response.json()["outputs"]
    assert labels["shape"] == [2, 3, 3]


def test_oip_concepts_of_a_method_without_them_are_refused(client: TestClient) -> None:
    response = _infer(client, ["concepts"], method="GradCAM")
    assert response.status_code == 400, response.text
    message = response.json()["error"]  # OIP's error body: {"error": message}
    assert "concepts of DFF; GradCAM finds none" in message


@pytest.mark.parametrize("method", ["GuidedBackprop", "GuidedGradCAM"])
def test_the_guided_methods_answer_maps_at_the_input_size(client: TestClient, method: str) -> None:
    data = {"method": method, "output": "raw,heatmap"}
    response = client.post("/explain", files=files(image_bytes(seed=5)), data=data)
    assert response.status_code == 200, response.text
    (explanation,) = response.json()["results"][0]["explanations"]
    (served,) = explanation["maps"]
    assert served["raw"]["shape"] == [32, 32] and served["heatmap"]
    assert explanation["concepts"] is None


def test_too_many_concepts_get_a_clear_422_everywhere(client: TestClient) -> None:
    form = client.post(
        "/explain",
        files=files(image_bytes(seed=5)),
        data={"method": "DFF", "n_components": "9"},
    )
    message = assert_error(form, 422, "invalid_parameter")
    assert "n_components=9 is more concepts than the target layer's 4 channels" in message
    instance = {"image": {"b64": _b64()}, "method": "DFF", "n_components": 9}
    kserve = client.post("/v1/models/tiny:explain", json={"instances": [instance]})
    assert kserve.status_code == 422 and kserve.json()["error"] == message  # KServe's body
