"""Several classes in one request through every HTTP protocol: the form (/explain), /jobs,
KServe's :explain and OIP's infer read ``classes`` and ``top_classes`` through the one rule
(``app.pipeline.classes``) and answer one explanation per class and method."""

from __future__ import annotations

import base64
import time

import pytest
from fastapi.testclient import TestClient

from tests.conftest import assert_error, files, image_bytes
from tests.http.protocols.test_oip import assert_protocol_error, explain_body


def _b64(data: bytes) -> dict[str, str]:
    return {"b64": base64.b64encode(data).decode()}


def test_the_form_takes_repeated_classes(client: TestClient) -> None:
    data = {"method": "GradCAM,CAM", "classes": ["2", "0"], "output": "raw"}  # two parts
    response = client.post("/explain", files=files(image_bytes(seed=1)), data=data)
    assert response.status_code == 200, response.text
    body = response.json()
    got = [(e["method"], e["class_idx"]) for e in body["results"][0]["explanations"]]
    assert got == [("GradCAM", 2), ("GradCAM", 0), ("CAM", 2), ("CAM", 0)]
    assert body["timings"]["forwards"] == 1


def test_the_form_takes_top_classes(client: TestClient) -> None:
    data = {"method": "GradCAM", "top_classes": "3", "output": "raw"}
    response = client.post("/explain", files=files(image_bytes(seed=2)), data=data)
    assert response.status_code == 200, response.text
    result = response.json()["results"][0]
    assert [e["class_idx"] for e in result["explanations"]] == [
        p["class_idx"] for p in result["predictions"][:3]
    ]


@pytest.mark.parametrize(
    ("data", "status", "words"),
    [
        ({"top_classes": "4"}, 400, "model 'tiny' has 3 classes"),
        ({"classes": "0,1,2,0"}, 400, "has 3 classes"),
        ({"classes": "5"}, 400, "out of range"),
        ({"class_idx": "1", "top_classes": "2"}, 400, "class_idx and top_classes"),
        ({"top_classes": "0"}, 422, "top_classes must lie in [1, 32]"),
        ({"top_classes": "two"}, 400, "top_classes must be an integer"),
    ],
)
def test_bad_classes_are_refused_clearly(
    client: TestClient, data: dict[str, str], status: int, words: str
) -> None:
    response = client.post("/explain", files=files(image_bytes()), data=data)
    code = "malformed_parameter" if status == 400 else "invalid_parameter"
    assert words in assert_error(response, status, code)


def test_a_job_explains_several_classes(client: TestClient) -> None:
    data = {"method": "ScoreCAM", "top_classes": "2", "output": "raw", "batch_size": "8"}
    response = client.post("/jobs", files=files(image_bytes(seed=3)), data=data)
    assert response.status_code == 202, response.text
    deadline = time.monotonic() + 60
    while (view := client.get(response.headers["location"]).json())["status"] in (
        "queued",
        "running",
    ):
        assert time.monotonic() < deadline, view
        time.sleep(0.01)
    assert view["status"] == "succeeded", view
    explanations = view["result"]["results"][0]["explanations"]
    assert len(explanations) == 2 and explanations[0]["class_idx"] != explanations[1]["class_idx"]


def test_kserve_instances_take_classes(client: TestClient) -> None:
    body = {
        "instances": [
            {"image": _b64(image_bytes(seed=1)), "method": "gradcam", "classes": [1, 2]},
            {"image": _b64(image_bytes(seed=2)), "method": "gradcam", "top_classes": 2},
        ]
    }
    response = client.post("/v1/models/tiny:explain", json=body)
    assert response.status_code == 200, response.text
    first, second = response.json()["explanations"]
    assert [e["class_idx"] for e in first["explanations"]] == [1, 2]
    ranked = [p["class_idx"] for p in second["predictions"][:2]]
    assert [e["class_idx"] for e in second["explanations"]] == ranked
    bad = {"instances": [{"image": _b64(image_bytes()), "top_classes": 9}]}
    assert "has 3 classes" in assert_protocol_error(
        client.post("/v1/models/tiny:explain", json=bad), 400
    )


def test_oip_stacks_a_map_per_image_and_class(client: TestClient) -> None:
    body = explain_body(image_bytes(seed=1), image_bytes(seed=2), outputs=("cam",), classes=[2, 0])
    response = client.post("/v2/models/tiny/infer", json=body)
    assert response.status_code == 200, response.text
    (cam,) = response.json()["outputs"]
    assert cam["shape"][0] == 4
    assert cam["parameters"]["class_idx"] == "2,0,2,0"
    assert cam["parameters"]["classes_per_image"] == 2
    one = explain_body(image_bytes(seed=1), outputs=("cam",), class_idx=[2])
    (single,) = client.post("/v2/models/tiny/infer", json=one).json()["outputs"]
    assert "classes_per_image" not in single["parameters"]
    size = len(single["data"])
    assert cam["data"][:size] == pytest.approx(single["data"], abs=1e-5)
    bad = explain_body(image_bytes(), outputs=("cam",), top_classes=7)
    assert "has 3 classes" in assert_protocol_error(
        client.post("/v2/models/tiny/infer", json=bad), 400
    )
