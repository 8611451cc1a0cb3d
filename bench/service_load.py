"""Load test of the running service over HTTP, with request batching on and off, in one run.

    python bench/service_load.py                     # CPU, resnet18, concurrency 1,4,16,64
    python bench/service_load.py --quick             # smoke run, about 1-2 minutes
    python bench/service_load.py --device cuda --models resnet18,resnet50 --concurrency 1,8,32
    python bench/service_load.py --scenario mixed --quick   # GradCAM beside a Score-CAM job

The ``mixed`` scenario (short requests beside a long job, one server) is ``bench/mixed_load.py``;
what follows is the default ``load`` scenario.

What it does, in order:

1. Builds a temporary model store: a link to ``model_store/shapes`` plus random-weight (seeded)
   torchvision ``resnet18`` and ``resnet50`` folders (1000 classes, generated labels, resize 256,
   crop 224, ImageNet mean/std, target layer ``layer4``, ``fc_layer = "fc"``). Nothing is
   downloaded. Generates two photo-like JPEGs (quality 90): 640x480 and 12 MP (4000x3000).
2. Starts ``python -m app`` (uvicorn) twice, each on 127.0.0.1 and a free port, and waits for
   ``GET /ready``: one with default settings (batching on), one with ``CAMSERVE_MAX_BATCH_SIZE=1``
   (batching off). Closed-loop load (GradCAM, 640x480 JPEG, per model and concurrency, one
   discarded warm-up round first): the two servers take turns level by level, so the idle one
   costs nothing and drift hits both alike. Throughput counts the 200s; latency percentiles are
   of the 200s; 503s are counted apart from other errors.
3. Engine alone vs request: for resnet50 and shapes, rounds of one call in this process (the
   model loaded as the service loads it: eval, frozen, channels-last on CPU; GradCAM extractor
   setup + forward + CAM at batch 1 on the model's input size) then one sequential ``/explain``
   with default form fields to the batching-on server; medians and their ratio.
4. On the batching-on server, the per-stage ``timings`` and answer size of one 640x480 and one
   12 MP upload to shapes (default fields, alternating, medians). Both servers are stopped.

Both servers get ``CAMSERVE_QUEUE_SIZE=256`` so that no level is refused for queue space, and
``CAMSERVE_LOG_LEVEL=WARNING``; every other setting (``CAMSERVE_MAX_MODEL_SLOTS``,
``CAMSERVE_BATCH_TIMEOUT_MS``, ``CAMSERVE_MAX_OUTPUT_SIDE``, ...) keeps the service's default
unless given with ``--env``. ``CAMSERVE_*`` variables of the calling shell are not passed on.
The servers are stopped at the end, on an exception, on Ctrl-C and on SIGTERM.

Markdown tables go to stdout and everything to ``bench/results/service_load.json`` (``--out``;
``service_load_mixed.json`` for the mixed scenario).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import serving  # noqa: E402  (bench/, this script's own folder)
from serving import (  # noqa: E402
    machine_info,
    markdown_table,
    percentile,
    photo_jpeg,
    raise_on_sigterm,
    rounded,
    running_server,
    table_of,
    timed_step,
    warn_if_busy,
)

from app.cam import GradCAM  # noqa: E402
from app.models.manifest import ModelSpec, parse_manifest  # noqa: E402

TORCHVISION_MODELS = ("resnet18", "resnet50")
REFERENCE_TARGETS = {"resnet50": 1.3, "shapes": 8.0}  # request / engine alone, at most
STAGE_RATIO_TARGET = 4.0  # 12 MP / 640x480 wall time, at most
ANSWER_BYTES_TARGET = 2_000_000  # 12 MP answer, at most
TIMING_FIELDS = (
    "decode_ms",
    "queue_ms",
    "forward_ms",
    "cam_ms",
    "encode_ms",
    "total_ms",
    "batch_images",
)
REQUEST_TIMEOUT_S = 300.0
OUT_NAMES = {"load": "service_load.json", "mixed": "service_load_mixed.json"}
_TIMINGS_RE = re.compile(rb'"timings"\s*:\s*(\{[^{}]*\})')


@dataclass(frozen=True)
class Config:
    """Everything one run needs, from the command line."""

    device: str
    models: tuple[str, ...]
    concurrency: tuple[int, ...]
    requests: int | None
    seconds: float
    reference_repeats: int
    stage_repeats: int
    extra_env: dict[str, str]
    out: Path
    quick: bool
    scenario: str = "load"
    job_forwards: int | None = None


@dataclass(frozen=True)
class Outcome:
    """One HTTP request as the client saw it."""

    status: int  # 0: no response (connection error or timeout)
    wall_ms: float
    answer_bytes: int
    timings: dict[str, float] = field(default_factory=dict)


def build_store(root: Path) -> Path:
    """shapes (a link to the shipped one) plus random resnet18 and resnet50."""
    return serving.build_store(root, TORCHVISION_MODELS)


# --------------------------------------------------------------------------- HTTP client


def _timings_of(body: bytes) -> dict[str, float]:
    """The answer's ``timings`` object, found without parsing the (large) base64 maps when it is
    flat, else from the whole answer."""
    match = _TIMINGS_RE.search(body)
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        timings = json.loads(match.group(1)) if match else json.loads(body).get("timings", {})
        return {k: float(v) for k, v in timings.items() if isinstance(v, int | float)}
    return {}


async def post_explain(
    client: httpx.AsyncClient, url: str, image: bytes, fields: dict[str, str]
) -> Outcome:
    """One multipart POST /explain; transport errors become status 0."""
    started = time.perf_counter()
    try:
        answer = await client.post(
            f"{url}/explain", files={"file": ("image.jpg", image, "image/jpeg")}, data=fields
        )
    except httpx.HTTPError:
        return Outcome(0, (time.perf_counter() - started) * 1000, 0)
    wall_ms = (time.perf_counter() - started) * 1000
    timings = _timings_of(answer.content) if answer.status_code == 200 else {}
    return Outcome(answer.status_code, wall_ms, len(answer.content), timings)


def new_client(concurrency: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    return httpx.AsyncClient(limits=limits, timeout=REQUEST_TIMEOUT_S)


async def closed_loop(
    url: str,
    image: bytes,
    fields: dict[str, str],
    concurrency: int,
    total: int,
    seconds: float,
) -> tuple[list[Outcome], float]:
    """``concurrency`` clients each send the next request as soon as the last one is answered,
    until ``total`` requests were sent or ``seconds`` passed; returns outcomes and elapsed s."""
    tickets = iter(range(total))
    outcomes: list[Outcome] = []
    last_done = 0.0

    async def client_loop(client: httpx.AsyncClient, deadline: float) -> None:
        nonlocal last_done
        while next(tickets, None) is not None and time.perf_counter() < deadline:
            outcomes.append(await post_explain(client, url, image, fields))
            last_done = time.perf_counter()

    async with new_client(concurrency) as client:
        started = time.perf_counter()
        deadline = started + seconds
        await asyncio.gather(*(client_loop(client, deadline) for _ in range(concurrency)))
    return outcomes, max(last_done - started, 1e-9)


# --------------------------------------------------------------------------- statistics


def summarize_level(outcomes: Sequence[Outcome], elapsed_s: float) -> dict[str, Any]:
    """Throughput of the 200s, their latency percentiles, errors, and the mean batch size."""
    ok = [o for o in outcomes if o.status == 200]
    latencies = [o.wall_ms for o in ok]
    batches = [o.timings["batch_images"] for o in ok if "batch_images" in o.timings]
    return {
        "requests": len(outcomes),
        "ok": len(ok),
        "errors": sum(o.status not in (200, 503) for o in outcomes),
        "errors_503": sum(o.status == 503 for o in outcomes),
        "elapsed_s": round(elapsed_s, 2),
        "throughput_rps": round(len(ok) / elapsed_s, 2),
        "p50_ms": rounded(percentile(latencies, 50)),
        "p95_ms": rounded(percentile(latencies, 95)),
        "p99_ms": rounded(percentile(latencies, 99)),
        "mean_batch_images": round(statistics.fmean(batches), 2) if batches else None,
    }


def median_outcome(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    """Median wall time, answer size and every ``timings`` field over the 200s."""
    ok = [o for o in outcomes if o.status == 200]
    if not ok:
        return {"ok": 0, "statuses": sorted({o.status for o in outcomes})}
    row: dict[str, Any] = {
        "ok": len(ok),
        "wall_ms": round(statistics.median(o.wall_ms for o in ok), 1),
        "answer_bytes": int(statistics.median(o.answer_bytes for o in ok)),
    }
    for name in TIMING_FIELDS:
        values = [o.timings[name] for o in ok if name in o.timings]
        row[name] = round(statistics.median(values), 2) if values else None
    return row


# --------------------------------------------------------------------------- engine alone


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_frozen(spec: ModelSpec, device: torch.device) -> torch.nn.Module:
    """The model as the service holds it (eval, frozen, channels-last on CPU, warmed up)."""
    try:
        from app.models.loading import load_model

        return load_model(spec, device).module
    except (ImportError, AttributeError, TypeError):  # the loader's API moved: do it by hand
        from app.models.loading import build_model

        module, _ = build_model(spec)
        module.eval().requires_grad_(False).to(device)
        if device.type == "cpu":
            module.to(memory_format=torch.channels_last)
        return module


def engine_gradcam(spec: ModelSpec, device: torch.device) -> Callable[[], float]:
    """A timer of extractor setup + forward + GradCAM at batch 1 on the model's input size,
    in this process; each call returns ms."""
    model = load_frozen(spec, device)
    torch.manual_seed(0)
    x = torch.randn(1, *spec.input_shape, device=device)
    layers = list(spec.target_layers)

    def once() -> float:
        _sync(device)
        started = time.perf_counter()
        with GradCAM(model, target_layer=layers, input_shape=spec.input_shape) as cam:
            with torch.enable_grad():
                scores = model(x)
                cam(scores.argmax(1).tolist(), scores)
        _sync(device)
        return (time.perf_counter() - started) * 1000

    return once


# --------------------------------------------------------------------------- benchmark steps


async def alternate(
    url: str, image: bytes, fields: dict[str, str], engine: Callable[[], float], repeats: int
) -> tuple[list[float], list[Outcome]]:
    """Rounds of one engine-alone call then one sequential request (the server is idle while the
    engine runs, and the other way round), after two warm-up rounds."""
    engine_ms: list[float] = []
    outcomes: list[Outcome] = []
    async with new_client(1) as client:
        for round_idx in range(repeats + 2):
            elapsed = engine()
            outcome = await post_explain(client, url, image, fields)
            if round_idx >= 2:
                engine_ms.append(elapsed)
                outcomes.append(outcome)
    return engine_ms, outcomes


def run_references(
    url: str, image: bytes, store: Path, device: torch.device, repeats: int
) -> list[dict[str, Any]]:
    """Sequential requests with default form fields against the engine alone, per model."""
    rows = []
    for name, target in REFERENCE_TARGETS.items():
        engine = engine_gradcam(parse_manifest(store / name), device)
        engine_ms, outcomes = asyncio.run(alternate(url, image, {"model": name}, engine, repeats))
        del engine
        summary = median_outcome(outcomes)
        median_engine = statistics.median(engine_ms)
        request = summary.get("wall_ms")
        rows.append(
            {
                "model": name,
                "engine_ms": round(median_engine, 2),
                "request_ms": request,
                "server_total_ms": summary.get("total_ms"),
                "ratio": None if request is None else round(request / median_engine, 2),
                "target": target,
            }
        )
    return rows


def run_stages(url: str, images: dict[str, bytes], repeats: int) -> list[dict[str, Any]]:
    """shapes at default fields, each image in turn (alternating, so drift hits both alike)."""
    fields = {"model": "shapes"}
    outcomes: dict[str, list[Outcome]] = {label: [] for label in images}

    async def rounds() -> None:
        async with new_client(1) as client:
            for round_idx in range(repeats + 1):  # the first round is a warm-up
                for label, data in images.items():
                    outcome = await post_explain(client, url, data, fields)
                    if round_idx:
                        outcomes[label].append(outcome)

    asyncio.run(rounds())
    return [
        {"image": label, "upload_bytes": len(images[label]), **median_outcome(outcomes[label])}
        for label in images
    ]


def requests_for(concurrency: int, config: Config) -> int:
    if config.requests is not None:
        return config.requests
    return max(100, 4 * concurrency)


def measure_level(
    url: str, image: bytes, fields: dict[str, str], concurrency: int, config: Config
) -> dict[str, Any]:
    """One discarded warm-up round of ``concurrency`` requests, then the measured run."""
    asyncio.run(closed_loop(url, image, fields, concurrency, concurrency, config.seconds))
    total = requests_for(concurrency, config)
    outcomes, elapsed = asyncio.run(
        closed_loop(url, image, fields, concurrency, total, config.seconds)
    )
    return summarize_level(outcomes, elapsed)


def run_load(
    urls: dict[str, str], image: bytes, config: Config, label: str = "batching "
) -> list[dict[str, Any]]:
    """Every model x concurrency level on every server (mode -> URL); the servers take turns
    level by level, first one first then the other, so that the machine's drift hits both.
    ``label``: what the progress lines call a mode."""
    rows = []
    modes = list(urls)
    for model in config.models:
        fields = {"model": model, "method": "GradCAM"}
        for index, concurrency in enumerate(config.concurrency):
            for mode in modes if index % 2 == 0 else modes[::-1]:
                row = {"mode": mode, "model": model, "concurrency": concurrency}
                row.update(measure_level(urls[mode], image, fields, concurrency, config))
                rows.append(row)
                print(_progress(row, label), flush=True)
    return rows


def _progress(row: dict[str, Any], label: str) -> str:
    return (
        f"  {label}{row['mode']:3s} {row['model']} c={row['concurrency']}: "
        f"{row['throughput_rps']} req/s, p50 {row['p50_ms']} ms, "
        f"errors {row['errors']} (+{row['errors_503']} 503)"
    )


def batching_ratios(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """throughput(on) / throughput(off) per model and concurrency."""
    by_key = {(r["mode"], r["model"], r["concurrency"]): r["throughput_rps"] for r in rows}
    ratios = []
    for (mode, model, concurrency), on in by_key.items():
        off = by_key.get(("off", model, concurrency))
        if mode == "on" and off is not None:
            ratio = round(on / off, 2) if off else None
            ratios.append(
                {"model": model, "concurrency": concurrency, "on": on, "off": off, "ratio": ratio}
            )
    return ratios


# --------------------------------------------------------------------------- report


def render_report(report: dict[str, Any]) -> str:
    """The markdown printed at the end of a run."""
    machine = report["machine"]
    parts = [
        f"## camserve service load ({machine['device']}, {machine['cpu']}, "
        f"{machine['cores']} cores, torch {machine['torch']}, {machine['date']})",
        "### Closed-loop load: GradCAM, 640x480 JPEG",
        table_of(
            report["load"],
            (
                "mode",
                "model",
                "concurrency",
                "requests",
                "throughput_rps",
                "p50_ms",
                "p95_ms",
                "p99_ms",
                "errors",
                "errors_503",
                "mean_batch_images",
            ),
        ),
        "### Batching: throughput(on) / throughput(off)",
        table_of(report["batching_ratio"], ("model", "concurrency", "on", "off", "ratio")),
        "### Sequential request (default fields, 640x480 JPEG) / engine alone (forward + GradCAM)",
        table_of(
            report["reference"],
            ("model", "engine_ms", "request_ms", "server_total_ms", "ratio", "target"),
        ),
        "### Stages of one shapes request (default fields, medians)",
        table_of(report["stages"], ("image", "upload_bytes", "wall_ms", *TIMING_FIELDS)),
        markdown_table(
            ("12 MP / 640x480 wall", "target", "12 MP answer bytes", "target"),
            [
                [
                    report["stage_checks"]["wall_ratio"],
                    f"<= {STAGE_RATIO_TARGET}",
                    report["stage_checks"]["answer_bytes_12mp"],
                    f"<= {ANSWER_BYTES_TARGET}",
                ]
            ],
        ),
    ]
    return "\n\n".join(parts)


def stage_checks(stages: Sequence[dict[str, Any]]) -> dict[str, Any]:
    small, large = stages[0], stages[1]
    ratio = None
    if small.get("wall_ms") and large.get("wall_ms"):
        ratio = round(large["wall_ms"] / small["wall_ms"], 2)
    return {"wall_ratio": ratio, "answer_bytes_12mp": large.get("answer_bytes")}


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", choices=("load", "mixed"), default="load")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--models",
        default=None,
        help="load-test models: resnet18, resnet50, shapes (load: resnet18; mixed: both resnets)",
    )
    parser.add_argument(
        "--job-forwards",
        type=int,
        default=None,
        help="mixed: end each Score-CAM job after this many masked forwards (--quick: 256)",
    )
    parser.add_argument("--concurrency", default="1,4,16,64", help="comma-separated levels")
    parser.add_argument(
        "--requests", type=int, default=None, help="requests per level (default max(100, 4 x c))"
    )
    parser.add_argument("--seconds", type=float, default=45.0, help="time cap per level")
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="sequential/engine repeats, mixed: rounds (default 10; --quick: 3, mixed 2)",
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="CAMSERVE_X=VALUE",
        help="extra server setting for both servers (repeatable)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny counts for a smoke run")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    default_models = "resnet18,resnet50" if args.scenario == "mixed" else "resnet18"
    models = tuple(m for m in (args.models or default_models).split(",") if m)
    unknown = set(models) - {"shapes", *TORCHVISION_MODELS}
    if unknown:
        parser.error(f"unknown model(s) {', '.join(sorted(unknown))}")
    if any("=" not in item for item in args.env):
        parser.error("--env takes CAMSERVE_NAME=VALUE")
    extra = dict(item.split("=", 1) for item in args.env)
    concurrency = tuple(int(c) for c in args.concurrency.split(",") if c)
    requests, seconds, repeats = args.requests, args.seconds, args.repeats or 10
    if args.quick:
        concurrency = tuple(c for c in concurrency if c <= 4) or (1,)
        quick_requests = 16 if args.scenario == "mixed" else 8
        quick_repeats = 2 if args.scenario == "mixed" else 3
        repeats = args.repeats or quick_repeats
        requests, seconds = requests or quick_requests, min(seconds, 15.0)
    return Config(
        device=args.device,
        models=models,
        concurrency=concurrency,
        requests=requests,
        seconds=seconds,
        reference_repeats=repeats,
        stage_repeats=max(2, repeats // 2),
        extra_env=extra,
        out=args.out or REPO / "bench" / "results" / OUT_NAMES[args.scenario],
        quick=args.quick,
        scenario=args.scenario,
        job_forwards=args.job_forwards or (256 if args.quick else None),
    )


def run(config: Config) -> dict[str, Any]:
    device = torch.device(config.device)
    report: dict[str, Any] = {"machine": machine_info(device), "config": _config_json(config)}
    needed = sorted({*config.models, *REFERENCE_TARGETS})
    with tempfile.TemporaryDirectory(prefix="camserve-load-") as tmp:
        root = Path(tmp)
        store = timed_step("model store", lambda: build_store(root))
        images = timed_step(
            "images",
            lambda: {"640x480": photo_jpeg(640, 480, 1), "4000x3000": photo_jpeg(4000, 3000, 2)},
        )
        small = images["640x480"]
        off_env = {**config.extra_env, "CAMSERVE_MAX_BATCH_SIZE": "1"}
        with contextlib.ExitStack() as servers:
            urls = {
                mode: servers.enter_context(
                    running_server(store, config.device, env, root / f"server-{mode}.log", needed)
                )
                for mode, env in (("on", config.extra_env), ("off", off_env))
            }
            load = timed_step("load, batching on/off", lambda: run_load(urls, small, config))
            report["reference"] = timed_step(
                "engine alone vs sequential requests (batching on)",
                lambda: run_references(urls["on"], small, store, device, config.reference_repeats),
            )
            report["stages"] = timed_step(
                "stages (batching on)", lambda: run_stages(urls["on"], images, config.stage_repeats)
            )
    report["load"] = load
    report["batching_ratio"] = batching_ratios(load)
    report["stage_checks"] = stage_checks(report["stages"])
    report["image_bytes"] = {label: len(data) for label, data in images.items()}
    return report


def _config_json(config: Config) -> dict[str, Any]:
    return {
        "device": config.device,
        "models": list(config.models),
        "concurrency": list(config.concurrency),
        "requests_per_level": config.requests or "max(100, 4 x concurrency)",
        "seconds_cap_per_level": config.seconds,
        "reference_repeats": config.reference_repeats,
        "stage_repeats": config.stage_repeats,
        "extra_env": config.extra_env,
        "quick": config.quick,
    }


def main(argv: Sequence[str] | None = None) -> None:
    raise_on_sigterm()
    config = parse_args(argv)
    warn_if_busy()
    started = time.perf_counter()
    if config.scenario == "mixed":
        from mixed_load import MixedConfig, render_mixed, run_mixed

        mixed = MixedConfig(
            device=config.device,
            models=config.models,
            requests=config.requests or 40,
            job_forwards=config.job_forwards,
            rounds=config.reference_repeats,
            extra_env=config.extra_env,
        )
        report, render = run_mixed(mixed), render_mixed
    else:
        report, render = run(config), render_report
    report["wall_s"] = round(time.perf_counter() - started, 1)
    report["machine"]["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    config.out.parent.mkdir(parents=True, exist_ok=True)
    config.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(render(report))
    print(f"\nwrote {config.out} ({report['wall_s']} s)")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted: servers stopped", file=sys.stderr)
        sys.exit(130)
