"""The faithfulness stage on shapes: Grad-CAM's maps against random maps, as the service scores.

The maps come from the service's own CAM pass (``app.pipeline.passes.run_cam_pass``) and the
scores from its faithfulness pass (``app.pipeline.faithfulness.run_scoring_pass``, one forward
per curve), on the held-out images of the quality benchmark. A random map (uniform noise at the
layer's resolution, seeded) is the baseline, and Grad-CAM's map reversed (least salient first) a
second one: a map that reflects what the model uses has a higher insertion AUC and a lower
deletion AUC than both, and keeps more of the class's probability when the image is multiplied
by it (a lower ``confidence_drop``: Grad-CAM++'s Average Drop, its mean). The AUCs at 16, 32
and 64 steps of the same maps say how much the steps change the score (the reason for the bound
on them).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch

from app.models.registry import ModelRegistry
from app.models.zoo.shapes_dataset import make_dataset
from app.pipeline.faithfulness import DEFAULT_STEPS, ScoreItem, Scoring, run_scoring_pass
from app.pipeline.passes import CamItem, CamPlan, run_cam_pass
from bench.quality.data import to_input

RANDOM_MAP_SEED = 27
CURVES = ("deletion", "insertion")


def _scores(model: Any, x: torch.Tensor, cams: torch.Tensor, classes: list[int], steps: int):  # type: ignore[no-untyped-def]
    item = ScoreItem(x, ((cams, tuple(classes)),))
    [[scored]] = run_scoring_pass(model, Scoring((*CURVES, "confidence"), steps), [item])
    return [
        (s.deletion_auc, s.insertion_auc, s.confidence_drop, s.confidence_increase) for s in scored
    ]


def run(store: Path, n_images: int, seed: int, batch: int = 16) -> dict[str, Any]:
    """Mean deletion and insertion AUC of Grad-CAM and of random maps on ``n_images`` held-out
    shapes images, through the service's passes."""
    started = time.perf_counter()
    registry = ModelRegistry(store, torch.device("cpu"), "shapes")
    registry.discover()
    registry.load_all()
    model = registry.get("shapes")
    _, size, _ = model.spec.input_shape
    images, _, labels = make_dataset(n_images, seed, size)
    x_all = to_input(images, model.spec.mean, model.spec.std)
    plan = CamPlan("GradCAM", _gradcam(), model.target_layers, (), True)
    generator = torch.Generator().manual_seed(RANDOM_MAP_SEED)
    rows: dict[str, list[tuple[float, float, float, bool]]] = {
        "GradCAM": [],
        "random map": [],
        "GradCAM reversed": [],
    }
    by_steps: dict[int, list[tuple[float, float, float, bool]]] = {16: [], 32: [], 64: []}
    correct = 0
    for start in range(0, n_images, batch):
        x = x_all[start : start + batch]
        [outcome] = run_cam_pass(model, plan, [CamItem(x)])
        classes = outcome.class_idx
        truth = labels[start : start + batch]
        correct += sum(int(c == int(t)) for c, t in zip(classes, truth, strict=True))
        cams = outcome.cams[0]
        noise = torch.rand(cams.shape, generator=generator)
        rows["GradCAM"] += _scores(model, x, cams, classes, DEFAULT_STEPS)
        rows["random map"] += _scores(model, x, noise, classes, DEFAULT_STEPS)
        rows["GradCAM reversed"] += _scores(model, x, -cams, classes, DEFAULT_STEPS)
        if start < 64:  # the steps' effect on the first 64 images
            for steps in by_steps:
                by_steps[steps] += _scores(model, x, cams, classes, steps)
    table = {
        name: {
            "deletion_auc": statistics.fmean(v[0] for v in values),
            "insertion_auc": statistics.fmean(v[1] for v in values),
            "average_drop": statistics.fmean(v[2] for v in values),
            "increase_in_confidence": statistics.fmean(float(v[3]) for v in values),
            "n_images": len(values),
        }
        for name, values in rows.items()
    }
    grad, rand = table["GradCAM"], table["random map"]
    finest = by_steps[64]
    return {
        "model": f"{store.name}/shapes ({model.spec.architecture})",
        "held_out_seed": seed,
        "steps": DEFAULT_STEPS,
        "classified_correctly": correct / n_images,
        "rows": table,
        "gradcam_insertion_above_random": grad["insertion_auc"] > rand["insertion_auc"],
        "gradcam_deletion_below_random": grad["deletion_auc"] < rand["deletion_auc"],
        "gradcam_drop_below_random": grad["average_drop"] < rand["average_drop"],
        "gradcam_drop_below_random_per_image": statistics.fmean(
            float(g[2] < r[2]) for g, r in zip(rows["GradCAM"], rows["random map"], strict=True)
        ),
        "gradcam_drop_below_reversed_per_image": statistics.fmean(
            float(g[2] < r[2])
            for g, r in zip(rows["GradCAM"], rows["GradCAM reversed"], strict=True)
        ),
        "steps_effect": {
            str(steps): {
                f"mean_abs_change_vs_64_{curve}": statistics.fmean(
                    abs(a[k] - b[k]) for a, b in zip(values, finest, strict=True)
                )
                for k, curve in enumerate(CURVES)
            }
            for steps, values in by_steps.items()
            if steps != 64
        },
        "seconds": round(time.perf_counter() - started, 1),
    }


def _gradcam() -> Any:
    from app.cam import METHODS

    return METHODS["GradCAM"]


def markdown(section: dict[str, Any]) -> str:
    """The section as a markdown table."""
    lines = [
        f"Faithfulness stage on {section['model']}, held-out seed {section['held_out_seed']}, "
        f"{section['steps']} steps per curve:",
        "",
        "| maps | images | deletion AUC (lower is better) | insertion AUC (higher is better) "
        "| average drop (lower is better) | increase in confidence |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in section["rows"].items():
        lines.append(
            f"| {name} | {row['n_images']} | {row['deletion_auc']:.3f} | "
            f"{row['insertion_auc']:.3f} | {row['average_drop']:.3f} | "
            f"{row['increase_in_confidence']:.3f} |"
        )
    effect = section["steps_effect"]
    lines += [
        "",
        "Mean absolute change of Grad-CAM's AUC against 64 steps (first 64 images): "
        + "; ".join(
            f"{steps} steps: deletion {v['mean_abs_change_vs_64_deletion']:.4f}, "
            f"insertion {v['mean_abs_change_vs_64_insertion']:.4f}"
            for steps, v in effect.items()
        )
        + ".",
    ]
    return "\n".join(lines) + "\n"
