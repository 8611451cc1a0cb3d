"""Prometheus metrics of one app: request counts and stage times, batches, queue, models, GPU.

Each app has its own ``CollectorRegistry`` (tests build many apps in one process). Counters and
histograms are fed as requests end; gauges are read from the app's state at scrape time.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

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
from prometheus_client.registry import Collector

from app.observability.context import STAGES, RequestInfo

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


def method_label(methods: str) -> str:
    """A request's ``method`` label: its one method, or ``several``. The methods a client lists
    in any order would otherwise each make a new series (300 orders took a scrape from 131 KB to
    5.5 MB); this keeps the labels to the registered methods and one more."""
    return SEVERAL_METHODS if "," in methods else methods


class _StateCollector(Collector):
    """Gauges read from the app at scrape time."""

    def __init__(self, state: Any) -> None:
        self.state = state

    def collect(self) -> Iterable[Metric]:
        explainer = getattr(self.state, "explainer", None)
        registry = getattr(self.state, "registry", None)
        device = getattr(self.state, "device", None)

        queue = GaugeMetricFamily(
            "camserve_queue_depth", "Requests waiting for a model pass (all models)."
        )
        queue.add_metric([], explainer.waiting if explainer is not None else 0)
        yield queue

        admitted = GaugeMetricFamily(
            "camserve_admitted_requests",
            "Requests admitted to model work: running in a model slot or waiting for one "
            "(503 beyond CAMSERVE_MAX_MODEL_SLOTS + CAMSERVE_QUEUE_SIZE).",
        )
        admitted.add_metric([], explainer.limiter.in_flight if explainer is not None else 0)
        yield admitted

        share = getattr(self.state, "cpu_share", None)
        cpu = GaugeMetricFamily(
            "camserve_cpu_work_in_flight",
            "Tasks running now on the service's decoding, drawing and model threads; a CPU pass "
            "takes an intra-op team of the cores less the others (CAMSERVE_FIT_PASS_THREADS).",
        )
        cpu.add_metric([], share.running if share is not None else 0)
        yield cpu

        yield from _cache_gauges(getattr(explainer, "cache", None))

        store = getattr(self.state, "jobs", None)
        background = GaugeMetricFamily(
            "camserve_background_jobs",
            "Jobs of /jobs in the job store, by status (finished ones until they expire; with "
            "Redis, those of every replica).",
            labels=["status"],
        )
        for status, count in (store.counts() if store is not None else {}).items():
            background.add_metric([status], count)
        yield background

        ready = GaugeMetricFamily(
            "camserve_model_ready",
            "1 when the model's version is loaded and serving, else 0.",
            labels=["model", "version"],
        )
        for name, entry in (registry.entries if registry is not None else {}).items():
            for number, version in entry.versions.items():
                ready.add_metric([name, str(number)], 1.0 if version.model is not None else 0.0)
        yield ready

        if device is not None and device.type == "cuda":
            yield from _gpu_memory()


def _cache_gauges(cache: Any) -> Iterable[Metric]:
    """The explanation cache's memory tier (nothing without a cache)."""
    if cache is None:
        return
    held = GaugeMetricFamily(
        "camserve_cache_bytes",
        "Bytes the explanation cache holds in this process (keys and answers).",
    )
    held.add_metric([], cache.memory.held_bytes)
    yield held
    capacity = GaugeMetricFamily(
        "camserve_cache_capacity_bytes", "The explanation cache's bound (CAMSERVE_CACHE_MB)."
    )
    capacity.add_metric([], cache.memory.capacity)
    yield capacity
    entries = GaugeMetricFamily(
        "camserve_cache_entries", "Answers the explanation cache holds in this process."
    )
    entries.add_metric([], len(cache.memory))
    yield entries


def _gpu_memory() -> Iterable[Metric]:
    allocated = GaugeMetricFamily(
        "camserve_gpu_memory_allocated_bytes",
        "GPU memory held by tensors (torch.cuda.memory_allocated).",
        labels=["device"],
    )
    reserved = GaugeMetricFamily(
        "camserve_gpu_memory_reserved_bytes",
        "GPU memory held by torch's caching allocator (torch.cuda.memory_reserved).",
        labels=["device"],
    )
    for index in range(torch.cuda.device_count()):
        name = f"cuda:{index}"
        allocated.add_metric([name], float(torch.cuda.memory_allocated(index)))
        reserved.add_metric([name], float(torch.cuda.memory_reserved(index)))
    yield allocated
    yield reserved


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
        self.client_requests = Counter(
            "camserve_client_requests",
            "Requests to the keyed routes by API key name ('-': no key or a wrong one) and "
            "status; only when the service has API keys (the key itself is never a label).",
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
        return generate_latest(self.registry)
