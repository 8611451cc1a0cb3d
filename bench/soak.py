"""Soak test of one running service over HTTP: a long mixed load, an overload burst, abandoned
slow requests, then idle; watches the server process's memory and threads throughout.

    python bench/soak.py                      # CPU, 600 s at concurrency 16 (about 14 minutes)
    python bench/soak.py --quick              # smoke run, about 2-3 minutes
    python bench/soak.py --duration 1800 --env CAMSERVE_MAX_MODEL_SLOTS=4

What it does, in order, against one ``python -m app`` on 127.0.0.1 and a free port (a temporary
model store: ``shapes`` plus a seeded random-weight torchvision ``resnet18``, as in
``service_load.py``; ``--no-resnet18`` leaves it out):

1. **Steady**: ``--concurrency`` closed-loop clients for ``--duration`` seconds. Each request is
   drawn (seeded) from a mix: ``/explain`` with GradCAM, GradCAMpp, LayerCAM, XGradCAM and CAM
   on shapes and resnet18, a few ScoreCAM and ISCAM with small settings on shapes, and
   ``/predict``; images are the four ``examples/*.png``, a 640x480 photo-like JPEG, a thin
   400x20 PNG and now and then a 12 MP JPEG; ``size``, ``output``, ``image_format``,
   ``colormap`` and ``top_k`` vary. The first ``--warmup`` seconds (default 180 s, at most
   half the steady phase) are warm-up: the memory and thread baselines are taken at their end.
   RSS swings by tens of MB with the requests in flight, so its growth compares medians over
   windows (10 % of the steady phase, at least 3 samples) just after warm-up and just before
   the end.
2. **Burst**: ``--burst-clients`` closed-loop clients for ``--burst-seconds`` with the same mix.
   503 ``overloaded`` is the intended answer beyond the queue (the server runs with
   ``CAMSERVE_QUEUE_SIZE=16`` unless ``--env`` says otherwise), then a short idle.
3. **Abandon**: one completed request of each slow kind (ScoreCAM on resnet18's ``layer2``, or on
   shapes with ``--no-resnet18``; SSCAM with 8 samples on shapes; both in small chunks) measures
   its CPU cost from an idle server; then ``--abandon`` of them (alternating) are sent at once,
   and every client disconnects after ``--abandon-after`` s. It measures the server's CPU seconds
   from the moment the clients left until it is idle again, against the CPU of as many completed
   requests, and the latency of a GradCAM request sent right after they left.
4. **Idle** for ``--idle`` seconds: threads should be back to their baseline.

All along, the server process's RSS, threads, open files and CPU time are sampled every
``--sample-every`` seconds (psutil). Errors are classified by status and the ``code`` of the
JSON error body; 503 ``overloaded`` in the burst and 499 (the client left) are not errors, and
status 0 means no answer (a transport error or a client timeout).

Targets (PASS/FAIL): no errors besides intended 503s; RSS growth under 5 % from the end of
warm-up to the end of the steady phase; threads back to their end-of-warm-up count once idle;
and, for abandoned work (issue #8), CPU after the clients left under 10 % of the completed
equivalent and the GradCAM sent right after answered within 2 s.

``CAMSERVE_LOG_LEVEL=WARNING``; ``CAMSERVE_*`` variables of the calling shell are not passed on.
The server is stopped at the end, on an exception, on Ctrl-C and on SIGTERM. Markdown tables go
to stdout and ``bench/results/soak.md``, everything to ``bench/results/soak.json`` (``--quick``:
``soak_quick.*``, which git ignores; ``--out`` names the JSON, the markdown goes next to it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import torch
from PIL import Image

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
    running_process,
    table_of,
    timed_step,
    warn_if_busy,
)

RSS_GROWTH_TARGET = 0.05  # end of steady / end of warm-up - 1, at most
ABANDONED_CPU_TARGET = 0.10  # CPU after the clients left / completed equivalent, at most
PROBE_LATENCY_TARGET_MS = 2000.0  # GradCAM sent right after the abandoned requests, at most
REQUEST_TIMEOUT_S = 300.0
IDLE_CPU_CORES = 0.05  # the server counts as idle below this CPU use (cores) over IDLE_WINDOW_S
IDLE_WINDOW_S = 1.0
DEFAULT_QUEUE_SIZE = "16"
# Slow kinds for the abandon phase: seconds of CPU each, in small chunks (masked forwards per
# chunk), so that a server that stops "at the next chunk" can stop early.
ABANDON_SSCAM = {"method": "SSCAM", "num_samples": "8", "batch_size": "16", "seed": "0"}
ABANDON_SCORECAM = {
    "method": "ScoreCAM",
    "model": "resnet18",
    "target_layer": "layer2",
    "batch_size": "16",
}
ABANDON_SCORECAM_SHAPES = {"method": "ScoreCAM", "batch_size": "4"}
PROBE_FIELDS = {"method": "GradCAM"}


@dataclass(frozen=True)
class Config:
    """Everything one run needs, from the command line."""

    device: str
    duration: float
    warmup: float
    concurrency: int
    burst_clients: int
    burst_seconds: float
    abandon: int
    abandon_after: float
    idle: float
    sample_every: float
    resnet18: bool
    seed: int
    extra_env: dict[str, str]
    out: Path
    quick: bool


@dataclass(frozen=True)
class Shot:
    """One request to send: where, which image, which form fields."""

    kind: str
    path: str
    image: str
    fields: dict[str, str]


@dataclass(frozen=True)
class Outcome:
    """One HTTP request as the client saw it."""

    kind: str
    image: str
    status: int  # 0: no answer (connection error or client timeout)
    code: str  # the JSON error code, "" for 200, the exception's name for status 0
    at_s: float  # when it was sent, seconds since the phase began
    wall_ms: float


# --------------------------------------------------------------------------- images and the mix


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def make_images() -> dict[str, bytes]:
    """The four examples, a 640x480 and a 12 MP photo-like JPEG, and a thin 400x20 PNG."""
    images = {path.stem: path.read_bytes() for path in sorted((REPO / "examples").glob("*.png"))}
    images["photo_640x480"] = photo_jpeg(640, 480, 1)
    images["photo_12mp"] = photo_jpeg(4000, 3000, 2)
    gradient = Image.linear_gradient("L").resize((400, 20)).convert("RGB")
    images["thin_400x20"] = png_bytes(gradient)
    return images


LIGHT_METHODS = ("GradCAM", "GradCAMpp", "LayerCAM", "XGradCAM", "CAM")


class Mix:
    """Seeded draws of requests: mostly light CAMs and predictions, a few slow Score-family ones
    with small settings, images of every size now and then."""

    def __init__(self, seed: int, images: Sequence[str], resnet18: bool) -> None:
        self.rng = random.Random(seed)
        examples = [name for name in images if not name.startswith(("photo_", "thin_"))]
        self.images = [*examples, "photo_640x480", "thin_400x20", "photo_12mp"]
        self.image_weights = [12.0] * len(examples) + [25.0, 15.0, 2.0]
        kinds: list[tuple[str, float]] = [(f"explain shapes {m}", 10.0) for m in LIGHT_METHODS]
        kinds += [("explain shapes ScoreCAM", 1.5), ("explain shapes ISCAM", 1.5)]
        kinds += [("predict shapes", 10.0)]
        if resnet18:
            kinds += [(f"explain resnet18 {m}", 3.0) for m in ("GradCAM", "LayerCAM", "CAM")]
            kinds += [("predict resnet18", 5.0)]
        self.kinds = [k for k, _ in kinds]
        self.kind_weights = [w for _, w in kinds]

    def _image(self, kind: str) -> str:
        if "ScoreCAM" in kind or "ISCAM" in kind:  # the cost is in the model, not the picture
            return self.rng.choice(self.images[:-3])
        return self.rng.choices(self.images, self.image_weights)[0]

    def draw(self) -> Shot:
        rng = self.rng
        kind = rng.choices(self.kinds, self.kind_weights)[0]
        verb, model, *method = kind.split()
        image = self._image(kind)
        fields = {"model": model}
        if rng.random() < 0.3:
            fields["top_k"] = str(rng.randint(1, 10))
        if verb == "predict":
            return Shot(kind, "/predict", image, fields)
        fields["method"] = method[0]
        if method[0] == "ScoreCAM":
            fields["batch_size"] = "64"
        elif method[0] == "ISCAM":
            fields.update(num_samples="2", batch_size="64")
        sizes = [None, None, None, "input", "256", "64", "1000"]
        if image != "photo_12mp":
            sizes.append("original")
        outputs = [None, None, None, "heatmap", "raw", "overlay,raw", "overlay,heatmap"]
        formats = [None, None, "png", "webp", "jpeg"]
        colormaps = [None, None, "viridis", "turbo", "gray"]
        for name, choices in (
            ("size", sizes),
            ("output", outputs),
            ("image_format", formats),
            ("colormap", colormaps),
        ):
            value = rng.choice(choices)
            if value is not None:
                fields[name] = value
        return Shot(kind, "/explain", image, fields)


# --------------------------------------------------------------------------- HTTP client


def error_code(answer: httpx.Response) -> str:
    """The ``code`` of the JSON error body, or ``-`` when there is none."""
    with contextlib.suppress(ValueError, AttributeError, TypeError, KeyError):
        return str(answer.json()["error"]["code"])
    return "-"


def multipart(shot: Shot, data: bytes) -> dict[str, Any]:
    media = "image/png" if data.startswith(b"\x89PNG") else "image/jpeg"
    return {"files": {"file": (f"{shot.image}.img", data, media)}, "data": shot.fields}


async def send(
    client: httpx.AsyncClient, url: str, shot: Shot, images: dict[str, bytes], phase_t0: float
) -> Outcome:
    """One multipart POST; transport errors and client timeouts become status 0."""
    started = time.perf_counter()
    try:
        answer = await client.post(f"{url}{shot.path}", **multipart(shot, images[shot.image]))
    except httpx.HTTPError as error:
        wall_ms = (time.perf_counter() - started) * 1000
        return Outcome(shot.kind, shot.image, 0, type(error).__name__, started - phase_t0, wall_ms)
    wall_ms = (time.perf_counter() - started) * 1000
    code = "" if answer.status_code == 200 else error_code(answer)
    return Outcome(shot.kind, shot.image, answer.status_code, code, started - phase_t0, wall_ms)


#: Idle pooled connections are dropped by the client before the server's keep-alive (5 s by
#: default) closes them: with both at 5 s, a client that reuses a connection the server is just
#: closing gets a reset (one ReadError per burst in three runs; none with the server at 600 s).
CLIENT_KEEPALIVE_S = 2.0


def new_client(connections: int) -> httpx.AsyncClient:
    limits = httpx.Limits(
        max_connections=connections,
        max_keepalive_connections=connections,
        keepalive_expiry=CLIENT_KEEPALIVE_S,
    )
    return httpx.AsyncClient(limits=limits, timeout=REQUEST_TIMEOUT_S)


async def closed_loop(
    url: str,
    images: dict[str, bytes],
    mix: Mix,
    clients: int,
    seconds: float,
    at: dict[float, Any] | None = None,
) -> tuple[list[Outcome], float]:
    """``clients`` clients each send the next drawn request as soon as the last one is answered,
    for ``seconds``; ``at`` maps seconds into the phase to callbacks (run once, on time).
    Returns the outcomes and the elapsed seconds (until the last answer)."""
    outcomes: list[Outcome] = []

    async def client_loop(client: httpx.AsyncClient, started: float, deadline: float) -> None:
        while time.perf_counter() < deadline:
            outcomes.append(await send(client, url, mix.draw(), images, started))

    async def timer(delay: float, callback: Any, started: float) -> None:
        await asyncio.sleep(max(0.0, started + delay - time.perf_counter()))
        callback()

    async with new_client(clients) as client:
        started = time.perf_counter()
        deadline = started + seconds
        timers = [asyncio.create_task(timer(d, c, started)) for d, c in (at or {}).items()]
        await asyncio.gather(*(client_loop(client, started, deadline) for _ in range(clients)))
        await asyncio.gather(*timers)
    return outcomes, time.perf_counter() - started


# --------------------------------------------------------------------------- the server process


class Sampler:
    """Samples RSS, threads, open files and CPU seconds of the server process in a thread every
    ``every`` seconds, labelled with the current phase; ``mark`` takes a named sample now."""

    def __init__(self, pid: int, every: float) -> None:
        self.process = psutil.Process(pid)
        # Its own handle: the sampler thread's oneshot() caches would give stale CPU times.
        self._cpu_process = psutil.Process(pid)
        self.every = every
        self.phase = "start"
        self.t0 = time.perf_counter()
        self.samples: list[dict[str, Any]] = []
        self.marks: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-sampler", daemon=True)

    def cpu_s(self) -> float:
        times = self._cpu_process.cpu_times()
        return times.user + times.system

    def sample(self) -> dict[str, Any]:
        with self._lock, self.process.oneshot():
            row = {
                "t_s": round(time.perf_counter() - self.t0, 1),
                "phase": self.phase,
                "rss_mb": round(self.process.memory_info().rss / 2**20, 1),
                "threads": self.process.num_threads(),
                "fds": self.process.num_fds(),
                "cpu_s": round(sum(self.process.cpu_times()[:2]), 2),
            }
            self.samples.append(row)
        return row

    def mark(self, label: str) -> dict[str, Any]:
        row = {"mark": label, **self.sample()}
        self.marks[label] = row
        print(
            f"  [{row['t_s']:7.1f} s] {label}: RSS {row['rss_mb']} MB, "
            f"{row['threads']} threads, {row['fds']} fds, CPU {row['cpu_s']} s",
            flush=True,
        )
        return row

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            with contextlib.suppress(psutil.Error):
                self.sample()

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


async def wait_idle(sampler: Sampler, max_wait: float) -> tuple[float, float, bool]:
    """Wait until the server uses under IDLE_CPU_CORES over IDLE_WINDOW_S; returns the CPU
    seconds and the time at the start of that quiet window, and whether it got there."""
    deadline = time.perf_counter() + max_wait
    while True:
        window_t, window_cpu = time.perf_counter(), sampler.cpu_s()
        await asyncio.sleep(IDLE_WINDOW_S)
        if sampler.cpu_s() - window_cpu < IDLE_CPU_CORES * IDLE_WINDOW_S:
            return window_cpu, window_t, True
        if time.perf_counter() > deadline:
            return sampler.cpu_s(), time.perf_counter(), False


# --------------------------------------------------------------------------- statistics


def intended(phase: str, outcome: Outcome) -> bool:
    """Not an error: a 503 ``overloaded`` in the burst, or a 499 (the client left)."""
    if outcome.status == 499:
        return True
    return phase == "burst" and outcome.status == 503 and outcome.code == "overloaded"


def summarize(phase: str, outcomes: Sequence[Outcome], elapsed_s: float) -> dict[str, Any]:
    """Counts, throughput of the 200s, their latency percentiles, intended and other errors."""
    ok = [o.wall_ms for o in outcomes if o.status == 200]
    refused = sum(intended(phase, o) for o in outcomes)
    return {
        "requests": len(outcomes),
        "ok": len(ok),
        "intended": refused,
        "errors": len(outcomes) - len(ok) - refused,
        "elapsed_s": round(elapsed_s, 1),
        "ok_per_s": round(len(ok) / max(elapsed_s, 1e-9), 2),
        "p50_ms": rounded(percentile(ok, 50)),
        "p95_ms": rounded(percentile(ok, 95)),
        "p99_ms": rounded(percentile(ok, 99)),
        "max_ms": rounded(max(ok, default=None)),
    }


def statuses(phase: str, outcomes: Sequence[Outcome]) -> list[dict[str, Any]]:
    """One row per (status, code), saying how it counts."""
    counts = Counter((o.status, o.code) for o in outcomes)
    rows = []
    for (status, code), count in sorted(counts.items()):
        example = Outcome("", "", status, code, 0, 0)
        verdict = "ok" if status == 200 else "intended" if intended(phase, example) else "error"
        rows.append(
            {
                "phase": phase,
                "status": status,
                "code": code or "-",
                "count": count,
                "counts": verdict,
            }
        )
    return rows


def by_kind(outcomes: Sequence[Outcome]) -> list[dict[str, Any]]:
    """Latency of the 200s and the non-200 count per request kind."""
    kinds = sorted({o.kind for o in outcomes})
    rows = []
    for kind in kinds:
        mine = [o for o in outcomes if o.kind == kind]
        ok = [o.wall_ms for o in mine if o.status == 200]
        rows.append(
            {
                "kind": kind,
                "requests": len(mine),
                "not_200": len(mine) - len(ok),
                "p50_ms": rounded(percentile(ok, 50)),
                "p95_ms": rounded(percentile(ok, 95)),
                "p99_ms": rounded(percentile(ok, 99)),
            }
        )
    return rows


def downsample(rows: Sequence[dict[str, Any]], at_most: int) -> list[dict[str, Any]]:
    """Every k-th row (and the last), so that at most about ``at_most`` remain."""
    if len(rows) <= at_most:
        return list(rows)
    step = -(-len(rows) // at_most)
    picked = list(rows[::step])
    if picked[-1] is not rows[-1]:
        picked.append(rows[-1])
    return picked


# --------------------------------------------------------------------------- phases


def run_steady(
    url: str, images: dict[str, bytes], sampler: Sampler, config: Config
) -> tuple[list[Outcome], float]:
    sampler.phase = "warmup"

    def end_warmup() -> None:
        sampler.mark("warmup_end")
        sampler.phase = "steady"

    mix = Mix(config.seed, list(images), config.resnet18)
    outcomes, elapsed = asyncio.run(
        closed_loop(
            url, images, mix, config.concurrency, config.duration, {config.warmup: end_warmup}
        )
    )
    sampler.mark("steady_end")
    return outcomes, elapsed


def run_burst(
    url: str, images: dict[str, bytes], sampler: Sampler, config: Config
) -> tuple[list[Outcome], float]:
    sampler.phase = "burst"
    mix = Mix(config.seed + 1, list(images), config.resnet18)
    outcomes, elapsed = asyncio.run(
        closed_loop(url, images, mix, config.burst_clients, config.burst_seconds)
    )
    sampler.mark("burst_end")
    sampler.phase = "after_burst"

    async def settle() -> None:
        await wait_idle(sampler, 120.0)
        await asyncio.sleep(min(config.idle, 10.0))

    asyncio.run(settle())
    sampler.mark("after_burst_idle")
    return outcomes, elapsed


async def completed_cost(
    url: str, sampler: Sampler, fields: dict[str, str], image: bytes
) -> dict[str, Any]:
    """Server CPU seconds and wall ms of one request answered in full, from an idle server."""
    await wait_idle(sampler, 120.0)
    cpu_before = sampler.cpu_s()
    started = time.perf_counter()
    async with new_client(1) as client:
        answer = await client.post(
            f"{url}/explain", files={"file": ("star.png", image, "image/png")}, data=fields
        )
    wall_ms = (time.perf_counter() - started) * 1000
    cpu_after, _, _ = await wait_idle(sampler, 120.0)
    return {
        "status": answer.status_code,
        "wall_ms": round(wall_ms, 1),
        "cpu_s": round(cpu_after - cpu_before, 3),
    }


async def abandoned_request(url: str, fields: dict[str, str], image: bytes, after_s: float) -> str:
    """Send one request and leave after ``after_s``; its own client, so that leaving closes
    the connection. Returns ``left`` or the status if the answer came first."""
    client = new_client(1)
    try:
        answer = await asyncio.wait_for(
            client.post(
                f"{url}/explain", files={"file": ("star.png", image, "image/png")}, data=fields
            ),
            after_s,
        )
        return str(answer.status_code)
    except (asyncio.TimeoutError, httpx.HTTPError):
        return "left"
    finally:
        await client.aclose()


def abandon_kinds(config: Config) -> list[tuple[str, dict[str, str]]]:
    """ScoreCAM on resnet18's layer2 (shapes when resnet18 is left out) and SSCAM on shapes."""
    scorecam = ("ScoreCAM resnet18", ABANDON_SCORECAM)
    if not config.resnet18:
        scorecam = ("ScoreCAM shapes", ABANDON_SCORECAM_SHAPES)
    return [scorecam, ("SSCAM shapes", ABANDON_SSCAM)]


