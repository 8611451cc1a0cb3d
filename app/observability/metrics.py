"""Prometheus metrics of one app: request counts and stage times, batches, queue, models, GPU.

Each app has its own ``CollectorRegistry`` (tests build many apps in one process). Counters and
histograms are fed as requests end; gauges are read from the app's state at scrape time.

With ``--workers N`` the workers share their metrics (``app.observability.shared``): a scrape,
whichever worker answers it, reads every worker's counters and histograms from the shared files
and adds them up, and the state gauges each worker writes there (``PUBLISH_EVERY_S``).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from app.observability.context import STAGES, RequestInfo
from app.observability.shared import shared_folder

# Seconds: a tiny model's forward (~1 ms) up to a Score-CAM family request (~minutes).
DURATION_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
UNMATCHED_ROUTE = "unmatched"
SEVERAL_METHODS = "several"
"""The ``method`` label of a request that asked for several methods (each is counted under its
own name in ``camserve_explanations``)."""
PUBLISH_EVERY_S = 1.0
"""With shared metrics, how often each worker writes its state gauges for the others' scrapes."""


def method_label(methods: str) -> str:
    """A request's ``method`` label: its one method, or ``several``. The methods a client lists
    in any order would otherwise each make a new series (300 orders took a scrape from 131 KB to
    5.5 MB); this keeps the labels to the registered methods and one more."""
    return SEVERAL_METHODS if "," in methods else methods


SharedMode = Literal["livesum", "livemax", "livemin", "liveall"]
"""How a gauge adds up over the workers (prometheus_client's multiprocess modes)."""
Reading = tuple[tuple[str, ...], float]
"""A gauge's label values and value."""


@dataclass(frozen=True)
class StateGauge:
    """A gauge read from the app's state (``read(state)`` gives its readings) at scrape time;
    ``shared`` says how the workers of ``--workers N`` add up (a prometheus_client
    multiprocess mode: "live" ones count only the running workers)."""

    name: str
    documentation: str
    read: Callable[[Any], Iterable[Reading]]
    labels: tuple[str, ...] = ()
    shared: SharedMode = "livesum"
    optional: bool = False
    """Left out of a scrape when it has no reading (the app has no cache, no GPU)."""


def _explainer(state: Any) -> Any:
    return getattr(state, "explainer", None)


def _one(value: Any) -> list[Reading]:
    return [((), float(value))]


def _cache(read: Callable[[Any], float]) -> Callable[[Any], list[Reading]]:
    """``read`` of the explanation cache's memory tier; no reading without a cache."""

    def readings(state: Any) -> list[Reading]:
        cache = getattr(_explainer(state), "cache", None)
        return [] if cache is None else _one(read(cache.memory))

    return readings


def _jobs(state: Any) -> list[Reading]:
    store = getattr(state, "jobs", None)
    counts = store.counts() if store is not None else {}
    return [((status,), count) for status, count in counts.items()]


def _models(state: Any) -> list[Reading]:
    registry = getattr(state, "registry", None)
    return [
        ((name, str(number)), 1.0 if version.model is not None else 0.0)
        for name, entry in (registry.entries if registry is not None else {}).items()
        for number, version in entry.versions.items()
    ]


def _gpu(reading: str) -> Callable[[Any], list[Reading]]:
    """``torch.cuda.<reading>(index)`` of every CUDA device, when the app serves on CUDA."""

    def readings(state: Any) -> list[Reading]:
        device = getattr(state, "device", None)
        if device is None or device.type != "cuda":
            return []
        read = getattr(torch.cuda, reading)
        return [((f"cuda:{i}",), float(read(i))) for i in range(torch.cuda.device_count())]

    return readings


def _resident_bytes(_state: Any) -> list[Reading]:
    for family in ProcessCollector(registry=None).collect():
        if family.name == "process_resident_memory_bytes":
            return [((), sample.value) for sample in family.samples]
    return []


