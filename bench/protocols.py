"""The same explanation through the four transports, side by side in one run.

    python bench/protocols.py            # resnet50 (random weights) and shapes, c=1 and c=16
    python bench/protocols.py --quick    # about 2 minutes on 2 cores

One ``python -m app`` serves HTTP and gRPC (a free port each) on a temporary store: the shipped
``shapes`` and a seeded random-weight torchvision ``resnet50`` (224 crop; nothing downloaded,
``bench/serving.py`` builds it). One 640x480 photo-like JPEG goes, for GradCAM with the logits
and the raw map back, through:

- ``multipart``: ``POST /explain`` (``output=raw``), camserve's own route;
- ``oip-json``: ``POST /v2/models/{m}/infer``, the image base64 in JSON, the answer in JSON;
- ``oip-binary``: the same route with the binary tensor data extension both ways (the raw
  image after a JSON header, the logits and the map as raw FP32 after the answer's header);
- ``grpc``: ``ModelInfer`` through tritonclient.grpc.aio, ``raw_input_contents`` and
  ``raw_output_contents``; one channel for all clients (HTTP/2 multiplexes the calls).

At c=1 one client sends the transports' requests in turn, request by request; at c=16, a
closed loop (16 clients, each sending the next request when the last is answered) per
transport, the transports in a rotated order. Either way a slow moment of the machine hits
every transport alike; the rounds are repeated and the medians reported. The engine's own
time for the same work is measured in the same run, twice: in the server (``forward_ms +
cam_ms`` of /explain's timings at c=1, the same process and threads as every transport) and
alone in this process (GradCAM at batch 1 on the model's input size, extractor setup + forward
+ map, while the server is idle, before and after the load). The overhead of a transport is its
median latency at c=1 less the engine's median in the server, and at c=16 its time per answer
(1 / throughput) less that (which batching can beat: then it is negative). On a busy machine
the engine alone in this process is the less reliable of the two (its torch threads compete
with the server's and everyone else's).

Markdown tables to stdout, everything to ``bench/results/protocols.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import serving  # noqa: E402  (bench/, this script's own folder)
from service_load import engine_gradcam  # noqa: E402
from serving import (  # noqa: E402
    free_port,
    machine_info,
    markdown_table,
    photo_jpeg,
    raise_on_sigterm,
    running_server,
    timed_step,
    warn_if_busy,
)

from app.models.manifest import parse_manifest  # noqa: E402

MODELS = ("resnet50", "shapes")
TRANSPORTS = ("multipart", "oip-json", "oip-binary", "grpc")
METHOD = "GradCAM"
TIMEOUT_S = 300.0
HEADER = "Inference-Header-Content-Length"


@dataclass(frozen=True)
class Config:
    models: tuple[str, ...]
    concurrency: tuple[int, ...]
    repeats: int
    requests_per_client: dict[int, int]
    engine_repeats: int
    out: Path
    quick: bool


Send = Callable[[], Awaitable[int]]


# --------------------------------------------------------------------------- the four requests


def _binary_body(image: bytes) -> tuple[bytes, int]:
    element = struct.pack("<I", len(image)) + image
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "shape": [1],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(element)},
                }
            ],
            "outputs": [
                {"name": "logits", "parameters": {"binary_data": True}},
                {"name": "cam", "parameters": {"binary_data": True}},
            ],
            "parameters": {"method": METHOD},
        }
    ).encode()
    return header + element, len(header)


def _json_body(image: bytes) -> bytes:
    return json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "shape": [1],
                    "datatype": "BYTES",
                    "data": [base64.b64encode(image).decode()],
                }
            ],
            "outputs": [{"name": "logits"}, {"name": "cam"}],
            "parameters": {"method": METHOD},
        }
    ).encode()


class Transports:
    """One sender per transport for one model, sharing one HTTP client and one gRPC client."""

    def __init__(self, url: str, target: str, image: bytes, concurrency: int) -> None:
        import tritonclient.grpc.aio as grpcclient

        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        self.http = httpx.AsyncClient(limits=limits, timeout=TIMEOUT_S)
        self.grpc = grpcclient.InferenceServerClient(target)
        self.grpcclient = grpcclient
        self.url = url
        self.image = image
        self.server_engine_ms: list[float] = []
        """forward_ms + cam_ms of each multipart answer: the engine's time in the server."""
        self.json_body = _json_body(image)
        self.binary_body, self.binary_header = _binary_body(image)
        self.sizes = {
            "multipart": len(image),
            "oip-json": len(self.json_body),
            "oip-binary": len(self.binary_body),
            "grpc": len(image) + 4,
        }

    async def close(self) -> None:
        await self.http.aclose()
        await self.grpc.close()

    def sender(self, transport: str, model: str) -> Send:
        if transport == "multipart":

            async def multipart() -> int:
                answer = await self.http.post(
                    f"{self.url}/explain",
                    files={"file": ("image.jpg", self.image, "image/jpeg")},
                    data={"model": model, "method": METHOD, "output": "raw"},
                )
                if answer.status_code == 200:
                    timings = answer.json()["timings"]
                    self.server_engine_ms.append(timings["forward_ms"] + timings["cam_ms"])
                return answer.status_code

            return multipart
        if transport == "oip-json":

            async def oip_json() -> int:
                answer = await self.http.post(
                    f"{self.url}/v2/models/{model}/infer",
                    content=self.json_body,
                    headers={"Content-Type": "application/json"},
                )
                if answer.status_code == 200:
                    json.loads(answer.content)  # what a client must do to read it
                return answer.status_code

            return oip_json
        if transport == "oip-binary":

            async def oip_binary() -> int:
                answer = await self.http.post(
                    f"{self.url}/v2/models/{model}/infer",
                    content=self.binary_body,
                    headers={
                        "Content-Type": "application/octet-stream",
                        HEADER: str(self.binary_header),
                    },
                )
                if answer.status_code == 200:
                    length = int(answer.headers.get(HEADER, len(answer.content)))
                    json.loads(answer.content[:length])
                return answer.status_code

            return oip_binary

        grpcclient = self.grpcclient
        tensor = grpcclient.InferInput("image", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([self.image], dtype=np.object_))
        outputs = [
            grpcclient.InferRequestedOutput("logits"),
            grpcclient.InferRequestedOutput("cam"),
        ]

        async def grpc_call() -> int:
            try:
                result = await self.grpc.infer(
                    model, [tensor], outputs=outputs, parameters={"method": METHOD}
                )
            except Exception:  # tritonclient's InferenceServerException and transport errors
                return 500
            result.as_numpy("cam")
            return 200

        return grpc_call


