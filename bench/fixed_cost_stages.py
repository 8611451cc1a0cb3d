"""The CPU time of a small request's image stages in one process, for ``bench/fixed_cost.py``.

    python bench/fixed_cost_stages.py TREE [REPEATS]

Imports ``app`` from the source tree ``TREE`` (not this one), then times, with the thread's own
CPU clock (``time.thread_time``: what another process's load does not stretch), the stages that
a 640x480 JPEG goes through for ``shapes``: ``decode`` (the header's check, then the decode and
the model input), ``render`` (one GradCAM map drawn as the default overlay, base64 included) and
``answer`` (the results put together and the answer's JSON). Prints one JSON object of medians
in ms.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def median_ms(step: Callable[[], Any], repeats: int) -> float:
    step()
    times = []
    for _ in range(repeats):
        started = time.thread_time()
        step()
        times.append((time.thread_time() - started) * 1000)
    return round(statistics.median(times), 4)


def main() -> None:
    tree, repeats = Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 60
    sys.path.insert(0, str(tree))
    sys.path.insert(1, str(Path(__file__).resolve().parent))
    import torch

    torch.set_num_threads(1)
    from serving import photo_jpeg

    from app.models.manifest import parse_manifest
    from app.pipeline import answers, decoding, rendering

    spec = parse_manifest(tree / "model_store" / "shapes")
    upload = decoding.Upload("image.jpg", photo_jpeg(640, 480, seed=1))
    side = rendering.RenderStyle().size.side
    decoded = decoding.decode_upload(upload, spec, 10**8, side)
    torch.manual_seed(0)
    maps = [rendering.NamedMap("layer3", "layer", torch.rand(1, 8, 8), True)]
    style = rendering.RenderStyle()

    def decode() -> None:
        decoding.decode_cost([upload], spec, 10**8, side)
        decoding.decode_upload(upload, spec, 10**8, side)

    def render() -> None:
        rendering.render_image(decoded, 0, maps, style, spec.crop)

    fields = rendering.render_image(decoded, 0, maps, style, spec.crop)
    answer = _answer(fields)

    loop = asyncio.new_event_loop()

    def encode_answer() -> None:
        loop.run_until_complete(answers.answer_parts(answer))

    result = {
        "decode": median_ms(decode, repeats),
        "render": median_ms(render, repeats),
        "answer": median_ms(encode_answer, repeats),
    }
    print(json.dumps(result))


def _answer(fields: list[dict[str, Any]]) -> Any:
    """An answer of one image and one explanation, as ``/explain`` gives for ``shapes``."""
    from app.pipeline.results import (
        ExplainResponse,
        ExplainResult,
        ExplainTimings,
        Explanation,
        MapOutput,
        Prediction,
    )

    predictions = [
        Prediction(class_idx=i, label=f"class {i}", logit=1.0 - i, probability=0.1)
        for i in range(5)
    ]
    explanation = Explanation(
        method="GradCAM",
        class_idx=0,
        label="class 0",
        logit=1.0,
        probability=0.1,
        maps=[MapOutput(**f) for f in fields],
        concepts=None,
    )
    result = ExplainResult(
        filename="image.jpg",
        width=640,
        height=480,
        predictions=predictions,
        logits=[0.5] * 8,
        explanations=[explanation],
    )
    timings = ExplainTimings(
        decode_ms=1.0,
        queue_ms=0.1,
        forward_ms=2.0,
        cam_ms=0.5,
        encode_ms=4.0,
        total_ms=9.0,
        batch_images=1,
        cam_ms_by_method={"GradCAM": 0.5},
    )
    return ExplainResponse(
        model="shapes",
        version=1,
        device="cpu",
        method="GradCAM",
        target_layers=["layer3"],
        options={},
        image_format="jpeg",
        media_type="image/jpeg",
        timings=timings,
        results=[result],
    )


if __name__ == "__main__":
    main()
