"""What the pause points cost a long pass when nobody waits: a chunked CAM call with and without
a ``pause`` callback, side by side.

    python bench/pause_cost.py                       # CPU: resnet18 and resnet50
    python bench/pause_cost.py --device cuda --rounds 20

A call given ``pause`` registers a forward pre-hook on each leaf module of the model and calls
``pause`` before each of them in every masked, ablated or noisy forward
(``app.cam.core.Work.pause_points``); the service's ``pause`` returns at once while no other pass
waits. The rounds alternate the two calls (random-weight models, one 224x224 image, the last
stage as target layer, ``batch_size`` 32) and the table gives their medians and the ratio
with / without. Only the first ``--channels`` channels' chunks are timed: the call is stopped
through ``should_stop`` once that many masked inputs are done.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serving import machine_info, table_of  # noqa: E402

from app.cam import METHODS, CamInterrupted  # noqa: E402

MODELS = {"resnet18": "layer4", "resnet50": "layer4"}
BATCH = 32


def timed_call(
    model: torch.nn.Module, layer: str, method: str, x: torch.Tensor, channels: int, pause: bool
) -> float:
    """Seconds of one forward + CAM call, stopped after ``channels`` masked inputs."""
    done = [0]

    def progress(count: int, _total: int) -> None:
        done[0] = count

    def stop() -> bool:
        return done[0] >= channels

    options: dict[str, Any] = {"batch_size": BATCH} if method != "SmoothGradCAMpp" else {}
    started = time.perf_counter()
    with METHODS[method](model, layer, input_shape=tuple(x.shape[1:]), **options) as extractor:
        context = torch.enable_grad() if extractor.requires_grad else torch.inference_mode()
        with context:
            scores = model(x)
        try:
            extractor(
                [0],
                scores,
                progress=progress,
                should_stop=stop,
                pause=(lambda: None) if pause else None,
            )
        except CamInterrupted:
            pass
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    return time.perf_counter() - started


def measure(device: torch.device, rounds: int, channels: int, methods: list[str]) -> list[dict]:
    rows = []
    for name, layer in MODELS.items():
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)(weights=None).eval().to(device)
        for p in model.parameters():
            p.requires_grad_(False)
        x = torch.rand(1, 3, 224, 224, device=device)
        for method in methods:
            for pause in (False, True):  # warm-up
                timed_call(model, layer, method, x, channels, pause)
            times: dict[bool, list[float]] = {False: [], True: []}
            for round_idx in range(rounds):
                order = (False, True) if round_idx % 2 == 0 else (True, False)
                for pause in order:
                    times[pause].append(timed_call(model, layer, method, x, channels, pause))
            plain, paused = (statistics.median(times[p]) * 1000 for p in (False, True))
            rows.append(
                {
                    "model": name,
                    "method": method,
                    "without_ms": round(plain, 1),
                    "with_pauses_ms": round(paused, 1),
                    "ratio": round(paused / plain, 3),
                }
            )
            print(table_of(rows[-1:], tuple(rows[-1])), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--channels", type=int, default=256, help="masked inputs timed per call")
    parser.add_argument("--methods", default="ScoreCAM,AblationCAM,SmoothGradCAMpp")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = measure(device, args.rounds, args.channels, args.methods.split(","))
    report = {"machine": machine_info(device), "rows": rows}
    print(f"\n## pause points ({device}, {report['machine']['cpu']})\n")
    print(table_of(rows, tuple(rows[0])))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