# --------------------------------------------------------------------------- load


async def closed_loop(send: Send, concurrency: int, total: int) -> dict[str, Any]:
    """``concurrency`` clients, ``total`` requests in all; latency of each, errors, elapsed."""
    tickets = iter(range(total))
    latencies: list[float] = []
    errors = 0

    async def client() -> None:
        nonlocal errors
        while next(tickets, None) is not None:
            started = time.perf_counter()
            status = await send()
            if status == 200:
                latencies.append((time.perf_counter() - started) * 1000)
            else:
                errors += 1

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    return {"latencies_ms": latencies, "errors": errors, "elapsed_s": elapsed}


async def interleaved(senders: dict[str, Send], order: Sequence[str], total: int) -> dict[str, Any]:
    """One client: ``total`` requests per transport, the transports taking turns request by
    request (a slow moment of the machine hits them all alike); a transport's elapsed time is
    the sum of its own requests'."""
    runs: dict[str, dict[str, Any]] = {
        t: {"latencies_ms": [], "errors": 0, "elapsed_s": 0.0} for t in order
    }
    for _ in range(total):
        for transport in order:
            started = time.perf_counter()
            status = await senders[transport]()
            elapsed = time.perf_counter() - started
            runs[transport]["elapsed_s"] += elapsed
            if status == 200:
                runs[transport]["latencies_ms"].append(elapsed * 1000)
            else:
                runs[transport]["errors"] += 1
    return runs


