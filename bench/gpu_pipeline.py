"""The image pipeline end to end on one device, today's CPU image lanes against the device's lanes,
and against a FastAPI + pytorch-grad-cam peer (issue #25).

    python bench/gpu_pipeline.py --device cuda            # on a GPU: about 4 minutes
    python bench/gpu_pipeline.py --device cpu --quick     # the same keys on the CPU, ~3 minutes
    python bench/gpu_pipeline.py --device cuda --soak-seconds 300   # plus a soak at c=32
    python bench/gpu_pipeline.py --device cuda --soak-only          # only the soak: 5 minutes

Writes ``bench/results/gpu_pipeline_<card>.json`` (``--out``), ``<card>`` the device's name
("cpu", "nvidia_h200", ...), with:

- ``request_over_engine_c1``: resnet50, one 640x480 JPEG, GradCAM, a JPEG overlay at the
  upload's size (``size=original``): the median sequential request over the median engine alone
  (extractor + forward + Grad-CAM in this process), in alternating rounds.
- ``http_floor_ms``: the same client, route and multipart body with no model work (an unknown
  method: refused after the form is read, before any decode).
- ``throughput_c32`` / ``throughput_c32_before``: req/s at c=32, with the device's lanes
  (``CAMSERVE_IMAGE_LANE=device``) and with the CPU lanes (``=cpu``), servers taking turns.
- ``peer_c1_ratio`` (camserve's c=1 time over the peer's) and ``peer_c32_ratio`` (camserve's c=32
  throughput over the peer's): bench/peers/fastapi_gradcam.py on the same device, weights and
  image; null, with ``peer_skipped`` saying why, where pytorch-grad-cam is not installed.
- ``gpu_busy``: the GPU's mean busy fraction (``torch.cuda.utilization``, NVML) during the
  device lanes' c=32 run; null on the CPU.
- ``scorecam_resnet50_ms``: {fp32, bf16} median Score-CAM time, and ``scorecam_spearman`` of
  the bf16 map against fp32's. On the CPU in ``--quick`` mode a 32x32 input and ``layer2``
  (``scorecam_setup`` says which), timed once, so that it takes seconds.
- ``soak`` (``--soak-seconds``): device memory (NVML's used MiB; the server's RSS on the CPU)
  after warm-up and at the end of c=32 for that long, and every sample (``memory_mib_series``,
  one each 2 s).

``--soak-only`` starts one server with the device's lanes and runs only the soak (default 300
s), into ``bench/results/gpu_soak_<card>.json``: a step of its own, for a device session that
has the time.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import torch

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))

import serving  # noqa: E402
from service_load import (  # noqa: E402
    alternate,
    closed_loop,
    engine_gradcam,
    load_frozen,
    median_outcome,
    new_client,
    post_explain,
    summarize_level,
)

from app.cam import ScoreCAM, spearman_correlation  # noqa: E402
from app.models.manifest import parse_manifest  # noqa: E402

MODEL = "resnet50"
FIELDS = {
    "model": MODEL,
    "method": "GradCAM",
    "output": "overlay",
    "image_format": "jpeg",
    "size": "original",
}


def card_name(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "_", torch.cuda.get_device_name(device).lower()).strip("_")


@contextmanager
def sampling(sample: Callable[[], float | None], every_s: float = 0.1) -> Iterator[list[float]]:
    """Samples ``sample()`` on a thread while the block runs."""
    values: list[float] = []
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(every_s):
            value = sample()
            if value is not None:
                values.append(value)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield values
    finally:
        stop.set()
        thread.join()


def gpu_utilization(device: torch.device) -> Callable[[], float | None]:
    def sample() -> float | None:
        try:
            return torch.cuda.utilization(device) / 100
        except Exception:  # no NVML here: no figure
            return None

    return sample


def device_memory(device: torch.device, pid: int) -> float | None:
    """NVML's used MiB on the GPU (every process), or the server's RSS in MiB on the CPU."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return (total - free) / 2**20
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


async def floor_ms(url: str, image: bytes, repeats: int) -> float:
    """The same multipart POST /explain, refused before any model work (unknown method)."""
    walls = []
    async with new_client(1) as client:
        for index in range(repeats + 2):
            outcome = await post_explain(client, url, image, {**FIELDS, "method": "NoSuchCAM"})
            assert 400 <= outcome.status < 500, outcome
            if index >= 2:
                walls.append(outcome.wall_ms)
    return statistics.median(walls)


