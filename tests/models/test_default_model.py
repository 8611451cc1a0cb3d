"""The shipped model_store/shapes through the whole service: right label, map on the shape."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.http.app import create_app
from app.settings import Settings
from tests.conftest import wait_ready

STORE = Path(__file__).resolve().parents[2] / "model_store"
pytestmark = pytest.mark.skipif(
    not (STORE / "shapes" / "weights.pt").is_file(), reason="model_store/shapes is not built"
)


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with TestClient(create_app(Settings(model_store=STORE, device="cpu"))) as test_client:
        wait_ready(test_client)
        yield test_client


def test_shapes_model_explains_the_shape(client: TestClient) -> None:
    from app.models.zoo.shapes_dataset import generate_sample

    hits = 0
    for seed in range(10_000, 10_004):
        sample = generate_sample(np.random.default_rng(seed))
        buffer = io.BytesIO()
        Image.fromarray(sample.image).save(buffer, format="PNG")
        response = client.post(
            "/explain",
            files=[("file", ("s.png", buffer.getvalue(), "image/png"))],
            data={"output": "raw"},
        )
        assert response.status_code == 200, response.text
        result = response.json()["results"][0]
        assert result["predictions"][0]["label"] == sample.label_name
        raw = np.array(result["explanations"][0]["maps"][0]["raw"]["values"])
        mask = np.asarray(sample.mask, dtype=bool)
        peak = np.unravel_index(raw.argmax(), raw.shape)
        scale = mask.shape[0] // raw.shape[0]
        hits += bool(
            mask[
                peak[0] * scale : (peak[0] + 1) * scale, peak[1] * scale : (peak[1] + 1) * scale
            ].any()
        )
    assert hits >= 3  # the map's peak falls on the shape
