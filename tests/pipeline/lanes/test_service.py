"""The service on the tensor lane (the CUDA lane's code, on the CPU here): the same answers as on
the CPU lane, through HTTP, and ``CAMSERVE_IMAGE_LANE=cpu`` keeps the CPU lane."""

from __future__ import annotations

import base64
import io

import numpy as np
import torch
from PIL import Image

from app.pipeline.lanes.cpu import CpuLane
from app.pipeline.lanes.tensor import TensorLane
from tests.conftest import files
from tests.pipeline.lanes.helpers import encoded, photo
from tests.pipeline.lanes.test_drawing import _psnr

FIELDS = {"model": "tiny", "method": "GradCAM", "class_idx": "1", "output": ["overlay", "raw"]}


def _answer(client, data: bytes, **fields):  # type: ignore[no-untyped-def]
    response = client.post("/explain", files=files(data, name="p.jpg"), data={**FIELDS, **fields})
    assert response.status_code == 200, response.text
    return response.json()["results"][0]["explanations"][0]["maps"][0]


def _picture(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def test_the_tensor_lane_answers_as_the_cpu_lane(make_client) -> None:  # type: ignore[no-untyped-def]
    client = make_client()
    explainer = client.app.state.explainer
    model = explainer.registry.get("tiny")
    assert isinstance(explainer.lane(model), CpuLane)
    data = encoded(photo((160, 120)), "JPEG", 6)
    for fields in ({}, {"image_format": "png", "size": "input"}):
        want = _answer(client, data, **fields)
        explainer._lanes[model.device] = lane = TensorLane(torch.device("cpu"))
        got = _answer(client, data, **fields)
        explainer._lanes.clear()
        assert lane.jpegs.calls == [1]
        assert {k: got[k] for k in ("width", "height", "region")} == {
            k: want[k] for k in ("width", "height", "region")
        }
        # The inputs differ by about a level (resampling), so the maps move a little.
        gap = np.abs(np.asarray(got["raw"]["values"]) - np.asarray(want["raw"]["values"]))
        assert float(gap.mean()) <= 0.01
        assert _psnr(_picture(got["overlay"]), _picture(want["overlay"])) >= 30


def test_image_lane_cpu_keeps_the_cpu_lane(make_client) -> None:  # type: ignore[no-untyped-def]
    client = make_client(image_lane="cpu")
    explainer = client.app.state.explainer
    assert explainer.image_lane == "cpu"
    assert isinstance(explainer.lane(explainer.registry.get("tiny")), CpuLane)
