"""Memory of the render stage per pixel drawn: the numbers behind docs/hardening.md's ``R``.

    python bench/render_memory.py            # about 1 minute on CPU

Each case draws the maps of one upload (``examples/star.png``, 256x256) the way the service does
(``app.pipeline.rendering.draw_maps``: one step at a time on one render thread) in a fresh
process, and reads that process's resident memory: before drawing (after a small warm-up draw),
and its high-water mark while drawing (``VmHWM``, reset through ``/proc/self/clear_refs``).
Printed per case: the pixels drawn, the answer's base64 bytes, the peak growth of RSS, and both
per pixel drawn. The largest cases are those the default ``CAMSERVE_MAX_RENDER_PIXELS`` (16 Mi
pixels) allows: one 4096-px picture, or 16 maps of 1024 px. Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
STAR = REPO / "examples" / "star.png"

#: (name, longest side, maps, outputs, image format)
CASES = (
    ("4096 overlay jpeg", 4096, 1, ("overlay",), "jpeg"),
    ("4096 overlay png", 4096, 1, ("overlay",), "png"),
    ("4096 heatmap png", 4096, 1, ("heatmap",), "png"),
    ("16 maps x 1024 overlay jpeg", 1024, 16, ("overlay",), "jpeg"),
    ("16 maps x 1024 overlay png", 1024, 16, ("overlay",), "png"),
    ("1024 overlay jpeg (default)", 1024, 1, ("overlay",), "jpeg"),
)


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _draw(side: int, maps: int, outputs: tuple[str, ...], image_format: str) -> dict[str, Any]:
    """One case, in this (fresh) process."""
    sys.path.insert(0, str(REPO))
    import torch
    from PIL import Image

    from app.pipeline.budget import FairThreads
    from app.pipeline.decoding import Box, DecodedImage
    from app.pipeline.rendering import NamedMap, PictureSize, RenderStyle, draw_maps, render_cost

    image = Image.open(STAR).convert("RGB")
    decoded = DecodedImage(
        "star.png", image, image.size, torch.zeros(3, 8, 8), Box(0, 0, *image.size)
    )
    cams = torch.rand(maps, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    named = [[NamedMap(f"l{i}", "layer", cams[i], True) for i in range(maps)]]
    style = RenderStyle(outputs=outputs, image_format=image_format, size=PictureSize("side", side))
    small = RenderStyle(outputs=outputs, image_format=image_format, size=PictureSize("side", 64))
    with ThreadPoolExecutor(1) as pool:
        threads = FairThreads(pool)
        asyncio.run(draw_maps(threads, [decoded], named, small, (128, 128)))  # warm-up
        before = _status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        started = time.perf_counter()
        drawn = asyncio.run(draw_maps(threads, [decoded], named, style, (128, 128)))
        seconds = time.perf_counter() - started
        peak = _status("VmHWM")
    answer = sum(len(fields[o]) for group in drawn[0] for fields in group for o in outputs)
    pixels = render_cost([image.size], maps, style, (128, 128)).pixels
    growth = peak - before
    return {
        "pixels": pixels,
        "answer_bytes": answer,
        "peak_growth_bytes": growth,
        "answer_bytes_per_pixel": round(answer / pixels, 3),
        "peak_bytes_per_pixel": round(growth / pixels, 2),
        "seconds": round(seconds, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=REPO / "bench" / "results" / "render_memory.json"
    )
    args = parser.parse_args(argv)
    context = multiprocessing.get_context("spawn")
    rows = []
    print("| case | pixels drawn | answer MB | peak RSS growth MB | answer B/px | peak B/px | s |")
    print("|---|---|---|---|---|---|---|")
    for name, side, maps, outputs, image_format in CASES:
        with context.Pool(1) as pool:
            row = pool.apply(_draw, (side, maps, outputs, image_format))
        rows.append({"case": name, **row})
        print(
            f"| {name} | {row['pixels']} | {row['answer_bytes'] / 2**20:.1f} | "
            f"{row['peak_growth_bytes'] / 2**20:.1f} | {row['answer_bytes_per_pixel']} | "
            f"{row['peak_bytes_per_pixel']} | {row['seconds']} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
