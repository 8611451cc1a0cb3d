"""The explanation cache: a hit against a miss of the same request, side by side in one run.

    python bench/cache.py                          # ScoreCAM on resnet50 (layer4), GradCAM and
                                                   # ScoreCAM on shapes
    python bench/cache.py --resnet-layer layer1    # a cheaper Score-CAM miss (256 channels)
    python bench/cache.py --quick                  # shapes only, a smoke run

The service runs in this process (``create_app`` behind Starlette's ``TestClient``, so every
request goes through the HTTP stack: multipart parsing, the middleware, JSON out) on a temporary
store: the shipped ``shapes`` and a seeded random-weight torchvision ``resnet50`` (224 crop,
nothing downloaded; ``bench/serving.py`` builds it), on the CPU, with
``CAMSERVE_CACHE_MB=256``.

For each case a *miss* is ``POST /explain`` of a photo-like JPEG that was never sent before (a
new seed each time, so each one runs the model), and a *hit* is the first of those images sent
again with the same form. The table gives medians (p50), p90 and the ratio miss p50 / hit p50;
the targets of issue #27 are a ratio of at least 20 for Score-CAM on resnet50 and a hit p50 under
10 ms on shapes. Each answer's ``X-Camserve-Cache`` header is checked (``miss``, then ``hit``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from fastapi.testclient import TestClient

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serving import (  # noqa: E402
    build_store,
    machine_info,
    percentile,
    photo_jpeg,
    table_of,
    warn_if_busy,
)

from app.http.app import create_app  # noqa: E402
from app.settings import Settings  # noqa: E402


@dataclass(frozen=True)
class Case:
    model: str
    method: str
    layer: str
    side: int
    misses: int
    hits: int
    target: str


def _explain(client: TestClient, case: Case, image: bytes) -> tuple[float, str]:
    form = {"model": case.model, "method": case.method, "target_layer": case.layer}
    started = time.perf_counter()
    upload = {"file": ("photo.jpg", image, "image/jpeg")}
    response = client.post("/explain", files=upload, data=form)
    seconds = time.perf_counter() - started
    if response.status_code != 200:
        raise RuntimeError(f"{case.model} {case.method}: {response.status_code} {response.text}")
    return seconds * 1000, response.headers["x-camserve-cache"]


def measure(client: TestClient, case: Case, first_seed: int) -> dict[str, Any]:
    images = [photo_jpeg(case.side, case.side, seed=first_seed + i) for i in range(case.misses)]
    misses, hits = [], []
    for image in images:
        ms, state = _explain(client, case, image)
        assert state == "miss", state
        misses.append(ms)
    for _ in range(case.hits):
        ms, state = _explain(client, case, images[0])
        assert state == "hit", state
        hits.append(ms)
    miss_p50, hit_p50 = statistics.median(misses), statistics.median(hits)
    return {
        "model": case.model,
        "method": case.method,
        "layer": case.layer,
        "misses": len(misses),
        "miss_p50_ms": round(miss_p50, 1),
        "hits": len(hits),
        "hit_p50_ms": round(hit_p50, 2),
        "hit_p90_ms": round(percentile(hits, 90) or 0.0, 2),
        "ratio": round(miss_p50 / hit_p50, 1),
        "target": case.target,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resnet-layer", default="layer4", help="Score-CAM's layer on resnet50")
    parser.add_argument("--resnet-misses", type=int, default=2)
    parser.add_argument("--hits", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="shapes only, fewer rounds")
    parser.add_argument("--out", type=Path, default=None, help="write the report as JSON here")
    args = parser.parse_args()
    warn_if_busy()
    hits = 10 if args.quick else args.hits
    cases = [
        Case("shapes", "GradCAM", "layer3", 128, 3 if args.quick else 10, hits, "hit p50 < 10 ms"),
        Case("shapes", "ScoreCAM", "layer3", 128, 2 if args.quick else 5, hits, ""),
    ]
    if not args.quick:
        cases.insert(
            0,
            Case(
                "resnet50", "ScoreCAM", args.resnet_layer, 224, args.resnet_misses, hits, ">= 20x"
            ),
        )
    with tempfile.TemporaryDirectory(prefix="camserve-cache-bench-") as tmp:
        store = build_store(Path(tmp), [] if args.quick else ["resnet50"])
        settings = Settings(
            model_store=store,
            default_model="shapes",
            device="cpu",
            cache_mb=256,
            request_timeout_s=None,  # a Score-CAM miss on resnet50 takes minutes on 2 cores
            grpc_port=None,
            allow_links_out_of_store=True,  # build_store links the shipped shapes
            log_level="WARNING",
        )
        rows = []
        with TestClient(create_app(settings)) as client:
            deadline = time.monotonic() + 600
            while client.get("/ready").status_code != 200:
                if time.monotonic() > deadline:
                    raise TimeoutError("the models did not load")
                time.sleep(0.1)
            for number, case in enumerate(cases):
                rows.append(measure(client, case, first_seed=1000 * (number + 1)))
                print(table_of(rows[-1:], tuple(rows[-1])), flush=True)
    report = {"machine": machine_info(torch.device("cpu")), "rows": rows}
    print(f"\n## explanation cache, hit against miss (cpu, {report['machine']['cpu']})\n")
    print(table_of(rows, tuple(rows[0])))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
