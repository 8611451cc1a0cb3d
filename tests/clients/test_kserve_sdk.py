"""The kserve SDK's REST client (v1 and v2) against a real camserve, in a process of its own
(kserve_calls.py says why)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.clients.conftest import IMAGES, IMAGES_B64, explain_raw, predict_logits

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def results(server: str) -> dict[str, Any]:
    run = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("kserve_calls.py"))],
        input=json.dumps({"url": server, "images": IMAGES_B64}),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    answer: dict[str, Any] = json.loads(run.stdout)
    return answer


def test_health_and_readiness(results: dict[str, Any]) -> None:
    assert results["v2_live"] and results["v2_ready"] and results["v2_model_ready"]
    assert results["v1_live"] and results["v1_model_ready"]  # v1 liveness is GET /


def test_binary_infer_gives_the_logits_of_predict(results: dict[str, Any], server: str) -> None:
    expected = np.asarray(predict_logits(server, IMAGES, "resnet"), np.float32)
    assert np.array_equal(np.asarray(results["binary_logits"], np.float32), expected)


def test_json_infer_with_the_cam_output(results: dict[str, Any], server: str) -> None:
    assert results["cam_shape"][0] == 2 and results["cam_method"] == "GradCAM"
    expected = np.asarray(explain_raw(server, IMAGES, "tiny", "GradCAM")[0], np.float32)
    assert np.array_equal(np.asarray(results["cam"], np.float32), expected)


def test_v1_predict(results: dict[str, Any], server: str) -> None:
    logits = predict_logits(server, IMAGES, "resnet")
    for predicted, row in zip(results["v1_predictions"], logits, strict=True):
        top = predicted["predictions"][0]
        assert top["class_idx"] == int(np.argmax(row))
        assert top["logit"] == pytest.approx(max(row), abs=1e-6)


def test_errors_read_through_the_client(results: dict[str, Any]) -> None:
    errors = results["errors"]
    assert "Unknown model 'nope'" in errors["unknown_model"] and "404" in errors["unknown_model"]
    assert "no parameter 'temperature'" in errors["unknown_parameter"]
    assert "not valid base64" in errors["v1_bad_base64"]