async def run_load(url: str, target: str, image: bytes, config: Config) -> list[dict[str, Any]]:
    rows = []
    for model in config.models:
        for concurrency in config.concurrency:
            transports = Transports(url, target, image, concurrency)
            try:
                senders = {t: transports.sender(t, model) for t in TRANSPORTS}
                for send in senders.values():  # warm-up: connections, the model's first passes
                    await closed_loop(send, concurrency, concurrency)
                runs: dict[str, list[dict[str, Any]]] = {t: [] for t in TRANSPORTS}
                total = concurrency * config.requests_per_client[concurrency]
                for repeat in range(config.repeats):
                    order = TRANSPORTS[repeat % 4 :] + TRANSPORTS[: repeat % 4]
                    if concurrency == 1:
                        done = await interleaved(senders, order, total)
                        for transport in order:
                            runs[transport].append(done[transport])
                        continue
                    for transport in order:
                        runs[transport].append(
                            await closed_loop(senders[transport], concurrency, total)
                        )
                server_engine = (
                    round(statistics.median(transports.server_engine_ms), 2)
                    if concurrency == 1 and transports.server_engine_ms
                    else None
                )
                for transport in TRANSPORTS:
                    row = summarize(model, concurrency, transport, runs[transport])
                    row["request_bytes"] = transports.sizes[transport]
                    row["server_engine_ms"] = server_engine
                    rows.append(row)
                    print(_progress(row), flush=True)
            finally:
                await transports.close()
    return rows