async def abandon_phase(
    url: str, images: dict[str, bytes], sampler: Sampler, config: Config
) -> dict[str, Any]:
    star = images["star"]
    kinds = abandon_kinds(config)
    costs = {label: await completed_cost(url, sampler, f, star) for label, f in kinds}
    probe_idle = [await completed_cost(url, sampler, PROBE_FIELDS, star) for _ in range(3)]
    probe_cpu = sorted(p["cpu_s"] for p in probe_idle)[1]
    await wait_idle(sampler, 120.0)
    sampler.mark("abandon_start")
    kinds = [kinds[i % len(kinds)] for i in range(config.abandon)]
    cpu_sent = sampler.cpu_s()
    sent = time.perf_counter()
    results = await asyncio.gather(
        *(abandoned_request(url, f, star, config.abandon_after) for _, f in kinds)
    )
    left = time.perf_counter()
    cpu_left = sampler.cpu_s()
    async with new_client(1) as client:
        probe = await send(client, url, Shot("probe", "/explain", "star", PROBE_FIELDS), images, 0)
    probe_ms = (time.perf_counter() - left) * 1000
    cpu_idle, idle_at, settled = await wait_idle(sampler, max(120.0, 10.0 * config.abandon))
    sampler.mark("abandon_idle")
    after_leave = max(0.0, cpu_idle - cpu_left - probe_cpu)
    equivalent = sum(costs[label]["cpu_s"] for label, _ in kinds)
    return {
        "requests": config.abandon,
        "kinds": dict(Counter(label for label, _ in kinds)),
        "leave_after_s": config.abandon_after,
        "client_results": dict(Counter(results)),
        "completed_cost": costs,
        "probe_idle": {"cpu_s": probe_cpu, "wall_ms": sorted(p["wall_ms"] for p in probe_idle)[1]},
        "cpu_before_leave_s": round(cpu_left - cpu_sent, 2),
        "cpu_after_leave_s": round(after_leave, 2),
        "completed_equivalent_cpu_s": round(equivalent, 2),
        "after_leave_ratio": round(after_leave / equivalent, 3) if equivalent else None,
        "busy_after_leave_s": round(idle_at - left, 1),
        "settled": settled,
        "probe_status": probe.status,
        "probe_ms": round(probe_ms, 1),
        "clients_connected_s": round(left - sent, 2),
    }