def c32(url: str, image: bytes, seconds: float) -> dict[str, Any]:
    asyncio.run(closed_loop(url, image, FIELDS, 32, 64, min(seconds, 5)))  # warm-up
    outcomes, elapsed = asyncio.run(closed_loop(url, image, FIELDS, 32, 10**6, seconds))
    return summarize_level(outcomes, elapsed)


def scorecam(spec: Any, device: torch.device, quick: bool, repeats: int) -> dict[str, Any]:
    model = load_frozen(spec, device)
    # On the CPU a quick check's Score-CAM is 512 masked forwards at 32 px (layer2's 4x4 grid),
    # timed once: 1,024 at 64 px (layer3) took 28 s in fp32 and 65 s in bf16 each time on two
    # cores without bf16 units, and the whole check over 9 minutes.
    cpu_quick = quick and device.type == "cpu"
    side, layer = (32, "layer2") if cpu_quick else (224, "layer4")
    repeats = 1 if cpu_quick else repeats
    torch.manual_seed(0)
    x = torch.randn(1, 3, side, side, device=device)
    times: dict[str, float] = {}
    maps: dict[str, torch.Tensor] = {}
    for precision in ("fp32", "bf16"):
        runs = []
        with ScoreCAM(model, layer, input_shape=(3, side, side), precision=precision) as cam:
            for index in range(repeats + 1):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                started = time.perf_counter()
                with torch.inference_mode():
                    scores = model(x)
                maps[precision] = cam([0], scores)[0]
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if index:
                    runs.append((time.perf_counter() - started) * 1000)
            chunks = list(cam.chunk_sizes)
        times[precision] = round(statistics.median(runs), 1)
    rho = float(spearman_correlation(maps["bf16"][None], maps["fp32"][None])[0])
    return {
        "scorecam_resnet50_ms": times,
        "scorecam_spearman": round(rho, 4),
        "scorecam_setup": {"input": side, "layer": layer, "last_chunk_sizes": chunks[:12]},
    }


