"""Several classes in one request against one request per class (issue #27), side by side.

    python bench/classes.py                 # resnet50, CPU, K=3, 7 rounds
    python bench/classes.py --rounds 3      # a quicker run

Two measurements, each in interleaved rounds (so that the machine's drift hits both alike),
reporting medians:

1. The engine: after one forward of resnet50 (random weights, frozen, eval), Grad-CAM's K maps
   by one backward per class from the retained graph (``loop``) against one batched
   vector-Jacobian product (``batched``, ``torch.autograd.grad(is_grads_batched=True)``), with
   the single-class call as the reference.
2. The service's pipeline in this process (decode, pass, render; an overlay per map): one
   request with ``classes=a,b,c`` against three requests with ``class_idx`` each, one after the
   other, on the same resnet50 (and the one request again with the batched backward). The
   target is a ratio of at most 0.5.

The results go to bench/results/classes.json.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serving import IMAGENET_MEAN, IMAGENET_STD, photo_jpeg, write_torchvision_model  # noqa: E402  (bench/, this folder)

from app.cam import GradCAM  # noqa: E402
from app.cam.gradient import _GradientCAM  # noqa: E402
from app.models.registry import ModelRegistry  # noqa: E402
from app.pipeline.admission import SlotLimiter  # noqa: E402
from app.pipeline.decoding import Upload  # noqa: E402
from app.pipeline.explainer import Explainer, ExplainParams  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "classes.json"


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000


def engine(classes: list[int], rounds: int) -> dict[str, float]:
    """Medians (ms) of the forward, and of the maps after it: one class, then K classes by a
    loop of backwards and by one batched backward."""
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval().requires_grad_(False)
    model = model.to(memory_format=torch.channels_last)  # as the service loads it
    # A photo-like input, normalised as the service does.
    picture = Image.open(io.BytesIO(photo_jpeg(224, 224, seed=1))).convert("RGB")
    pixels = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255).permute(2, 0, 1)
    mean, std = (
        torch.tensor(IMAGENET_MEAN)[:, None, None],
        torch.tensor(IMAGENET_STD)[:, None, None],
    )
    x = ((pixels - mean) / std)[None].contiguous(memory_format=torch.channels_last)
    modes = ("one_class", "loop", "batched")
    times: dict[str, list[float]] = {"forward": [], **{mode: [] for mode in modes}}
    maps: dict[str, list[torch.Tensor]] = {}
    with GradCAM(model, "layer4", input_shape=(3, 224, 224)) as extractor:
        for round_idx in range(rounds + 1):  # one warm-up round
            for mode in modes:
                _GradientCAM.batched_class_grads = mode == "batched"
                start = time.perf_counter()
                with torch.enable_grad():
                    scores = model(x)
                forward = _ms(start)
                start = time.perf_counter()
                if mode == "one_class":
                    extractor(classes[:1], scores)
                else:
                    got = extractor.explain_classes([[c] for c in classes], scores)
                    maps[mode] = [m[0] for m in got]
                if round_idx:
                    times[mode].append(_ms(start))
                    times["forward"].append(forward)
        # The K maps alone, many times after one forward (the graph kept): what the two ways
        # of taking K classes' gradients cost, without the forward's noise.
        with torch.enable_grad():
            scores = model(x)
        for mode in ("loop", "batched"):
            times[f"{mode}_maps_only"] = []
        for _ in range(3 * rounds + 2):
            for mode in ("loop", "batched"):
                _GradientCAM.batched_class_grads = mode == "batched"
                start = time.perf_counter()
                extractor.explain_classes([[c] for c in classes], scores, retain_graph=True)
                times[f"{mode}_maps_only"].append(_ms(start))
        for mode in ("loop", "batched"):
            times[f"{mode}_maps_only"] = times[f"{mode}_maps_only"][2:]  # two warm-ups
    _GradientCAM.batched_class_grads = False
    difference = max(
        float((a - b).abs().max()) for a, b in zip(maps["loop"], maps["batched"], strict=True)
    )
    result = {mode: statistics.median(values) for mode, values in times.items()}
    return {**result, "max_difference_loop_vs_batched": difference}


async def _pipeline(store: Path, classes: list[int], rounds: int) -> dict[str, Any]:
    registry = ModelRegistry(store, torch.device("cpu"), "resnet50")
    registry.discover()
    registry.load_all()
    explainer = Explainer(
        registry,
        SlotLimiter(max_running=1, max_waiting=8),
        10**8,
        model_threads=ThreadPoolExecutor(1),
        image_threads=ThreadPoolExecutor(1),
    )
    uploads = [Upload("photo.jpg", photo_jpeg(320, 240, seed=3))]
    together = ExplainParams(method="GradCAM", classes=tuple(classes))
    apart = [ExplainParams(method="GradCAM", class_idx=(c,)) for c in classes]
    times: dict[str, list[float]] = {
        "one_request": [],
        "one_request_batched": [],
        "k_requests": [],
    }
    stages: dict[str, dict[str, list[float]]] = {mode: {} for mode in times}
    forwards: dict[str, int] = {}

    def note(mode: str, answers: list[Any]) -> None:
        for stage in ("decode_ms", "queue_ms", "forward_ms", "cam_ms", "encode_ms"):
            spent = sum(getattr(a.timings, stage) for a in answers)
            stages[mode].setdefault(stage, []).append(spent)

    try:
        for round_idx in range(rounds + 1):  # one warm-up round
            _GradientCAM.batched_class_grads = True
            start = time.perf_counter()
            batched = await explainer.explain("resnet50", uploads, together)
            one_batched = _ms(start)
            _GradientCAM.batched_class_grads = False
            start = time.perf_counter()
            answer = await explainer.explain("resnet50", uploads, together)
            one = _ms(start)
            forwards["one_request"] = answer.timings.forwards
            assert [e.class_idx for e in answer.results[0].explanations] == classes
            start = time.perf_counter()
            answers = [await explainer.explain("resnet50", uploads, p) for p in apart]
            several = _ms(start)
            forwards["k_requests"] = sum(a.timings.forwards for a in answers)
            if round_idx:
                times["one_request"].append(one)
                times["one_request_batched"].append(one_batched)
                times["k_requests"].append(several)
                note("one_request", [answer])
                note("one_request_batched", [batched])
                note("k_requests", answers)
    finally:
        await explainer.close()
    medians = {mode: statistics.median(values) for mode, values in times.items()}
    return {
        **medians,
        "ratio": medians["one_request"] / medians["k_requests"],
        "forwards": forwards,
        "stages_ms": {
            mode: {stage: statistics.median(v) for stage, v in spent.items()}
            for mode, spent in stages.items()
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--classes", default="3,7,11", help="the K classes, comma-separated")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    classes = [int(c) for c in args.classes.split(",")]
    report: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        "classes": classes,
        "rounds": args.rounds,
        "engine_ms": engine(classes, args.rounds),
    }
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        write_torchvision_model(store / "resnet50", "resnet50")
        report["pipeline_ms"] = asyncio.run(_pipeline(store, classes, args.rounds))
    print(json.dumps(report, indent=2))
    RESULTS.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
