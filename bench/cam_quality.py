"""CAM quality benchmark: localization and faithfulness of every CAM method on shapes.

Runs the nine CAM methods of :mod:`app.cam` (plus LayerCAM fused over several layers, a
random-map baseline and a centre-Gaussian baseline) on a seeded held-out set of the
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
images. Results go to ``bench/results/cam_quality.{json,md}``.

Usage::

    .venv/bin/python bench/cam_quality.py            # full run (<= 15 min on 2 CPU cores)
    .venv/bin/python bench/cam_quality.py --quick    # smoke run (~1 min)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from app.cam.faithfulness import (  # noqa: E402
    auc,
    perturbation_curve,
    randomize_model,
    spearman_correlation,
)
from app.cam.localization import (  # noqa: E402
    DEFAULT_IOU_THRESHOLDS,
    energy_pointing_game,
    iou_sweep,
    mask_iou,
    pointing_game,
)
from app.loading import build_model  # noqa: E402
from app.manifest import parse_manifest  # noqa: E402

logger = logging.getLogger("bench.cam_quality")

#: Seed of the held-out set. Training used seeds listed in model_store/shapes/TRAINING.md.
HELD_OUT_SEED = 90_417
FUSED_LAYERS = ("layer1", "layer2", "layer3")
RANDOMIZATION_SEED = 0
NOISE_SEED = 0

MapFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------------------
# model and data
# --------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """The classifier and what the manifest says about it."""

    model: nn.Module
    mean: tuple[float, ...]
    std: tuple[float, ...]
    target_layer: str
    image_size: int
    num_classes: int
    source: str
    weights_sha256: str | None = None


def _freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def load_model(model_dir: Path) -> LoadedModel:
    """Build the model a ``model.toml`` manifest describes, with the service's own manifest
    parser and loader (weights through ``torch.load(weights_only=True)``), in eval mode with
    frozen parameters; the first ``[cam] target_layers`` entry is the benchmark's target layer.
    """
    spec = parse_manifest(model_dir)
    model, _ = build_model(spec)
    _, height, width = spec.input_shape
    if height != width:
        raise ValueError(f"square inputs expected, got input_shape {spec.input_shape}")
    return LoadedModel(
        model=_freeze(model),
        mean=spec.mean,
        std=spec.std,
        target_layer=spec.target_layers[0] if spec.target_layers else "layer3",
        image_size=height,
        num_classes=spec.num_classes,
        source=f"{_rel(model_dir)} ({spec.architecture}, {spec.weights})",
        weights_sha256=hashlib.sha256((model_dir / spec.weights).read_bytes()).hexdigest(),
    )


def stand_in_model() -> LoadedModel:
    """Random-weight shapes ResNet, to debug the benchmark before the trained model exists."""
    from app.zoo.shapes_resnet import build

    torch.manual_seed(0)
    return LoadedModel(
        model=_freeze(build(num_classes=8)),
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        target_layer="layer3",
        image_size=128,
        num_classes=8,
        source="STAND-IN: app.zoo.shapes_resnet:build(num_classes=8), random weights (seed 0)",
    )


def preprocess(images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 ``(N, H, W, 3)`` -> float ``(N, 3, H, W)``, ``(x / 255 - mean) / std``."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (x - m) / s


def training_seeds(model_dir: Path) -> list[int]:
    """Every integer on the lines of TRAINING.md that mention a seed (a guard, not a parser)."""
    import re

    path = model_dir / "TRAINING.md"
    if not path.exists():
        return []
    found: list[int] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if "seed" in line.lower():
            found += [int(v) for v in re.findall(r"(?<![\w.])(\d+)(?![\w.])", line)]
    return sorted(set(found))


# --------------------------------------------------------------------------------------
# map functions
# --------------------------------------------------------------------------------------


@dataclass
class Row:
    """One benchmark row: how to compute its maps, and on how many images."""

    name: str
    description: str
    n_maps: int
    n_faith: int
    n_sanity: int
    make_fn: Callable[[nn.Module], Callable[[torch.Tensor, int], torch.Tensor]] | None = None
    baseline: Callable[[int, torch.Generator], torch.Tensor] | None = None
    batch_fn: MapFn | None = None


def _extractor_row_fns(
    cls: type, target: str | list[str], opts: dict[str, Any], fuse: bool, image_shape: tuple
) -> tuple[Callable[[nn.Module], Any], MapFn]:
    """Per-image and batched map functions for an extractor class of :mod:`app.cam`."""
    needs_grad = bool(getattr(cls, "requires_grad", False))

    def compute(ext: Any, model: nn.Module, x: torch.Tensor, classes: list[int]) -> torch.Tensor:
        if needs_grad:
            with torch.enable_grad():
                scores = model(x)
                cams = ext(classes, scores)
        else:
            with torch.inference_mode():
                scores = model(x)
                cams = ext(classes, scores)
        cam = ext.fuse_cams(cams) if fuse else cams[0]
        return cam.detach().float().cpu()

    def make(model: nn.Module) -> Any:
        ext = cls(model, target_layer=target, input_shape=image_shape, **opts)

        def per_image(x: torch.Tensor, c: int) -> torch.Tensor:
            return compute(ext, model, x, [c])[0]

        per_image.close = ext.remove_hooks  # type: ignore[attr-defined]
        return per_image

    def batched(model: nn.Module, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        out = []
        with cls(model, target_layer=target, input_shape=image_shape, **opts) as ext:
            for start in range(0, images.shape[0], 16):
                x = images[start : start + 16]
                out.append(compute(ext, model, x, classes[start : start + 16].tolist()))
        return torch.cat(out)

    return make, batched


def gaussian_map(side: int, sigma_frac: float = 0.25) -> torch.Tensor:
    """Centre Gaussian on a ``side x side`` grid, sigma = ``sigma_frac * side`` cells."""
    t = torch.arange(side, dtype=torch.float32) - (side - 1) / 2
    g = torch.exp(-(t[:, None] ** 2 + t[None, :] ** 2) / (2 * (sigma_frac * side) ** 2))
    return (g - g.min()) / (g.max() - g.min())


# --------------------------------------------------------------------------------------
# the benchmark
# --------------------------------------------------------------------------------------


def _mean(t: torch.Tensor) -> float:
    return float(t.float().mean()) if t.numel() else float("nan")


def average_drop_increase(
    model: nn.Module,
    images: torch.Tensor,
    maps: torch.Tensor,
    classes: torch.Tensor,
    base_probs: torch.Tensor,
    batch_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image drop ``max(0, Y_c - O_c) / Y_c`` and increase flag ``O_c > Y_c``.

    ``O_c`` is the class probability on the model input multiplied by the map upsampled
    bilinearly to the image size (Chattopadhay et al., Grad-CAM++, WACV 2018). The input is
    the normalised tensor, so a zero map value means the data-set mean colour.
    """
    h, w = images.shape[-2:]
    out = []
    with torch.inference_mode():
        for start in range(0, images.shape[0], batch_size):
            x = images[start : start + batch_size]
            m = maps[start : start + batch_size].float()
            m = F.interpolate(m[:, None], size=(h, w), mode="bilinear", align_corners=False)
            p = torch.softmax(model(x * m), dim=1)
            out.append(p.gather(1, classes[start : start + batch_size, None])[:, 0])
    o = torch.cat(out)
    y = base_probs
    return (y - o).clamp_min(0) / y, o > y