STATE_GAUGES = (
    StateGauge(
        "camserve_queue_depth",
        "Requests waiting for a model pass (all models).",
        lambda state: _one(getattr(_explainer(state), "waiting", 0)),
    ),
    StateGauge(
        "camserve_admitted_requests",
        "Requests admitted to model work: running in a model slot or waiting for one "
        "(503 beyond CAMSERVE_MAX_MODEL_SLOTS + CAMSERVE_QUEUE_SIZE).",
        lambda state: _one(getattr(getattr(_explainer(state), "limiter", None), "in_flight", 0)),
    ),
    StateGauge(
        "camserve_cpu_work_in_flight",
        "Tasks running now on the service's decoding, drawing and model threads; a CPU pass "
        "takes an intra-op team of the cores less the others (CAMSERVE_FIT_PASS_THREADS).",
        lambda state: _one(getattr(getattr(state, "cpu_share", None), "running", 0)),
    ),
    StateGauge(
        "camserve_cache_bytes",
        "Bytes the explanation cache holds in this process (keys and answers).",
        _cache(lambda memory: memory.held_bytes),
        optional=True,
    ),
    StateGauge(
        "camserve_cache_capacity_bytes",
        "The explanation cache's bound (CAMSERVE_CACHE_MB).",
        _cache(lambda memory: memory.capacity),
        optional=True,
    ),
    StateGauge(
        "camserve_cache_entries",
        "Answers the explanation cache holds in this process.",
        _cache(len),
        optional=True,
    ),
    StateGauge(
        "camserve_background_jobs",
        "Jobs of /jobs in the job store, by status (finished ones until they expire; with "
        "Redis, those of every replica).",
        _jobs,
        ("status",),
        shared="livemax",  # every worker reads the same Redis store
    ),
    StateGauge(
        "camserve_model_ready",
        "1 when the model's version is loaded and serving, else 0.",
        _models,
        ("model", "version"),
        shared="livemin",  # with several workers: loaded and serving in every one
    ),
    StateGauge(
        "camserve_gpu_memory_allocated_bytes",
        "GPU memory held by tensors (torch.cuda.memory_allocated).",
        _gpu("memory_allocated"),
        ("device",),
        optional=True,
    ),
    StateGauge(
        "camserve_gpu_memory_reserved_bytes",
        "GPU memory held by torch's caching allocator (torch.cuda.memory_reserved).",
        _gpu("memory_reserved"),
        ("device",),
        optional=True,
    ),
)
"""The gauges read from the app's state; with several workers, each adds up over them."""

WORKER_GAUGES = (
    StateGauge(
        "camserve_worker_resident_memory_bytes",
        "Resident memory of each worker process of --workers N, by pid (one process: "
        "process_resident_memory_bytes).",
        _resident_bytes,
        shared="liveall",
    ),
)
"""With several workers, in place of the process collector's metrics (of one process)."""


class _StateCollector(Collector):
    """The state gauges, read at scrape time (one process)."""

    def __init__(self, state: Any) -> None:
        self.state = state

    def collect(self) -> Iterable[Metric]:
        for gauge in STATE_GAUGES:
            readings = list(gauge.read(self.state))
            if not readings and gauge.optional:
                continue
            family = GaugeMetricFamily(gauge.name, gauge.documentation, labels=gauge.labels)
            for labels, value in readings:
                family.add_metric(list(labels), value)
            yield family


class _SharedGauges:
    """The state gauges of this worker, written to the shared files for every worker's scrape
    (multiprocess mode: a scrape cannot read the other workers' state). Each worker writes its
    own every ``PUBLISH_EVERY_S`` and before it answers a scrape; a label set that is gone (a
    model removed, a job status with no job left) is written as 0."""

    def __init__(self, state: Any) -> None:
        self.state = state
        self.gauges = {
            g.name: Gauge(
                g.name, g.documentation, g.labels, registry=None, multiprocess_mode=g.shared
            )
            for g in (*STATE_GAUGES, *WORKER_GAUGES)
        }
        self.written: dict[str, set[tuple[str, ...]]] = {name: set() for name in self.gauges}
        self.lock = threading.Lock()

    def publish(self) -> None:
        with self.lock:
            for spec in (*STATE_GAUGES, *WORKER_GAUGES):
                gauge, now = self.gauges[spec.name], dict(spec.read(self.state))
                for labels in self.written[spec.name] - now.keys():
                    now[labels] = 0.0
                for labels, value in now.items():
                    (gauge.labels(*labels) if labels else gauge).set(value)
                self.written[spec.name] = set(now)


