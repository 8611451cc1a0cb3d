"""Faithfulness over every HTTP protocol: /explain, /jobs, KServe v1 and OIP carry it alike, and
refuse a bad metric, too many steps and ROAD outside /jobs with a 400 naming what is allowed."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from app.pipeline.faithfulness import MAX_STEPS
from tests.conftest import assert_error, files, image_bytes
from tests.http.protocols.test_kserve import instance
from tests.http.protocols.test_oip import assert_protocol_error, infer_body

ASKED = {"method": "GradCAM", "output": "raw", "faithfulness": "deletion,insertion"}


def _scores(body: dict) -> list[dict]:
    return [
        m["faithfulness"]
        for result in body["results"]
        for e in result["explanations"]
        for m in e["maps"]
    ]


def _native(client: TestClient, **form: str) -> dict:
    response = client.post("/explain", files=files(image_bytes(seed=5)), data=form)
    assert response.status_code == 200, response.text
    return response.json()


def test_explain_gives_each_map_its_scores(client: TestClient) -> None:
    body = _native(client, **ASKED, faithfulness_steps="8")
    [score] = _scores(body)
    assert set(score) >= {"deletion_auc", "insertion_auc", "steps"}
    assert score["steps"] == 8 and 0 <= score["deletion_auc"] <= 1
    assert score["road_morf"] is None
    assert body["timings"]["faithfulness_ms"] > 0
    assert _scores(_native(client, method="GradCAM", output="raw")) == [None]


def test_confidence_alone_is_two_forwards_and_its_two_numbers(client: TestClient) -> None:
    body = _native(client, method="GradCAM", output="raw", faithfulness="confidence")
    [score] = _scores(body)
    assert 0 <= score["confidence_drop"] <= 1
    assert isinstance(score["confidence_increase"], bool)
    assert score["deletion_auc"] is None and score["steps"] is None
    response = client.post(
        "/jobs",
        files=files(image_bytes(seed=5)),
        data={"method": "GradCAM", "output": "raw", "faithfulness": "confidence"},
    )
    assert response.status_code == 202, response.text
    view = _finished(client, response.json()["id"])
    assert view["progress"]["total"] == 2  # the image and its explanation map
    assert _scores(view["result"]) == [score]


def test_each_class_of_several_gets_the_scores_of_its_own_map(client: TestClient) -> None:
    together = _native(client, **ASKED, classes="2,0")
    assert [e["class_idx"] for e in together["results"][0]["explanations"]] == [2, 0]
    alone = [_scores(_native(client, **ASKED, class_idx=str(c)))[0] for c in (2, 0)]
    assert _scores(together) == alone
    assert alone[0] != alone[1]


def test_a_job_gives_the_scores_of_explain(client: TestClient) -> None:
    response = client.post("/jobs", files=files(image_bytes(seed=5)), data=ASKED)
    assert response.status_code == 202, response.text
    view = _finished(client, response.json()["id"])
    assert view["status"] == "succeeded", view
    assert _scores(view["result"]) == _scores(_native(client, **ASKED))
    assert view["progress"]["total"] == 34  # the curves' forwards: GradCAM runs none of its own


def test_road_runs_in_a_job(client: TestClient) -> None:
    form = {"method": "GradCAM", "output": "raw", "faithfulness": "road,deletion"}
    response = client.post("/jobs", files=files(image_bytes(seed=5)), data=form)
    assert response.status_code == 202, response.text
    view = _finished(client, response.json()["id"])
    assert view["status"] == "succeeded", view
    [score] = _scores(view["result"])
    assert 0 <= score["road_morf"] <= 1 and 0 <= score["road_lerf"] <= 1
    assert score["deletion_auc"] is not None and score["insertion_auc"] is None


def _finished(client: TestClient, job_id: str) -> dict:
    deadline = time.monotonic() + 60
    while True:
        view = client.get(f"/jobs/{job_id}").json()
        if view["status"] in ("succeeded", "failed", "cancelled"):
            return view
        assert time.monotonic() < deadline, view
        time.sleep(0.02)


def test_kserve_instances_carry_it(client: TestClient) -> None:
    body = {"instances": [instance(image_bytes(seed=5), **ASKED)]}
    response = client.post("/v1/models/tiny:explain", json=body)
    assert response.status_code == 200, response.text
    [explanation] = response.json()["explanations"]
    score = explanation["explanations"][0]["maps"][0]["faithfulness"]
    assert score == _scores(_native(client, **ASKED))[0]


def test_oip_gives_the_scores_as_the_cam_outputs_parameters(client: TestClient) -> None:
    body = {
        **infer_body(image_bytes(seed=5), image_bytes(seed=6)),
        "outputs": [{"name": "cam"}],
        "parameters": {"method": "GradCAM", "faithfulness": "deletion,insertion,confidence"},
    }
    response = client.post("/v2/models/tiny/infer", json=body)
    assert response.status_code == 200, response.text
    [cam] = response.json()["outputs"]
    parameters = cam["parameters"]
    assert parameters["faithfulness_steps"] == 16
    native = client.post(
        "/explain",
        files=files(image_bytes(seed=5), image_bytes(seed=6)),
        data={**ASKED, "faithfulness": "deletion,insertion,confidence"},
    ).json()
    expected = _scores(native)
    for name in ("deletion_auc", "insertion_auc", "confidence_drop"):
        assert [float(v) for v in parameters[name].split(",")] == pytest.approx(
            [s[name] for s in expected]
        )
    increases = [str(s["confidence_increase"]).lower() for s in expected]
    assert parameters["confidence_increase"].split(",") == increases


@pytest.mark.parametrize(
    ("form", "words"),
    [
        ({"faithfulness": "deletion,accuracy"}, "deletion, insertion, confidence, road"),
        (
            {"faithfulness": "deletion", "faithfulness_steps": str(MAX_STEPS + 1)},
            f"[1, {MAX_STEPS}]",
        ),
    ],
)
def test_bad_faithfulness_is_400_on_every_protocol(
    client: TestClient, form: dict, words: str
) -> None:
    response = client.post("/explain", files=files(image_bytes()), data=form)
    assert words in assert_error(response, 400, "malformed_parameter")
    response = client.post("/jobs", files=files(image_bytes()), data=form)
    assert words in assert_error(response, 400, "malformed_parameter")
    typed = {name: int(v) if name.endswith("steps") else v for name, v in form.items()}
    kserve = {"instances": [instance(image_bytes(), **typed)]}
    assert words in assert_protocol_error(client.post("/v1/models/tiny:explain", json=kserve), 400)
    oip = {**infer_body(image_bytes()), "outputs": [{"name": "cam"}], "parameters": typed}
    assert words in assert_protocol_error(client.post("/v2/models/tiny/infer", json=oip), 400)


def test_road_outside_jobs_is_400_that_says_to_use_jobs(client: TestClient) -> None:
    form = {"faithfulness": "road"}
    response = client.post("/explain", files=files(image_bytes()), data=form)
    assert "/jobs" in assert_error(response, 400, "bad_request")
    kserve = {"instances": [instance(image_bytes(), **form)]}
    message = assert_protocol_error(client.post("/v1/models/tiny:explain", json=kserve), 400)
    assert "/jobs" in message
    oip = {**infer_body(image_bytes()), "outputs": [{"name": "cam"}], "parameters": form}
    assert "/jobs" in assert_protocol_error(client.post("/v2/models/tiny/infer", json=oip), 400)