def run(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    torch.set_num_threads(args.threads)
    model_dir = (ROOT / args.model_dir).resolve()
    if args.stand_in or not (model_dir / "model.toml").exists():
        if not args.stand_in:
            logger.warning("%s/model.toml not found: using the random-weight stand-in", model_dir)
        loaded = stand_in_model()
    else:
        loaded = load_model(model_dir)
    model = loaded.model
    seeds = training_seeds(model_dir)
    if args.seed in seeds:
        raise SystemExit(f"seed {args.seed} appears in TRAINING.md ({seeds}); pick another")

    import app.cam as cam_lib
    from app.datasets.shapes import CLASSES, make_dataset

    n_total = max(args.n_images, args.n_score, args.n_noise)
    t0 = time.perf_counter()
    images_u8, masks_np, labels_np = make_dataset(n_total, args.seed, loaded.image_size)
    images = preprocess(images_u8, loaded.mean, loaded.std)
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
    n_score, n_noise = args.n_score, args.n_noise
    methods: list[tuple[str, str, type, Any, dict[str, Any], bool, tuple[int, int, int]]] = [
        ("CAM", "CAM", cam_lib.CAM, tl, {}, False, (n_cheap, n_faith, n_sanity)),
        ("GradCAM", "Grad-CAM", cam_lib.GradCAM, tl, {}, False, (n_cheap, n_faith, n_sanity)),
        ("GradCAMpp", "Grad-CAM++", cam_lib.GradCAMpp, tl, {}, False, (n_cheap, n_faith, n_sanity)),
        ("XGradCAM", "XGrad-CAM", cam_lib.XGradCAM, tl, {}, False, (n_cheap, n_faith, n_sanity)),
        ("LayerCAM", "LayerCAM", cam_lib.LayerCAM, tl, {}, False, (n_cheap, n_faith, n_sanity)),
        (
            "LayerCAM-fused",
            f"LayerCAM fused over {'+'.join(FUSED_LAYERS)} (fuse_cams)",
            cam_lib.LayerCAM,
            list(FUSED_LAYERS),
            {},
            True,
            (n_cheap, n_faith, n_sanity),
        ),
        (
            "SmoothGradCAMpp",
            "Smooth Grad-CAM++ (num_samples=4, std=0.3, seed 0)",
            cam_lib.SmoothGradCAMpp,
            tl,
            {"seed": NOISE_SEED},
            False,
            (n_cheap, n_faith, n_sanity),
        ),
        (
            "ScoreCAM",
            "Score-CAM (batch_size=32)",
            cam_lib.ScoreCAM,
            tl,
            {},
            False,
            (n_score, n_score, min(n_score, args.n_sanity_expensive)),
        ),
        (
            "SSCAM",
            f"SS-CAM (num_samples={args.sscam_samples}"
            + (", lowered from the default 35 for cost" if args.sscam_samples != 35 else "")
            + ", std=2.0, seed 0)",
            cam_lib.SSCAM,
            tl,
            {"num_samples": args.sscam_samples, "seed": NOISE_SEED},
            False,
            (n_noise, n_noise, min(n_noise, args.n_sanity_expensive)),
        ),
        (
            "ISCAM",
            f"IS-CAM (num_samples={args.iscam_samples}"
            + (", default" if args.iscam_samples == 10 else ", default 10")
            + ")",
            cam_lib.ISCAM,
            tl,
            {"num_samples": args.iscam_samples},
            False,
            (n_noise, n_noise, min(n_noise, args.n_sanity_expensive)),
        ),
    ]
    rows: list[Row] = []
    for name, desc, cls, target, opts, fuse, (nm, nf, ns) in methods:
        make, batched = _extractor_row_fns(cls, target, opts, fuse, shape)
        rows.append(Row(name, desc, nm, min(nf, nm), min(ns, nm), make_fn=make, batch_fn=batched))

    # Baselines: maps at the target layer's resolution, like the methods' maps.
    side = _layer_side(model, tl, shape)
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
            "processor": _cpu_model(),
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
            "dataset": "app.datasets.shapes.make_dataset",
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
        "stand_in_model": loaded.source.startswith("STAND-IN"),
    }
    return report