def run_idle(sampler: Sampler, config: Config) -> dict[str, Any] | None:
    """Idle for ``config.idle`` s; returns the first sample with threads at baseline or below."""
    sampler.phase = "idle"
    baseline = sampler.marks["warmup_end"]["threads"]
    deadline = time.perf_counter() + config.idle
    back = None
    while time.perf_counter() < deadline:
        row = sampler.sample()
        if back is None and row["threads"] <= baseline:
            back = row
        time.sleep(min(config.sample_every, max(0.0, deadline - time.perf_counter())))
    final = sampler.mark("idle_end")
    if back is None and final["threads"] <= baseline:
        back = final
    return back


# --------------------------------------------------------------------------- targets and report


def rss_growth(
    samples: Sequence[dict[str, Any]], marks: dict[str, Any], config: Config
) -> dict[str, Any]:
    """Median RSS over a window just after warm-up and one just before the end of the steady
    phase (one sample catches whatever the requests in flight hold at that moment)."""
    window = max(3 * config.sample_every, 0.1 * (config.duration - config.warmup))
    start, end = marks["warmup_end"]["t_s"], marks["steady_end"]["t_s"]
    first = [r["rss_mb"] for r in samples if start <= r["t_s"] <= start + window]
    last = [r["rss_mb"] for r in samples if end - window <= r["t_s"] <= end]
    after_warmup, end_of_steady = statistics.median(first), statistics.median(last)
    return {
        "window_s": round(window, 1),
        "after_warmup_mb": round(after_warmup, 1),
        "end_of_steady_mb": round(end_of_steady, 1),
        "growth": round(end_of_steady / after_warmup - 1, 4),
    }


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    marks, rss = report["marks"], report["rss"]
    errors = report["steady"]["errors"] + report["burst"]["errors"]
    warm, idle_end = marks["warmup_end"], marks["idle_end"]
    abandon = report["abandon"]
    rows = [
        ("errors besides intended 503s (steady + burst)", errors, "0", errors == 0),
        (
            f"RSS growth, end of warm-up -> end of steady (medians over {rss['window_s']} s)",
            f"{rss['growth']:+.1%} ({rss['after_warmup_mb']} -> {rss['end_of_steady_mb']} MB)",
            f"< {RSS_GROWTH_TARGET:.0%}",
            rss["growth"] < RSS_GROWTH_TARGET,
        ),
        (
            "threads once idle vs end of warm-up",
            f"{idle_end['threads']} vs {warm['threads']} (when ready: {marks['ready']['threads']})",
            "<= baseline",
            idle_end["threads"] <= warm["threads"],
        ),
    ]
    ratio = abandon["after_leave_ratio"]
    rows.append(
        (
            "abandoned work: CPU after clients left / completed equivalent",
            f"{ratio} ({abandon['cpu_after_leave_s']} / {abandon['completed_equivalent_cpu_s']} s)",
            f"<= {ABANDONED_CPU_TARGET}",
            ratio is not None and ratio <= ABANDONED_CPU_TARGET,
        )
    )
    rows.append(
        (
            "GradCAM sent right after the abandoned ones",
            f"{abandon['probe_status']} in {abandon['probe_ms']} ms",
            f"200 in <= {PROBE_LATENCY_TARGET_MS:.0f} ms",
            abandon["probe_status"] == 200 and abandon["probe_ms"] <= PROBE_LATENCY_TARGET_MS,
        )
    )
    return [
        {"target": t, "value": v, "limit": lim, "result": "PASS" if ok else "FAIL"}
        for t, v, lim, ok in rows
    ]


