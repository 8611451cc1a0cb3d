"""OIP v2 ``infer`` of the shipped ``shapes-detect`` at the edges of its answers: an image it
finds nothing in, with ``cam`` asked for every box, in JSON and in binary."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.http.app import create_app
from app.settings import Settings
from tests.conftest import calls_on_the_loop, wait_ready
from tests.fixtures_tasks import copy_shapes_task_models
from tests.http.protocols.test_oip import binary_body, binary_outputs


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    store = tmp_path_factory.mktemp("oip-tasks")
    copy_shapes_task_models(store)
    settings = Settings(model_store=store, default_model="shapes-detect", device="cpu")
    with TestClient(create_app(settings)) as test_client:
        wait_ready(test_client)
        yield test_client


def _blank() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_no_detection_gives_an_empty_cam_in_json_and_binary(client: TestClient) -> None:
    """``box=all`` on a black image (the trained detector finds no shape there): the ``cam``
    output is an empty [0, 0, 0] tensor and ``boxes`` an empty [0, 4]; it was a 500."""
    predicted = client.post("/predict", files=[("file", ("b.png", _blank(), "image/png"))])
    assert predicted.json()["results"][0]["detections"] == []
    body = {
        "inputs": [
            {
                "name": "image",
                "shape": [1],
                "datatype": "BYTES",
                "data": [base64.b64encode(_blank()).decode()],
            }
        ],
        "outputs": [{"name": "cam"}, {"name": "boxes"}],
        "parameters": {"box": "all", "faithfulness": "deletion"},
    }
    response = client.post("/v2/models/shapes-detect/infer", json=body)
    assert response.status_code == 200, response.text
    shown = {o["name"]: o for o in response.json()["outputs"]}
    assert shown["cam"]["shape"] == [0, 0, 0] and shown["cam"]["data"] == []
    assert shown["cam"]["parameters"]["method"] == "LayerCAM"
    assert "deletion_auc" not in shown["cam"]["parameters"]  # no map, no score
    assert shown["boxes"]["shape"] == [0, 4]
    outputs = [{"name": n, "parameters": {"binary_data": True}} for n in ("cam", "boxes")]
    raw, headers = binary_body(_blank(), outputs=outputs, parameters={"box": "all"})
    response = client.post("/v2/models/shapes-detect/infer", content=raw, headers=headers)
    assert response.status_code == 200, response.text
    header, buffers = binary_outputs(response)
    assert [o["shape"] for o in header["outputs"]] == [[0, 0, 0], [0, 4]]
    assert buffers == {"cam": b"", "boxes": b""}
    assert np.frombuffer(buffers["cam"], dtype="<f4").size == 0


def test_the_mask_is_made_off_the_event_loop(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each image's mask PNG decoded and stacked into a pixel list on the loop: a second for 16
    # images of 1024x1024, every other request waiting.
    seen = calls_on_the_loop(monkeypatch, "app.protocols.oip.predicted_outputs")
    body = {
        "inputs": [
            {
                "name": "image",
                "shape": [1],
                "datatype": "BYTES",
                "data": [base64.b64encode(_blank()).decode()],
            }
        ],
        "outputs": [{"name": "mask"}],
    }
    response = client.post("/v2/models/shapes-segment/infer", json=body)
    assert response.status_code == 200, response.text
    mask = response.json()["outputs"][0]
    assert mask["shape"] == [1, 64, 64] and all(type(v) is int for v in mask["data"])
    assert seen == [False]