#: Pairs of methods that coincide for a model whose head is global average pooling followed by one
#: linear layer: dS_c/dA_k(i,j) = w_ck / (h w) is constant, so Grad-CAM's weights are CAM's up to
#: a factor, XGrad-CAM's weights sum_ij A/sum(A) * g equal Grad-CAM's, and Smooth Grad-CAM++
#: averages gradients that do not depend on the (noisy) input, which gives Grad-CAM++.
IDENTITIES = (("CAM", "GradCAM"), ("GradCAM", "XGradCAM"), ("GradCAMpp", "SmoothGradCAMpp"))


def identity_checks(results: list[dict[str, Any]]) -> dict[str, float]:
    """Largest absolute difference between the maps of method pairs expected to coincide."""
    maps = {r["name"]: r["_maps"] for r in results}
    out = {}
    for a, b in IDENTITIES:
        k = min(maps[a].shape[0], maps[b].shape[0])
        out[f"max_abs_diff_{a}_vs_{b}"] = float((maps[a][:k] - maps[b][:k]).abs().max())
    logger.info("identity checks (up to 64 maps per pair): %s", out)
    return out


def crosscheck_classification_metric(
    cam_lib: Any,
    model: nn.Module,
    images: torch.Tensor,
    preds: torch.Tensor,
    target: str,
    shape: tuple[int, ...],
    results: list[dict[str, Any]],
    n: int,
) -> dict[str, Any]:
    """Average Drop / Increase in Confidence of Grad-CAM on the first ``n`` images computed by
    the engine's ``ClassificationMetric``, next to this benchmark's own computation."""
    mine = next(r for r in results if r["name"] == "GradCAM")["per_image"]
    n = min(n, len(mine["drop"]))
    with cam_lib.GradCAM(model, target_layer=target, input_shape=shape) as ext:
        metric = cam_lib.ClassificationMetric(ext)
        for start in range(0, n, 16):
            metric.update(images[start : min(start + 16, n)], preds[start : min(start + 16, n)])
        summary = metric.summary()
    out = {
        "n_images": n,
        "engine_average_drop": 100 * summary["avg_drop"],
        "engine_increase_in_confidence": 100 * summary["conf_increase"],
        "bench_average_drop": 100 * float(np.mean(mine["drop"][:n])),
        "bench_increase_in_confidence": 100 * float(np.mean(mine["increase"][:n])),
    }
    logger.info("ClassificationMetric cross-check (Grad-CAM): %s", out)
    return out


