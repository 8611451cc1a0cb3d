"""The quality benchmark's report: markdown tables of the JSON results."""

from __future__ import annotations

import math
import platform
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


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
    if "class_sensitivity" in report:
        lines += sensitivity_markdown(report["class_sensitivity"])
    return "\n".join(lines)


SENSITIVITY_COLUMNS = [
    ("discriminative_pointing_game", "DPG ↑", "{:.3f}"),
    ("own_energy_share", "own energy share ↑", "{:.3f}"),
    ("map_correlation_between_classes", "ρ between classes ↓", "{:.3f}"),
    ("pointing_on_either_object", "PG either object", "{:.3f}"),
]


def sensitivity_markdown(section: dict[str, Any]) -> list[str]:
    """The class-sensitivity table and its protocol."""
    pairs = section["pairs"]
    head = ["method", "n", *[c[1] for c in SENSITIVITY_COLUMNS]]
    lines = [
        "## Class sensitivity",
        "",
        f"Two-shape images ({pairs['dataset']}, seed {pairs['seed']}, "
        f"{pairs['image_size']}x{pairs['image_size']}); the model's prediction is one of the two "
        f"present classes on {pairs['prediction_is_one_of_the_two']:.0%} of them. "
        f"{section['protocol']}. Wall time {section['wall_seconds']:.0f} s.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|",
    ]
    for r in section["rows"]:
        cells = [r["name"], str(r["n_images"])]
        cells += [_cell(r, key, fmt) for key, _, fmt in SENSITIVITY_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [""]
    lines += [
        f"- `{name}`: not applicable, {why}." for name, why in section["not_applicable"].items()
    ]
    lines += [f"- `{r['name']}`: {r['description']}" for r in section["rows"]]
    lines += [""]
    return lines