class Metrics:
    """The metrics of one app; ``state`` is its ``app.state`` (read at scrape time)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, state: Any) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "camserve_requests",
            "HTTP requests answered, by route template, model, version, CAM method and status.",
            ["route", "model", "version", "method", "status"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "camserve_request_duration_seconds",
            "Seconds per stage of a request; stage 'total' is the whole request as served.",
            ["route", "model", "version", "method", "stage"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.batch_images = Histogram(
            "camserve_batch_images",
            "Images in each model pass (several requests share one when batched).",
            ["model", "version"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.pass_seconds = Histogram(
            "camserve_pass_seconds",
            "Seconds of each model pass, by the number of images it ran (Triton's batch "
            "statistics are read from it).",
            ["model", "version", "images"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.last_pass = Gauge(
            "camserve_last_pass_timestamp_seconds",
            "When the last model pass on each version ended (Unix time).",
            ["model", "version"],
            registry=self.registry,
            multiprocess_mode="max",  # several workers: the latest of their passes
        )
        self.explanations = Counter(
            "camserve_explanations",
            "Explanations answered, each method of a request counted under its own name.",
            ["model", "method"],
            registry=self.registry,
        )
        self.cam_forwards = Counter(
            "camserve_cam_forwards",
            "Masked (Score-CAM family) and noisy (SmoothGrad-CAM++) forwards run by CAM calls.",
            ["model", "version", "method"],
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "camserve_queue_wait_seconds",
            "Seconds from a request's arrival at its model to the start of its pass, by priority "
            "class (interactive: /explain, /predict, protocol routes; background: /jobs).",
            ["model", "priority"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.yields = Counter(
            "camserve_pass_yields",
            "Chunk boundaries and pauses inside chunks at which a long pass (Score-CAM "
            "family, Ablation-CAM, SmoothGrad-CAM++) let other passes on its model run.",
            ["model"],
            registry=self.registry,
        )
        self.displaced = Counter(
            "camserve_requests_displaced",
            "Requests that gave their admitted place, still waiting for their first pass, to "
            "another client's while the service was full: their client held the most places "
            "(answered 503 overloaded).",
            registry=self.registry,
        )
        self.client_requests = Counter(
            "camserve_client_requests",
            "Requests to the keyed routes and gRPC calls by API key name ('-': no key or a wrong "
            "one) and status; only when the service has API keys (the key itself is never a "
            "label).",
            ["client", "status"],
            registry=self.registry,
        )
        self.cache_hits = Counter(
            "camserve_cache_hits",
            "Explanations answered from the explanation cache, by the tier that held them "
            "(memory: this process; redis: shared by the replicas).",
            ["tier"],
            registry=self.registry,
        )
        self.cache_misses = Counter(
            "camserve_cache_misses",
            "Explanations looked up in the cache and not found (computed, then kept).",
            registry=self.registry,
        )
        self.cache_bypasses = Counter(
            "camserve_cache_bypasses",
            "Explanations never cached: a random method (SSCAM, SmoothGradCAMpp) without a seed.",
            registry=self.registry,
        )
        self.cache_evictions = Counter(
            "camserve_cache_evictions",
            "Answers dropped from the explanation cache, by tier (memory: this process; redis: "
            "the shared one, counted by the replica whose write made room) and reason: `lru` to "
            "make room under CAMSERVE_CACHE_MB, `expired` past CAMSERVE_CACHE_TTL_S, "
            "`too_large` never kept (over a quarter of the cache).",
            ["tier", "reason"],
            registry=self.registry,
        )
        self.shared = shared_folder()
        """The folder of the workers' shared metrics (None: this process's alone)."""
        self.shared_gauges = _SharedGauges(state) if self.shared is not None else None
        self.registry.register(_StateCollector(state))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)

    def observe_request(self, route: str, status: int, seconds: float, info: RequestInfo) -> None:
        """Count one answered request and its stage times."""
        method = method_label(info.method)
        labels = (route, info.model, info.version, method)
        self.requests.labels(*labels, str(status)).inc()
        for stage in STAGES:
            if stage in info.stages:
                self.duration.labels(*labels, stage).observe(info.stages[stage])
        self.duration.labels(*labels, "total").observe(seconds)
        if info.client:
            self.client_requests.labels(info.client, str(status)).inc()
        if info.cam_forwards:
            self.cam_forwards.labels(info.model, info.version, method).inc(info.cam_forwards)
        if info.method and status < 400:
            for name in info.method.split(","):
                self.explanations.labels(info.model, name).inc()

    def observe_pass(self, model: str, version: int, images: int, seconds: float) -> None:
        """One model pass of ``images`` images ran on that version of the model in ``seconds``."""
        self.batch_images.labels(model, str(version)).observe(images)
        self.pass_seconds.labels(model, str(version), str(images)).observe(seconds)
        self.last_pass.labels(model, str(version)).set_to_current_time()

    def observe_wait(self, model: str, priority: str, seconds: float) -> None:
        """A request of class ``priority`` waited ``seconds`` for its pass on ``model``."""
        self.queue_wait.labels(model, priority).observe(seconds)

    def observe_yield(self, model: str) -> None:
        """A long pass on ``model`` let other passes run (called from its thread)."""
        self.yields.labels(model).inc()

    def observe_displaced(self) -> None:
        """A waiting request gave its place to another client's (``app.pipeline.admission``)."""
        self.displaced.inc()

    def observe_cache(self, event: str, tier: str) -> None:
        """The explanation cache's ``event`` (hit, miss, bypass, eviction, expiry, too_large);
        ``tier`` names where a hit was found."""
        if event == "hit":
            self.cache_hits.labels(tier).inc()
        elif event == "miss":
            self.cache_misses.inc()
        elif event == "bypass":
            self.cache_bypasses.inc()
        else:
            reason = {"eviction": "lru", "expiry": "expired"}.get(event, event)
            self.cache_evictions.labels(tier, reason).inc()

    def render(self) -> bytes:
        if self.shared is None or self.shared_gauges is None:
            return generate_latest(self.registry)
        self.shared_gauges.publish()  # this worker's state as of now
        workers = CollectorRegistry()
        MultiProcessCollector(workers, path=str(self.shared))  # type: ignore[no-untyped-call]
        return generate_latest(workers)

    def every_worker(self, *metrics: Any) -> list[list[Metric]]:
        """Each metric's families as a scrape reads them: this process's, or with shared
        metrics every worker's, from one read of the shared files (what Triton's statistics
        are read from)."""
        own = [list(metric.collect()) for metric in metrics]
        if self.shared is None:
            return own
        every = MultiProcessCollector(None, path=str(self.shared))  # type: ignore[no-untyped-call]
        by_name = {family.name: family for family in every.collect()}  # type: ignore[no-untyped-call]
        return [[by_name[f.name] for f in families if f.name in by_name] for families in own]

    async def publish_periodically(self, every_s: float = PUBLISH_EVERY_S) -> None:
        """With shared metrics, write this worker's state gauges every ``every_s`` (on a
        thread: reading the job store's counts may wait for Redis) until cancelled."""
        if self.shared_gauges is None:
            return
        while True:
            await asyncio.to_thread(self.shared_gauges.publish)
            await asyncio.sleep(every_s)
