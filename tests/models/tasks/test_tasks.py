"""Every listed torchvision detector and segmenter loads from a manifest with random weights,
with its task's preset target layer and methods; a manifest's task and task tables are checked."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.models.loading import LoadedModel
from app.models.manifest import ManifestError, parse_manifest
from app.models.tasks import TASKS
from tests.fixtures_tasks import DETECTORS, SEGMENTERS, loaded_task_model, write_task_model

PRESETS = {
    "fasterrcnn_resnet50_fpn": "backbone.body.layer4",
    "fasterrcnn_resnet50_fpn_v2": "backbone.body.layer4",
    "maskrcnn_resnet50_fpn": "backbone.body.layer4",
    "retinanet_resnet50_fpn": "backbone.body.layer4",
    "fcos_resnet50_fpn": "backbone.body.layer4",
    "ssd300_vgg16": "backbone.features",
    "ssdlite320_mobilenet_v3_large": "backbone.features.1",
    "deeplabv3_resnet50": "backbone.layer4",
    "fcn_resnet50": "backbone.layer4",
    "lraspp_mobilenet_v3_large": "backbone.16",
}


@pytest.mark.parametrize("architecture", [*DETECTORS, *SEGMENTERS])
def test_loads_with_random_weights_and_preset_layer(
    architecture: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    model = loaded_task_model(tmp_path_factory.mktemp("tasks"), architecture)
    assert isinstance(model, LoadedModel)
    task = "detection" if architecture in DETECTORS else "segmentation"
    assert model.spec.task == task
    assert model.target_layers == (PRESETS[architecture],)
    assert len(model.layer_shapes[PRESETS[architecture]]) == 4
    assert set(model.applicable_methods) == set(TASKS[task].methods or ())
    assert model.methods["ScoreCAM"] is not None
    assert f"cannot explain a {task} model" in model.methods["ScoreCAM"]


def test_task_defaults_to_classification(tmp_path: Path) -> None:
    folder = write_task_model(tmp_path, "m", "fcn_resnet50", "segmentation")
    text = (folder / "model.toml").read_text().replace('task = "segmentation"\n', "")
    (folder / "model.toml").write_text(text)
    assert parse_manifest(folder).task == "classification"


def test_unknown_task_is_refused(tmp_path: Path) -> None:
    folder = write_task_model(tmp_path, "m", "fcn_resnet50", "tracking")
    with pytest.raises(ManifestError, match="task"):
        parse_manifest(folder)


def test_detection_table_needs_the_detection_task(tmp_path: Path) -> None:
    folder = write_task_model(
        tmp_path, "m", "fcn_resnet50", "segmentation", extra="[detection]\nmax_detections = 3\n"
    )
    with pytest.raises(ManifestError, match=r"\[detection\] is for task = 'detection'"):
        parse_manifest(folder)


def test_detection_keys_reach_the_spec(tmp_path: Path) -> None:
    folder = write_task_model(
        tmp_path,
        "m",
        "fcos_resnet50_fpn",
        "detection",
        extra="[detection]\nscore_threshold = 0.25\nmax_detections = 7\nmax_side = 320\n",
    )
    spec = parse_manifest(folder)
    assert (spec.score_threshold, spec.max_detections, spec.max_side) == (0.25, 7, 320)


def test_score_threshold_is_bounded(tmp_path: Path) -> None:
    folder = write_task_model(
        tmp_path,
        "m",
        "fcos_resnet50_fpn",
        "detection",
        extra="[detection]\nscore_threshold = 2.0\n",
    )
    with pytest.raises(ManifestError, match="score_threshold"):
        parse_manifest(folder)


def test_a_classifier_output_is_refused_as_detection(tmp_path: Path) -> None:
    import torch

    from app.models.loading import load_model

    folder = write_task_model(tmp_path, "m", "resnet18", "detection", num_classes=3)
    with pytest.raises(ManifestError, match='task = "detection" needs a model that answers'):
        load_model(parse_manifest(folder), torch.device("cpu"))
