"""A job's input survives the trip through a store, and its result size is bounded up front."""

from __future__ import annotations

import pytest
from fastapi import FastAPI

from app.errors import ResultTooLarge
from app.pipeline.decoding import Upload
from app.pipeline.explainer import ExplainParams
from app.pipeline.jobs.work import (
    Outcome,
    check_result_size,
    estimate_result_bytes,
    params_from_json,
    params_to_json,
    result_over,
)
from app.pipeline.results import ExplainResponse
from tests.conftest import image_bytes


def test_params_come_back_equal_from_json() -> None:
    params = ExplainParams(
        method="ScoreCAM,GradCAM",
        class_idx=(1, 2),
        target_layers=("layer3", "layer4"),
        outputs=("overlay", "raw"),
        size="input",
        options={"batch_size": 8, "seed": 0},
    )
    assert params_from_json(params_to_json(params)) == params


def test_the_estimate_grows_with_pictures_and_is_refused_past_the_limit(
    app: FastAPI, client: object
) -> None:
    explainer = app.state.explainer
    small = [Upload("a.png", image_bytes(size=(40, 32)))]
    large = [Upload("a.png", image_bytes(size=(400, 320)))]
    png = ExplainParams(outputs=("overlay", "heatmap"), image_format="png")
    jpeg = ExplainParams(outputs=("overlay", "heatmap"), image_format="jpeg")
    assert estimate_result_bytes(explainer, None, small, png) < estimate_result_bytes(
        explainer, None, large, png
    )
    assert estimate_result_bytes(explainer, None, large, jpeg) < estimate_result_bytes(
        explainer, None, large, png
    )
    # 400 x 320 pictures, two of them, 4 bytes a pixel in base64 PNG at most.
    assert estimate_result_bytes(explainer, None, large, png) >= 2 * 400 * 320 * 4
    with pytest.raises(ResultTooLarge, match="CAMSERVE_JOB_MAX_RESULT_BYTES"):
        check_result_size(explainer, None, large, png, limit=1_000_000)
    check_result_size(explainer, None, small, png, limit=1_000_000)


def test_a_result_over_the_limit_fails_with_result_too_large() -> None:
    """The check after the run (the estimate at creation is an upper bound): both stores."""
    result = ExplainResponse.model_validate(ExplainResponse.model_json_schema()["examples"][0])
    size = len(result.model_dump_json())
    kept = result_over(Outcome("succeeded", result=result), size)
    assert kept.status == "succeeded" and kept.result is result
    over = result_over(Outcome("succeeded", result=result), size - 1)
    assert over.status == "failed" and over.result is None
    assert over.error is not None and over.error.code == "result_too_large"
    assert "CAMSERVE_JOB_MAX_RESULT_BYTES" in over.error.message