def _layer_side(model: nn.Module, layer: str, shape: tuple[int, ...]) -> int:
    out: dict[str, torch.Tensor] = {}
    handle = dict(model.named_modules())[layer].register_forward_hook(
        lambda m, i, o: out.__setitem__("o", o)
    )
    try:
        with torch.inference_mode():
            model(torch.zeros(1, *shape))
    finally:
        handle.remove()
    return int(out["o"].shape[-1])


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def evaluate_row(
    row: Row,
    model: nn.Module,
    images: torch.Tensor,
    masks: torch.Tensor,
    preds: torch.Tensor,
    base_probs: torch.Tensor,
    args: argparse.Namespace,
    num_classes: int,
) -> dict[str, Any]:
    """All metrics of one row; returns per-image values too (for the common-subset table)."""
    n = row.n_maps
    x_all, cls_all = images[:n], preds[:n]
    maps: list[torch.Tensor] = []
    times: list[float] = []
    gen = torch.Generator().manual_seed(RANDOMIZATION_SEED + 1)
    t_maps = time.perf_counter()
    if row.baseline is not None:
        for i in range(n):
            t = time.perf_counter()
            maps.append(row.baseline(i, gen))
            times.append(time.perf_counter() - t)
    else:
        assert row.make_fn is not None
        per_image = row.make_fn(model)
        try:
            for i in range(n):
                t = time.perf_counter()
                maps.append(per_image(x_all[i : i + 1], int(cls_all[i])))
                times.append(time.perf_counter() - t)
        finally:
            per_image.close()
    m = torch.stack(maps)
    t_maps = time.perf_counter() - t_maps
    if not torch.isfinite(m).all():
        logger.error("%s: non-finite values in the maps", row.name)

    msk = masks[:n]
    pg0 = pointing_game(m, msk, tolerance=0)
    pg15 = pointing_game(m, msk, tolerance=15)
    epg = energy_pointing_game(m, msk)
    iou05 = mask_iou(m, msk, 0.5)
    sweep = iou_sweep(m, msk, DEFAULT_IOU_THRESHOLDS)
    drop, inc = average_drop_increase(model, x_all, m, cls_all, base_probs[:n])

    t_faith = time.perf_counter()
    nf = row.n_faith
    fr, p_del = perturbation_curve(
        model, x_all[:nf], m[:nf], cls_all[:nf], "deletion", args.steps, batch_size=32
    )
    del_auc = auc(fr, p_del)
    fr, p_ins = perturbation_curve(
        model, x_all[:nf], m[:nf], cls_all[:nf], "insertion", args.steps, batch_size=32
    )
    ins_auc = auc(fr, p_ins)
    t_faith = time.perf_counter() - t_faith

    t_sanity = time.perf_counter()
    ns = row.n_sanity
    rnd = randomize_model(model, seed=RANDOMIZATION_SEED)
    if row.baseline is not None:
        rnd_maps = torch.stack([row.baseline(i, gen) for i in range(ns)])
    else:
        assert row.batch_fn is not None
        rnd_maps = row.batch_fn(rnd, x_all[:ns], cls_all[:ns])
    rho = spearman_correlation(m[:ns], rnd_maps)
    t_sanity = time.perf_counter() - t_sanity

    mean_sweep = sweep.mean(dim=0)
    keep = min(n, 64)
    best_idx = int(mean_sweep.argmax())
    return {
        "name": row.name,
        "description": row.description,
        "n_maps": n,
        "n_faithfulness": nf,
        "n_sanity": ns,
        "map_shape": list(m.shape[1:]),
        "pointing_game": _mean(pg0),
        "pointing_game_15px": _mean(pg15),
        "energy_pointing_game": _mean(epg),
        "iou_at_0.5": _mean(iou05),
        "best_iou": float(mean_sweep[best_idx]),
        "best_iou_threshold": float(DEFAULT_IOU_THRESHOLDS[best_idx]),
        "deletion_auc": _mean(del_auc),
        "insertion_auc": _mean(ins_auc),
        "sanity_spearman": _mean(rho),
        "average_drop": 100 * _mean(drop),
        "increase_in_confidence": 100 * _mean(inc),
        "ms_per_image_median": 1000 * statistics.median(times),
        "seconds_maps": round(t_maps, 1),
        "seconds_faithfulness": round(t_faith, 1),
        "seconds_sanity": round(t_sanity, 1),
        "_maps": m[:keep],  # in memory only, for the identity checks; not written
        "per_image": {
            "pointing_game": pg0.int().tolist(),
            "energy_pointing_game": [round(v, 5) for v in epg.tolist()],
            "iou_at_0.5": [round(v, 5) for v in iou05.tolist()],
            "iou_sweep": [[round(v, 4) for v in r] for r in sweep.tolist()],
            "deletion_auc": [round(v, 5) for v in del_auc.tolist()],
            "insertion_auc": [round(v, 5) for v in ins_auc.tolist()],
            "sanity_spearman": [round(v, 5) for v in rho.tolist()],
            "drop": [round(v, 5) for v in drop.tolist()],
            "increase": inc.int().tolist(),
        },
    }


