"""Several boxes of one image in one map call: the ranks of a task pass (box 0 of every image,
box 1, ...) share the hooked forward and the method's extra forwards (``explain_classes`` with
``targets=``), against one map call per rank (what the task pass did before).

On held-out scenes of ``shapes-detect`` (the default store's detector; two shapes, so two boxes
each), per method: the map stage of a pass with every box explained, side by side in one run
(shared, then one call per box, alternating, ``--repeats`` times), the median ratio, the model
forwards each way (counted), and the largest difference between the maps of the two ways (they
are the same maps: a seeded D-RISE draws the same masks). Usage::

    .venv/bin/python bench/task_boxes.py                 # 6 scenes, 5 repeats
    .venv/bin/python bench/task_boxes.py --masks 200     # a quicker D-RISE

Results go to ``bench/results/task_boxes.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
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
from app.pipeline.decoding import Upload  # noqa: E402
from app.pipeline.explainer import ExplainParams  # noqa: E402
from app.pipeline.passes import CamPlan, own_pass  # noqa: E402
from app.pipeline.tasks import PIPELINES  # noqa: E402
from app.pipeline.tasks.common import decode_whole  # noqa: E402
from app.pipeline.tasks.maps import batch_maps  # noqa: E402

HELD_OUT_SEED = 2026
SIZE = 64


def _png(image: Any) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _ranks(model: LoadedModel, scenes: int, plan: CamPlan) -> tuple[torch.Tensor, list[list[Any]]]:
    """The scenes as one batch, and per rank (box 0, box 1, ...) each scene's target."""
    pipeline = PIPELINES["detection"]
    images, _, _ = make_pairs(scenes, HELD_OUT_SEED, SIZE)
    decoded = [
        decode_whole(Upload(f"{i}.png", _png(im)), model.spec, 10**6) for i, im in enumerate(images)
    ]
    wants = []
    with own_pass(model):
        outputs = pipeline.forward_many(model, decoded)
        for i, (image, output) in enumerate(zip(decoded, outputs, strict=True)):
            _, wanted = pipeline.wanted(model, image, i, output, ExplainParams(boxes=("all",)))
            wants.append(wanted)
    count = min(len(w) for w in wants)
    ranks = [[w[rank].target(plan) for w in wants] for rank in range(count)]
    return torch.stack([d.tensor for d in decoded]), ranks


def _timed(
    model: LoadedModel, plan: CamPlan, x: torch.Tensor, ranks: list[list[Any]], shared: bool
) -> tuple[float, int, list[torch.Tensor]]:
    with own_pass(model), counting_forwards(model.module) as counted:
        started = time.perf_counter()
        if shared:
            per_rank, _ = batch_maps(model, plan, x, ranks, {})
        else:
            per_rank = [batch_maps(model, plan, x, [rank], {})[0][0] for rank in ranks]
        seconds = time.perf_counter() - started
    return seconds, counted.calls, [maps[-1].cams for maps in per_rank]


def measure(
    model: LoadedModel, method: str, options: dict[str, Any], scenes: int, repeats: int
) -> dict[str, Any]:
    plan = CamPlan(
        method, METHODS[method], model.target_layers, tuple(sorted(options.items())), True
    )
    x, ranks = _ranks(model, scenes, plan)
    times: dict[bool, list[float]] = {True: [], False: []}
    forwards: dict[bool, int] = {}
    maps: dict[bool, list[torch.Tensor]] = {}
    _timed(model, plan, x, ranks, True)  # warm-up
    for _ in range(repeats):
        for shared in (True, False):
            seconds, forwards[shared], maps[shared] = _timed(model, plan, x, ranks, shared)
            times[shared].append(seconds)
    ratios = [apart / together for together, apart in zip(times[True], times[False], strict=True)]
    return {
        "method": method,
        "options": options,
        "images": len(x),
        "boxes_per_image": len(ranks),
        "shared_ms": round(1000 * statistics.median(times[True]), 1),
        "per_box_ms": round(1000 * statistics.median(times[False]), 1),
        "per_box_over_shared": round(statistics.median(ratios), 2),
        "ratios": [round(r, 2) for r in ratios],
        "forwards_shared": forwards[True],
        "forwards_per_box": forwards[False],
        "max_map_difference": float(
            max((a - b).abs().max() for a, b in zip(maps[True], maps[False], strict=True))
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenes", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--masks", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/task_boxes.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    spec = parse_manifest(ROOT / "model_store/shapes-detect")
    model = load_model(spec, torch.device("cpu"))
    runs = []
    for method, options in (
        ("DRISE", {"masks": args.masks, "seed": 5}),
        ("GradCAM", {}),
        ("LayerCAM", {}),
    ):
        row = measure(model, method, options, args.scenes, args.repeats)
        runs.append(row)
        print(
            f"{method:9s} {row['images']} images x {row['boxes_per_image']} boxes: shared "
            f"{row['shared_ms']} ms, one call per box {row['per_box_ms']} ms, ratio "
            f"{row['per_box_over_shared']} (forwards {row['forwards_shared']} vs "
            f"{row['forwards_per_box']}; maps differ by {row['max_map_difference']:.1e})"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"threads": torch.get_num_threads(), "runs": runs}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
