"""CAM quality benchmark: localization and faithfulness of every CAM method on shapes.

Runs every CAM method of :mod:`app.cam` that applies to a CNN (plus LayerCAM fused over several
layers, a random-map baseline and a centre-Gaussian baseline) on a seeded held-out set of the
synthetic shapes dataset with the default model of ``model_store/shapes`` and reports:

* pointing game (Zhang et al. 2016; tolerance 0 px, and 15 px in the JSON),
* energy-based pointing game (Wang et al. 2020),
* IoU of the mask with the map thresholded at 0.5, and the best mean IoU over the
  threshold sweep 0.05..0.95 with the threshold achieving it,
* deletion AUC (zeros-after-normalisation baseline) and insertion AUC (blurred-image
  baseline), RISE protocol (Petsiuk et al. 2018),
* the randomisation sanity check (Adebayo et al. 2018): mean Spearman correlation between
  the maps on the trained model and on a fully re-initialised copy (seeded),
* Average Drop and Increase in Confidence (Chattopadhay et al. 2018),
* median wall time per image of forward (+ backward) and map, one image per call.

The explained class is the model's prediction (argmax of the logits). Every sample subset
is a prefix of the held-out set, so the second table compares all rows on the same
images. A second section, class sensitivity, explains both classes of images holding two
shapes (``bench/quality/sensitivity.py``); a third scores Grad-CAM's and random maps through the
service's faithfulness stage (``bench/quality/faithfulness.py``). Results go to
``bench/results/cam_quality.{json,md}``; ``--sections sensitivity`` reruns that section alone and
keeps the other ones' results.

The parts: ``bench/quality/data.py`` (model, images), ``evaluation.py`` (rows, metrics),
``sensitivity.py`` (class sensitivity), ``report.py`` (markdown).

Usage::

    .venv/bin/python bench/cam_quality.py            # full run (<= 15 min on 2 CPU cores)
    .venv/bin/python bench/cam_quality.py --quick    # smoke run (~1 min)
    .venv/bin/python bench/cam_quality.py --sections sensitivity   # class sensitivity only
    .venv/bin/python bench/cam_quality.py --sections faithfulness  # the faithfulness stage only
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import app.cam as cam_lib  # noqa: E402
from app.cam.localization import DEFAULT_IOU_THRESHOLDS  # noqa: E402
from app.models.zoo.shapes_dataset import CLASSES, make_dataset  # noqa: E402
from bench.quality import faithfulness as faithfulness_stage  # noqa: E402
from bench.quality.data import (  # noqa: E402
    HELD_OUT_SEED,
    PAIRS_SEED,
    BenchModel,
    open_bench_model,
    stand_in_model,
    to_input,
    training_seeds,
)
from bench.quality.evaluation import (  # noqa: E402
    NOISE_SEED,
    NOT_APPLICABLE,
    RANDOMIZATION_SEED,
    MethodSpec,
    Row,
    common_subset_table,
    crosscheck_classification_metric,
    evaluate_row,
    extractor_map_fns,
    gaussian_map,
    identity_checks,
    layer_side,
    selected_specs,
)
from bench.quality.report import cpu_model, markdown  # noqa: E402
from bench.quality.sensitivity import SensitivityRow, evaluate, pair_set  # noqa: E402

logger = logging.getLogger("bench.cam_quality")


def open_model(args: argparse.Namespace) -> tuple[BenchModel, list[int]]:
    model_dir = (ROOT / args.model_dir).resolve()
    if args.stand_in or not (model_dir / "model.toml").exists():
        if not args.stand_in:
            logger.warning("%s/model.toml not found: using the random-weight stand-in", model_dir)
        bench = stand_in_model()
    else:
        bench = open_bench_model(model_dir)
    seeds = training_seeds(model_dir)
    for seed in (args.seed, args.pairs_seed):
        if seed in seeds:
            raise SystemExit(f"seed {seed} appears in TRAINING.md ({seeds}); pick another")
    return bench, seeds


def sizes(spec: MethodSpec, args: argparse.Namespace) -> tuple[int, int, int]:
    """Images for the maps, deletion/insertion and the randomisation check of a method row."""
    if spec.cost == "score":
        return args.n_score, args.n_score, min(args.n_score, args.n_sanity_expensive)
    if spec.cost == "noise":
        return args.n_noise, args.n_noise, min(args.n_noise, args.n_sanity_expensive)
    return args.n_images, args.n_faith, args.n_sanity


def run_quality(args: argparse.Namespace, bench: BenchModel, seeds: list[int]) -> dict[str, Any]:
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    loaded = bench
    model = loaded.model

    n_total = max(args.n_images, args.n_score, args.n_noise)
    t0 = time.perf_counter()
    images_u8, masks_np, labels_np = make_dataset(n_total, args.seed, loaded.image_size)
    images = to_input(images_u8, loaded.mean, loaded.std)
    masks = torch.from_numpy(masks_np)
    labels = torch.from_numpy(labels_np)
    logger.info(
        "held-out set: %d images, seed %d (%.1fs)", n_total, args.seed, time.perf_counter() - t0
    )

    with torch.inference_mode():
        logits = torch.cat([model(images[i : i + 64]) for i in range(0, n_total, 64)])
    probs = torch.softmax(logits, dim=1)
    preds = logits.argmax(dim=1)
    base_probs = probs.gather(1, preds[:, None])[:, 0]
    accuracy = float((preds == labels).float().mean())
    logger.info("accuracy on the held-out set: %.4f", accuracy)

    shape = (3, loaded.image_size, loaded.image_size)
    tl = loaded.target_layer
    n_cheap, n_faith, n_sanity = args.n_images, args.n_faith, args.n_sanity
    rows: list[Row] = []
    for spec in selected_specs(args, tl):
        nm, nf, ns = sizes(spec, args)
        make, batched = extractor_map_fns(
            spec.cls, spec.target, spec.options, spec.fuse, shape, spec.call
        )
        rows.append(
            Row(spec.name, spec.description, nm, min(nf, nm), min(ns, nm), make, None, batched)
        )

    # Baselines: maps at the target layer's resolution, like the methods' maps.
    side = layer_side(model, tl, shape)
    gauss = gaussian_map(side)
    rows.append(
        Row(
            "random",
            f"random map, U(0,1) per cell at {side}x{side}",
            n_cheap,
            n_faith,
            n_sanity,
            baseline=lambda i, g: torch.rand(side, side, generator=g),
        )
    )
    rows.append(
        Row(
            "centre-gaussian",
            f"centre Gaussian, sigma = side/4 at {side}x{side}",
            n_cheap,
            n_faith,
            n_sanity,
            baseline=lambda i, g: gauss.clone(),
        )
    )

    results: list[dict[str, Any]] = []
    for row in rows:
        t_row = time.perf_counter()
        results.append(
            evaluate_row(row, model, images, masks, preds, base_probs, args, loaded.num_classes)
        )
        results[-1]["seconds_total"] = round(time.perf_counter() - t_row, 1)
        r = results[-1]
        logger.info(
            "%s done in %.1fs (maps %.1fs, del/ins %.1fs, sanity %.1fs): PG %.3f EPG %.3f "
            "IoU %.3f del %.3f ins %.3f rho %.3f AD %.1f IC %.1f",
            row.name,
            r["seconds_total"],
            r["seconds_maps"],
            r["seconds_faithfulness"],
            r["seconds_sanity"],
            r["pointing_game"],
            r["energy_pointing_game"],
            r["iou_at_0.5"],
            r["deletion_auc"],
            r["insertion_auc"],
            r["sanity_spearman"],
            r["average_drop"],
            r["increase_in_confidence"],
        )

    crosscheck = crosscheck_classification_metric(
        cam_lib, model, images, preds, tl, shape, results, args.crosscheck_images
    )

    identities = identity_checks(results)

    elapsed = time.perf_counter() - t_start
    common = common_subset_table(results)
    report = {
        "benchmark": "cam_quality",
        "machine": {
            "platform": platform.platform(),
            "processor": cpu_model(),
            "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else None,
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "loadavg_start": [round(v, 2) for v in load_start],
            "loadavg_end": [round(v, 2) for v in os.getloadavg()],
        },
        "model": loaded.source,
        "weights_sha256": loaded.weights_sha256,
        "target_layer": tl,
        "held_out": {
            "dataset": "app.models.zoo.shapes_dataset.make_dataset",
            "seed": args.seed,
            "training_seeds_in_TRAINING_md": seeds,
            "n_images": n_total,
            "image_size": loaded.image_size,
            "classes": list(CLASSES),
            "accuracy": round(accuracy, 4),
        },
        "protocol": {
            "explained_class": "predicted class (argmax of the logits on the clean image)",
            "pointing_game_tolerance_px": [0, 15],
            "iou_threshold": 0.5,
            "iou_sweep": list(DEFAULT_IOU_THRESHOLDS),
            "best_iou": "one threshold per row maximising the mean IoU over its images",
            "deletion": f"{args.steps} steps, pixels set to 0 after normalisation (mean colour)",
            "insertion": f"{args.steps} steps from the image blurred by an 11x11 sigma-5 Gaussian",
            "sanity": "Spearman (ties averaged) between maps at the layer resolution on the "
            "trained model and on a fully re-initialised copy (every module's "
            f"reset_parameters(), seed {RANDOMIZATION_SEED}), same explained class",
            "average_drop": "mean of max(0, Y_c - O_c) / Y_c x 100, O_c on input x map",
            "increase_in_confidence": "% of images with O_c > Y_c",
            "ms_per_image": "median wall time of one forward (+backward) and the map, batch 1",
            "noise_seed": NOISE_SEED,
        },
        "rows": results,
        "common_subset": common,
        "classification_metric_crosscheck": crosscheck,
        "identity_checks": identities,
        "wall_seconds": round(elapsed, 1),
        "quick": bool(args.quick),
        "stand_in_model": loaded.stand_in,
        "not_applicable": NOT_APPLICABLE,
    }
    return report


def run_sensitivity(args: argparse.Namespace, bench: BenchModel) -> dict[str, Any]:
    """The class-sensitivity section: every method and two baselines on two-shape images."""
    started = time.perf_counter()
    n_total = max(args.n_pairs, args.n_pairs_score, args.n_pairs_noise)
    pairs = pair_set(bench, n_total, args.pairs_seed)
    shape = (3, bench.image_size, bench.image_size)
    layer = bench.target_layer
    model = bench.model
    counts = {"cheap": args.n_pairs, "score": args.n_pairs_score, "noise": args.n_pairs_noise}
    rows = []
    for spec in selected_specs(args, layer):
        _, batched = extractor_map_fns(
            spec.cls, spec.target, spec.options, spec.fuse, shape, spec.call
        )
        rows.append(
            SensitivityRow(
                spec.name,
                spec.description,
                min(counts[spec.cost], n_total),
                lambda x, c, batched=batched: batched(model, x, c),
            )
        )
    _, grad_maps = extractor_map_fns(cam_lib.GradCAM, layer, {}, False, shape)

    def class_blind(x: torch.Tensor, _classes: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            top = torch.cat([model(x[i : i + 64]).argmax(1) for i in range(0, len(x), 64)])
        return grad_maps(model, x, top)

    side = layer_side(model, layer, shape)

    def random_maps(x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator().manual_seed(int(classes.sum()))  # a new draw per class
        return torch.rand(len(x), side, side, generator=generator)

    rows.append(
        SensitivityRow(
            "class-blind",
            "baseline: the Grad-CAM map of the predicted class, whatever class is asked",
            args.n_pairs,
            class_blind,
        )
    )
    rows.append(
        SensitivityRow(
            "random", f"baseline: U(0,1) per cell at {side}x{side}", args.n_pairs, random_maps
        )
    )
    with torch.inference_mode():
        predicted = bench.model(pairs.images[: args.n_pairs]).argmax(1)
    predicted_present = (predicted[:, None] == pairs.labels[: args.n_pairs]).any(1)
    return {
        "pairs": {
            "dataset": "app.models.zoo.shapes_dataset.make_pairs",
            "seed": args.pairs_seed,
            "image_size": bench.image_size,
            "n_images": n_total,
            "prediction_is_one_of_the_two": round(float(predicted_present.float().mean()), 4),
        },
        "protocol": "Both present classes explained on every image, at the target layer "
        f"{layer!r}; DPG: map maximum inside the explained class's own object (0 px); energy "
        "share: own / (own + other) object energy; rho: Spearman between the two classes' maps",
        "rows": [evaluate(row, pairs) for row in rows],
        "not_applicable": NOT_APPLICABLE,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model-dir", default="model_store/shapes")
    p.add_argument("--stand-in", action="store_true", help="random-weight model (debugging)")
    p.add_argument("--seed", type=int, default=HELD_OUT_SEED, help="held-out dataset seed")
    p.add_argument("--n-images", type=int, default=500, help="images for the cheap methods")
    p.add_argument("--n-faith", type=int, default=200, help="deletion/insertion images (cheap)")
    p.add_argument("--n-sanity", type=int, default=500, help="randomisation-check images (cheap)")
    p.add_argument("--n-score", type=int, default=150, help="images for ScoreCAM")
    p.add_argument("--n-noise", type=int, default=40, help="images for SSCAM and ISCAM")
    p.add_argument(
        "--n-sanity-expensive", type=int, default=20, help="randomisation images, Score family"
    )
    p.add_argument(
        "--sscam-samples", type=int, default=10, help="SSCAM num_samples (library default 35)"
    )
    p.add_argument("--iscam-samples", type=int, default=10, help="ISCAM num_samples")
    p.add_argument("--steps", type=int, default=20, help="deletion/insertion steps (>= 20)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads; 1 by default: on a shared 2-core machine two threads "
        "spin against other users' processes and ran 10-40x slower in our measurements",
    )
    p.add_argument(
        "--crosscheck-images", type=int, default=64, help="AD/IC cross-check with the engine"
    )
    p.add_argument("--pairs-seed", type=int, default=PAIRS_SEED, help="two-shape images seed")
    p.add_argument("--n-pairs", type=int, default=100, help="two-shape images (cheap methods)")
    p.add_argument("--n-pairs-score", type=int, default=30, help="two-shape images, ScoreCAM etc.")
    p.add_argument("--n-pairs-noise", type=int, default=10, help="two-shape images, SSCAM, ISCAM")
    p.add_argument(
        "--sections",
        default="quality,sensitivity,faithfulness",
        help="comma-separated: quality, sensitivity, faithfulness (the service's faithfulness "
        "stage: Grad-CAM against random maps); a section left out keeps its results from the "
        "existing JSON",
    )
    p.add_argument(
        "--methods",
        default="",
        help="comma-separated method rows to run (default: all); the baselines and GradCAM "
        "always run",
    )
    p.add_argument("--out-dir", default="bench/results")
    p.add_argument("--quick", action="store_true", help="smoke run on a few images")
    args = p.parse_args(argv)
    if args.quick:
        args.n_images, args.n_faith, args.n_sanity = 24, 8, 8
        args.n_score, args.n_noise, args.n_sanity_expensive = 4, 2, 2
        args.sscam_samples, args.iscam_samples = 2, 2
        args.crosscheck_images = 8
        args.n_pairs, args.n_pairs_score, args.n_pairs_noise = 8, 2, 2
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(args.sections) - {"quality", "sensitivity", "faithfulness"}
    if unknown or not args.sections:
        raise SystemExit(
            f"--sections takes quality, sensitivity and/or faithfulness, got {args.sections}"
        )
    if args.steps < 20 and not args.quick:
        raise SystemExit("--steps must be >= 20")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(NOISE_SEED)  # RandomCAM's draws (the other rows seed their own)
    out_dir = ROOT / args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    json_path = out_dir / f"cam_quality{suffix}.json"
    bench, seeds = open_model(args)
    if "quality" in args.sections:
        report = run_quality(args, bench, seeds)
        for row in report["rows"]:
            row.pop("_maps", None)
            row["per_image"].pop("iou_sweep", None)  # large; the sweep means are in the tables
    elif json_path.exists():
        report = json.loads(json_path.read_text())
    else:
        raise SystemExit(f"{json_path} does not exist: run the quality section first")
    if "sensitivity" in args.sections:
        report["class_sensitivity"] = run_sensitivity(args, bench)
    if "faithfulness" in args.sections:
        report["faithfulness_stage"] = faithfulness_stage.run(
            ROOT / "model_store", args.n_faith, args.seed
        )
    md = markdown(report)
    if "faithfulness_stage" in report:
        md += "\n## The service's faithfulness stage\n\n"
        md += faithfulness_stage.markdown(report["faithfulness_stage"])
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    (out_dir / f"cam_quality{suffix}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
