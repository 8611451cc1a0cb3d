"""Live model changes, measured over HTTP: how soon a new folder answers in poll mode, and what a
reload costs the other models' requests.

    python bench/model_control.py            # about 2-3 minutes on 2 CPU cores
    python bench/model_control.py --quick    # about 1 minute

1. **New folder to first answer (poll).** A server with ``CAMSERVE_MODEL_CONTROL=poll`` and
   ``CAMSERVE_MODEL_POLL_S`` (``--poll-s``, default 1.0). Each round moves a complete random
   ``resnet18`` folder into the store with one rename, then asks ``/predict`` for it every 20 ms
   until it answers 200: the time from the rename to that answer (the poll's wait, the load and
   warm-up, the first request).
2. **Other models during a reload (explicit).** A server with ``CAMSERVE_MODEL_CONTROL=explicit``.
   ``--clients`` closed-loop clients send ``/explain`` (GradCAM, 640x480 JPEG) to ``shapes``
   while, in alternating windows of ``--window-s`` seconds, nothing else happens (baseline) or
   ``resnet50`` is reloaded back to back (its weights touched, then ``POST /models/resnet50/load``;
   each reload builds and warms a new copy beside the serving one). The two kinds of window take
   turns, so drift hits both alike; the table gives the latency percentiles of each and their
   ratio.

Markdown tables go to stdout, everything to ``bench/results/model_control.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from serving import (  # noqa: E402  (bench/, this script's own folder)
    build_store,
    machine_info,
    markdown_table,
    percentile,
    photo_jpeg,
    raise_on_sigterm,
    rounded,
    running_server,
    warn_if_busy,
    write_torchvision_model,
)

ADMIN_KEY = "bench-admin"


def first_answer_times(
    store: Path, staging: Path, rounds: int, poll_s: float, log: Path
) -> list[float]:
    """Seconds from a new folder's rename into the store to its first 200 from /predict."""
    image = photo_jpeg(640, 480, seed=1)
    overrides = {"CAMSERVE_MODEL_CONTROL": "poll", "CAMSERVE_MODEL_POLL_S": str(poll_s)}
    times = []
    with running_server(store, "cpu", overrides, log, ["shapes"]) as url, httpx.Client() as client:
        for index in range(rounds):
            name = f"new{index}"
            shutil.copytree(staging, staging.parent / name)
            started = time.perf_counter()
            os.replace(staging.parent / name, store / name)
            while True:
                answer = client.post(
                    f"{url}/predict",
                    files=[("file", ("a.jpg", image, "image/jpeg"))],
                    data={"model": name},
                    timeout=60,
                )
                if answer.status_code == 200:
                    break
                time.sleep(0.02)
            times.append(time.perf_counter() - started)
            print(f"# {name}: first answer after {times[-1]:.2f} s", flush=True)
    return times


class Clients:
    """Closed-loop /explain clients on one model; each latency is tagged with the window."""

    def __init__(self, url: str, model: str, count: int) -> None:
        self.url, self.model = url, model
        self.window = "warm-up"
        self.latencies: dict[str, list[float]] = {}
        self.errors: dict[str, int] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._image = photo_jpeg(640, 480, seed=2)
        self._threads = [threading.Thread(target=self._run) for _ in range(count)]

    def _run(self) -> None:
        with httpx.Client(timeout=120) as client:
            while not self._stop.is_set():
                window = self.window
                started = time.perf_counter()
                answer = client.post(
                    f"{self.url}/explain",
                    files=[("file", ("a.jpg", self._image, "image/jpeg"))],
                    data={"model": self.model},
                )
                elapsed = time.perf_counter() - started
                with self._lock:
                    if window != self.window:
                        continue  # straddled two windows: counted in neither
                    if answer.status_code == 200:
                        self.latencies.setdefault(window, []).append(elapsed)
                    else:
                        self.errors[window] = self.errors.get(window, 0) + 1

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()


