"""/metrics: request counts and stage times, batches, CAM forwards, model and queue gauges."""

from __future__ import annotations

import itertools
import random
import string
import time
from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.observability.metrics import _SharedGauges, _StateCollector
from tests.conftest import files, image_bytes

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(client: TestClient) -> Samples:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def test_counts_and_stages_of_predict_and_explain(make_client: Callable[..., TestClient]) -> None:
    client = make_client()
    assert client.post("/predict", files=files(image_bytes(), image_bytes(seed=1))).is_success
    form = {"method": "ScoreCAM", "batch_size": "8", "output": "raw"}
    assert client.post("/explain", files=files(image_bytes()), data=form).is_success
    assert client.post("/predict", files=files(image_bytes()), data={"model": "nope"}).is_error
    samples = scrape(client)

    predict = {"route": "/predict", "model": "tiny", "version": "1", "method": ""}
    explain = {"route": "/explain", "model": "tiny", "version": "1", "method": "ScoreCAM"}
    assert value(samples, "camserve_requests_total", **predict, status="200") == 1
    assert value(samples, "camserve_requests_total", **explain, status="200") == 1
    # An unknown model is not a label value: a client cannot grow the series without bound.
    unknown = {"route": "/predict", "model": "", "version": "", "method": "", "status": "404"}
    assert value(samples, "camserve_requests_total", **unknown) == 1

    duration = "camserve_request_duration_seconds_count"
    for stage in ("decode", "queue", "forward", "total"):
        assert value(samples, duration, **predict, stage=stage) == 1, stage
    assert value(samples, duration, **predict, stage="cam") is None
    for stage in ("decode", "queue", "forward", "cam", "encode", "total"):
        assert value(samples, duration, **explain, stage=stage) == 1, stage
    assert value(samples, "camserve_request_duration_seconds_sum", **explain, stage="cam") > 0

    # One pass of 2 images (the predict) and one of 1 (the explain).
    assert value(samples, "camserve_batch_images_count", model="tiny", version="1") == 2
    assert value(samples, "camserve_batch_images_sum", model="tiny", version="1") == 3
    for images in ("1", "2"):  # and each pass's seconds, by its size
        passes = {"model": "tiny", "version": "1", "images": images}
        assert value(samples, "camserve_pass_seconds_count", **passes) == 1
        assert value(samples, "camserve_pass_seconds_sum", **passes) > 0
    ended = value(samples, "camserve_last_pass_timestamp_seconds", model="tiny", version="1")
    assert ended is not None and abs(ended - time.time()) < 600
    # ScoreCAM on tiny's `features` (4 channels): one masked forward per channel.
    forwards = {"model": "tiny", "version": "1", "method": "ScoreCAM"}
    assert value(samples, "camserve_cam_forwards_total", **forwards) == 4

    assert value(samples, "camserve_model_ready", model="tiny", version="1") == 1
    assert value(samples, "camserve_model_ready", model="broken", version="1") == 0
    assert value(samples, "camserve_queue_depth") == 0
    assert value(samples, "camserve_admitted_requests") == 0
    assert value(samples, "camserve_cpu_work_in_flight") == 0
    assert value(samples, "process_resident_memory_bytes") > 0
    assert value(samples, "camserve_gpu_memory_allocated_bytes", device="cuda:0") is None


