"""The ``mixed`` scenario of ``bench/service_load.py``: short requests beside a long job.

    python bench/service_load.py --scenario mixed --quick          # CPU, resnet18 and resnet50
    python bench/service_load.py --scenario mixed --device cuda --models resnet50

One server (default settings, batching on) on a temporary store (``shapes`` plus random-weight
resnet18/resnet50, as the load scenario builds it) and one 640x480 JPEG. For each model M:

1. GradCAM on M alone, closed loop at concurrency 1: p50/p95 (the idle reference).
2. A Score-CAM job (``POST /jobs``, ``batch_size`` 32, M's ``layer4``) alone: its duration, and
   one chunk's time (32 masked forwards), from the times at which its progress rose.
3. The same job again, with GradCAM on M at concurrency 1, then at concurrency 4, for as long as
   the job runs: GradCAM p50/p95 and the job's duration beside that load.
4. The same job on M's twin (another model folder with the same weights, so another model with
   its own scheduler) with GradCAM on M at concurrency 1: only the CPU is shared, no turns are
   taken. This splits the job's growth at level 3 into what the CPU sharing costs (here) and
   what the turns add (the rest).
5. The job on M again, with GradCAM on M at concurrency 1 from *another client* (the requests
   name 198.51.100.7 through ``X-Forwarded-For``, which the server trusts from 127.0.0.1): the
   job keeps an equal share of the model against them, not ``CAMSERVE_BACKGROUND_SHARE``
   (``app.pipeline.scheduling``). Levels 1 to 4 come from one client, 127.0.0.1.

A job's duration runs from its ``POST`` to its end; with ``--job-forwards N`` (``--quick``: 256)
it ends once N masked forwards are done (its progress), and is then cancelled, so that resnet50's
2,048-channel job fits a smoke run. The targets are checked side by side in this one run:
same-model GradCAM p95 <= 3 x idle p95 + one chunk; the job's duration beside GradCAM at c=1
<= 1.25 x alone.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from service_load import Outcome, build_store, new_client, post_explain
from serving import machine_info, percentile, photo_jpeg, rounded, running_server, table_of

JOB_BATCH = 32
P95_FACTOR = 3.0  # same-model p95 beside a job <= this x idle p95 + one chunk
JOB_GROWTH = 1.25  # the job's duration beside GradCAM at c=1 <= this x alone
POLL_S = 0.02
OTHER_CLIENT = "198.51.100.7"
"""The address that the level of another client's requests sends as X-Forwarded-For."""


@dataclass(frozen=True)
class MixedConfig:
    device: str
    models: tuple[str, ...]
    requests: int
    """GradCAM requests of the idle level (the levels beside a job run as long as it runs)."""
    job_forwards: int | None
    """End a job after this many masked forwards (None: the whole job)."""
    rounds: int
    extra_env: dict[str, str]


@dataclass(frozen=True)
class JobRun:
    seconds: float
    forwards: int
    chunk_s: float | None = None
    """Its chunk's time, from its progress (``chunk_seconds``; None: fewer than two
    steps were seen)."""


def chunk_seconds(steps: list[tuple[float, int]]) -> float | None:
    """One chunk's time from the (time, done) pairs at which a job's progress rose: the first
    rise is the flat channels (counted at once, before any masked forward), so the time from it
    to the last rise over the chunks of ``JOB_BATCH`` done meanwhile (robust to a poll that sees
    several chunks at once, as on a GPU)."""
    if len(steps) < 2:
        return None
    (first_s, first_done), (last_s, last_done) = steps[0], steps[-1]
    return (last_s - first_s) * JOB_BATCH / (last_done - first_done)


