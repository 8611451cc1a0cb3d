"""KServe v1 protocol: :predict and :explain with {"instances": [{"image": {"b64": ...}}]}."""

from __future__ import annotations

import base64
from collections.abc import Callable

import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.conftest import calls_on_the_loop, files, image_bytes
from tests.http.protocols.test_oip import assert_protocol_error


def instance(data: bytes, **options: object) -> dict:
    return {"image": {"b64": base64.b64encode(data).decode()}, **options}


def test_list_and_ready(client: TestClient) -> None:
    assert set(client.get("/v1/models").json()["models"]) == {"tiny", "resnet", "vgg", "broken"}
    assert client.get("/v1/models/tiny").json() == {"name": "tiny", "ready": True}
    assert client.get("/v1/models/broken").status_code == 503
    assert_protocol_error(client.get("/v1/models/nope"), 404)


def test_predict_matches_the_native_route(client: TestClient) -> None:
    images = [image_bytes(seed=1), image_bytes(seed=2)]
    body = {"instances": [instance(images[0]), instance(images[1], top_k=1)]}
    response = client.post("/v1/models/resnet:predict", json=body)
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert [len(p["predictions"]) for p in predictions] == [5, 1]
    assert [p["filename"] for p in predictions] == ["instance0", "instance1"]
    native = client.post("/predict", files=files(*images), data={"model": "resnet"}).json()
    for mine, theirs in zip(predictions, native["results"], strict=True):
        assert mine["predictions"][0]["class_idx"] == theirs["predictions"][0]["class_idx"]
        assert mine["predictions"][0]["logit"] == pytest.approx(
            theirs["predictions"][0]["logit"], abs=1e-5
        )


def test_inputs_is_a_synonym_of_instances(client: TestClient) -> None:
    response = client.post("/v1/models/tiny:predict", json={"inputs": [instance(image_bytes())]})
    assert response.status_code == 200
    both = {"inputs": [instance(image_bytes())], "instances": [instance(image_bytes())]}
    assert "not both" in assert_protocol_error(
        client.post("/v1/models/tiny:predict", json=both), 400
    )


def test_explain_in_camserve_shape_with_options_as_fields(client: TestClient) -> None:
    body = {
        "instances": [
            instance(image_bytes(seed=1), method="gradcam", output=["overlay", "raw"], class_idx=2),
            instance(image_bytes(seed=2), method="gradcam", output=["overlay", "raw"], class_idx=0),
            instance(image_bytes(seed=3), method="ScoreCAM", batch_size=8, output="raw"),
        ]
    }
    response = client.post("/v1/models/tiny:explain", json=body)
    assert response.status_code == 200, response.text
    explanations = response.json()["explanations"]
    assert [e["method"] for e in explanations] == ["GradCAM", "GradCAM", "ScoreCAM"]
    assert [e["explanations"][0]["class_idx"] for e in explanations[:2]] == [2, 0]
    first = explanations[0]
    assert first["model"] == "tiny" and first["target_layers"] == ["features"]
    (layer_map,) = first["explanations"][0]["maps"]
    assert layer_map["overlay"] and layer_map["raw"]["shape"] == [32, 32]
    assert len(first["logits"]) == 3 and first["predictions"]
    assert explanations[2]["options"] == {"batch_size": 8}
    assert explanations[2]["explanations"][0]["maps"][0]["overlay"] is None

    native = client.post(
        "/explain",
        files=files(image_bytes(seed=1)),
        data={"method": "gradcam", "output": "raw", "class_idx": "2"},
    ).json()
    np.testing.assert_allclose(
        first["explanations"][0]["maps"][0]["raw"]["values"],
        native["results"][0]["explanations"][0]["maps"][0]["raw"]["values"],
        atol=1e-5,
    )


@pytest.mark.parametrize(
    ("route", "body", "words"),
    [
        (":predict", {}, "instances"),
        (":predict", {"instances": []}, "instances"),
        (":predict", {"instances": [{"image": "abc"}]}, "image"),
        (":predict", {"instances": [{"image": {"bytes": "abc"}}]}, "b64"),
        (":predict", {"instances": [{"image": {"b64": "%%%"}}]}, "not valid base64"),
        (":predict", {"instances": [instance(b"x", top_k=0)]}, "top_k"),
        (":explain", {"instances": [{"image": {"b64": "%%%"}}]}, "not valid base64"),
        (":explain", {"instances": [instance(b"x", class_idx="one")]}, "class_idx"),
    ],
)
def test_bad_bodies_are_400(client: TestClient, route: str, body: dict, words: str) -> None:
    message = assert_protocol_error(client.post(f"/v1/models/tiny{route}", json=body), 400)
    assert words in message


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"alpha": 2}, "alpha must lie in [0, 1], got 2.0."),
        ({"image_format": "gif"}, "image_format must be one of png, jpeg, webp"),
        ({"method": "SSCAM", "num_samples": 0}, "SSCAM: num_samples must lie in [1, 64], got 0."),
        ({"class_idx": -1}, "class_idx -1 is out of range"),
        # JSON integers of any size: 10**400 was a 500 (float() and isfinite overflowed), and
        # the class messages echoed its 401 digits
        (
            {"method": "SmoothGradCAMpp", "num_samples": 10**400},
            "num_samples must lie in [1, 64], got an integer of about 401 digits.",
        ),
        ({"class_idx": 10**400}, "class_idx an integer of about 401 digits is out of range"),
        (
            {"method": "FinerCAM", "comparison_idx": [10**400]},
            "comparison_idx [an integer of about 401 digits] out of range",
        ),
    ],
    ids=[
        "alpha",
        "format",
        "samples",
        "class",
        "samples-1e400",
        "class-1e400",
        "comparison-1e400",
    ],
)
def test_bad_explain_parameters_are_422_with_the_pipelines_message(
    client: TestClient, fields: dict, words: str
) -> None:
    body = {"instances": [instance(image_bytes(), **fields)]}
    message = assert_protocol_error(client.post("/v1/models/tiny:explain", json=body), 422)
    assert words in message and len(message) < 300


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"colour": "red"}, "Unknown explain parameter 'colour' (did you mean 'colormap'?);"),
        ({"alpha": "high"}, "alpha must be a number, got 'high'."),
    ],
)
def test_malformed_explain_parameters_are_400_with_the_pipelines_message(
    client: TestClient, fields: dict, words: str
) -> None:
    body = {"instances": [instance(image_bytes(), **fields)]}
    message = assert_protocol_error(client.post("/v1/models/tiny:explain", json=body), 400)
    assert words in message


