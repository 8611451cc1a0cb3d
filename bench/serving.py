"""Shared pieces of the HTTP benchmarks (``service_load.py``, ``soak.py``): a temporary model
store, photo-like test images, a ``python -m app`` server on a free port, and report helpers."""

from __future__ import annotations

import contextlib
import datetime
import io
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
import torchvision
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
READY_TIMEOUT_S = 300.0


# --------------------------------------------------------------------------- model store


def _manifest_text(architecture: str) -> str:
    return f"""description = "Random-weight {architecture} (seed 0) for the load benchmark."

[model]
architecture = "{architecture}"
weights = "weights.pt"
num_classes = 1000
labels = "labels.txt"

[preprocess]
resize = 256
crop = 224
mean = {list(IMAGENET_MEAN)}
std = {list(IMAGENET_STD)}
input_shape = [3, 224, 224]

[cam]
target_layers = ["layer4"]
fc_layer = "fc"
default_method = "GradCAM"
"""


def write_torchvision_model(folder: Path, architecture: str, seed: int = 0) -> None:
    """A model folder with a seeded random-init state_dict, generated labels and a manifest."""
    folder.mkdir(parents=True)
    torch.manual_seed(seed)
    model = getattr(torchvision.models, architecture)(weights=None, num_classes=1000)
    torch.save(model.state_dict(), folder / "weights.pt")
    labels = "\n".join(f"class_{i:04d}" for i in range(1000))
    (folder / "labels.txt").write_text(labels + "\n", encoding="utf-8")
    (folder / "model.toml").write_text(_manifest_text(architecture), encoding="utf-8")


def build_store(root: Path, architectures: Sequence[str]) -> Path:
    """``root/store``: shapes (a link to the shipped one) plus random torchvision models."""
    store = root / "store"
    store.mkdir()
    (store / "shapes").symlink_to(REPO / "model_store" / "shapes", target_is_directory=True)
    for architecture in architectures:
        write_torchvision_model(store / architecture, architecture)
    return store


# --------------------------------------------------------------------------- test images


def photo_jpeg(width: int, height: int, seed: int, quality: int = 90) -> bytes:
    """A photo-like JPEG: a smooth colour field, mid-frequency texture, waves and pixel noise."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    image = np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.float32)
    grain = rng.integers(0, 256, (max(height // 16, 1), max(width // 16, 1)), dtype=np.uint8)
    texture = np.asarray(
        Image.fromarray(grain).resize((width, height), Image.BILINEAR), dtype=np.float32
    )
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    waves = 12 * np.sin(xx * (18 * np.pi / width)) * np.cos(yy * (14 * np.pi / height))
    image = image + (0.25 * (texture - 128) + waves)[..., None]
    image += rng.normal(0.0, 1.0, image.shape).astype(np.float32)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


# --------------------------------------------------------------------------- server process


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_env(store: Path, port: int, device: str, overrides: dict[str, str]) -> dict[str, str]:
    """The calling environment without its CAMSERVE_* variables, plus the benchmark's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAMSERVE_")}
    env.update(
        CAMSERVE_MODEL_STORE=str(store),
        CAMSERVE_HOST="127.0.0.1",
        CAMSERVE_PORT=str(port),
        CAMSERVE_DEVICE=device,
        CAMSERVE_DEFAULT_MODEL="shapes",
        CAMSERVE_QUEUE_SIZE="256",
        CAMSERVE_LOG_LEVEL="WARNING",
        # build_store links model_store/shapes in from outside the temporary store.
        CAMSERVE_ALLOW_LINKS_OUT_OF_STORE="true",
        CAMSERVE_GRPC_PORT="",  # HTTP only, unless the overrides name a port
        # The benchmarks repeat one upload: with the explanation cache on, every request after
        # the first would be a hit, and they would measure the cache (bench/cache.py does that).
        CAMSERVE_CACHE_MB="0",
    )
    env.update(overrides)
    return env


def log_tail(path: Path, lines: int = 30) -> str:
    text = path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


def wait_ready(process: subprocess.Popen, url: str, log: Path) -> dict[str, str]:
    """Poll GET /ready until 200; returns model -> status. Raises if the server dies or hangs."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log_tail(log)}")
        with contextlib.suppress(httpx.TransportError):
            answer = httpx.get(f"{url}/ready", timeout=5)
            if answer.status_code == 200:
                return dict(answer.json().get("models", {}))
        time.sleep(0.25)
    raise RuntimeError(f"server not ready after {READY_TIMEOUT_S:.0f} s:\n{log_tail(log)}")


def stop_server(process: subprocess.Popen) -> None:
    """SIGINT (uvicorn's graceful shutdown), then SIGKILL if it lingers."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def running_process(
    store: Path,
    device: str,
    overrides: dict[str, str],
    log: Path,
    needed: Sequence[str],
    cwd: Path = REPO,
) -> Iterator[tuple[str, subprocess.Popen]]:
    """Run ``python -m app`` until the block ends; yields its base URL and process once the
    models are up. ``cwd``: the tree whose ``app`` it runs (default this one)."""
    port = free_port()
    env = server_env(store, port, device, overrides)
    with log.open("wb") as log_file:
        # Own session: a Ctrl-C in the terminal reaches only us, and we stop the server.
        process = subprocess.Popen(
            [sys.executable, "-m", "app"],
            cwd=cwd,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        models = wait_ready(process, url, log)
        broken = {name: models.get(name, "missing") for name in needed}
        broken = {name: status for name, status in broken.items() if status != "ready"}
        if broken:
            raise RuntimeError(f"models not ready: {broken}\n{log_tail(log)}")
        yield url, process
    finally:
        stop_server(process)


@contextlib.contextmanager
def running_server(
    store: Path, device: str, overrides: dict[str, str], log: Path, needed: Sequence[str]
) -> Iterator[str]:
    """Like ``running_process``, yielding only the base URL."""
    with running_process(store, device, overrides, log, needed) as (url, _process):
        yield url


# --------------------------------------------------------------------------- statistics


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def rounded(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


# --------------------------------------------------------------------------- report


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        )
        return done.stdout.strip() or None
    return None


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "device": str(device),
        "git_commit": git_commit(),
        "load_average_before": [round(v, 2) for v in os.getloadavg()],
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        return "-" if value is None else str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def table_of(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> str:
    return markdown_table(keys, [[row.get(k) for k in keys] for row in rows])


# --------------------------------------------------------------------------- running a bench


def raise_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so the ``running_*`` blocks stop their servers."""

    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def timed_step(label: str, step: Callable[[], Any]) -> Any:
    print(f"# {label} ...", flush=True)
    started = time.perf_counter()
    result = step()
    print(f"# {label}: {time.perf_counter() - started:.1f} s", flush=True)
    return result


def warn_if_busy() -> None:
    """Two-thread CPU runs stall badly when other processes want the cores: say so up front."""
    load = os.getloadavg()[0]
    cores = os.cpu_count() or 1
    if load > 0.5 * cores:
        print(
            f"warning: load average {load:.2f} on {cores} cores before the run; "
            "other processes will distort the timings",
            flush=True,
        )