async def _gradcam_until(
    client: httpx.AsyncClient,
    url: str,
    image: bytes,
    model: str,
    concurrency: int,
    stop: asyncio.Event,
    total: int | None = None,
) -> list[Outcome]:
    """Closed-loop GradCAM on ``model`` until ``stop`` is set (or ``total`` requests)."""
    fields = {"model": model, "method": "GradCAM"}
    outcomes: list[Outcome] = []
    sent = 0

    async def loop() -> None:
        nonlocal sent
        while not stop.is_set() and (total is None or sent < total):
            sent += 1
            outcomes.append(await post_explain(client, url, image, fields))

    await asyncio.gather(*(loop() for _ in range(concurrency)))
    return outcomes


async def _job(
    client: httpx.AsyncClient,
    url: str,
    image: bytes,
    model: str,
    goal: int | None,
    running: asyncio.Event | None = None,
    ended: asyncio.Event | None = None,
) -> JobRun:
    """One Score-CAM job on ``model``, followed to its end (or to ``goal`` forwards);
    ``running`` is set once it has made progress, ``ended`` once it has ended or reached its
    goal (before it is cancelled: the load beside it stops there)."""
    started = time.perf_counter()
    answer = await client.post(
        f"{url}/jobs",
        files={"file": ("image.jpg", image, "image/jpeg")},
        data={"model": model, "method": "ScoreCAM", "batch_size": str(JOB_BATCH)},
    )
    answer.raise_for_status()
    job_url = f"{url}/jobs/{answer.json()['id']}"
    steps: list[tuple[float, int]] = []  # when the progress rose, and to what
    last = 0
    while True:
        view = (await client.get(job_url)).json()
        done = int(view["progress"]["done"])
        if done > last:
            steps.append((time.perf_counter(), done))
            last = done
        if running is not None and done > 0:
            running.set()
        finished = view["status"] in ("succeeded", "failed", "cancelled")
        if ended is not None and (finished or (goal is not None and done >= goal)):
            ended.set()
        if finished:
            if view["status"] != "succeeded":
                raise RuntimeError(f"the job ended {view['status']}: {view.get('error')}")
            break
        if goal is not None and done >= goal:
            seconds = time.perf_counter() - started
            await client.delete(job_url)
            # The pass stops at its next boundary (a request on the model would be answered
            # in a pause before that, so it cannot tell): wait out the longest chunk seen, so
            # that the next level starts on a free model slot and an idle CPU.
            longest = max((b[0] - a[0] for a, b in itertools.pairwise(steps)), default=1.0)
            await asyncio.sleep(1.5 * longest)
            return JobRun(seconds, done, chunk_seconds(steps))
        await asyncio.sleep(POLL_S)
    return JobRun(time.perf_counter() - started, done, chunk_seconds(steps))


async def _beside_job(
    url: str,
    image: bytes,
    model: str,
    job_model: str,
    concurrency: int,
    goal: int | None,
    other_client: bool = False,
) -> tuple[list[Outcome], JobRun]:
    """GradCAM on ``model`` at ``concurrency`` for as long as a job runs on ``job_model``;
    ``other_client``: the GradCAM requests come from another client than the job (the server
    trusts 127.0.0.1 to name it: ``OTHER_CLIENT``)."""
    async with new_client(concurrency + 1) as client, new_client(concurrency) as others:
        if other_client:
            others.headers["X-Forwarded-For"] = OTHER_CLIENT
        load_client = others if other_client else client
        stop, running = asyncio.Event(), asyncio.Event()
        job = asyncio.ensure_future(_job(client, url, image, job_model, goal, running, stop))
        await running.wait()  # the job's first chunk is done: it holds the model
        load = asyncio.ensure_future(
            _gradcam_until(load_client, url, image, model, concurrency, stop)
        )
        run = await job  # it set ``stop`` when it reached its goal, before its cancellation
        return await load, run


async def _alone(url: str, image: bytes, model: str, requests: int) -> list[Outcome]:
    async with new_client(1) as client:
        return await _gradcam_until(client, url, image, model, 1, asyncio.Event(), requests)


async def _job_alone(url: str, image: bytes, model: str, goal: int | None) -> JobRun:
    async with new_client(1) as client:
        return await _job(client, url, image, model, goal)


