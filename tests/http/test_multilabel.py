"""A multi-label classifier (``[model] probabilities = "sigmoid"``): its predictions, its
explanations, their faithfulness scores and DFF's concept labels read each class's sigmoid, not
a softmax over the classes; /models says which rule a model has; a detector or segmenter, or
an unknown rule, is refused in its manifest."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from app.cam import ClassProbability
from app.cam.faithfulness import auc, confidence_change, confidence_drop, perturbation_curve
from app.http.app import create_app
from app.models.loading import load_model
from app.models.manifest import ManifestError, parse_manifest
from app.pipeline.decoding import Upload, decode_upload
from app.settings import Settings
from tests.conftest import files, image_bytes, wait_ready
from tests.fixtures_models import build_tiny, fixture_access, write_model

SIGMOID = 'probabilities = "sigmoid"'


def _write(store: Path, name: str, extra: str) -> Path:
    torch.manual_seed(7)
    return write_model(
        store,
        name,
        build_tiny(num_classes=4),
        architecture="tests.fixtures_models:build_tiny",
        num_classes=4,
        input_size=32,
        target_layers=["features"],
        kwargs=f"kwargs = {{ num_classes = 4 }}\n{extra}",
    )


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("multilabel")
    _write(root, "tags", SIGMOID)
    _write(root, "single", "")  # the same weights, one class per image
    return root


@pytest.fixture(scope="module")
def client(store: Path) -> Iterator[TestClient]:
    settings = Settings(model_store=store, default_model="tags", device="cpu", cache_mb=0)
    with TestClient(create_app(settings)) as test_client:
        wait_ready(test_client)
        yield test_client


def _sigmoid(x: float) -> float:
    return float(torch.sigmoid(torch.tensor(x)))


def test_predictions_are_each_classs_sigmoid(client: TestClient) -> None:
    response = client.post("/predict", files=files(image_bytes(seed=3)), data={"top_k": "4"})
    assert response.status_code == 200, response.text
    predictions = response.json()["results"][0]["predictions"]
    assert len(predictions) == 4
    for p in predictions:
        assert p["probability"] == pytest.approx(_sigmoid(p["logit"]), abs=1e-6)
    assert sum(p["probability"] for p in predictions) != pytest.approx(1.0, abs=1e-3)
    assert [p["probability"] for p in predictions] == sorted(
        (p["probability"] for p in predictions), reverse=True
    )
    single = client.post(
        "/predict", files=files(image_bytes(seed=3)), data={"top_k": "4", "model": "single"}
    ).json()["results"][0]["predictions"]
    assert sum(p["probability"] for p in single) == pytest.approx(1.0, abs=1e-5)
    assert [p["class_idx"] for p in single] == [p["class_idx"] for p in predictions]


def test_models_say_which_rule_each_model_has(client: TestClient) -> None:
    listed = {m["name"]: m for m in client.get("/models").json()["models"]}
    assert listed["tags"]["probabilities"] == "sigmoid"
    assert listed["single"]["probabilities"] == "softmax"
    assert client.get("/models/tags").json()["probabilities"] == "sigmoid"


def _explain(client: TestClient, **form: str) -> dict[str, Any]:
    response = client.post("/explain", files=files(image_bytes(seed=3)), data=form)
    assert response.status_code == 200, response.text
    return response.json()


def test_explanations_and_their_scores_follow_the_sigmoid(store: Path, client: TestClient) -> None:
    """Each explained class's probability is its sigmoid, and its map's deletion, insertion and
    confidence scores are the engine's with that class's sigmoid as the target, recomputed
    here from the model alone; a softmax would have given other scores."""
    steps = 8
    body = _explain(
        client,
        method="GradCAM",
        output="raw",
        classes="0,2",
        faithfulness="deletion,insertion,confidence",
        faithfulness_steps=str(steps),
    )
    model = load_model(
        parse_manifest(store / "tags", access=fixture_access(store)), torch.device("cpu")
    )
    upload = Upload("img.png", image_bytes(seed=3))
    x = decode_upload(upload, model.spec, 10**7, None).tensor[None]
    explanations = body["results"][0]["explanations"]
    assert [e["class_idx"] for e in explanations] == [0, 2]
    for explanation in explanations:
        assert explanation["probability"] == pytest.approx(_sigmoid(explanation["logit"]), abs=1e-6)
        [one] = explanation["maps"]
        cam = torch.tensor(one["raw"]["values"], dtype=torch.float32)[None]
        target = ClassProbability(explanation["class_idx"], "sigmoid")
        scores = one["faithfulness"]
        for mode in ("deletion", "insertion"):
            curve = perturbation_curve(model.module, x, cam, None, mode, steps, targets=target)
            assert scores[f"{mode}_auc"] == pytest.approx(float(auc(*curve)[0]), abs=1e-5)
            by_softmax = perturbation_curve(
                model.module, x, cam, [explanation["class_idx"]], mode, steps
            )
            assert scores[f"{mode}_auc"] != pytest.approx(float(auc(*by_softmax)[0]), abs=1e-4)
        before, after = confidence_change(model.module, x, cam, None, targets=target)
        assert scores["confidence_drop"] == pytest.approx(
            float(confidence_drop(before, after)[0]), abs=1e-5
        )
        assert float(before[0]) == pytest.approx(explanation["probability"], abs=1e-6)


def test_dff_concepts_labels_use_the_sigmoid(client: TestClient) -> None:
    body = _explain(client, method="DFF", output="raw", n_components="2")
    for concept in body["results"][0]["explanations"][0]["concepts"]:
        for label in concept["top_labels"]:
            assert label["probability"] == pytest.approx(_sigmoid(label["score"]), abs=1e-6)


@pytest.mark.parametrize(
    ("task", "line", "words"),
    [
        ("classification", 'probabilities = "relu"', "softmax"),
        ("detection", SIGMOID, "is for classification models"),
        ("segmentation", 'probabilities = "softmax"', "is for classification models"),
    ],
)
def test_the_manifest_refuses_a_rule_it_cannot_use(
    tmp_path: Path, task: str, line: str, words: str
) -> None:
    folder = _write(tmp_path, "bad", line)
    manifest = folder / "model.toml"
    manifest.write_text(f'task = "{task}"\n' + manifest.read_text())
    with pytest.raises(ManifestError) as refused:
        parse_manifest(folder, access=fixture_access(tmp_path))
    assert words in str(refused.value) and "probabilities" in str(refused.value)
