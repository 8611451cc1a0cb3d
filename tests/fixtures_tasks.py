"""Manifests of torchvision detectors and segmenters with random weights (nothing downloaded),
small enough to load and explain on the CPU in a test; the shipped shapes task models and their
held-out scenes."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

from PIL import Image

from app.models.zoo.shapes_dataset import make_pairs

#: (architecture, kwargs) of every torchvision detector the service serves; the inputs are kept
#: tiny (the R-CNN family, RetinaNet and FCOS resize to min_size; SSD to its own size), and no
#: score threshold cuts the random model's detections.
DETECTORS: dict[str, str] = {
    "fasterrcnn_resnet50_fpn": "min_size = 64, max_size = 96, box_score_thresh = 0.0",
    "fasterrcnn_resnet50_fpn_v2": "min_size = 64, max_size = 96, box_score_thresh = 0.0",
    "maskrcnn_resnet50_fpn": "min_size = 64, max_size = 96, box_score_thresh = 0.0",
    "retinanet_resnet50_fpn": "min_size = 64, max_size = 96, score_thresh = 0.0",
    "fcos_resnet50_fpn": "min_size = 64, max_size = 96, score_thresh = 0.0",
    "ssd300_vgg16": "score_thresh = 0.0",
    "ssdlite320_mobilenet_v3_large": "score_thresh = 0.0",
}
SEGMENTERS: dict[str, str] = {
    "deeplabv3_resnet50": "aux_loss = false",
    "fcn_resnet50": "aux_loss = false",
    "lraspp_mobilenet_v3_large": "",
}


def write_task_model(
    store: Path,
    name: str,
    architecture: str,
    task: str,
    *,
    kwargs: str = "",
    num_classes: int = 3,
    size: int = 64,
    extra: str = "",
) -> Path:
    """A random-weights torchvision model of ``task`` as ``store/name``."""
    folder = store / name
    folder.mkdir(parents=True, exist_ok=True)
    labels = ["background", *(f"thing{i}" for i in range(1, num_classes))]
    (folder / "labels.txt").write_text("\n".join(labels) + "\n")
    (folder / "model.toml").write_text(
        f"""description = "random {architecture}"
task = "{task}"

[model]
architecture = "{architecture}"
kwargs = {{ num_classes = {num_classes}{", " + kwargs if kwargs else ""} }}
weights = "random"
num_classes = {num_classes}
labels = "labels.txt"

[preprocess]
input_shape = [3, {size}, {size}]
mean = [0.0, 0.0, 0.0]
std = [1.0, 1.0, 1.0]
{extra}
"""
    )
    return folder


_LOADED: dict[str, object] = {}


def loaded_task_model(tmp_root: Path, architecture: str) -> object:
    """The random ``architecture`` loaded on the CPU (once per test session: loading a
    ResNet-50 detector takes seconds)."""
    if architecture not in _LOADED:
        import torch

        from app.models.loading import load_model
        from app.models.manifest import parse_manifest

        task = "detection" if architecture in DETECTORS else "segmentation"
        kwargs = DETECTORS.get(architecture, SEGMENTERS.get(architecture, ""))
        extra = (
            "[detection]\nscore_threshold = 0.0\nmax_detections = 5\n"
            if task == "detection"
            else ""
        )
        folder = write_task_model(
            tmp_root, architecture, architecture, task, kwargs=kwargs, extra=extra
        )
        torch.manual_seed(0)
        _LOADED[architecture] = load_model(parse_manifest(folder), torch.device("cpu"))
    return _LOADED[architecture]


#: The shipped model store (``shapes-detect`` and ``shapes-segment``: trained, tiny).
SHIPPED_STORE = Path(__file__).resolve().parents[1] / "model_store"
SHAPES_TASK_MODELS = ("shapes-detect", "shapes-segment")


def copy_shapes_task_models(store: Path) -> None:
    """Put the shipped ``shapes-detect`` and ``shapes-segment`` into ``store``."""
    for name in SHAPES_TASK_MODELS:
        shutil.copytree(SHIPPED_STORE / name, store / name)


def shapes_scene(index: int, size: int = 64) -> bytes:
    """Held-out scene ``index`` (0 to 2) of two shapes (``make_pairs``, seed 2026), as a PNG
    of ``size`` pixels a side."""
    images, _, _ = make_pairs(3, 2026, 64)
    picture = Image.fromarray(images[index])
    if size != 64:
        picture = picture.resize((size, size))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()
