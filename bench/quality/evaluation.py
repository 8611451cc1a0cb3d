"""The quality benchmark's evaluation: which rows run, their maps, and the metrics of one row."""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import app.cam as cam_lib
from app.cam.faithfulness import auc, perturbation_curve, randomize_model, spearman_correlation
from app.cam.localization import (
    DEFAULT_IOU_THRESHOLDS,
    energy_pointing_game,
    iou_sweep,
    mask_iou,
    pointing_game,
)

logger = logging.getLogger("bench.cam_quality")

FUSED_LAYERS = ("layer1", "layer2", "layer3")
REFINE_LAYERS = ("layer2", "layer3")
RANDOMIZATION_SEED = 0
NOISE_SEED = 0

MapFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class MethodSpec:
    """A method row: the extractor, its layer(s) and options, and how costly it is.

    ``cost`` picks the image counts: ``"cheap"`` (one backward or none), ``"score"`` (one forward
    per channel), ``"noise"`` (one forward per channel and sample). ``call`` holds the options
    given when the extractor is called (``eigen_smooth``, ``aug_smooth``).
    """

    name: str
    description: str
    cls: type
    target: str | list[str]
    options: dict[str, Any] = field(default_factory=dict)
    fuse: bool = False
    cost: str = "cheap"
    call: dict[str, Any] = field(default_factory=dict)


def method_specs(args: argparse.Namespace, layer: str) -> list[MethodSpec]:
    """Every method of ``app.cam`` that applies to a CNN, as benchmark rows."""
    c = cam_lib
    return [
        MethodSpec("CAM", "CAM", c.CAM, layer),
        MethodSpec("GradCAM", "Grad-CAM", c.GradCAM, layer),
        MethodSpec("GradCAMpp", "Grad-CAM++", c.GradCAMpp, layer),
        MethodSpec("XGradCAM", "XGrad-CAM", c.XGradCAM, layer),
        MethodSpec("LayerCAM", "LayerCAM", c.LayerCAM, layer),
        MethodSpec(
            "LayerCAM-fused",
            f"LayerCAM fused over {'+'.join(FUSED_LAYERS)} (fuse_cams)",
            c.LayerCAM,
            list(FUSED_LAYERS),
            fuse=True,
        ),
        MethodSpec(
            "SmoothGradCAMpp",
            "Smooth Grad-CAM++ (num_samples=4, std=0.3, seed 0)",
            c.SmoothGradCAMpp,
            layer,
            {"seed": NOISE_SEED},
        ),
        MethodSpec("ScoreCAM", "Score-CAM (batch_size=32)", c.ScoreCAM, layer, cost="score"),
        MethodSpec(
            "SSCAM",
            f"SS-CAM (num_samples={args.sscam_samples}"
            + (", lowered from the default 35 for cost" if args.sscam_samples != 35 else "")
            + ", std=2.0, seed 0)",
            c.SSCAM,
            layer,
            {"num_samples": args.sscam_samples, "seed": NOISE_SEED},
            cost="noise",
        ),
        MethodSpec(
            "ISCAM",
            f"IS-CAM (num_samples={args.iscam_samples}"
            + (", default" if args.iscam_samples == 10 else ", default 10")
            + ")",
            c.ISCAM,
            layer,
            {"num_samples": args.iscam_samples},
            cost="noise",
        ),
        MethodSpec("HiResCAM", "HiResCAM", c.HiResCAM, layer),
        MethodSpec("GradCAMElementWise", "element-wise Grad-CAM", c.GradCAMElementWise, layer),
        MethodSpec("EigenCAM", "Eigen-CAM (class-agnostic)", c.EigenCAM, layer),
        MethodSpec("EigenGradCAM", "EigenGrad-CAM", c.EigenGradCAM, layer),
        MethodSpec(
            "AblationCAM", "Ablation-CAM (batch_size=32)", c.AblationCAM, layer, cost="score"
        ),
        MethodSpec(
            "RefineCAM",
            f"RefineCAM over {'+'.join(REFINE_LAYERS)} (base Grad-CAM++)",
            c.RefineCAM,
            list(REFINE_LAYERS),
        ),
        MethodSpec(
            "FinerCAM",
            "Finer-CAM (base Grad-CAM, gamma=0.6, 3 nearest classes)",
            c.FinerCAM,
            layer,
        ),
        MethodSpec(
            "ISCAM-linear",
            f"IS-CAM, schedule='linear' (c_i = i/n; num_samples={args.iscam_samples})",
            c.ISCAM,
            layer,
            {"num_samples": args.iscam_samples, "schedule": "linear"},
            cost="noise",
        ),
        MethodSpec(
            "AblationCAM-0.25",
            "Ablation-CAM, ablation_ratio=0.25 (the quarter of channels of largest mean)",
            c.AblationCAM,
            layer,
            {"ablation_ratio": 0.25},
            cost="score",
        ),
        MethodSpec("FullGrad", "FullGrad (input and every bias; no layer)", c.FullGrad, layer),
        MethodSpec("ShapleyCAM", "ShapleyCAM (gradient - 1/2 Hessian-vector)", c.ShapleyCAM, layer),
        MethodSpec("KPCACAM", "KPCA-CAM (RBF, gamma 1/K; class-agnostic)", c.KPCACAM, layer),
        MethodSpec("FEM", "FEM (k_std=2; class-agnostic)", c.FEM, layer),
        MethodSpec(
            "GuidedBackprop",
            "Guided Backpropagation (max_c |G_c| at the input's 128x128, scored as any map: "
            "its maximum pixel, its mass in the mask, deletion by its pixel order)",
            c.GuidedBackprop,
            layer,
        ),
        MethodSpec(
            "GuidedGradCAM",
            "Guided Grad-CAM (max_c |G_c x up(Grad-CAM)| at the input's 128x128)",
            c.GuidedGradCAM,
            layer,
        ),
        MethodSpec(
            "DFF",
            "DFF (K=4, 200 NMF steps): the map of the concept whose head score for the "
            "explained class is highest",
            c.DFF,
            layer,
        ),
        MethodSpec(
            "GradCAM-eigen",
            "Grad-CAM, eigen_smooth (first principal component of w_k A_k)",
            c.GradCAM,
            layer,
            call={"eigen_smooth": True},
        ),
        MethodSpec(
            "GradCAM-aug",
            "Grad-CAM, aug_smooth (mean over flip x scale 0.9/1.0/1.1)",
            c.GradCAM,
            layer,
            call={"aug_smooth": True},
        ),
        MethodSpec(
            "GradCAMpp-eigen",
            "Grad-CAM++, eigen_smooth",
            c.GradCAMpp,
            layer,
            call={"eigen_smooth": True},
        ),
        MethodSpec(
            "GradCAMpp-aug",
            "Grad-CAM++, aug_smooth",
            c.GradCAMpp,
            layer,
            call={"aug_smooth": True},
        ),
        # No seed: a seed restarts the draws at every call, and the benchmark calls once per
        # image, so every image would get the same map. torch's global generator is seeded
        # once by main().
        MethodSpec(
            "RandomCAM",
            "RandomCAM, the floor (U(-1,1) per cell, torch's global generator seeded once)",
            c.RandomCAM,
            layer,
        ),
    ]