def test_domain_errors_keep_their_status(client: TestClient) -> None:
    one = {"instances": [instance(image_bytes())]}
    assert_protocol_error(client.post("/v1/models/nope:predict", json=one), 404)
    assert_protocol_error(
        client.post("/v1/models/tiny:predict", json={"instances": [instance(b"junk")]}), 415
    )
    bad_method = {"instances": [instance(image_bytes(), method="nope")]}
    assert "Unknown method" in assert_protocol_error(
        client.post("/v1/models/tiny:explain", json=bad_method), 422
    )
    bad_class = {"instances": [instance(image_bytes(), class_idx=7)]}
    assert "out of range" in assert_protocol_error(
        client.post("/v1/models/tiny:explain", json=bad_class), 422
    )
    not_applicable = {"instances": [instance(image_bytes(), method="CAM")]}
    assert_protocol_error(client.post("/v1/models/vgg:explain", json=not_applicable), 422)
    wrong_option = {"instances": [instance(image_bytes(), method="GradCAM", num_samples=4)]}
    assert "does not take" in assert_protocol_error(
        client.post("/v1/models/tiny:explain", json=wrong_option), 422
    )


def test_api_key_and_limits(make_client: Callable[..., TestClient]) -> None:
    client = make_client(api_key="k", max_images=1)
    one = {"instances": [instance(image_bytes())]}
    assert_protocol_error(client.post("/v1/models/tiny:predict", json=one), 401)
    assert_protocol_error(client.get("/v1/models"), 401)
    key = {"X-API-Key": "k"}
    assert client.post("/v1/models/tiny:explain", json=one, headers=key).status_code == 200
    two = {"instances": [instance(image_bytes())] * 2}
    assert "at most 1" in assert_protocol_error(
        client.post("/v1/models/tiny:predict", json=two, headers=key), 422
    )


def test_a_get_on_a_verb_route_is_405_not_an_unknown_model(client: TestClient) -> None:
    for verb in ("predict", "explain"):
        response = client.get(f"/v1/models/tiny:{verb}")
        assert response.status_code == 405, response.text
        assert response.headers["allow"] == "POST"
        assert client.options(f"/v1/models/tiny:{verb}").headers["allow"] == "POST"
    assert client.get("/v1/models/tiny").json() == {"name": "tiny", "ready": True}


def test_an_unknown_model_is_named_before_the_images_are_read(client: TestClient) -> None:
    body = {"instances": [{"image": {"b64": "%%% not base64"}}]}
    for verb in ("predict", "explain"):
        response = client.post(f"/v1/models/nope:{verb}", json=body)
        assert response.status_code == 404 and "Unknown model 'nope'" in response.json()["error"]


def test_the_schema_examples_are_accepted_as_they_are(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    posted = 0
    for path in (
        "/v1/models/{name}:predict",
        "/v1/models/{name}:explain",
        "/v2/models/{name}/infer",
    ):
        content = paths[path]["post"]["requestBody"]["content"]["application/json"]
        schema = content["schema"]
        ref = schema["$ref"].rsplit("/", 1)[-1]
        components = client.get("/openapi.json").json()["components"]["schemas"]
        for example in components[ref]["examples"]:
            response = client.post(path.replace("{name}", "tiny"), json=example)
            assert response.status_code == 200, (path, response.text)
            posted += 1
    assert posted == 3


@pytest.mark.parametrize("verb", ["predict", "explain"])
def test_the_images_are_decoded_off_the_event_loop(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, verb: str
) -> None:
    # As the OIP route's: base64 of a full request took over a second on the loop.
    seen = calls_on_the_loop(monkeypatch, "app.http.protocols.kserve.decode_images")
    image = base64.b64encode(image_bytes()).decode()
    response = client.post(
        f"/v1/models/tiny:{verb}", json={"instances": [{"image": {"b64": image}}]}
    )
    assert response.status_code == 200, response.text
    assert seen == [False]