def reload_latencies(
    store: Path, clients: int, windows: int, window_s: float, log: Path
) -> dict[str, Any]:
    overrides = {"CAMSERVE_MODEL_CONTROL": "explicit", "CAMSERVE_ADMIN_KEY": ADMIN_KEY}
    weights = store / "resnet50" / "weights.pt"
    reloads: list[float] = []
    with running_server(store, "cpu", overrides, log, ["shapes", "resnet50"]) as url:
        load = Clients(url, "shapes", clients)
        load.start()
        time.sleep(window_s)  # warm-up, not counted
        with httpx.Client(timeout=120) as admin:
            for _ in range(windows):
                for window in ("baseline", "reload"):
                    load.window = window
                    ends = time.perf_counter() + window_s
                    if window == "baseline":
                        time.sleep(window_s)
                        continue
                    while time.perf_counter() < ends:
                        os.utime(weights)  # a changed file: the load builds a new copy
                        started = time.perf_counter()
                        answer = admin.post(
                            f"{url}/models/resnet50/load", headers={"X-Admin-Key": ADMIN_KEY}
                        )
                        answer.raise_for_status()
                        reloads.append(time.perf_counter() - started)
        load.window = "done"
        load.stop()
    rows = {}
    for window in ("baseline", "reload"):
        values = load.latencies.get(window, [])
        rows[window] = {
            "requests": len(values),
            "errors": load.errors.get(window, 0),
            "p50_ms": rounded(1000 * (percentile(values, 50) or 0)),
            "p95_ms": rounded(1000 * (percentile(values, 95) or 0)),
            "mean_ms": rounded(1000 * statistics.fmean(values)) if values else None,
        }
    return {
        "windows": rows,
        "reloads": len(reloads),
        "reload_s_median": rounded(statistics.median(reloads), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and shorter windows")
    parser.add_argument("--poll-s", type=float, default=1.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--window-s", type=float, default=None)
    parser.add_argument(
        "--out", type=Path, default=REPO / "bench" / "results" / "model_control.json"
    )
    args = parser.parse_args()
    raise_on_sigterm()
    warn_if_busy()
    torch.set_num_threads(1)
    rounds = 3 if args.quick else 5
    windows = 2 if args.quick else 3
    window_s = args.window_s or (4.0 if args.quick else 8.0)
    with tempfile.TemporaryDirectory(prefix="camserve-bench-") as tmp:
        root = Path(tmp)
        store = build_store(root, ["resnet50"])
        staging = root / "_staging" / "template"
        staging.parent.mkdir()
        write_torchvision_model(staging, "resnet18")
        first = first_answer_times(store, staging, rounds, args.poll_s, root / "poll.log")
        shutil.rmtree(store / "new0", ignore_errors=True)
        for extra in store.glob("new*"):
            shutil.rmtree(extra)
        during = reload_latencies(store, args.clients, windows, window_s, root / "explicit.log")

    base, busy = during["windows"]["baseline"], during["windows"]["reload"]
    print("\n## New folder to first answer (poll mode)\n")
    print(
        markdown_table(
            ["poll interval", "rounds", "median s", "min s", "max s"],
            [
                [
                    f"{args.poll_s} s",
                    rounds,
                    rounded(statistics.median(first), 2),
                    rounded(min(first), 2),
                    rounded(max(first), 2),
                ]
            ],
        )
    )
    print(f"\n## shapes /explain latency, {args.clients} clients, while resnet50 reloads\n")
    ratio = {
        key: rounded(busy[key] / base[key], 2) if base[key] and busy[key] else None
        for key in ("p50_ms", "p95_ms", "mean_ms")
    }
    print(
        markdown_table(
            ["window", "requests", "errors", "p50 ms", "p95 ms", "mean ms"],
            [
                [
                    "baseline",
                    base["requests"],
                    base["errors"],
                    base["p50_ms"],
                    base["p95_ms"],
                    base["mean_ms"],
                ],
                [
                    "reloading",
                    busy["requests"],
                    busy["errors"],
                    busy["p50_ms"],
                    busy["p95_ms"],
                    busy["mean_ms"],
                ],
                ["ratio", "", "", ratio["p50_ms"], ratio["p95_ms"], ratio["mean_ms"]],
            ],
        )
    )
    print(f"\nresnet50 reloads: {during['reloads']}, median {during['reload_s_median']} s each")
    result = {
        "machine": machine_info(torch.device("cpu")),
        "poll_s": args.poll_s,
        "first_answer_s": [rounded(t, 3) for t in first],
        "during_reload": during,
        "ratio": ratio,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
