"""Good clients beside hostile ones: Grad-CAM latency alone, then beside a mix of attackers.

    python bench/hostile_mix.py --quick        # about 2 minutes on 2 CPU cores
    python bench/hostile_mix.py                # longer phases, the full 200 event streams

One ``python -m app`` on 127.0.0.1 and a free port, with the shipped store (``shapes``) and the
service's default settings (``--env NAME=VALUE`` changes one). The good clients send Grad-CAM on
``examples/star.png`` with the default fields, closed loop at ``--concurrency`` (2), in two
phases side by side in this one run:

0. **warm-up**: 4 good requests and one heavy drawing (the first heavy drawing spawns the
   service's drawing process, ``CAMSERVE_RENDER_PROCESSES``: once per replica, in no phase).
1. **alone**: ``--requests`` requests; p50 and p95 of the wall time, and the server's RSS after.
2. **beside the mix**: the same requests, while these attackers run (and for at most
   ``--mix-seconds``):
   - *render*: the largest drawings the render budget allows, two at a time: one 4096-px PNG
     overlay (one map), or 16 maps of 1024 px (15 layers and their fusion);
   - *jobs*: Score-CAM jobs submitted until the service refuses more, topped up as they end;
   - *streams*: ``--streams`` event streams (``GET /jobs/{id}/events``) held open on those jobs;
     a refused one waits out its ``Retry-After`` (with ``--impatient-streams`` it does not, and
     the refused streams become a flood of requests);
   - *headers*: requests of ``--headers`` tiny headers each, two at a time;
   - *flood* (not in the default mix; ``--attackers flood``): ``--flood`` interactive Score-CAM
     ``/explain`` requests kept in flight (default 34: every place of the default
     ``CAMSERVE_MAX_MODEL_SLOTS + CAMSERVE_QUEUE_SIZE``), each sent again at once when answered
     or refused, ``Retry-After`` ignored;
   - *huge* (not in the default mix; ``--attackers huge``): ``--huge`` requests in flight, each
     a 6000 x 6000 PNG of one colour (a 100 kB upload that decodes to 288 MB: three of them hold
     the whole default ``CAMSERVE_DECODE_BUDGET_BYTES``), sent again at once when answered.
   The good clients and the attackers are different clients to the service: the server trusts
   127.0.0.1 to name them (``CAMSERVE_FORWARDED_ALLOW_IPS``), the good clients send
   ``X-Forwarded-For: 198.51.100.7`` and the attackers ``203.0.113.66``, as two hosts behind a
   gateway would be seen.
   The attackers run in a spawned process with their own event loop (``AttackProcess``), so
   that their client work (200 streams' connection pool) does not delay the good clients' loop.
   Attackers may be refused (413, 422, 429, 431, 503, a closed connection): that is the service
   defending itself, counted per attacker and status, not as a good client's error.
3. **after**: the attackers are stopped (their jobs deleted, their streams closed); the server's
   RSS is read until it stops falling (at most ``--settle-seconds``).

Goals, checked in this run: good p95 beside the mix <= 3x alone; no good request answered other
than 200; RSS after within 10 % of RSS after the alone phase. A table goes to stdout and
everything to ``bench/results/hostile_mix.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import multiprocessing
import queue
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch
from PIL import Image
from serving import (
    REPO,
    machine_info,
    percentile,
    raise_on_sigterm,
    rounded,
    running_process,
)

STAR = REPO / "examples" / "star.png"
P95_FACTOR = 3.0
RSS_TOLERANCE = 0.10
#: 15 of shapes' layers with maps of at least 2x2: with their fusion, 16 maps of 1024 px.
MANY_LAYERS = (
    "stem,layer1,layer1.0,layer1.0.conv1,layer1.0.conv2,layer2,layer2.0,layer2.0.conv1,"
    "layer2.0.conv2,layer2.0.downsample,layer3,layer3.0,layer3.0.conv1,layer3.0.conv2,"
    "layer3.0.downsample"
)
RENDERS = (
    {"size": "4096", "output": "overlay", "image_format": "png"},
    {"size": "1024", "output": "overlay", "target_layer": MANY_LAYERS},
)
JOB_FIELDS = {"method": "ScoreCAM", "output": "raw"}
FLOOD_FIELDS = {"method": "ScoreCAM", "output": "raw"}
#: Who the good clients and the attackers are (documentation addresses, RFC 5737), named to the
#: service in X-Forwarded-For by the trusted loopback.
GOOD_CLIENT = {"X-Forwarded-For": "198.51.100.7"}
ATTACKER = {"X-Forwarded-For": "203.0.113.66"}


@dataclass(frozen=True)
class MixConfig:
    requests: int
    concurrency: int
    mix_seconds: float
    settle_seconds: float
    streams: int
    headers: int
    attackers: tuple[str, ...]
    env: dict[str, str]
    impatient_streams: bool = False
    flood: int = 34
    huge: int = 10


@dataclass
class Tally:
    """What the attackers got, per attacker and status (0: the connection failed or closed)."""

    counts: dict[str, Counter[int]] = field(default_factory=dict)

    def add(self, attacker: str, status: int) -> None:
        self.counts.setdefault(attacker, Counter())[status] += 1

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {k: {str(s): n for s, n in sorted(v.items())} for k, v in self.counts.items()}


# --------------------------------------------------------------------------- measurements


def note(text: str) -> None:
    """Progress, on stderr."""
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def rss_bytes(pid: int) -> int:
    """Resident memory of process ``pid`` (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


#: The stages of an answer's ``timings`` that the bench reports, and ``outside``: the wall time
#: the server's ``total_ms`` does not count (the HTTP layers, the event loop, the client).
STAGES = ("decode_ms", "queue_ms", "forward_ms", "cam_ms", "encode_ms", "total_ms")


async def good_clients(url: str, image: bytes, requests: int, concurrency: int, seconds: float):  # type: ignore[no-untyped-def]
    """Closed-loop Grad-CAM with default fields; returns (milliseconds of the 200s, statuses,
    the stages' milliseconds of the 200s)."""
    tickets = iter(range(requests))
    wall_ms: list[float] = []
    stages: dict[str, list[float]] = {name: [] for name in (*STAGES, "outside_ms")}
    statuses: Counter[int] = Counter()
    failures: Counter[str] = Counter()
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def loop(client: httpx.AsyncClient) -> None:
        while next(tickets, None) is not None and time.monotonic() < deadline:
            started = time.perf_counter()
            try:
                answer = await client.post(
                    f"{url}/explain", files={"file": ("star.png", image, "image/png")}
                )
                status = answer.status_code
            except httpx.HTTPError as error:
                status = 0
                failures[f"{type(error).__name__}: {error}"[:200]] += 1
            statuses[status] += 1
            if status == 200:
                wall_ms.append((time.perf_counter() - started) * 1000)
                timings = answer.json()["timings"]  # parsed after the clock stopped
                for name in STAGES:
                    stages[name].append(float(timings[name]))
                stages["outside_ms"].append(wall_ms[-1] - float(timings["total_ms"]))

    async with httpx.AsyncClient(limits=limits, timeout=120, headers=GOOD_CLIENT) as client:
        await asyncio.gather(*(loop(client) for _ in range(concurrency)))
    if failures:
        note(f"good requests that failed: {dict(failures)}")
    return wall_ms, statuses, stages


def stage_table(stages: dict[str, list[float]]) -> dict[str, dict[str, float | None]]:
    """p50 and p95 of each stage: which part of a good request grew beside the mix."""
    return {
        name: {"p50": rounded(percentile(v, 50)), "p95": rounded(percentile(v, 95))}
        for name, v in stages.items()
    }


# --------------------------------------------------------------------------- attackers


async def render_attacker(url: str, image: bytes, tally: Tally, turn: int) -> None:
    async with httpx.AsyncClient(timeout=180, headers=ATTACKER) as client:
        for number in range(turn, 10**9):
            fields = RENDERS[number % len(RENDERS)]
            try:
                answer = await client.post(
                    f"{url}/explain", files={"file": ("star.png", image, "image/png")}, data=fields
                )
                tally.add("render", answer.status_code)
            except httpx.HTTPError:
                tally.add("render", 0)
                await asyncio.sleep(0.5)


async def job_attacker(url: str, image: bytes, tally: Tally, jobs: list[str]) -> None:
    """Keep the job queue full: submit until refused, then retry once a second."""
    async with httpx.AsyncClient(timeout=60, headers=ATTACKER) as client:
        while True:
            try:
                answer = await client.post(
                    f"{url}/jobs", files={"file": ("star.png", image, "image/png")}, data=JOB_FIELDS
                )
                tally.add("jobs", answer.status_code)
                if answer.status_code == 202:
                    jobs.append(answer.json()["id"])
                    continue
            except httpx.HTTPError:
                tally.add("jobs", 0)
            await asyncio.sleep(1.0)


async def stream_attacker(
    url: str, client: httpx.AsyncClient, tally: Tally, jobs: list[str], patient: bool
) -> None:
    """One event stream held open, on the newest job; reopened when it ends. A refused one
    (429) waits out its ``Retry-After`` when ``patient``; otherwise it tries again at once, and
    200 of them become a flood of requests (``--impatient-streams``)."""
    while True:
        if not jobs:
            await asyncio.sleep(0.2)
            continue
        pause = 0.2
        try:
            async with client.stream("GET", f"{url}/jobs/{jobs[-1]}/events") as answer:
                tally.add("streams", answer.status_code)
                if answer.status_code == 429 and patient:
                    pause = float(answer.headers.get("retry-after", "1"))
                async for _ in answer.aiter_raw():
                    pass
        except httpx.HTTPError:
            tally.add("streams", 0)
        await asyncio.sleep(pause)


async def flood_attacker(
    url: str,
    client: httpx.AsyncClient,
    image: bytes,
    tally: Tally,
    kind: str = "flood",
    fields: dict[str, str] = FLOOD_FIELDS,
) -> None:
    """One interactive request in flight at all times (Score-CAM by default): sent again at
    once when answered or refused (``Retry-After`` ignored; a short pause after a failed
    connection)."""
    while True:
        try:
            answer = await client.post(
                f"{url}/explain", files={"file": ("x.png", image, "image/png")}, data=fields
            )
            tally.add(kind, answer.status_code)
        except httpx.HTTPError:
            tally.add(kind, 0)
            await asyncio.sleep(0.5)


def huge_png() -> bytes:
    """6000 x 6000 pixels of one colour: about 100 kB that decode to 288 MB."""
    buffer = io.BytesIO()
    Image.new("RGB", (6000, 6000), (90, 140, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


async def header_attacker(url: str, headers: int, tally: Tally) -> None:
    """GET /health with ``headers`` tiny headers, over a raw connection (no client caps)."""
    host, port = url.removeprefix("http://").split(":")
    flood = "".join(f"X-F{i}: v\r\n" for i in range(headers)).encode()
    request = b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n" + flood + b"\r\n"
    while True:
        status = 0
        try:
            reader, writer = await asyncio.open_connection(host, int(port))
            try:
                writer.write(request)
                await writer.drain()
                line = await asyncio.wait_for(reader.readline(), 60)
                parts = line.split()
                status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
        except (OSError, asyncio.TimeoutError):
            status = 0
        tally.add("headers", status)
        await asyncio.sleep(0.05)


#: Longest wait for the cancelled attackers: one that does not end by then is left behind (and
#: counted) so that the run still ends and reports.
STOP_WAIT_S = 30.0


async def stop(tasks: list[asyncio.Task[None]]) -> int:
    """Cancels ``tasks``; how many had not ended ``STOP_WAIT_S`` later."""
    for task in tasks:
        task.cancel()
    _, pending = await asyncio.wait(tasks, timeout=STOP_WAIT_S)
    return len(pending)


async def delete_jobs(url: str, jobs: list[str]) -> None:
    async with httpx.AsyncClient(timeout=30, headers=ATTACKER) as client:
        for job in jobs:
            with contextlib.suppress(httpx.HTTPError):
                await client.delete(f"{url}/jobs/{job}")


async def sample_peak(pid: int, peak: list[int]) -> None:
    while True:
        peak[0] = max(peak[0], rss_bytes(pid))
        await asyncio.sleep(0.25)


# --------------------------------------------------------------------------- the attack process


async def attack(url: str, config: MixConfig, started: Any, stopping: Any) -> dict[str, Any]:
    """Every attacker of ``config``, until ``stopping`` is set; then their jobs are deleted and
    their streams closed. Returns the tally, the jobs made and the attackers left behind."""
    image = STAR.read_bytes()
    huge = huge_png() if "huge" in config.attackers else b""
    tally, jobs = Tally(), []
    stream_client = httpx.AsyncClient(
        timeout=httpx.Timeout(30, read=None),
        limits=httpx.Limits(max_connections=config.streams + 8),
        headers=ATTACKER,
    )
    flood_client = httpx.AsyncClient(
        timeout=300,
        limits=httpx.Limits(max_connections=config.flood + config.huge + 8),
        headers=ATTACKER,
    )
    kinds: dict[str, list[Callable[[], Awaitable[None]]]] = {
        "render": [
            lambda: render_attacker(url, image, tally, 0),
            lambda: render_attacker(url, image, tally, 1),
        ],
        "jobs": [lambda: job_attacker(url, image, tally, jobs)],
        "streams": [
            lambda: stream_attacker(url, stream_client, tally, jobs, not config.impatient_streams)
        ]
        * config.streams,
        "headers": [lambda: header_attacker(url, config.headers, tally)] * 2,
        "flood": [lambda: flood_attacker(url, flood_client, image, tally)] * config.flood,
        "huge": [lambda: flood_attacker(url, flood_client, huge, tally, "huge", {"output": "raw"})]
        * config.huge,
    }
    if "streams" in config.attackers and "jobs" not in config.attackers:
        kinds["streams"].append(lambda: job_attacker(url, image, tally, jobs))  # their jobs
    attackers = [attack for kind in config.attackers for attack in kinds[kind]]
    tasks = [asyncio.create_task(attack()) for attack in attackers]
    started.put(len(attackers))
    cpu_start = time.process_time()
    try:
        while not stopping.is_set():
            await asyncio.sleep(0.1)
    finally:
        cpu_s = time.process_time() - cpu_start
        left = await stop(tasks)
        for client in (stream_client, flood_client):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.aclose(), STOP_WAIT_S)
        await delete_jobs(url, jobs)
    return {"left": left, "tally": tally.as_dict(), "jobs": len(jobs), "cpu_s": cpu_s}


def attack_main(url: str, config: MixConfig, started: Any, stopping: Any, done: Any) -> None:
    done.put(asyncio.run(attack(url, config, started, stopping)))


class AttackProcess:
    """The attackers in a process of their own, with their own event loop: 200 event streams
    and their connection pool keep a loop busy, and the good clients' times must not wait on
    the attackers' client code (they share the machine's cores, as attackers on one host do)."""

    def __init__(self, url: str, config: MixConfig) -> None:
        context = multiprocessing.get_context("spawn")
        self.started, self.done = context.Queue(), context.Queue()
        self.stopping = context.Event()
        self.process = context.Process(
            target=attack_main,
            args=(url, config, self.started, self.stopping, self.done),
            daemon=True,
        )

    async def start(self) -> int:
        """Starts the process; the number of attackers once they all run."""
        self.process.start()
        return int(await asyncio.to_thread(self.started.get, True, 120))

    async def stop(self) -> tuple[int, dict[str, Any], int, float]:
        """(attackers left behind, the tally, jobs made, the CPU seconds the attackers' own
        client work took while they ran), once the process cleaned up."""
        self.stopping.set()
        try:
            result = await asyncio.to_thread(self.done.get, True, STOP_WAIT_S + 60)
        except queue.Empty:
            result = {"left": -1, "tally": {}, "jobs": 0, "cpu_s": float("nan")}
        await asyncio.to_thread(self.process.join, 10)
        if self.process.is_alive():
            self.process.kill()
        return result["left"], result["tally"], result["jobs"], result["cpu_s"]


# --------------------------------------------------------------------------- the run


#: The service gives freed heap pages back every 10 s (``app.models.memory``): wait for one.
TRIM_WAIT_S = 12.0


async def settle(pid: int, seconds: float) -> int:
    """RSS once the service's heap trim has run and RSS stops falling (two readings 2 s apart
    within 1 %), or after ``seconds``."""
    deadline = time.monotonic() + max(seconds, TRIM_WAIT_S)
    await asyncio.sleep(TRIM_WAIT_S)
    last = rss_bytes(pid)
    while time.monotonic() < deadline:
        await asyncio.sleep(2.0)
        now = rss_bytes(pid)
        if now >= last * 0.99:
            return now
        last = now
    return rss_bytes(pid)


async def measure(url: str, pid: int, config: MixConfig) -> dict[str, Any]:
    image = STAR.read_bytes()
    limit_s = config.mix_seconds
    await good_clients(url, image, 4, 1, 60)  # warm-up
    # One heavy drawing too: the service spawns its drawing process for the first one (a few
    # seconds of imports, once per replica), which belongs to no phase.
    async with httpx.AsyncClient(timeout=180) as client:
        await client.post(
            f"{url}/explain", files={"file": ("star.png", image, "image/png")}, data=RENDERS[0]
        )
    note("alone")
    alone_ms, alone_status, alone_stages = await good_clients(
        url, image, config.requests, config.concurrency, limit_s
    )
    rss_alone = rss_bytes(pid)

    peak = [rss_alone]
    attack = AttackProcess(url, config)
    sampling = asyncio.create_task(sample_peak(pid, peak))
    started = time.monotonic()
    try:
        note(f"mix: {await attack.start()} attackers")
        await asyncio.sleep(3.0)  # the attackers in full swing first
        mix_ms, mix_status, mix_stages = await good_clients(
            url, image, config.requests, config.concurrency, limit_s
        )
    finally:
        mix_s = time.monotonic() - started
        note("stopping the attackers")
        left, tally, jobs, attack_cpu_s = await attack.stop()
        if left:
            note(f"{left} attackers did not stop within {STOP_WAIT_S:.0f} s; left behind")
        sampling.cancel()
    note("settling")
    rss_after = await settle(pid, config.settle_seconds)

    alone_p95, mix_p95 = percentile(alone_ms, 95), percentile(mix_ms, 95)
    good_errors = sum(n for s, n in (alone_status + mix_status).items() if s != 200)
    ratio = mix_p95 / alone_p95 if alone_p95 and mix_p95 else None
    rss_ratio = rss_after / rss_alone
    return {
        "alone": {
            "requests": len(alone_ms),
            "p50_ms": rounded(percentile(alone_ms, 50)),
            "p95_ms": rounded(alone_p95),
            "statuses": dict(alone_status),
            "stages_ms": stage_table(alone_stages),
        },
        "mix": {
            "requests": len(mix_ms),
            "p50_ms": rounded(percentile(mix_ms, 50)),
            "p95_ms": rounded(mix_p95),
            "statuses": dict(mix_status),
            "stages_ms": stage_table(mix_stages),
            "seconds": rounded(mix_s),
            "jobs_created": jobs,
            "attackers": tally,
            # The attackers' client work shares the machine's cores with the server.
            "attackers_cpu_s": rounded(attack_cpu_s),
        },
        "p95_ratio": rounded(ratio, 2),
        "good_errors": good_errors,
        "rss_mb": {
            "after_alone": rounded(rss_alone / 2**20),
            "peak_in_mix": rounded(peak[0] / 2**20),
            "after_mix": rounded(rss_after / 2**20),
            "ratio_after": rounded(rss_ratio, 3),
        },
        "goals": {
            "p95_within_3x": ratio is not None and ratio <= P95_FACTOR,
            "no_good_errors": good_errors == 0 and len(mix_ms) == config.requests,
            "rss_back_within_10pct": rss_ratio <= 1 + RSS_TOLERANCE,
        },
    }


def parse_args(argv: list[str] | None = None) -> tuple[MixConfig, Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="about 2 minutes")
    parser.add_argument("--requests", type=int, help="good requests per phase (40; quick 30)")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--mix-seconds", type=float, help="most seconds of a phase (300; quick 60)")
    parser.add_argument("--settle-seconds", type=float, default=30.0)
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--headers", type=int, help="headers a flood request (100000; quick 20000)")
    parser.add_argument(
        "--attackers",
        default="render,jobs,streams,headers",
        help="which attackers run beside the good clients (comma-separated; default all)",
    )
    parser.add_argument(
        "--impatient-streams",
        action="store_true",
        help="refused event streams retry after 0.2 s, ignoring Retry-After (a request flood)",
    )
    parser.add_argument(
        "--flood",
        type=int,
        default=34,
        help="requests the flood attacker keeps in flight (34: every place by default)",
    )
    parser.add_argument(
        "--huge", type=int, default=10, help="huge-PNG requests the huge attacker keeps in flight"
    )
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for the server")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "hostile_mix.json")
    parser.add_argument("--server-log", type=Path, help="keep the server's log here")
    args = parser.parse_args(argv)
    # Without the explanation cache: the good clients and the attackers repeat their requests,
    # and hits would measure the cache (a real attacker varies its images), not the defences.
    env = {"CAMSERVE_CACHE_MB": "0", **dict(item.split("=", 1) for item in args.env)}
    config = MixConfig(
        requests=args.requests or (30 if args.quick else 40),
        concurrency=args.concurrency,
        mix_seconds=args.mix_seconds or (60.0 if args.quick else 300.0),
        settle_seconds=args.settle_seconds,
        streams=args.streams,
        headers=args.headers or (20_000 if args.quick else 100_000),
        attackers=tuple(a.strip() for a in args.attackers.split(",") if a.strip()),
        impatient_streams=args.impatient_streams,
        flood=args.flood,
        huge=args.huge,
        env=env,
    )
    return config, args.out, args.server_log


def main(argv: list[str] | None = None) -> int:
    config, out, server_log = parse_args(argv)
    raise_on_sigterm()  # a `timeout` or a Ctrl-C stops the server too
    overrides = {
        "CAMSERVE_QUEUE_SIZE": "32",
        "CAMSERVE_DEFAULT_MODEL": "shapes",
        "CAMSERVE_FORWARDED_ALLOW_IPS": "127.0.0.1",  # the clients name themselves (see above)
        **config.env,
    }
    with tempfile.TemporaryDirectory() as tmp:
        log = server_log or Path(tmp) / "server.log"
        with running_process(REPO / "model_store", "cpu", overrides, log, ["shapes"]) as (
            url,
            process,
        ):
            # Bounded whatever the server does: both phases, the stop and the settling.
            limit_s = 3 * config.mix_seconds + config.settle_seconds + 120
            try:
                result = asyncio.run(asyncio.wait_for(measure(url, process.pid, config), limit_s))
            except Exception:
                if process.poll() is not None:
                    note(f"the server ended with exit code {process.returncode}")
                raise
    result["config"] = {**config.__dict__}
    result["machine"] = machine_info(torch.device("cpu"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    alone, mix, rss = result["alone"], result["mix"], result["rss_mb"]
    print("| phase | requests | p50 ms | p95 ms | statuses |")
    print("|---|---|---|---|---|")
    for name, phase in (("alone", alone), ("beside the mix", mix)):
        print(
            f"| {name} | {phase['requests']} | {phase['p50_ms']} | {phase['p95_ms']} | "
            f"{phase['statuses']} |"
        )
    print(
        f"\np95 ratio {result['p95_ratio']} (goal <= {P95_FACTOR}); good errors "
        f"{result['good_errors']}; RSS MB after alone {rss['after_alone']}, peak "
        f"{rss['peak_in_mix']}, after {rss['after_mix']} (ratio {rss['ratio_after']})"
    )
    print(
        f"attackers: {json.dumps(mix['attackers'])}; jobs created {mix['jobs_created']}; "
        f"the attackers' own client work took {mix['attackers_cpu_s']} CPU s in "
        f"{mix['seconds']} s of mix"
    )
    print("\n| stage (ms) | p50 alone | p50 mix | p95 alone | p95 mix |")
    print("|---|---|---|---|---|")
    for name, a in alone["stages_ms"].items():
        m = mix["stages_ms"][name]
        print(f"| {name} | {a['p50']} | {m['p50']} | {a['p95']} | {m['p95']} |")
    print(f"goals: {json.dumps(result['goals'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