def test_the_explanation_cache_counts_hits_misses_bytes_and_evictions(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(cache_mb=1)
    form = {"method": "GradCAM", "output": "raw"}
    for seed in (1, 1, 2):
        assert client.post("/explain", files=files(image_bytes(seed=seed)), data=form).is_success
    random = {"method": "SmoothGradCAMpp", "num_samples": "2", "output": "raw"}
    assert client.post("/explain", files=files(image_bytes()), data=random).is_success
    samples = scrape(client)
    assert value(samples, "camserve_cache_hits_total", tier="memory") == 1
    assert value(samples, "camserve_cache_misses_total") == 2
    assert value(samples, "camserve_cache_bypasses_total") == 1
    assert value(samples, "camserve_cache_entries") == 2
    assert 0 < value(samples, "camserve_cache_bytes") <= 1024 * 1024  # type: ignore[operator]
    assert value(samples, "camserve_cache_capacity_bytes") == 1024 * 1024
    assert value(samples, "camserve_cache_evictions_total", tier="memory", reason="lru") is None
    # Fill the 1 MiB with answers of about the first ones' size: the oldest make room.
    size = value(samples, "camserve_cache_bytes") / 2  # type: ignore[operator]
    for seed in range(10, 12 + int(1024 * 1024 / size)):
        assert client.post("/explain", files=files(image_bytes(seed=seed)), data=form).is_success
    samples = scrape(client)
    lru = {"tier": "memory", "reason": "lru"}
    assert value(samples, "camserve_cache_evictions_total", **lru)  # some were dropped
    assert value(samples, "camserve_cache_bytes") <= 1024 * 1024  # type: ignore[operator]


def test_scrapes_are_counted_under_their_route(make_client: Callable[..., TestClient]) -> None:
    client = make_client()
    client.get("/metrics")
    samples = scrape(client)
    labels = {"route": "/metrics", "model": "", "version": "", "method": "", "status": "200"}
    assert value(samples, "camserve_requests_total", **labels) == 1


def test_unmatched_paths_share_one_route_label(make_client: Callable[..., TestClient]) -> None:
    client = make_client()
    for path in ("/a", "/b", "/c"):
        assert client.get(path).status_code == 404
    labels = {"route": "unmatched", "model": "", "version": "", "method": "", "status": "404"}
    assert value(scrape(client), "camserve_requests_total", **labels) == 3


def test_metrics_can_be_turned_off(make_client: Callable[..., TestClient]) -> None:
    client = make_client(metrics=False)
    assert client.get("/metrics").status_code == 404
    assert client.post("/predict", files=files(image_bytes())).status_code == 200


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_memory_gauges(make_client: Callable[..., TestClient]) -> None:
    client = make_client(device="cuda")
    assert client.post("/predict", files=files(image_bytes())).status_code == 200
    samples = scrape(client)
    assert value(samples, "camserve_gpu_memory_allocated_bytes", device="cuda:0") > 0
    assert value(samples, "camserve_gpu_memory_reserved_bytes", device="cuda:0") > 0


def test_background_jobs_are_counted_by_status(make_client: Callable[..., TestClient]) -> None:
    client = make_client()
    assert value(scrape(client), "camserve_background_jobs", status="succeeded") == 0
    job = client.post("/jobs", files=files(image_bytes()), data={"method": "GradCAM"}).json()
    while client.get(job["url"]).json()["status"] not in ("succeeded", "failed"):
        pass
    samples = scrape(client)
    assert value(samples, "camserve_background_jobs", status="succeeded") == 1
    assert value(samples, "camserve_background_jobs", status="running") == 0


def test_method_orders_do_not_grow_the_series(make_client: Callable[..., TestClient]) -> None:
    """50 requests, each listing methods in another order: one series, and each method counted
    under its own name."""
    client = make_client()
    names = ["GradCAM", "GradCAMpp", "XGradCAM", "LayerCAM", "HiResCAM"]
    orders = list(itertools.permutations(names, 3))[:50]
    assert len(orders) == 50
    for order in orders:
        form = {"method": ",".join(order), "output": "raw"}
        response = client.post("/explain", files=files(image_bytes()), data=form)
        assert response.status_code == 200, response.text
    samples = scrape(client)
    methods = {
        dict(labels)["method"]
        for (name, labels) in samples
        if name == "camserve_requests_total" and dict(labels)["route"] == "/explain"
    }
    assert methods == {"several"}
    counted = {
        dict(labels)["method"]: count
        for (name, labels), count in samples.items()
        if name == "camserve_explanations_total"
    }
    assert set(counted) == set(names) and sum(counted.values()) == 150


def _hostile_round(client: TestClient, seed: int) -> None:
    """Every input of a client that a label could be read from, with values of ``seed``."""
    word = random.Random(seed).choices
    key = {"X-API-Key": "k-alice"}

    def name() -> str:
        return "".join(word(string.ascii_letters, k=12))

    image = files(image_bytes())
    for _ in range(3):
        client.post("/explain", files=image, data={"model": name()}, headers=key)
        client.post("/explain", files=image, data={"model": "tiny", "version": "7"}, headers=key)
        client.post("/explain", files=image, data={"method": name()}, headers=key)
        client.post("/predict", files=image, data={"model": name()}, headers=key)
        client.post("/jobs", files=image, data={"model": name()}, headers=key)
        client.get(f"/jobs/{name()}", headers=key)
        client.get(f"/models/{name()}", headers=key)
        body = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["x"]}]}
        client.post(f"/v2/models/{name()}/infer", json=body, headers=key)
        client.post(f"/v2/models/tiny/versions/{name()}/infer", json=body, headers=key)
        client.get(f"/v2/models/{name()}/ready", headers=key)
        client.post(f"/v1/models/{name()}:predict", json={"instances": []}, headers=key)
        client.get(f"/{name()}/{name()}", headers=key)
        client.request(name().upper(), "/explain", headers=key)
        client.get("/models", headers={"X-API-Key": name(), "User-Agent": name()})
        client.post("/explain", content=b"x", headers={**key, "Content-Type": "image/" + name()})
    # One method spelled in every case: one series, under its own name.
    for method in ("gradcam", "GRADCAM", "GradCam"):
        form = {"method": method, "output": "raw"}
        assert client.post("/explain", files=image, data=form, headers=key).status_code == 200


