"""Every listed torchvision detector explains a box, and every segmenter a region, on the CPU
with a tiny input and random weights."""

from __future__ import annotations

import pytest
import torch

from app.cam import METHODS
from app.models.loading import LoadedModel
from app.pipeline.decoding import Upload
from app.pipeline.explainer import ExplainParams
from app.pipeline.passes import CamPlan
from app.pipeline.tasks import PIPELINES
from app.pipeline.tasks.common import decode_whole
from tests.conftest import image_bytes
from tests.fixtures_tasks import DETECTORS, SEGMENTERS, loaded_task_model


def _plan(model: LoadedModel, method: str) -> CamPlan:
    return CamPlan(method, METHODS[method], model.target_layers, (), True)


@pytest.mark.parametrize("architecture", [*DETECTORS, *SEGMENTERS])
def test_explains_on_cpu(architecture: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    model = loaded_task_model(tmp_path_factory.mktemp("tasks"), architecture)
    assert isinstance(model, LoadedModel)
    decoded = decode_whole(Upload("x.png", image_bytes((80, 64), seed=1)), model.spec, 10**6)
    pipeline = PIPELINES[model.spec.task]
    detector = model.spec.task == "detection"
    params = ExplainParams(boxes=("0", "1") if detector else (), region=None)
    plans = [_plan(model, "GradCAM"), _plan(model, "EigenCAM")]
    run = pipeline.explain_image(model, decoded, 0, plans, params, {})
    per_plan = 2 if detector else 1
    assert len(run.explained) == 2 * per_plan
    for item in run.explained:
        assert item.cam.ndim == 2 and torch.isfinite(item.cam).all()
        assert 0.0 <= float(item.cam.min()) and float(item.cam.max()) <= 1.0
        x0, y0, x1, y1 = item.fields["box"]
        assert 0 <= x0 <= x1 <= 80 and 0 <= y0 <= y1 <= 64
    eigen = [item for item in run.explained if item.plan.method == "EigenCAM"]
    assert all(float(item.cam.max()) == pytest.approx(1.0) for item in eigen)
    if detector:
        found = run.answer["detections"]
        scores = [d.score for d in found]
        assert scores == sorted(scores, reverse=True) and len(found) >= 2
        assert [item.fields["detection"] for item in run.explained[:2]] == [0, 1]
        assert run.explained[0].fields["box"] == found[0].box
    else:
        assert sum(s.pixels for s in run.answer["segments"]) == 80 * 64
