"""A detector's and a segmenter's pass on a CUDA device answer as on the CPU: the shipped
``shapes-detect`` and ``shapes-segment``, one forward for the answer and both gradient methods'
maps, every box in one map call, D-RISE's masks drawn and run on the device, and the maps'
faithfulness scores. Skipped without CUDA."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from PIL import Image

from app.cam import METHODS
from app.models.loading import LoadedModel, load_model
from app.models.manifest import parse_manifest
from app.models.zoo.shapes_dataset import make_pairs
from app.pipeline.decoding import DecodedImage, Upload
from app.pipeline.explainer import ExplainParams
from app.pipeline.faithfulness import ScoreItem, Scoring, run_scoring_pass
from app.pipeline.passes import CamPlan
from app.pipeline.tasks import PIPELINES
from app.pipeline.tasks.base import ImageRun, TaskItem
from app.pipeline.tasks.common import decode_whole

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")

STORE = Path(__file__).resolve().parents[3] / "model_store"
DEVICES = ("cpu", "cuda")


def _decoded(model: LoadedModel) -> DecodedImage:
    images, _, _ = make_pairs(1, 2026, 64)
    buffer = io.BytesIO()
    Image.fromarray(images[0]).save(buffer, format="PNG")
    return decode_whole(Upload("scene.png", buffer.getvalue()), model.spec, 10**6)


def _run(name: str, device: str, methods: tuple[str, ...], **options: object) -> ImageRun:
    model: LoadedModel = load_model(parse_manifest(STORE / name), torch.device(device))
    decoded = _decoded(model)
    detector = model.spec.task == "detection"
    params = ExplainParams(boxes=("all",)) if detector else ExplainParams()
    plans = [
        CamPlan(m, METHODS[m], model.target_layers, tuple(sorted(options.items())), True)
        for m in methods
    ]
    pipeline = PIPELINES[model.spec.task]
    return pipeline.explain_images(model, [TaskItem(decoded, 0, params)], plans, {})[0]


@pytest.mark.parametrize("name", ["shapes-detect", "shapes-segment"])
def test_a_task_pass_on_cuda_answers_as_on_the_cpu(name: str) -> None:
    runs = {device: _run(name, device, ("LayerCAM", "GradCAM")) for device in DEVICES}
    cpu, cuda = runs["cpu"], runs["cuda"]
    assert cuda.counted is not None and cuda.counted.calls == 1  # answer and maps: one forward
    if name == "shapes-detect":
        found = {d: [(x.class_idx, x.box) for x in r.answer["detections"]] for d, r in runs.items()}
        assert [c for c, _ in found["cuda"]] == [c for c, _ in found["cpu"]]
        for (_, a), (_, b) in zip(found["cuda"], found["cpu"], strict=True):
            assert max(abs(p - q) for p, q in zip(a, b, strict=True)) <= 1.0
    else:
        classes = {d: [s.class_idx for s in r.answer["segments"]] for d, r in runs.items()}
        assert classes["cuda"] == classes["cpu"]
    assert len(cuda.explained) == len(cpu.explained) > 0
    for on_gpu, on_cpu in zip(cuda.explained, cpu.explained, strict=True):
        assert on_gpu.plan.method == on_cpu.plan.method and on_gpu.cam.device.type == "cpu"
        difference = (on_gpu.cam - on_cpu.cam).abs()
        # cuDNN's convolutions may run in TF32: close, not equal.
        assert float(difference.mean()) <= 2e-3 and float(difference.max()) <= 5e-2


def test_drise_runs_its_masks_on_cuda() -> None:
    run = _run("shapes-detect", "cuda", ("DRISE",), masks=64, seed=5)
    assert len(run.explained) == len(run.answer["detections"]) >= 2
    for item in run.explained:
        assert item.cam.shape == (64, 64) and bool(torch.isfinite(item.cam).all())
        assert 0.0 <= float(item.cam.min()) and float(item.cam.max()) == pytest.approx(1.0)


@pytest.mark.parametrize("name", ["shapes-detect", "shapes-segment"])
def test_a_task_maps_faithfulness_scores_on_cuda_as_on_the_cpu(name: str) -> None:
    """The scoring pass of a box's or region's map on CUDA: the detection's similarity or the
    region's probability read from outputs on the device, the same areas as on the CPU."""
    scores = {}
    for device in DEVICES:
        model = load_model(parse_manifest(STORE / name), torch.device(device))
        run = _run(name, device, ("LayerCAM",))
        decoded_tensor = _decoded(model).tensor[None]
        items = [ScoreItem(decoded_tensor, ((e.cam[None], (e.judged_by,)),)) for e in run.explained]
        wanted = Scoring(("deletion", "insertion", "confidence"), 8)
        scores[device] = [
            (s.deletion_auc, s.insertion_auc, s.confidence_drop)
            for per_item in run_scoring_pass(model, wanted, items)
            for per_map in per_item
            for s in per_map
        ]
    assert len(scores["cuda"]) == len(scores["cpu"]) > 0
    for on_gpu, on_cpu in zip(scores["cuda"], scores["cpu"], strict=True):
        assert on_gpu == pytest.approx(on_cpu, abs=2e-2)