def test_client_chosen_values_never_become_label_values(
    make_client: Callable[..., TestClient],
) -> None:
    """A second round of every hostile input, with new random names, adds no series: each label
    read from a request is a route template, a status, a model and version the service
    serves, a registered method or a key's name (the review sent 10,000 such requests to
    `python -m app`: /metrics went from 10.5 to 35 KB on its first round and stayed there)."""
    client = make_client(api_keys="alice:k-alice")
    _hostile_round(client, seed=1)
    scrape(client)  # a scrape is counted once it is answered: the next one shows its series
    first = set(scrape(client))
    _hostile_round(client, seed=2)
    second = set(scrape(client))
    assert second == first, sorted(second - first)
    labels = [dict(labels) for name, labels in second if name.startswith("camserve_")]
    served = set(client.app.state.registry.entries)  # type: ignore[attr-defined]
    assert {label["model"] for label in labels if "model" in label} <= {"", *served}
    assert {label["method"] for label in labels if "method" in label} <= {"", "GradCAM"}
    assert {label["client"] for label in labels if "client" in label} == {"alice", "-"}


class _Version:
    def __init__(self, loaded: bool) -> None:
        self.model = object() if loaded else None


class _Entry:
    def __init__(self, **versions: bool) -> None:
        self.versions = {int(n): _Version(v) for n, v in versions.items()}


def test_shared_gauges_write_this_workers_state_and_zero_what_is_gone() -> None:
    # With --workers N each worker writes its state gauges for the others' scrapes; a label set
    # that is gone (a model removed) is written as 0, not left at its last value.
    state = SimpleNamespace(
        registry=SimpleNamespace(entries={"a": _Entry(**{"1": True}), "b": _Entry(**{"2": False})})
    )
    shared = _SharedGauges(state)
    ready = shared.gauges["camserve_model_ready"]

    def readings() -> dict[tuple[str, ...], float]:
        return {
            (s.labels["model"], s.labels["version"]): s.value
            for family in ready.collect()
            for s in family.samples
        }

    shared.publish()
    assert readings() == {("a", "1"): 1.0, ("b", "2"): 0.0}
    assert shared.gauges["camserve_queue_depth"].collect()[0].samples[0].value == 0
    state.registry.entries = {"b": _Entry(**{"2": True})}
    shared.publish()
    assert readings() == {("a", "1"): 0.0, ("b", "2"): 1.0}
    memory = shared.gauges["camserve_worker_resident_memory_bytes"].collect()[0].samples
    assert memory[0].value > 0


def test_the_gpu_gauges_read_every_cuda_device(monkeypatch: pytest.MonkeyPatch) -> None:
    # Read from torch at scrape time, one series per device; none when serving on the CPU.
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda i: 100 + i)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda i: 200 + i)
    families = {
        f.name: f for f in _StateCollector(SimpleNamespace(device=torch.device("cuda"))).collect()
    }
    allocated = families["camserve_gpu_memory_allocated_bytes"].samples
    assert [(s.labels["device"], s.value) for s in allocated] == [("cuda:0", 100), ("cuda:1", 101)]
    assert families["camserve_gpu_memory_reserved_bytes"].samples[1].value == 201
    on_cpu = {
        f.name for f in _StateCollector(SimpleNamespace(device=torch.device("cpu"))).collect()
    }
    assert "camserve_gpu_memory_allocated_bytes" not in on_cpu
    assert "camserve_queue_depth" in on_cpu
