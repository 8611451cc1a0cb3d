"""Pointing game of the detection and segmentation models of the default store.

On held-out synthetic scenes of two shapes (``make_pairs``, a seed the training never saw),
for every shape:

* ``shapes-detect``: the detection of the shape's class is explained (Grad-CAM on its box's
  score, as ``/explain box=K`` does; D-RISE by the similarity of masked images' detections to
  it); a hit when the map's peak lies inside the shape's true box.
* ``shapes-segment``: the shape's class is explained over its predicted mask (``region=mask``);
  a hit when the map's peak lies inside the shape's true mask (``peak_in_true_box``: inside
  its true box, the looser test).

Random maps (seeded uniform noise at the map's resolution) are the baseline. A map's peak is
the centre of its highest cell, in the image's pixels.
A shape the model misses (no detection of its class; its class predicted nowhere) counts as a
miss for the method and is reported. Usage::

    .venv/bin/python bench/task_quality.py            # 100 scenes (200 shapes)
    .venv/bin/python bench/task_quality.py --quick    # 20 scenes
    .venv/bin/python bench/task_quality.py --only DRISE --drise-scenes 25  # D-RISE's rows alone

Results go to ``bench/results/task_quality.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from app.cam import METHODS  # noqa: E402
from app.errors import InvalidTarget  # noqa: E402
from app.models.loading import LoadedModel, load_model  # noqa: E402
from app.models.manifest import parse_manifest  # noqa: E402
from app.models.zoo.shapes_dataset import make_pairs  # noqa: E402
from app.pipeline.decoding import DecodedImage, Upload  # noqa: E402
from app.pipeline.explainer import ExplainParams  # noqa: E402
from app.pipeline.passes import CamPlan  # noqa: E402
from app.pipeline.tasks import PIPELINES  # noqa: E402
from app.pipeline.tasks.base import Explained  # noqa: E402
from app.pipeline.tasks.common import decode_whole  # noqa: E402

HELD_OUT_SEED = 2026
SIZE = 64
METHODS_RUN = ("GradCAM", "LayerCAM", "HiResCAM", "EigenCAM")
#: Detectors only: D-RISE, black-box (its masks are its cost: one forward each per box).
DETECTOR_METHODS_RUN = ("DRISE",)


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _peak(cam: torch.Tensor) -> tuple[int, int]:
    """The image pixel at the centre of the map's highest cell (an upsampled map's argmax
    would sit on its border plateaus)."""
    height, width = cam.shape
    flat = int(cam.argmax())
    row, col = flat // width, flat % width
    return int((row + 0.5) * SIZE / height), int((col + 0.5) * SIZE / width)


def _box(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(mask)
    return int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1


def _inside_box(point: tuple[int, int], box: tuple[int, int, int, int]) -> bool:
    row, col = point
    return box[0] <= col < box[2] and box[1] <= row < box[3]


def explained_shapes(
    model: LoadedModel, decoded: DecodedImage, plan: CamPlan, classes: list[int]
) -> dict[int, Explained]:
    """Each class of ``classes`` explained as /explain explains it, by class; a class the model
    misses is left out. A detector: the first detection of each class, every box of the scene
    in one call (``box=``: the boxes share its extra forwards, D-RISE's masks among them). A
    segmenter: each class over its predicted mask (``region=mask``)."""
    pipeline = PIPELINES[model.spec.task]
    if model.spec.task != "detection":
        found = {}
        for class_idx in classes:
            params = ExplainParams(class_idx=(class_idx,))
            try:
                run_ = pipeline.explain_image(model, decoded, 0, [plan], params, {})
            except InvalidTarget:  # the class is predicted nowhere: nothing to explain
                continue
            found[class_idx] = run_.explained[0]
        return found
    answer = pipeline.answer(model, decoded, pipeline.forward(model, decoded), ())
    rows = {}
    for class_idx in classes:
        detected = [j for j, d in enumerate(answer["detections"]) if d.class_idx == class_idx]
        if detected:
            rows[class_idx] = detected[0]
    if not rows:
        return {}
    boxes = list(dict.fromkeys(rows.values()))
    params = ExplainParams(boxes=tuple(str(row) for row in boxes))
    explained = pipeline.explain_image(model, decoded, 0, [plan], params, {}).explained
    by_row = dict(zip(boxes, explained, strict=True))
    return {class_idx: by_row[row] for class_idx, row in rows.items()}


def run(
    model: LoadedModel,
    method: str,
    scenes: int,
    seed: int,
    options: tuple[tuple[str, Any], ...] = (),
) -> dict[str, Any]:
    images, masks, labels = make_pairs(scenes, seed, SIZE)
    plan = CamPlan(method, METHODS[method], model.target_layers, options, True)
    rng = np.random.default_rng(seed)
    hits = random_hits = missed = shapes = in_box = 0
    started = time.perf_counter()
    for i in range(scenes):
        decoded = decode_whole(Upload(f"{i}.png", _png(images[i])), model.spec, 10**6)
        classes = [int(labels[i, k]) + 1 for k in range(2)]
        explained = explained_shapes(model, decoded, plan, classes)
        for k in range(2):
            shapes += 1
            class_idx = classes[k]
            truth = masks[i, k]
            box = _box(truth)
            if class_idx not in explained:
                missed += 1
                continue
            cam = explained[class_idx].cam
            point = _peak(cam)
            noise = torch.from_numpy(rng.random(cam.shape).astype(np.float32))
            random_point = _peak(noise)
            if model.spec.task == "detection":
                hits += _inside_box(point, box)
                random_hits += _inside_box(random_point, box)
            else:
                hits += bool(truth[point])
                random_hits += bool(truth[random_point])
            in_box += _inside_box(point, box)
    return {
        "model": model.spec.name,
        "method": method,
        "target": "true box" if model.spec.task == "detection" else "true mask",
        "layer": None if not METHODS[method].takes_layers else model.target_layers[0],
        "options": dict(options),
        "shapes": shapes,
        "missed_by_model": missed,
        "pointing_game": round(hits / shapes, 4),
        "random_maps": round(random_hits / shapes, 4),
        "peak_in_true_box": round(in_box / shapes, 4),
        "seconds": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--scenes", type=int, default=100)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/task_quality.json")
    parser.add_argument("--drise-masks", type=int, default=500, help="D-RISE's masks")
    parser.add_argument(
        "--drise-scenes", type=int, default=None, help="scenes for D-RISE (default: --scenes)"
    )
    parser.add_argument(
        "--only", default=None, help="run this method only; its rows replace its old ones"
    )
    args = parser.parse_args()
    scenes = 20 if args.quick else args.scenes
    torch.set_num_threads(1)
    rows = []
    for name in ("shapes-detect", "shapes-segment"):
        model = load_model(parse_manifest(ROOT / "model_store" / name), torch.device("cpu"))
        runs: list[tuple[str, int, tuple[tuple[str, Any], ...]]] = [
            (method, scenes, ()) for method in METHODS_RUN
        ]
        if model.spec.task == "detection":
            drise = (("masks", args.drise_masks), ("seed", 0))
            runs += [(m, args.drise_scenes or scenes, drise) for m in DETECTOR_METHODS_RUN]
        for method, count, options in runs:
            if args.only is not None and method != args.only:
                continue
            row = run(model, method, count, HELD_OUT_SEED, options)
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.quick:
        return
    if args.only is not None and args.out.exists():
        kept = [r for r in json.loads(args.out.read_text())["rows"] if r["method"] != args.only]
        rows = kept + rows
    args.out.write_text(json.dumps({"held_out_seed": HELD_OUT_SEED, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