def summarize(
    model: str, concurrency: int, transport: str, runs: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    rates = [len(r["latencies_ms"]) / r["elapsed_s"] for r in runs]
    latencies = [statistics.median(r["latencies_ms"]) for r in runs if r["latencies_ms"]]
    return {
        "model": model,
        "concurrency": concurrency,
        "transport": transport,
        "repeats": len(runs),
        "requests": sum(len(r["latencies_ms"]) + r["errors"] for r in runs),
        "errors": sum(r["errors"] for r in runs),
        "throughput_rps": round(statistics.median(rates), 2),
        "throughput_rps_runs": [round(rate, 2) for rate in rates],
        "p50_ms": round(statistics.median(latencies), 1) if latencies else None,
    }


def _progress(row: dict[str, Any]) -> str:
    return (
        f"  {row['model']:>8} c={row['concurrency']:<2} {row['transport']:<10} "
        f"{row['throughput_rps']:>7.2f} req/s  p50 {row['p50_ms']} ms  errors {row['errors']}"
    )


# --------------------------------------------------------------------------- engine alone


def engine_times(store: Path, models: Sequence[str], repeats: int) -> dict[str, float]:
    """Median ms of GradCAM at batch 1 in this process, per model (two warm-up calls first)."""
    medians = {}
    for name in models:
        once = engine_gradcam(parse_manifest(store / name), torch.device("cpu"))
        once(), once()
        medians[name] = round(statistics.median(once() for _ in range(repeats)), 2)
        del once
    return medians


def add_overheads(rows: list[dict[str, Any]], engine_ms: dict[str, float]) -> None:
    """The overhead over the engine's time in the server (forward + map, from /explain's
    timings at c=1) where there is one, else over the engine alone in this process."""
    in_server = {
        row["model"]: row["server_engine_ms"] for row in rows if row.get("server_engine_ms")
    }
    for row in rows:
        row["engine_alone_ms"] = engine_ms[row["model"]]
        engine = in_server.get(row["model"], engine_ms[row["model"]])
        row["engine_ms"] = engine
        if row["concurrency"] == 1:
            row["overhead_ms"] = None if row["p50_ms"] is None else round(row["p50_ms"] - engine, 1)
        else:
            per_answer = 1000 / row["throughput_rps"] if row["throughput_rps"] else None
            row["overhead_ms"] = None if per_answer is None else round(per_answer - engine, 1)


def verdicts(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's goals: binary HTTP and gRPC no slower than multipart at c=1 (latency) and at
    least as fast at c=16 (throughput); and what base64 JSON costs over binary."""
    index = {(r["model"], r["concurrency"], r["transport"]): r for r in rows}
    out = []
    for (model, concurrency, transport), row in index.items():
        if transport == "multipart":
            continue
        base = index[(model, concurrency, "multipart")]
        binary = index[(model, concurrency, "oip-binary")]
        out.append(
            {
                "model": model,
                "concurrency": concurrency,
                "transport": transport,
                "rps_vs_multipart": round(row["throughput_rps"] / base["throughput_rps"], 3),
                "p50_vs_multipart": (
                    round(row["p50_ms"] / base["p50_ms"], 3)
                    if row["p50_ms"] and base["p50_ms"]
                    else None
                ),
                "p50_minus_binary_ms": (
                    round(row["p50_ms"] - binary["p50_ms"], 1)
                    if row["p50_ms"] is not None and binary["p50_ms"] is not None
                    else None
                ),
            }
        )
    return out


def render(report: dict[str, Any]) -> str:
    keys = ("model", "concurrency", "transport", "throughput_rps", "p50_ms", "engine_ms")
    headers = ("model", "c", "transport", "req/s", "p50 ms", "engine ms", "overhead ms", "bytes")
    # engine ms: in the server (forward + map, from /explain's timings at c=1)
    rows = [
        [*(row[k] for k in keys), row["overhead_ms"], row["request_bytes"]]
        for row in report["rows"]
    ]
    ratio_keys = ("model", "concurrency", "transport", "rps_vs_multipart", "p50_vs_multipart")
    ratios = [[v[k] for k in ratio_keys] for v in report["verdicts"]]
    return (
        markdown_table(headers, rows)
        + "\n\n"
        + markdown_table(
            ("model", "c", "transport", "req/s / multipart", "p50 / multipart"), ratios
        )
    )


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests (about 2 minutes)")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "protocols.json")
    args = parser.parse_args(argv)
    if args.quick:
        return Config(tuple(args.models.split(",")), (1, 16), 3, {1: 4, 16: 1}, 10, args.out, True)
    return Config(tuple(args.models.split(",")), (1, 16), 5, {1: 16, 16: 4}, 30, args.out, False)


def run(config: Config) -> dict[str, Any]:
    warn_if_busy()
    image = photo_jpeg(640, 480, seed=0)
    with tempfile.TemporaryDirectory(prefix="camserve-protocols-") as tmp:
        root = Path(tmp)
        architectures = [m for m in config.models if m != "shapes"]
        store = timed_step("model store", lambda: serving.build_store(root, architectures))
        grpc_port = free_port()
        overrides = {"CAMSERVE_GRPC_PORT": str(grpc_port), "CAMSERVE_MAX_IMAGES": "16"}
        with running_server(store, "cpu", overrides, root / "server.log", config.models) as url:
            target = f"127.0.0.1:{grpc_port}"
            engine_before = timed_step(
                "engine alone", lambda: engine_times(store, config.models, config.engine_repeats)
            )
            rows = timed_step("load", lambda: asyncio.run(run_load(url, target, image, config)))
            engine_after = timed_step(
                "engine alone again",
                lambda: engine_times(store, config.models, config.engine_repeats),
            )
    engine_ms = {
        name: round(statistics.median([engine_before[name], engine_after[name]]), 2)
        for name in config.models
    }
    add_overheads(rows, engine_ms)
    return {
        "machine": machine_info(torch.device("cpu")),
        "config": {
            "models": list(config.models),
            "concurrency": list(config.concurrency),
            "repeats": config.repeats,
            "requests_per_client": config.requests_per_client,
            "method": METHOD,
            "image": "640x480 JPEG (bench/serving.py photo_jpeg, seed 0)",
            "quick": config.quick,
        },
        "engine_ms": {"before": engine_before, "after": engine_after, "median": engine_ms},
        "rows": rows,
        "verdicts": verdicts(rows),
    }


def main(argv: Sequence[str] | None = None) -> None:
    raise_on_sigterm()
    config = parse_args(argv)
    report = run(config)
    print(render(report))
    config.out.parent.mkdir(parents=True, exist_ok=True)
    config.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {config.out}")


if __name__ == "__main__":
    main()
