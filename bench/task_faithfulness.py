"""Faithfulness scores of the detection and segmentation models' maps, against random maps.

On held-out synthetic scenes of two shapes (``make_pairs``, the seed ``bench/task_quality.py``
uses, which the training never saw), every shape is explained as ``/explain`` explains it (the
detection of its class, ``box=K``; its class over its predicted mask, ``region=mask``), and
each map is scored as ``faithfulness=deletion,insertion`` scores it: the deletion and insertion
AUCs (16 steps) of what the service's curves follow, the detection's similarity
(``DetectionSimilarity``) or the region's mean class probability (``RegionProbability``). The
same curves are drawn for a seeded random map at the map's resolution and for the map reversed
(its least salient pixels first). A score that means something ranks the method's maps ahead
of both: a lower deletion AUC, a higher insertion AUC. Usage::

    .venv/bin/python bench/task_faithfulness.py            # 50 scenes (100 shapes)
    .venv/bin/python bench/task_faithfulness.py --quick    # 10 scenes
    .venv/bin/python bench/task_faithfulness.py --cost     # the cost, Faster R-CNN, DeepLabV3

Results go to ``bench/results/task_faithfulness.json`` (CPU, one thread), the cost's to
``bench/results/task_faithfulness_cost.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
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
from app.cam.faithfulness import (  # noqa: E402
    auc,
    confidence_change,
    confidence_drop,
    perturbation_curve,
)
from app.models.loading import LoadedModel, load_model  # noqa: E402
from app.models.manifest import parse_manifest  # noqa: E402
from app.models.zoo.shapes_dataset import make_pairs  # noqa: E402
from app.pipeline.decoding import Upload  # noqa: E402
from app.pipeline.explainer import ExplainParams  # noqa: E402
from app.pipeline.faithfulness import (  # noqa: E402
    DEFAULT_STEPS,
    ScoreItem,
    Scoring,
    run_scoring_pass,
)
from app.pipeline.passes import CamPlan  # noqa: E402
from app.pipeline.tasks import PIPELINES  # noqa: E402
from app.pipeline.tasks.common import decode_whole  # noqa: E402

# The pointing game's scenes and methods: the two benchmarks read the same maps.
from bench.task_quality import (  # noqa: E402
    DETECTOR_METHODS_RUN,
    HELD_OUT_SEED,
    METHODS_RUN,
    SIZE,
    _png,
    explained_shapes,
)


def _aucs(model: LoadedModel, x: torch.Tensor, cam: torch.Tensor, target: Any) -> list[float]:
    """Deletion AUC, insertion AUC and confidence drop of one map."""
    found = []
    for mode in ("deletion", "insertion"):
        curve = perturbation_curve(
            model.module, x, cam[None], None, mode, DEFAULT_STEPS, batch_size=None, targets=target
        )
        found.append(float(auc(*curve)[0]))
    before, after = confidence_change(model.module, x, cam[None], None, targets=target)
    found.append(float(confidence_drop(before, after)[0]))
    return found


def run(
    model: LoadedModel,
    method: str,
    scenes: int,
    seed: int,
    options: tuple[tuple[str, Any], ...] = (),
) -> dict[str, Any]:
    images, _, labels = make_pairs(scenes, seed, SIZE)
    plan = CamPlan(method, METHODS[method], model.target_layers, options, True)
    generator = torch.Generator().manual_seed(seed)
    scores: dict[str, list[float]] = {
        f"{kind}_{curve}": []
        for kind in ("map", "random", "reversed")
        for curve in ("del", "ins", "drop")
    }
    beats_random = {"del": 0, "ins": 0, "drop": 0}
    started = time.perf_counter()
    for i in range(scenes):
        decoded = decode_whole(Upload(f"{i}.png", _png(images[i])), model.spec, 10**6)
        x = decoded.tensor[None]
        classes = [int(labels[i, k]) + 1 for k in range(2)]
        for explained in explained_shapes(model, decoded, plan, classes).values():
            cam = explained.cam.float()
            noise = torch.rand(cam.shape, generator=generator)
            found = {
                "map": _aucs(model, x, cam, explained.judged_by),
                "random": _aucs(model, x, noise, explained.judged_by),
                "reversed": _aucs(model, x, -cam, explained.judged_by),
            }
            for kind, (deletion, insertion, drop) in found.items():
                scores[f"{kind}_del"].append(deletion)
                scores[f"{kind}_ins"].append(insertion)
                scores[f"{kind}_drop"].append(drop)
            beats_random["del"] += found["map"][0] < found["random"][0]
            beats_random["ins"] += found["map"][1] > found["random"][1]
            beats_random["drop"] += found["map"][2] < found["random"][2]
    maps = len(scores["map_del"])
    return {
        "model": model.spec.name,
        "method": method,
        "follows": "detection similarity"
        if model.spec.task == "detection"
        else "region class probability",
        "options": dict(options),
        "maps": maps,
        "steps": DEFAULT_STEPS,
        **{
            (f"{name}_mean" if name.endswith("drop") else f"{name}_auc_mean"): round(
                statistics.fmean(values), 4
            )
            for name, values in scores.items()
            if values
        },
        "deletion_beats_random": round(beats_random["del"] / max(1, maps), 4),
        "insertion_beats_random": round(beats_random["ins"] / max(1, maps), 4),
        "drop_beats_random": round(beats_random["drop"] / max(1, maps), 4),
        "seconds": round(time.perf_counter() - started, 1),
    }


def cost(repeats: int) -> list[dict[str, Any]]:
    """What scoring costs beside explaining: one box's (region's) Layer-CAM map of a 320 x 320
    scene on a Faster R-CNN (ResNet-50 FPN v2, random weights, 320 px) and a DeepLabV3
    (ResNet-50, random weights, 224 px), explained, then scored as the service scores it (both
    curves, 16 steps: one forward of 17 inputs per curve; then ``confidence`` alone: one forward
    of 2), alternating, medians."""
    from bench.task_pass import _random_model

    rows = []
    images, _, _ = make_pairs(1, HELD_OUT_SEED, SIZE)
    scene = _png(np.asarray(Image.fromarray(images[0]).resize((320, 320))))
    wanted = Scoring(("deletion", "insertion"), DEFAULT_STEPS)
    cheap = Scoring(("confidence",))
    with tempfile.TemporaryDirectory() as folder:
        for name, model in (
            (
                "fasterrcnn_resnet50_fpn_v2",
                _random_model(
                    Path(folder) / "frcnn",
                    "fasterrcnn_resnet50_fpn_v2",
                    "detection",
                    "min_size = 320, max_size = 320, box_score_thresh = 0.0",
                    320,
                ),
            ),
            (
                "deeplabv3_resnet50",
                _random_model(
                    Path(folder) / "deeplab", "deeplabv3_resnet50", "segmentation", "", 224
                ),
            ),
        ):
            decoded = decode_whole(Upload("scene.png", scene), model.spec, 10**6)
            plan = CamPlan("LayerCAM", METHODS["LayerCAM"], model.target_layers, (), True)
            detector = model.spec.task == "detection"
            params = ExplainParams(boxes=("0",)) if detector else ExplainParams()
            pipeline = PIPELINES[model.spec.task]
            explain_s, score_s, confidence_s = [], [], []
            for _ in range(repeats + 1):  # the first is a warm-up
                started = time.perf_counter()
                run_ = pipeline.explain_image(model, decoded, 0, [plan], params, {})
                explain_s.append(time.perf_counter() - started)
                explained = run_.explained[0]
                item = ScoreItem(
                    decoded.tensor[None], ((explained.cam[None], (explained.judged_by,)),)
                )
                started = time.perf_counter()
                run_scoring_pass(model, wanted, [item])
                score_s.append(time.perf_counter() - started)
                started = time.perf_counter()
                run_scoring_pass(model, cheap, [item])
                confidence_s.append(time.perf_counter() - started)
            explain_ms = 1000 * statistics.median(explain_s[1:])
            score_ms = 1000 * statistics.median(score_s[1:])
            confidence_ms = 1000 * statistics.median(confidence_s[1:])
            row = {
                "model": name,
                "input": list(decoded.tensor.shape[-2:]),
                "explain_ms": round(explain_ms, 1),
                "scoring_ms": round(score_ms, 1),
                "scored_over_explained": round((explain_ms + score_ms) / explain_ms, 2),
                "scoring_forwards": wanted.forwards_per_map,
                "confidence_ms": round(confidence_ms, 1),
                "confidence_over_explained": round((explain_ms + confidence_ms) / explain_ms, 2),
                "confidence_forwards": cheap.forwards_per_map,
                "threads": torch.get_num_threads(),
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--scenes", type=int, default=50)
    parser.add_argument("--drise-masks", type=int, default=500)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/task_faithfulness.json")
    parser.add_argument(
        "--cost", action="store_true", help="only what scoring costs on two real architectures"
    )
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.cost:
        rows = cost(args.repeats)
        path = args.out.with_name("task_faithfulness_cost.json")
        path.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
        return
    scenes = 10 if args.quick else args.scenes
    torch.set_num_threads(1)
    rows = []
    for name in ("shapes-detect", "shapes-segment"):
        model = load_model(parse_manifest(ROOT / "model_store" / name), torch.device("cpu"))
        runs: list[tuple[str, tuple[tuple[str, Any], ...]]] = [(m, ()) for m in METHODS_RUN]
        if model.spec.task == "detection":
            drise = (("masks", args.drise_masks), ("seed", 0))
            runs += [(m, drise) for m in DETECTOR_METHODS_RUN]
        for method, options in runs:
            row = run(model, method, scenes, HELD_OUT_SEED, options)
            print(json.dumps(row), flush=True)
            rows.append(row)
    if not args.quick:
        args.out.write_text(json.dumps({"held_out_seed": HELD_OUT_SEED, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
