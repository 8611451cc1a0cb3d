"""Cross-request batching of task requests: concurrent /explain requests of ``shapes-detect``
(Layer-CAM, box 0, raw map) with batching on (``CAMSERVE_MAX_BATCH_SIZE`` 8) and off (1).

Each round sends ``--clients`` requests at once from as many threads and waits for all; the
figure is requests per second over ``--rounds`` rounds, and the mean ``batch_images`` the
answers report. Usage::

    .venv/bin/python bench/task_batching.py            # 8 clients, 10 rounds

Results go to ``bench/results/task_batching.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fastapi.testclient import TestClient  # noqa: E402

from app.http.app import create_app  # noqa: E402
from app.models.zoo.shapes_dataset import make_pairs  # noqa: E402
from app.settings import Settings  # noqa: E402


def _scenes(count: int) -> list[bytes]:
    images, _, _ = make_pairs(count, 2026, 64)
    out = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def measure(batch: int, clients: int, rounds: int, store: Path) -> dict[str, Any]:
    settings = Settings(
        model_store=store,
        default_model="shapes-detect",
        device="cpu",
        cache_mb=0,
        max_batch_size=batch,
    )
    scenes = _scenes(clients)
    form = {"box": "0", "method": "LayerCAM", "output": "raw"}
    with TestClient(create_app(settings)) as client, ThreadPoolExecutor(clients) as pool:
        while client.get("/ready").status_code != 200:
            time.sleep(0.05)

        def post(image: bytes) -> dict[str, Any]:
            files = [("file", ("s.png", image, "image/png"))]
            response = client.post("/explain", files=files, data=form)
            assert response.status_code == 200, response.text
            return response.json()  # type: ignore[no-any-return]

        list(pool.map(post, scenes))  # warm-up round
        sizes = []
        started = time.perf_counter()
        for _ in range(rounds):
            sizes += [a["timings"]["batch_images"] for a in pool.map(post, scenes)]
        elapsed = time.perf_counter() - started
    return {
        "max_batch_size": batch,
        "clients": clients,
        "requests": clients * rounds,
        "requests_per_s": round(clients * rounds / elapsed, 2),
        "mean_batch_images": round(sum(sizes) / len(sizes), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/task_batching.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.disable(logging.INFO)  # one access line per request would drown the figures
    with tempfile.TemporaryDirectory() as folder:
        store = Path(folder)
        shutil.copytree(ROOT / "model_store" / "shapes-detect", store / "shapes-detect")
        rows = []
        for batch in (1, 8, 1, 8):  # interleaved: a busy machine drifts
            row = measure(batch, args.clients, args.rounds, store)
            print(json.dumps(row), flush=True)
            rows.append(row)
    args.out.write_text(json.dumps({"rows": rows}, indent=2))


if __name__ == "__main__":
    main()