def render_report(report: dict[str, Any]) -> str:
    machine, config = report["machine"], report["config"]
    phase_rows = [
        {"phase": name, "clients": clients, **report[name]}
        for name, clients in (
            ("steady", config["concurrency"]),
            ("burst", config["burst_clients"]),
        )
    ]
    abandon = report["abandon"]
    abandon_rows = [
        ["requests sent, then left after", f"{abandon['requests']}, {abandon['leave_after_s']} s"],
        ["client results", abandon["client_results"]],
        [
            "completed cost each (CPU s / wall ms)",
            ", ".join(
                f"{k} {v['cpu_s']} / {v['wall_ms']}" for k, v in abandon["completed_cost"].items()
            ),
        ],
        ["CPU while the clients were connected (s)", abandon["cpu_before_leave_s"]],
        ["CPU after the clients left (s)", abandon["cpu_after_leave_s"]],
        ["CPU of as many completed requests (s)", abandon["completed_equivalent_cpu_s"]],
        ["server busy after the clients left (s)", abandon["busy_after_leave_s"]],
        [
            "GradCAM right after: status, ms (idle: ms)",
            f"{abandon['probe_status']}, {abandon['probe_ms']} "
            f"({abandon['probe_idle']['wall_ms']})",
        ],
    ]
    marks = list(report["marks"].values())
    parts = [
        f"## camserve soak ({machine['device']}, {machine['cpu']}, {machine['cores']} cores, "
        f"torch {machine['torch']}, {machine['date']}, commit {machine['git_commit']}"
        f"{', quick' if config['quick'] else ''})",
        f"Steady {config['duration']} s at concurrency {config['concurrency']} "
        f"(warm-up {config['warmup']} s), burst {config['burst_clients']} clients for "
        f"{config['burst_seconds']} s, server settings {config['server_env']}.",
        "### Requests (latency of the 200s)",
        table_of(
            phase_rows,
            (
                "phase",
                "clients",
                "requests",
                "ok",
                "intended",
                "errors",
                "ok_per_s",
                "p50_ms",
                "p95_ms",
                "p99_ms",
                "max_ms",
            ),
        ),
        "### Answers by status and error code",
        table_of(report["statuses"], ("phase", "status", "code", "count", "counts")),
        "### Steady phase by request kind",
        table_of(
            report["steady_by_kind"], ("kind", "requests", "not_200", "p50_ms", "p95_ms", "p99_ms")
        ),
        "### Server process at phase boundaries",
        table_of(marks, ("mark", "t_s", "rss_mb", "threads", "fds", "cpu_s")),
        "### Server process over time",
        table_of(
            downsample(report["samples"], 30), ("t_s", "phase", "rss_mb", "threads", "fds", "cpu_s")
        ),
        "### Abandoned work (clients disconnect from slow requests)",
        markdown_table(("what", "value"), abandon_rows),
        "### Targets",
        table_of(report["targets"], ("target", "value", "limit", "result")),
    ]
    return "\n\n".join(parts)


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--duration", type=float, default=600.0, help="steady phase, seconds")
    parser.add_argument(
        "--warmup", type=float, default=None, help="seconds (default 180, at most --duration / 2)"
    )
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--burst-clients", type=int, default=128)
    parser.add_argument("--burst-seconds", type=float, default=20.0)
    parser.add_argument("--abandon", type=int, default=16, help="slow requests abandoned at once")
    parser.add_argument("--abandon-after", type=float, default=0.2, help="seconds")
    parser.add_argument("--idle", type=float, default=60.0, help="final idle, seconds")
    parser.add_argument("--sample-every", type=float, default=5.0, help="seconds")
    parser.add_argument("--no-resnet18", action="store_true", help="shapes only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="CAMSERVE_X=VALUE",
        help="extra server setting (repeatable)",
    )
    parser.add_argument("--quick", action="store_true", help="60 s steady, short burst and idle")
    parser.add_argument("--out", type=Path, default=None, help="JSON path; .md goes next to it")
    args = parser.parse_args(argv)
    if any("=" not in item for item in args.env):
        parser.error("--env takes CAMSERVE_NAME=VALUE")
    extra = {"CAMSERVE_QUEUE_SIZE": DEFAULT_QUEUE_SIZE}
    extra.update(item.split("=", 1) for item in args.env)
    duration, burst_seconds, abandon, idle = (
        args.duration,
        args.burst_seconds,
        args.abandon,
        args.idle,
    )
    sample_every = args.sample_every
    if args.quick:
        duration, burst_seconds = min(duration, 60.0), min(burst_seconds, 8.0)
        abandon, idle, sample_every = min(abandon, 6), min(idle, 20.0), min(sample_every, 2.0)
    # Allocator arenas and caches settle over minutes under this mix; a baseline taken earlier
    # counts their filling as growth.
    warmup = args.warmup if args.warmup is not None else min(180.0, duration / 2)
    if not 0 < warmup < duration:
        parser.error("--warmup must be between 0 and --duration")
    name = "soak_quick.json" if args.quick else "soak.json"
    out = args.out or REPO / "bench" / "results" / name
    return Config(
        device=args.device,
        duration=duration,
        warmup=warmup,
        concurrency=args.concurrency,
        burst_clients=args.burst_clients,
        burst_seconds=burst_seconds,
        abandon=abandon,
        abandon_after=args.abandon_after,
        idle=idle,
        sample_every=sample_every,
        resnet18=not args.no_resnet18,
        seed=args.seed,
        extra_env=extra,
        out=out,
        quick=args.quick,
    )


