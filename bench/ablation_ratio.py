"""Ablation-CAM's ``ablation_ratio``: time against the full run, and how far the maps move.

On the trained shapes model (``model_store/shapes``, target layer ``layer3``) and images of the
quality benchmark's held-out set, each ratio's Ablation-CAM call is timed: the median per image,
one image per call, the forward excluded, after one warm-up call that traces the model's tail;
the process's CPU time on one thread (on a shared CPU wall time measures the neighbours), or wall
time on CUDA. Its maps are compared with the full run's (ratio 1) by Spearman rank correlation
(``app.cam.spearman_correlation``) and by the pointing game on the shapes' masks.

Usage::

    .venv/bin/python bench/ablation_ratio.py                 # 16 images, ratios 1, 0.5, 0.25, 0.1
    .venv/bin/python bench/ablation_ratio.py --whole-model   # fast_path=False: whole forwards
    .venv/bin/python bench/ablation_ratio.py --quick         # 4 images
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from app.cam import AblationCAM, pointing_game, resize_maps, spearman_correlation  # noqa: E402
from app.cam.ablation import ablated_channels  # noqa: E402
from app.models.zoo.shapes_dataset import make_dataset  # noqa: E402
from bench.quality.data import HELD_OUT_SEED, open_bench_model, to_input  # noqa: E402

RATIOS = (1.0, 0.5, 0.25, 0.1)


def run(
    images: int, ratios: tuple[float, ...], device: str, fast_path: bool = True
) -> dict[str, Any]:
    bench = open_bench_model(ROOT / "model_store" / "shapes")
    model = bench.model.to(device)
    pixels, masks, _ = make_dataset(images, HELD_OUT_SEED, bench.image_size)
    x = to_input(pixels, bench.mean, bench.std).to(device)
    masks_t = torch.from_numpy(masks)
    size = (bench.image_size, bench.image_size)
    # On a CPU shared with other work, wall time measures the neighbours: the process's CPU time
    # (one thread) is what the call itself costs. On CUDA, wall time after a synchronize.
    clock = time.perf_counter if device == "cuda" else time.process_time
    maps: dict[float, list[torch.Tensor]] = {r: [] for r in ratios}
    times: dict[float, list[float]] = {r: [] for r in ratios}
    channels = 0
    for ratio in ratios:
        with AblationCAM(
            model,
            bench.target_layer,
            input_shape=(3, *size),
            ablation_ratio=ratio,
            fast_path=fast_path,
        ) as extractor:
            for i in range(-1, images):  # -1: a warm-up call (it traces the model's tail once)
                one = x[max(i, 0) : max(i, 0) + 1]
                with torch.inference_mode():
                    scores = model(one)
                channels = int(extractor._recorded()[0].shape[1])
                if device == "cuda":
                    torch.cuda.synchronize()
                started = clock()
                (cam,) = extractor(scores.argmax(1).tolist(), scores)
                if device == "cuda":
                    torch.cuda.synchronize()
                if i >= 0:
                    times[ratio].append(clock() - started)
                    maps[ratio].append(resize_maps(cam.float().cpu(), size))
    full = torch.cat(maps[1.0]) if 1.0 in maps else None
    full_ms = statistics.median(times[1.0]) * 1000 if 1.0 in times else None
    rows = []
    for ratio in ratios:
        stacked = torch.cat(maps[ratio])
        rho = spearman_correlation(stacked, full) if full is not None else None
        median_ms = statistics.median(times[ratio]) * 1000
        rows.append(
            {
                "ablation_ratio": ratio,
                "channels_ablated": ablated_channels(channels, ratio),
                "channels": channels,
                "median_ms_per_image": round(median_ms, 2),
                "speedup_vs_full": None if full_ms is None else round(full_ms / median_ms, 2),
                "spearman_vs_full_mean": None if rho is None else round(float(rho.mean()), 4),
                "spearman_vs_full_min": None if rho is None else round(float(rho.min()), 4),
                "pointing_game": round(float(pointing_game(stacked, masks_t).float().mean()), 4),
            }
        )
    return {
        "model": "model_store/shapes (trained), layer " + bench.target_layer,
        "fast_path": fast_path,
        "clock": "wall (cuda synchronize)" if device == "cuda" else "process CPU time",
        "images": images,
        "device": device,
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "rows": rows,
    }


def table(result: dict[str, Any]) -> str:
    head = (
        "| ablation_ratio | channels ablated | ms / image (median) | speed-up | Spearman vs full "
        "(mean / min) | pointing game |\n|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {r['ablation_ratio']} | {r['channels_ablated']} of {r['channels']} | "
        f"{r['median_ms_per_image']} | {r['speedup_vs_full']}x | "
        f"{r['spearman_vs_full_mean']} / {r['spearman_vs_full_min']} | {r['pointing_game']} |"
        for r in result["rows"]
    ]
    return head + "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="4 images")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--whole-model", action="store_true", help="fast_path=False: every ablation runs the model"
    )
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (CPU time is timed)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON (default: bench/results/ablation_ratio[_whole].json)",
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    result = run(4 if args.quick else args.images, RATIOS, args.device, not args.whole_model)
    out = args.out or ROOT / "bench/results" / (
        "ablation_ratio_whole.json" if args.whole_model else "ablation_ratio.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(
        f"({result['images']} images, {result['device']}, {result['cpu_threads']} threads, "
        f"load average {result['load_average_1m']}, fast_path={result['fast_path']})"
    )


if __name__ == "__main__":
    main()