def twin(model: str) -> str:
    return f"{model}-twin"


def _latency(outcomes: list[Outcome]) -> dict[str, Any]:
    ok = [o.wall_ms for o in outcomes if o.status == 200]
    queued = [o.timings["queue_ms"] for o in outcomes if "queue_ms" in o.timings]
    return {
        "requests": len(outcomes),
        "errors": len(outcomes) - len(ok),
        "p50_ms": rounded(percentile(ok, 50)),
        "p95_ms": rounded(percentile(ok, 95)),
        "queue_p95_ms": rounded(percentile(queued, 95)),
    }


LEVELS = (
    ("same1", "GradCAM beside the job (same model), c=1", "same", 1),
    ("same4", "GradCAM beside the job (same model), c=4", "same", 4),
    ("twin1", "GradCAM beside the job on a twin model, c=1", "twin", 1),
    ("other1", "GradCAM of another client beside the job (same model), c=1", "other", 1),
)


def measure_model(url: str, image: bytes, model: str, config: MixedConfig) -> dict[str, Any]:
    """Every level of the scenario for one model, in rounds: each round runs every level once,
    so that the machine's drift hits them alike; latencies are pooled over the rounds, job
    durations and growths are the medians of the rounds (a growth compares a level with the job
    alone of its own round)."""
    # Warm-up: the first GradCAM requests and the first masked chunks of a model are slower
    # (allocator, oneDNN primitives for the chunk's batch); a job alone measured cold ran 2x long.
    asyncio.run(_alone(url, image, model, 3))
    asyncio.run(_job_alone(url, image, model, 2 * JOB_BATCH))
    idle: list[Outcome] = []
    alone: list[JobRun] = []
    beside: dict[str, list[Outcome]] = {key: [] for key, *_ in LEVELS}
    runs: dict[str, list[JobRun]] = {key: [] for key, *_ in LEVELS}
    per_round = max(1, config.requests // config.rounds)
    for _ in range(config.rounds):
        idle += asyncio.run(_alone(url, image, model, per_round))
        alone.append(asyncio.run(_job_alone(url, image, model, config.job_forwards)))
        for key, _label, where, concurrency in LEVELS:
            job_model = twin(model) if where == "twin" else model
            outcomes, run = asyncio.run(
                _beside_job(
                    url,
                    image,
                    model,
                    job_model,
                    concurrency,
                    config.job_forwards,
                    other_client=where == "other",
                )
            )
            beside[key] += outcomes
            runs[key].append(run)
    alone_s = statistics.median(run.seconds for run in alone)

    def growth(key: str) -> float:
        return statistics.median(
            run.seconds / base.seconds for run, base in zip(runs[key], alone, strict=True)
        )

    rows: list[dict[str, Any]] = [
        {"level": "GradCAM alone, c=1", **_latency(idle)},
        {"level": "Score-CAM job alone", "job_s": round(alone_s, 2), "chunk_ms": chunk_ms(alone)},
    ]
    for key, label, *_ in LEVELS:
        job_s = statistics.median(run.seconds for run in runs[key])
        rows.append(
            {
                "level": label,
                **_latency(beside[key]),
                "job_s": round(job_s, 2),
                "job_growth": round(growth(key), 2),
                "chunk_ms": chunk_ms(runs[key]),
            }
        )
    result = {
        "model": model,
        "rounds": config.rounds,
        "job_forwards": alone[0].forwards,
        "rows": rows,
    }
    return {**result, **targets(result)}


def chunk_ms(runs: list[JobRun]) -> float | None:
    """The median over ``runs`` of their chunk's time, in ms."""
    chunks = [run.chunk_s for run in runs if run.chunk_s is not None]
    return rounded(statistics.median(chunks) * 1000) if chunks else None


def targets(result: dict[str, Any]) -> dict[str, Any]:
    """The targets of one model's levels (``rows`` in ``measure_model``'s order).

    "One chunk" is measured from the job's progress (``chunk_seconds``, the median of the rounds)
    two ways: as the job's chunks ran alone, and as they ran beside the same-model GradCAM load
    at c=1 (the turns included), which is the chunk a request there actually waits for."""
    idle, alone, same1, _same4, twin1, *_ = result["rows"]
    chunk, loaded_chunk = alone["chunk_ms"] or 0.0, same1["chunk_ms"] or 0.0
    idle_p95 = idle["p95_ms"] or 0.0
    same_p95 = same1["p95_ms"]
    limit = P95_FACTOR * idle_p95 + chunk
    loaded_limit = P95_FACTOR * idle_p95 + loaded_chunk
    growth, shared = same1["job_growth"], twin1["job_growth"]
    return {
        "chunk_ms": chunk,
        "loaded_chunk_ms": loaded_chunk,
        "targets": {
            "same_model_p95_ms": same_p95,
            "p95_limit_ms": rounded(limit),
            "p95_met": same_p95 is not None and same_p95 <= limit,
            "p95_limit_loaded_chunk_ms": rounded(loaded_limit),
            "p95_met_loaded_chunk": same_p95 is not None and same_p95 <= loaded_limit,
            "job_growth_c1": growth,
            "job_growth_cpu_sharing_only": shared,
            "job_growth_from_turns": round(growth / shared, 2),
            "job_growth_limit": JOB_GROWTH,
            "growth_met": growth <= JOB_GROWTH,
        },
    }


def run_mixed(config: MixedConfig) -> dict[str, Any]:
    import torch

    report: dict[str, Any] = {"machine": machine_info(torch.device(config.device))}
    with tempfile.TemporaryDirectory(prefix="camserve-mixed-") as tmp:
        root = Path(tmp)
        store = build_store(root)
        image = photo_jpeg(640, 480, 1)
        for model in config.models:
            (store / twin(model)).symlink_to(store / model, target_is_directory=True)
        needed = sorted({*config.models, *map(twin, config.models)})
        # 127.0.0.1 may name another client (the level of another client's requests).
        env = {"CAMSERVE_FORWARDED_ALLOW_IPS": "127.0.0.1", **config.extra_env}
        with running_server(store, config.device, env, root / "server.log", needed) as url:
            report["models"] = []
            for model in config.models:
                result = measure_model(url, image, model, config)
                report["models"].append(result)
                print(render_mixed(report), flush=True)  # as it goes: a long run may be cut
    return report


def render_mixed(report: dict[str, Any]) -> str:
    machine = report["machine"]
    parts = [
        f"## camserve mixed load ({machine['device']}, {machine['cpu']}, {machine['cores']} "
        f"cores, torch {machine['torch']}, {machine['date']})"
    ]
    columns = (
        "level",
        "requests",
        "errors",
        "p50_ms",
        "p95_ms",
        "queue_p95_ms",
        "job_s",
        "job_growth",
        "chunk_ms",
    )
    targets = []
    for result in report["models"]:
        parts.append(
            f"### {result['model']}: Score-CAM job of {result['job_forwards']} masked forwards, "
            f"{result['rounds']} rounds (medians), "
            f"one chunk ~{result['chunk_ms']} ms alone, ~{result['loaded_chunk_ms']} ms beside "
            "GradCAM on the same model at c=1"
        )
        parts.append(table_of(result["rows"], columns))
        targets.append({"model": result["model"], **result["targets"]})
    parts.append("### Targets (same run)")
    parts.append(
        table_of(
            targets,
            (
                "model",
                "same_model_p95_ms",
                "p95_limit_ms",
                "p95_met",
                "p95_limit_loaded_chunk_ms",
                "p95_met_loaded_chunk",
                "job_growth_c1",
                "job_growth_cpu_sharing_only",
                "job_growth_from_turns",
                "job_growth_limit",
                "growth_met",
            ),
        )
    )
    return "\n\n".join(parts)
