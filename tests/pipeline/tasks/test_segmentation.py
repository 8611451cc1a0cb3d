"""The segmenter's label mask at the upload's size; several classes of an image explained in
one pass (``classes``, ``top_classes``) on the shipped ``shapes-segment``."""

from __future__ import annotations

import io
from pathlib import Path

import torch
from PIL import Image

from app.cam import METHODS
from app.models.loading import load_model
from app.models.manifest import parse_manifest
from app.models.zoo.shapes_dataset import make_pairs
from app.pipeline.decoding import Box, DecodedImage, Upload
from app.pipeline.explainer import ExplainParams
from app.pipeline.passes import CamPlan
from app.pipeline.tasks import PIPELINES
from app.pipeline.tasks.base import ImageRun, TaskItem
from app.pipeline.tasks.common import decode_whole
from app.pipeline.tasks.segmentation import upload_labels


def test_labels_resized_to_the_upload_are_writable() -> None:
    # torch.from_numpy warns (once per process, in the server's log) on a read-only array.
    image = Image.new("RGB", (8, 6))
    decoded = DecodedImage("x.png", image, (8, 6), torch.zeros(3, 3, 4), Box(0, 0, 4, 3))
    logits = torch.zeros(2, 3, 4)
    logits[1, :, 2:] = 1.0
    labels = upload_labels(decoded, logits)
    assert labels.shape == (6, 8) and labels.flags.writeable
    assert (labels[:, 4:] == 1).all() and (labels[:, :4] == 0).all()


STORE = Path(__file__).resolve().parents[3] / "model_store"


def _scene_run(params: ExplainParams, methods: tuple[str, ...] = ("LayerCAM",)) -> ImageRun:
    model = load_model(parse_manifest(STORE / "shapes-segment"), torch.device("cpu"))
    images, _, _ = make_pairs(1, 2026, 64)
    buffer = io.BytesIO()
    Image.fromarray(images[0]).save(buffer, format="PNG")
    decoded = decode_whole(Upload("scene.png", buffer.getvalue()), model.spec, 10**6)
    plans = [CamPlan(m, METHODS[m], model.target_layers, (), True) for m in methods]
    pipeline = PIPELINES["segmentation"]
    return pipeline.explain_images(model, [TaskItem(decoded, 0, params)], plans, {})[0]


def _segment_classes(run: ImageRun) -> list[int]:
    return [s.class_idx for s in run.answer["segments"]]


def test_top_classes_explains_the_largest_shapes_from_one_forward() -> None:
    """``top_classes=K``: the K largest classes present but the background, largest first, fewer
    when fewer are present; every class's map equals its map asked for alone (class_idx), and
    the pass runs one forward for all of them."""
    run = _scene_run(ExplainParams(top_classes=5), ("LayerCAM", "GradCAM"))
    shapes = [c for c in _segment_classes(run) if c != 0]
    assert len(shapes) == 2  # a scene holds two shapes
    assert run.counted is not None and run.counted.calls == 1
    by_method: dict[str, list[int]] = {}
    for explained in run.explained:
        by_method.setdefault(explained.plan.method, []).append(explained.fields["class_idx"])
    assert by_method == {"LayerCAM": shapes, "GradCAM": shapes}
    for explained in run.explained:
        alone = _scene_run(
            ExplainParams(class_idx=(explained.fields["class_idx"],)), (explained.plan.method,)
        ).explained[0]
        assert alone.fields == explained.fields
        assert torch.allclose(alone.cam, explained.cam, atol=1e-6)


def test_classes_explains_each_listed_class_in_order() -> None:
    shapes = [c for c in _segment_classes(_scene_run(ExplainParams())) if c != 0]
    listed = (shapes[1], shapes[0])
    run = _scene_run(ExplainParams(classes=listed))
    assert [e.fields["class_idx"] for e in run.explained] == list(listed)
    one = _scene_run(ExplainParams(top_classes=1))
    assert [e.fields["class_idx"] for e in one.explained] == shapes[:1]