def run(config: Config) -> dict[str, Any]:
    device = torch.device(config.device)
    report: dict[str, Any] = {"machine": machine_info(device), "config": _config_json(config)}
    needed = ["shapes", *(["resnet18"] if config.resnet18 else [])]
    with tempfile.TemporaryDirectory(prefix="camserve-soak-") as tmp:
        root = Path(tmp)
        store = timed_step(
            "model store", lambda: build_store(root, ["resnet18"] if config.resnet18 else [])
        )
        images = timed_step("images", make_images)
        report["image_bytes"] = {label: len(data) for label, data in images.items()}
        log = root / "server.log"
        with (
            running_process(store, config.device, config.extra_env, log, needed) as (url, proc),
            Sampler(proc.pid, config.sample_every) as sampler,
        ):
            sampler.mark("ready")
            steady, steady_s = timed_step(
                f"steady, {config.duration:.0f} s at concurrency {config.concurrency}",
                lambda: run_steady(url, images, sampler, config),
            )
            burst, burst_s = timed_step(
                f"burst, {config.burst_clients} clients for {config.burst_seconds:.0f} s",
                lambda: run_burst(url, images, sampler, config),
            )
            sampler.phase = "abandon"
            report["abandon"] = timed_step(
                f"abandon, {config.abandon} slow requests",
                lambda: asyncio.run(abandon_phase(url, images, sampler, config)),
            )
            back = timed_step(f"idle, {config.idle:.0f} s", lambda: run_idle(sampler, config))
            report["server_log_tail"] = log.read_text(errors="replace").splitlines()[-20:]
    warm_t = sampler.marks["warmup_end"]["t_s"]
    report["threads_back_at_s"] = None if back is None else round(back["t_s"] - warm_t, 1)
    report["steady"] = summarize("steady", steady, steady_s)
    report["burst"] = summarize("burst", burst, burst_s)
    report["statuses"] = statuses("steady", steady) + statuses("burst", burst)
    report["steady_by_kind"] = by_kind(steady)
    report["samples"] = sampler.samples
    report["marks"] = sampler.marks
    report["rss"] = rss_growth(sampler.samples, sampler.marks, config)
    report["targets"] = targets(report)
    return report


def _config_json(config: Config) -> dict[str, Any]:
    data = asdict(config)
    data["server_env"] = data.pop("extra_env")
    data["out"] = str(config.out)
    return data


def main(argv: Sequence[str] | None = None) -> None:
    raise_on_sigterm()
    config = parse_args(argv)
    warn_if_busy()
    started = time.perf_counter()
    report = run(config)
    report["wall_s"] = round(time.perf_counter() - started, 1)
    report["machine"]["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    markdown = render_report(report)
    config.out.parent.mkdir(parents=True, exist_ok=True)
    config.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    config.out.with_suffix(".md").write_text(markdown + "\n", encoding="utf-8")
    print(markdown)
    failed = [t["target"] for t in report["targets"] if t["result"] == "FAIL"]
    print(f"\n{'FAIL: ' + '; '.join(failed) if failed else 'all targets PASS'}")
    print(f"wrote {config.out} and {config.out.with_suffix('.md')} ({report['wall_s']} s)")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted: server stopped", file=sys.stderr)
        sys.exit(130)
