"""What a heavy drawing costs the event loop: on a niced thread of the service, or in a drawing
process (``CAMSERVE_RENDER_PROCESSES``).

    python bench/render_gil.py --rounds 3

Draws the render attacker's largest picture (``examples/star.png`` as a 4096-px PNG overlay of
one map, the heaviest drawing the default budget allows) with ``draw_maps``, the way the render
stage does, while the event loop ticks every millisecond (``asyncio.sleep(0.001)``) and
measures how late each tick wakes: a tick is late while something else holds the GIL. A second
thread runs a pure-Python loop meanwhile (a stand-in for the model passes' Python work) and
counts its iterations. The two ways alternate, ``--rounds`` times each; a machine busy with
other work moves both alike, so read the ratios. Table to stdout, numbers to
``bench/results/render_gil.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from serving import REPO, machine_info, percentile, rounded

sys.path.insert(0, str(REPO))

from PIL import Image  # noqa: E402

from app.pipeline.budget import FairThreads  # noqa: E402
from app.pipeline.decoding import Box, DecodedImage  # noqa: E402
from app.pipeline.render_processes import RenderProcesses  # noqa: E402
from app.pipeline.rendering import (  # noqa: E402
    NamedMap,
    PictureSize,
    RenderStyle,
    draw_maps,
    lower_thread_priority,
)

STAR = REPO / "examples" / "star.png"
STYLE = RenderStyle(outputs=("overlay",), image_format="png", size=PictureSize("side", 4096))


CROP = (224, 224)


def star() -> DecodedImage:
    image = Image.open(STAR).convert("RGB")
    width, height = image.size
    return DecodedImage("star.png", image, image.size, torch.zeros(0), Box(0, 0, width, height))


async def one_drawing(way: str, threads: Any, processes: RenderProcesses) -> dict[str, Any]:
    decoded = [star()]
    cams = torch.rand(1, 7, 7, generator=torch.Generator().manual_seed(0))
    maps = [[NamedMap("layer4", "layer", cams, False)]]
    late_ms: list[float] = []
    spins = [0]
    stop = threading.Event()

    def python_work() -> None:
        while not stop.is_set():
            for _ in range(1000):
                pass
            spins[0] += 1

    async def ticker() -> None:
        while True:
            asked = time.perf_counter()
            await asyncio.sleep(0.001)
            late_ms.append((time.perf_counter() - asked) * 1000 - 1.0)

    worker = threading.Thread(target=python_work, daemon=True)
    worker.start()
    ticks = asyncio.create_task(ticker())
    started = time.perf_counter()
    lane: AbstractAsyncContextManager[Any] = (
        processes.painter() if way == "process" else nullcontext(None)
    )
    async with lane as painter:
        where = processes.threads if way == "process" else threads
        await draw_maps(FairThreads(where), decoded, maps, STYLE, CROP, painter)
    seconds = time.perf_counter() - started
    ticks.cancel()
    stop.set()
    worker.join()
    return {
        "way": way,
        "seconds": rounded(seconds, 3),
        "tick_late_ms": {
            "p50": rounded(percentile(late_ms, 50), 2),
            "p99": rounded(percentile(late_ms, 99), 2),
            "max": rounded(max(late_ms), 2),
        },
        "ticks": len(late_ms),
        "python_spins_per_s": round(spins[0] / seconds),
    }


async def run(rounds: int) -> list[dict[str, Any]]:
    processes = RenderProcesses(1)
    results = []
    with ThreadPoolExecutor(1, initializer=lower_thread_priority) as heavy:
        try:
            await one_drawing("process", heavy, processes)  # spawn and import first
            for _ in range(rounds):
                for way in ("thread", "process"):
                    results.append(await one_drawing(way, heavy, processes))
        finally:
            processes.close()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "render_gil.json")
    args = parser.parse_args()
    results = asyncio.run(run(args.rounds))
    print("| way | drawing s | tick late p50 ms | p99 | max | ticks | Python loop, k/s |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        late = r["tick_late_ms"]
        print(
            f"| {r['way']} | {r['seconds']} | {late['p50']} | {late['p99']} | {late['max']} | "
            f"{r['ticks']} | {r['python_spins_per_s'] / 1000:.1f} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"runs": results, "machine": machine_info(torch.device("cpu"))}, indent=2) + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