def selected_specs(args: argparse.Namespace, layer: str) -> list[MethodSpec]:
    """``method_specs`` narrowed to the rows ``--methods`` names (all when it names none), and
    Grad-CAM's."""
    specs = method_specs(args, layer)
    wanted = [name for name in (getattr(args, "methods", "") or "").split(",") if name]
    unknown = set(wanted) - {spec.name for spec in specs}
    if unknown:
        raise SystemExit(f"--methods: no row {sorted(unknown)}; rows: {[s.name for s in specs]}")
    # Grad-CAM always runs: the AD/IC cross-check with the engine reads its row.
    return [spec for spec in specs if not wanted or spec.name in {*wanted, "GradCAM"}]


#: Methods of ``app.cam`` that do not apply to the benchmark's CNN, with the reason.
NOT_APPLICABLE = {"LeGrad": "reads the attention of Vision Transformer blocks; the model is a CNN"}


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


def extractor_map_fns(
    cls: type,
    target: str | list[str],
    opts: dict[str, Any],
    fuse: bool,
    image_shape: tuple,
    call: dict[str, Any] | None = None,
) -> tuple[Callable[[nn.Module], Any], MapFn]:
    """Per-image and batched map functions for an extractor class of :mod:`app.cam`; ``call``:
    keywords of each call of the extractor (the smoothing options)."""
    needs_grad = bool(getattr(cls, "requires_grad", False))
    call = call or {}

    def compute(ext: Any, model: nn.Module, x: torch.Tensor, classes: list[int]) -> torch.Tensor:
        if needs_grad:
            with torch.enable_grad():
                scores = model(x)
                cams = ext(classes, scores, **call)
        else:
            with torch.inference_mode():
                scores = model(x)
                cams = ext(classes, scores, **call)
        cam = ext.fuse_cams(cams) if fuse else cams[0]
        return cam.detach().float().cpu()

    def make(model: nn.Module) -> Any:
        ext = cls(model, target, input_shape=image_shape, **opts)

        def per_image(x: torch.Tensor, c: int) -> torch.Tensor:
            return compute(ext, model, x, [c])[0]

        per_image.close = ext.remove_hooks  # type: ignore[attr-defined]
        return per_image

    def batched(model: nn.Module, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        out = []
        with cls(model, target, input_shape=image_shape, **opts) as ext:
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


#: Pairs of methods that coincide for a model whose head is global average pooling followed by one
#: linear layer: dS_c/dA_k(i,j) = w_ck / (h w) is constant, so Grad-CAM's weights are CAM's up to
#: a factor, XGrad-CAM's weights sum_ij A/sum(A) * g equal Grad-CAM's, and Smooth Grad-CAM++
#: averages gradients that do not depend on the (noisy) input, which gives Grad-CAM++. The score
#: is linear in A, so its Hessian-vector term is 0 and ShapleyCAM is Grad-CAM. Grad-CAM with
#: eigen_smooth takes the principal component of w_k A_k, w_k constant over positions: the
#: component of g_k A_k that EigenGrad-CAM takes.
IDENTITIES = (
    ("CAM", "GradCAM"),
    ("GradCAM", "XGradCAM"),
    ("GradCAMpp", "SmoothGradCAMpp"),
    ("GradCAM", "ShapleyCAM"),
    ("EigenGradCAM", "GradCAM-eigen"),
)


def identity_checks(results: list[dict[str, Any]]) -> dict[str, float]:
    """Largest absolute difference between the maps of method pairs expected to coincide."""
    maps = {r["name"]: r["_maps"] for r in results}
    out = {}
    for a, b in IDENTITIES:
        if a not in maps or b not in maps:
            continue  # a row left out (--methods)
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


def layer_side(model: nn.Module, layer: str, shape: tuple[int, ...]) -> int:
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
