"""What ``faithfulness=deletion,insertion`` costs, and whether its scores tell maps apart.

    .venv/bin/python bench/faithfulness.py            # both sections (~10 min on 2 busy cores)
    .venv/bin/python bench/faithfulness.py --quick    # a smoke run
    .venv/bin/python bench/faithfulness.py --sections cost

*cost*: resnet50 with random weights on the CPU, through the service's explainer (decode, CAM
pass, faithfulness pass, overlay): the same Grad-CAM request with and without
``faithfulness=deletion,insertion`` at 16 steps, with ``faithfulness=confidence``, and one plain
forward of one image, interleaved round by round so that the machine's drift hits all four
alike. The extra time of the request is given in forwards of one image; the bound is 1 + 34 of
them for the curves, 2 for ``confidence`` (the image and its explanation map, one forward).

*quality*: on the shapes model (``model_store/shapes``) and the quality benchmark's held-out
images, Grad-CAM's mean deletion and insertion AUC against a random map's, scored by the
service's faithfulness pass (``bench/quality/faithfulness.py``).

Results go to ``bench/results/faithfulness.json`` (``_quick`` for a smoke run).
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

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from app.models.registry import ModelRegistry  # noqa: E402
from app.pipeline.admission import SlotLimiter  # noqa: E402
from app.pipeline.decoding import Upload  # noqa: E402
from app.pipeline.explainer import Explainer, ExplainParams  # noqa: E402
from bench.quality import faithfulness as quality  # noqa: E402
from bench.quality.data import HELD_OUT_SEED  # noqa: E402

MANIFEST = """description = "resnet50, random weights (bench)"

[model]
architecture = "resnet50"
weights = "weights.pt"
num_classes = 1000
labels = "labels.txt"

[preprocess]
resize = 224
crop = 224
mean = [0.485, 0.456, 0.406]
std = [0.229, 0.224, 0.225]
input_shape = [3, 224, 224]

[cam]
target_layers = ["layer4"]
default_method = "GradCAM"
"""


def _resnet50_store(root: Path) -> Path:
    folder = root / "resnet50"
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet50().state_dict(), folder / "weights.pt")
    (folder / "labels.txt").write_text("".join(f"class{i}\n" for i in range(1000)))
    (folder / "model.toml").write_text(MANIFEST)
    return root


def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


async def _cost(repeats: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        registry = ModelRegistry(_resnet50_store(Path(tmp)), torch.device("cpu"), "resnet50")
        registry.discover()
        registry.load_all()
        model = registry.get("resnet50")
        threads = ThreadPoolExecutor(1)
        explainer = Explainer(
            registry, SlotLimiter(1, 4), 10**8, model_threads=threads, image_threads=threads
        )
        upload = [Upload("bench.png", _png(0))]
        plain = ExplainParams(method="GradCAM")
        scored = ExplainParams(method="GradCAM", faithfulness=("deletion", "insertion"))
        confidence = ExplainParams(method="GradCAM", faithfulness=("confidence",))
        x = torch.randn(1, 3, 224, 224)
        times: dict[str, list[float]] = {
            "forward": [],
            "plain": [],
            "faithfulness": [],
            "confidence": [],
        }
        answer = None
        try:
            for round_ in range(repeats + 1):  # the first round warms up and is left out
                started = time.perf_counter()
                with torch.inference_mode():
                    model.module(x)
                forward_s = time.perf_counter() - started
                started = time.perf_counter()
                await explainer.explain("resnet50", upload, plain)
                plain_s = time.perf_counter() - started
                started = time.perf_counter()
                answer = await explainer.explain("resnet50", upload, scored)
                scored_s = time.perf_counter() - started
                started = time.perf_counter()
                await explainer.explain("resnet50", upload, confidence)
                confidence_s = time.perf_counter() - started
                if round_:
                    times["forward"].append(forward_s)
                    times["plain"].append(plain_s)
                    times["faithfulness"].append(scored_s)
                    times["confidence"].append(confidence_s)
        finally:
            await explainer.close()
            threads.shutdown()
    medians = {name: statistics.median(values) for name, values in times.items()}
    extra = medians["faithfulness"] - medians["plain"]
    assert answer is not None
    return {
        "model": "resnet50, random weights, 224 x 224, CPU, 1 image, Grad-CAM at layer4, overlay",
        "repeats": repeats,
        "median_s": medians,
        "rounds_s": times,
        "extra_s": extra,
        "extra_in_forwards": extra / medians["forward"],
        "request_in_forwards": medians["faithfulness"] / medians["forward"],
        "bound_in_forwards": 1 + 34,
        "confidence_extra_in_forwards": (medians["confidence"] - medians["plain"])
        / medians["forward"],
        "confidence_bound_in_forwards": 2,
        "faithfulness_ms_reported": answer.timings.faithfulness_ms,
        "scores": answer.results[0]
        .explanations[0]
        .maps[0]
        .faithfulness.model_dump(  # type: ignore[union-attr]
            exclude_none=True
        ),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--sections", default="cost,quality")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--n-images", type=int, default=200, help="shapes held-out images")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out-dir", default="bench/results")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.n_images = 1, 16
    torch.set_num_threads(args.threads)
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    report: dict[str, Any] = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), "
        f"torch {torch.__version__}",
    }
    if "cost" in sections:
        report["cost"] = asyncio.run(_cost(args.repeats))
        print(json.dumps(report["cost"], indent=1))
    if "quality" in sections:
        report["quality"] = quality.run(ROOT / "model_store", args.n_images, HELD_OUT_SEED)
        print(quality.markdown(report["quality"]))
    out = ROOT / args.out_dir / f"faithfulness{'_quick' if args.quick else ''}.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