@contextmanager
def peer_server(store: Path, device: str, log: Path) -> Iterator[str]:
    port = serving.free_port()
    env = {**os.environ, "PEER_MODEL": str(store / MODEL), "PEER_DEVICE": device}
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "fastapi_gradcam:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--log-level",
                "warning",
            ],
            cwd=BENCH / "peers",
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the peer did not start:\n{serving.log_tail(log)}")
            try:
                httpx.get(f"{url}/docs", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.25)
        yield url
    finally:
        serving.stop_server(process)


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    seconds = args.seconds if not args.quick else min(args.seconds, 8.0)
    repeats = args.repeats if not args.quick else min(args.repeats, 8)
    report: dict[str, Any] = {"card": card_name(device), "machine": serving.machine_info(device)}
    image = serving.photo_jpeg(640, 480, seed=1)
    with tempfile.TemporaryDirectory(prefix="camserve-gpu-") as tmp:
        root = Path(tmp)
        store = serving.build_store(root, [MODEL])
        spec = parse_manifest(store / MODEL)
        engine = engine_gradcam(spec, device)
        lanes = {"after": "device", "before": "cpu"}
        for when, lane in lanes.items():
            env = {"CAMSERVE_IMAGE_LANE": lane}
            log = root / f"server_{when}.log"
            with serving.running_process(store, args.device, env, log, [MODEL]) as (url, proc):
                engine_ms, outcomes = asyncio.run(alternate(url, image, FIELDS, engine, repeats))
                request = median_outcome(outcomes)
                with sampling(gpu_utilization(device)) as busy:
                    level = c32(url, image, seconds)
                report[when] = {
                    "engine_ms": round(statistics.median(engine_ms), 2),
                    "request": request,
                    "c32": level,
                }
                if when == "after":
                    report["http_floor_ms"] = round(asyncio.run(floor_ms(url, image, repeats)), 2)
                    report["gpu_busy"] = round(statistics.fmean(busy), 3) if busy else None
                    if args.soak_seconds:
                        report["soak"] = soak(url, image, device, proc.pid, args.soak_seconds)
        after, before = report["after"], report["before"]
        report["request_over_engine_c1"] = round(
            after["request"]["wall_ms"] / after["engine_ms"], 2
        )
        report["request_over_engine_c1_before"] = round(
            before["request"]["wall_ms"] / before["engine_ms"], 2
        )
        report["throughput_c32"] = after["c32"]["throughput_rps"]
        report["throughput_c32_before"] = before["c32"]["throughput_rps"]
        report.update(peer(store, args.device, image, seconds, repeats, after, root))
        report.update(scorecam(spec, device, args.quick, max(1, repeats // 4)))
    return report


def peer(
    store: Path,
    device: str,
    image: bytes,
    seconds: float,
    repeats: int,
    after: dict[str, Any],
    root: Path,
) -> dict[str, Any]:
    if importlib.util.find_spec("pytorch_grad_cam") is None:
        return {
            "peer_c1_ratio": None,
            "peer_c32_ratio": None,
            "peer_skipped": "pytorch-grad-cam (grad-cam on PyPI) is not installed here",
        }
    with peer_server(store, device, root / "peer.log") as url:
        fields = {"model": MODEL}
        walls = []

        async def sequential() -> None:
            async with new_client(1) as client:
                for index in range(repeats + 2):
                    outcome = await post_explain(client, url, image, fields)
                    assert outcome.status == 200, outcome
                    if index >= 2:
                        walls.append(outcome.wall_ms)

        asyncio.run(sequential())
        outcomes, elapsed = asyncio.run(closed_loop(url, image, fields, 32, 10**6, seconds))
        level = summarize_level(outcomes, elapsed)
    c1 = statistics.median(walls)
    failed = level["errors"] or not level["ok"]
    return {
        "peer": {"c1_ms": round(c1, 1), "c32": level},
        "peer_c1_ratio": round(after["request"]["wall_ms"] / c1, 3),
        # A peer that failed requests at c=32 has no throughput to compare with.
        "peer_c32_ratio": None
        if failed
        else round(after["c32"]["throughput_rps"] / level["throughput_rps"], 2),
        **(
            {"peer_c32_failed": f"{level['errors']} of {level['requests']} failed"}
            if failed
            else {}
        ),
    }


def soak(url: str, image: bytes, device: torch.device, pid: int, seconds: float) -> dict[str, Any]:
    """c=32 for ``seconds``; device memory every 2 s; the warm-up is the first fifth."""
    with sampling(lambda: device_memory(device, pid), every_s=2.0) as memory:
        outcomes, elapsed = asyncio.run(closed_loop(url, image, FIELDS, 32, 10**7, seconds))
    warm = memory[max(0, len(memory) // 5)] if memory else None
    return {
        "seconds": seconds,
        "requests": summarize_level(outcomes, elapsed),
        "memory_mib_after_warmup": round(warm, 1) if warm is not None else None,
        "memory_mib_end": round(memory[-1], 1) if memory else None,
        "memory_mib_max": round(max(memory), 1) if memory else None,
        "growth_mib": round(memory[-1] - warm, 1) if memory and warm is not None else None,
        "memory_mib_series": [round(m, 1) for m in memory],
    }


def run_soak(args: argparse.Namespace) -> dict[str, Any]:
    """Only the soak, on one server with the device's lanes."""
    device = torch.device(args.device)
    report: dict[str, Any] = {"card": card_name(device), "machine": serving.machine_info(device)}
    image = serving.photo_jpeg(640, 480, seed=1)
    with tempfile.TemporaryDirectory(prefix="camserve-soak-") as tmp:
        root = Path(tmp)
        store = serving.build_store(root, [MODEL])
        env = {"CAMSERVE_IMAGE_LANE": "device"}
        with serving.running_process(store, args.device, env, root / "server.log", [MODEL]) as (
            url,
            proc,
        ):
            report["soak"] = soak(url, image, device, proc.pid, args.soak_seconds or 300.0)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seconds", type=float, default=20.0, help="per c=32 run")
    parser.add_argument("--repeats", type=int, default=20, help="sequential rounds at c=1")
    parser.add_argument("--quick", action="store_true", help="short runs (the CPU check)")
    parser.add_argument("--soak-seconds", type=float, default=0.0)
    parser.add_argument(
        "--soak-only", action="store_true", help="only the soak at c=32 (300 s by default)"
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    serving.raise_on_sigterm()
    report = run_soak(args) if args.soak_only else run(args)
    name = "gpu_soak" if args.soak_only else "gpu_pipeline"
    out = args.out or REPO / "bench" / "results" / f"{name}_{report['card']}.json"
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    keys = [k for k in report if k not in ("machine", "after", "before", "peer", "soak")]
    if "soak" in report:
        print(json.dumps({k: v for k, v in report["soak"].items() if k != "memory_mib_series"}))
    print(json.dumps({k: report[k] for k in keys}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