def common_subset_table(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Every metric recomputed on the largest prefix of images that all rows share."""
    k_maps = min(r["n_maps"] for r in results)
    k_faith = min(r["n_faithfulness"] for r in results)
    k_san = min(r["n_sanity"] for r in results)
    rows = []
    for r in results:
        pi = r["per_image"]
        sweep = torch.tensor(pi["iou_sweep"][:k_maps]).mean(dim=0)
        best = int(sweep.argmax())
        rows.append(
            {
                "name": r["name"],
                "pointing_game": float(np.mean(pi["pointing_game"][:k_maps])),
                "energy_pointing_game": float(np.mean(pi["energy_pointing_game"][:k_maps])),
                "iou_at_0.5": float(np.mean(pi["iou_at_0.5"][:k_maps])),
                "best_iou": float(sweep[best]),
                "best_iou_threshold": float(DEFAULT_IOU_THRESHOLDS[best]),
                "deletion_auc": float(np.mean(pi["deletion_auc"][:k_faith])),
                "insertion_auc": float(np.mean(pi["insertion_auc"][:k_faith])),
                "sanity_spearman": float(np.mean(pi["sanity_spearman"][:k_san])),
                "average_drop": 100 * float(np.mean(pi["drop"][:k_maps])),
                "increase_in_confidence": 100 * float(np.mean(pi["increase"][:k_maps])),
            }
        )
    return {"n_maps": k_maps, "n_faithfulness": k_faith, "n_sanity": k_san, "rows": rows}


COLUMNS = [
    ("pointing_game", "PG ↑", "{:.3f}"),
    ("energy_pointing_game", "EPG ↑", "{:.3f}"),
    ("iou_at_0.5", "IoU@.5 ↑", "{:.3f}"),
    ("best_iou", "best IoU ↑ (t)", None),
    ("deletion_auc", "Del AUC ↓", "{:.3f}"),
    ("insertion_auc", "Ins AUC ↑", "{:.3f}"),
    ("sanity_spearman", "rand. ρ ↓", "{:.3f}"),
    ("average_drop", "AD % ↓", "{:.1f}"),
    ("increase_in_confidence", "IC % ↑", "{:.1f}"),
]


def _cell(row: dict[str, Any], key: str, fmt: str | None) -> str:
    if key == "best_iou":
        return f"{row['best_iou']:.3f} ({row['best_iou_threshold']:.2f})"
    value = row[key]
    return (
        "nan"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else fmt.format(value)
    )


def markdown(report: dict[str, Any]) -> str:
    """The two tables and the run's facts as markdown."""
    mach = report["machine"]
    ho = report["held_out"]
    lines = [
        "# CAM quality benchmark",
        "",
        f"Model: {report['model']}, target layer `{report['target_layer']}`. Held-out shapes set: "
        f"seed {ho['seed']}, {ho['n_images']} images of {ho['image_size']}x{ho['image_size']}, "
        f"model accuracy {ho['accuracy']:.3f}. Explained class: the predicted class.",
        "",
        f"Machine: {mach['platform']}, {mach['processor']}, {mach['cpu_count']} CPUs "
        f"({mach['torch_threads']} torch threads), torch {mach['torch']}, Python {mach['python']}; "
        f"load average at start {mach['loadavg_start'][0]}, at end {mach['loadavg_end'][0]}. "
        f"Wall time {report['wall_seconds']:.0f} s"
        + (" (QUICK smoke run)" if report["quick"] else "")
        + (" (STAND-IN random-weight model)" if report["stand_in_model"] else "")
        + ".",
        "",
        "n = images for PG/EPG/IoU/AD/IC/ms; n_f for deletion/insertion; n_s for the "
        "randomisation check (all prefixes of the same held-out set).",
        "",
    ]
    head = ["method", "n", "n_f", "n_s", *[c[1] for c in COLUMNS], "ms/img"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
    for r in report["rows"]:
        cells = [r["name"], str(r["n_maps"]), str(r["n_faithfulness"]), str(r["n_sanity"])]
        cells += [_cell(r, k, f) for k, _, f in COLUMNS]
        cells.append(f"{r['ms_per_image_median']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    c = report["common_subset"]
    lines += [
        "",
        f"Same metrics, every row on the same first {c['n_maps']} images "
        f"({c['n_faithfulness']} for deletion/insertion, {c['n_sanity']} for the randomisation "
        "check):",
        "",
    ]
    head2 = ["method", *[col[1] for col in COLUMNS]]
    lines.append("| " + " | ".join(head2) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(head2) - 1)) + "|")
    for r in c["rows"]:
        lines.append(
            "| " + " | ".join([r["name"], *[_cell(r, k, f) for k, _, f in COLUMNS]]) + " |"
        )
    lines += ["", "Rows:", ""]
    lines += [f"- `{r['name']}`: {r['description']}" for r in report["rows"]]
    cc = report["classification_metric_crosscheck"]
    ids = ", ".join(
        f"{k[len('max_abs_diff_') :]} {v:.1e}" for k, v in report["identity_checks"].items()
    )
    lines += [
        "",
        f"Checks: AD/IC of Grad-CAM on {cc['n_images']} images by the engine's "
        f"`ClassificationMetric` {cc['engine_average_drop']:.2f} / "
        f"{cc['engine_increase_in_confidence']:.2f} vs this script "
        f"{cc['bench_average_drop']:.2f} / {cc['bench_increase_in_confidence']:.2f}; "
        f"largest map differences of pairs that coincide for a GAP + linear head: {ids}.",
    ]
    lines += [
        "",
        "PG: pointing game, map maximum inside the mask (0 px tolerance). EPG: share of the "
        "map's mass inside the mask. IoU@.5: mask vs map >= 0.5 after min-max normalisation; "
        "best IoU: best mean IoU over thresholds 0.05..0.95 (threshold in brackets). Del/Ins "
        f"AUC: RISE deletion (to 0 after normalisation) / insertion (from a blurred copy), "
        f"{report['protocol']['deletion'].split(',')[0]}. rand. ρ: Spearman correlation with the "
        "maps of a fully re-initialised model (low = the map depends on the weights). AD / IC: "
        "Average Drop / Increase in Confidence on image x map. ms/img: median, batch 1, "
        "forward (+backward) + map.",
        "",
    ]
    return "\n".join(lines)


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
    p.add_argument("--out-dir", default="bench/results")
    p.add_argument("--quick", action="store_true", help="smoke run on a few images")
    args = p.parse_args(argv)
    if args.quick:
        args.n_images, args.n_faith, args.n_sanity = 24, 8, 8
        args.n_score, args.n_noise, args.n_sanity_expensive = 4, 2, 2
        args.sscam_samples, args.iscam_samples = 2, 2
        args.crosscheck_images = 8
    if args.steps < 20 and not args.quick:
        raise SystemExit("--steps must be >= 20")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv)
    report = run(args)
    out_dir = ROOT / args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    md = markdown(report)
    for row in report["rows"]:
        row.pop("_maps", None)
        row["per_image"].pop("iou_sweep", None)  # large; the sweep means are in the tables
    (out_dir / f"cam_quality{suffix}.json").write_text(json.dumps(report, indent=1) + "\n")
    (out_dir / f"cam_quality{suffix}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
