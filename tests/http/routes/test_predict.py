"""/predict: one batched forward, top-k with labels, logits and probabilities."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tests.conftest import assert_error, files, image_bytes


def test_predict_one(client: TestClient) -> None:
    response = client.post("/predict", files=files(image_bytes()), data={"top_k": "2"})
    assert response.status_code == 200
    body = response.json()
    assert body["model"] == "tiny"
    result = body["results"][0]
    assert (result["width"], result["height"]) == (40, 32)
    assert len(result["predictions"]) == 2
    probabilities = [p["probability"] for p in result["predictions"]]
    assert probabilities == sorted(probabilities, reverse=True)
    assert result["predictions"][0]["label"].startswith("tiny_class")
    assert set(body["timings"]) == {
        "decode_ms",
        "queue_ms",
        "forward_ms",
        "total_ms",
        "batch_images",
    }


def test_batch_equals_single_requests(client: TestClient) -> None:
    images = [image_bytes(seed=s) for s in range(3)]
    batch = client.post("/predict", files=files(*images), data={"model": "resnet"}).json()
    for i, data in enumerate(images):
        single = client.post("/predict", files=files(data), data={"model": "resnet"}).json()
        for a, b in zip(
            single["results"][0]["predictions"],
            batch["results"][i]["predictions"],
            strict=True,
        ):
            assert a["class_idx"] == b["class_idx"]
            assert a["logit"] == pytest.approx(b["logit"], abs=1e-4)


def test_top_k_is_capped_by_classes(client: TestClient) -> None:
    body = client.post("/predict", files=files(image_bytes()), data={"top_k": "50"}).json()
    assert len(body["results"][0]["predictions"]) == 3


def test_predict_errors(client: TestClient) -> None:
    assert_error(client.post("/predict", data={"top_k": "1"}), 422, "validation_error")
    assert_error(
        client.post("/predict", files=files(image_bytes()), data={"model": "nope"}),
        404,
        "model_not_found",
    )
    assert_error(
        client.post("/predict", files=files(image_bytes()), data={"top_k": "0"}),
        422,
        "validation_error",
    )
