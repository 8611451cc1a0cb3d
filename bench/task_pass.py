"""A task pass (detectors, segmenters) against the way it ran before, side by side in one run.

Two sections:

- ``boxes``: the ranks of a pass (box 0 of every image, box 1, ...) go to one map call
  (``explain_classes`` with ``targets=``), which shares the hooked forward and the method's
  extra forwards, against one map call per rank. On held-out scenes of ``shapes-detect`` (two
  shapes, so two boxes each), per method: the map stage with every box explained, the ratio,
  the forwards each way (counted) and the largest difference between the maps (a seeded D-RISE
  draws the same masks).
- ``answer``: one forward gives the pass's answer (detections, segments) and every gradient
  method's maps (``TaskPipeline.explain_images``), against a forward of its own for the answer,
  then one hooked forward per method: Layer-CAM, then Layer-CAM and Grad-CAM, of box 0 (of the
  predicted mask for a segmenter) on ``shapes-detect``, a random-weight Faster R-CNN (ResNet-50
  FPN v2) at 320 px and a random-weight DeepLabV3 (ResNet-50) at 224 px.

Each way runs ``--repeats`` times, alternating; medians. Usage::

    .venv/bin/python bench/task_pass.py                       # both sections
    .venv/bin/python bench/task_pass.py --section boxes --masks 200

Results go to ``bench/results/task_pass_<section>.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from app.cam import METHODS  # noqa: E402
from app.cam.core import counting_forwards  # noqa: E402
from app.models.loading import LoadedModel, load_model  # noqa: E402
from app.models.manifest import parse_manifest  # noqa: E402
from app.models.zoo.shapes_dataset import make_pairs  # noqa: E402
from app.pipeline.decoding import DecodedImage, Upload  # noqa: E402
from app.pipeline.explainer import ExplainParams  # noqa: E402
from app.pipeline.passes import CamPlan, own_pass  # noqa: E402
from app.pipeline.tasks import PIPELINES  # noqa: E402
from app.pipeline.tasks.base import TaskItem, ranked_targets  # noqa: E402
from app.pipeline.tasks.common import decode_whole  # noqa: E402
from app.pipeline.tasks.maps import batch_maps  # noqa: E402

HELD_OUT_SEED = 2026
SIZE = 64
Way = Callable[[], tuple[int, list[torch.Tensor]]]
"""One way of running: the forwards it counted and the maps it made."""


def _png(image: Any) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _scenes(model: LoadedModel, count: int) -> list[DecodedImage]:
    images, _, _ = make_pairs(count, HELD_OUT_SEED, SIZE)
    return [
        decode_whole(Upload(f"{i}.png", _png(im)), model.spec, 10**6) for i, im in enumerate(images)
    ]


def _side_by_side(ways: dict[str, Way], repeats: int) -> dict[str, Any]:
    """Each way ``repeats`` times, alternating, after one warm-up each: medians, the median
    ratio of the second way's time to the first's, the forwards, the largest map difference."""
    times: dict[str, list[float]] = {name: [] for name in ways}
    done: dict[str, tuple[int, list[torch.Tensor]]] = {}
    for way in ways.values():
        way()
    for _ in range(repeats):
        for name, way in ways.items():
            started = time.perf_counter()
            done[name] = way()
            times[name].append(time.perf_counter() - started)
    (new, old) = ways
    ratios = [b / a for a, b in zip(times[new], times[old], strict=True)]
    return {
        **{f"{name}_ms": round(1000 * statistics.median(times[name]), 1) for name in ways},
        f"{old}_over_{new}": round(statistics.median(ratios), 2),
        "ratios": [round(r, 2) for r in ratios],
        **{f"forwards_{name}": done[name][0] for name in ways},
        "max_map_difference": float(
            max((a - b).abs().max() for a, b in zip(done[new][1], done[old][1], strict=True))
        ),
    }


# ----------------------------------------------------------------------------------- boxes
def boxes(
    model: LoadedModel, method: str, options: dict[str, Any], scenes: int, repeats: int
) -> dict[str, Any]:
    plan = CamPlan(
        method, METHODS[method], model.target_layers, tuple(sorted(options.items())), True
    )
    pipeline = PIPELINES["detection"]
    decoded = _scenes(model, scenes)
    with own_pass(model):
        outputs = pipeline.forward_many(model, decoded)
        wants = [
            pipeline.wanted(model, image, i, output, ExplainParams(boxes=("all",)))[1]
            for i, (image, output) in enumerate(zip(decoded, outputs, strict=True))
        ]
    ranks = ranked_targets([w[: min(len(w) for w in wants)] for w in wants], plan)
    x = torch.stack([d.tensor for d in decoded])

    def run(shared: bool) -> tuple[int, list[torch.Tensor]]:
        with own_pass(model), counting_forwards(model.module) as counted:
            if shared:
                per_rank = batch_maps(model, plan, x, ranks, {})[0]
            else:
                per_rank = [batch_maps(model, plan, x, [rank], {})[0][0] for rank in ranks]
        return counted.calls, [maps[-1].cams for maps in per_rank]

    row = _side_by_side(
        {"one_call": lambda: run(True), "one_call_per_box": lambda: run(False)}, repeats
    )
    return {
        "method": method,
        "options": options,
        "images": len(x),
        "boxes_per_image": len(ranks),
        **row,
    }


# ---------------------------------------------------------------------------------- answer
def _random_model(
    folder: Path, architecture: str, task: str, kwargs: str, size: int
) -> LoadedModel:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "labels.txt").write_text("background\nthing1\nthing2\n")
    extra = (
        "[detection]\nscore_threshold = 0.0\nmax_detections = 5\n" if task == "detection" else ""
    )
    (folder / "model.toml").write_text(
        f'task = "{task}"\n\n[model]\narchitecture = "{architecture}"\n'
        f'kwargs = {{ num_classes = 3{", " + kwargs if kwargs else ""} }}\nweights = "random"\n'
        f'num_classes = 3\nlabels = "labels.txt"\n\n'
        f"[preprocess]\ninput_shape = [3, {size}, {size}]\n"
        f"mean = [0.0, 0.0, 0.0]\nstd = [1.0, 1.0, 1.0]\n{extra}"
    )
    torch.manual_seed(0)
    return load_model(parse_manifest(folder), torch.device("cpu"))


def answer(model: LoadedModel, name: str, methods: tuple[str, ...], repeats: int) -> dict[str, Any]:
    plans = [CamPlan(m, METHODS[m], model.target_layers, (), True) for m in methods]
    pipeline = PIPELINES[model.spec.task]
    side = model.spec.input_shape[-1]
    images, _, _ = make_pairs(1, HELD_OUT_SEED, side)
    decoded = decode_whole(Upload("scene.png", _png(images[0])), model.spec, 10**7)
    params = ExplainParams(boxes=("0",)) if model.spec.task == "detection" else ExplainParams()
    item = TaskItem(decoded, 0, params)

    def shared() -> tuple[int, list[torch.Tensor]]:
        run = pipeline.explain_images(model, [item], plans, {})[0]
        assert run.counted is not None
        return run.counted.calls, [one.cam for one in run.explained]

    def apart() -> tuple[int, list[torch.Tensor]]:
        with own_pass(model), counting_forwards(model.module) as counted:
            output = pipeline.forward_many(model, [decoded])[0]
            wanted = pipeline.wanted(model, decoded, 0, output, params)[1]
            x = decoded.tensor[None]
            maps = [batch_maps(model, p, x, ranked_targets([wanted], p), {})[0] for p in plans]
        return counted.calls, [m[0][-1].cams[0] for m in maps]

    ways = {"one_forward": shared, "a_forward_each": apart}
    row = _side_by_side(ways, repeats)
    return {
        "model": name,
        "task": model.spec.task,
        "methods": list(methods),
        "input": list(decoded.tensor.shape[-2:]),
        **row,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--section", choices=("boxes", "answer", "all"), default="all")
    parser.add_argument("--scenes", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--masks", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results")
    args = parser.parse_args()
    shapes = load_model(parse_manifest(ROOT / "model_store/shapes-detect"), torch.device("cpu"))
    if args.section in ("boxes", "all"):
        runs = []
        for method, options in (
            ("DRISE", {"masks": args.masks, "seed": 5}),
            ("GradCAM", {}),
            ("LayerCAM", {}),
        ):
            row = boxes(shapes, method, options, args.scenes, args.repeats)
            runs.append(row)
            print(json.dumps(row), flush=True)
        (args.out / "task_pass_boxes.json").write_text(
            json.dumps({"threads": torch.get_num_threads(), "runs": runs}, indent=2) + "\n"
        )
    if args.section in ("answer", "all"):
        runs = []
        with tempfile.TemporaryDirectory() as folder:
            models = {
                "shapes-detect": shapes,
                "fasterrcnn_resnet50_fpn_v2": _random_model(
                    Path(folder) / "frcnn",
                    "fasterrcnn_resnet50_fpn_v2",
                    "detection",
                    "min_size = 320, max_size = 320, box_score_thresh = 0.0",
                    320,
                ),
                "deeplabv3_resnet50": _random_model(
                    Path(folder) / "deeplab",
                    "deeplabv3_resnet50",
                    "segmentation",
                    "aux_loss = false",
                    224,
                ),
            }
            for name, model in models.items():
                for methods in (("LayerCAM",), ("LayerCAM", "GradCAM")):
                    row = answer(model, name, methods, args.repeats)
                    runs.append(row)
                    print(json.dumps(row), flush=True)
        (args.out / "task_pass_answer.json").write_text(
            json.dumps({"threads": torch.get_num_threads(), "runs": runs}, indent=2) + "\n"
        )


if __name__ == "__main__":
    main()
