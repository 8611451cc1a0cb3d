"""Triton's own reads beside the protocol: a model's configuration and its statistics, in the
shapes tritonclient's ``get_model_config`` and ``get_inference_statistics`` read.

The configuration is camserve's, written in Triton's words: the input ``image`` (one encoded
image per batch row), the outputs of the model's metadata (``logits``, or a detector's or a
segmenter's own; ``cam``; DFF's ``concepts`` and ``concept_labels``), the batching, and the
explain methods as parameters. The statistics are read from the metrics camserve keeps anyway
(Prometheus counters and histograms), so they cost nothing per request; durations are in
nanoseconds.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from app.errors import BadRequest
from app.models.loading import LoadedModel
from app.models.registry import ModelRegistry
from app.observability.metrics import Metrics
from app.protocols.oip import INPUT, PLATFORM, model_outputs
from app.settings import Settings

#: camserve's stages of a request -> Triton's phases of an inference.
_PHASES = {
    "queue": ("queue",),
    "compute_input": ("decode",),
    "compute_infer": ("forward", "cam"),
    "compute_output": ("encode",),
}

#: Triton's config names of the protocol's datatypes.
_TYPES = {"FP32": "TYPE_FP32", "INT32": "TYPE_INT32", "BYTES": "TYPE_STRING"}


def model_config(model: LoadedModel, settings: Settings) -> dict[str, Any]:
    """The model's configuration in Triton's shape (``max_batch_size``: the most images one
    request may send; dims without the batch dimension)."""
    spec = model.spec

    def text(value: str) -> dict[str, str]:
        return {"string_value": value}

    config: dict[str, Any] = {
        "name": spec.name,
        "platform": PLATFORM,
        "backend": "camserve",
        "version_policy": {"specific": {"versions": [spec.version]}},
        "max_batch_size": settings.max_images,
        "input": [
            # One encoded image per batch row: dims [1], presented as [-1] (reshaped to a scalar).
            {"name": INPUT, "data_type": "TYPE_STRING", "dims": [1], "reshape": {"shape": []}}
        ],
        "output": [
            {"name": o.name, "data_type": _TYPES[o.datatype], "dims": o.shape[1:]}
            for o in model_outputs(model)
        ],
        "parameters": {
            "methods": text(",".join(model.applicable_methods)),
            "default_method": text(spec.default_method),
            "target_layers": text(",".join(model.target_layers)),
            "input_size": text(f"{spec.input_shape[2]}x{spec.input_shape[1]}"),
        },
    }
    if settings.max_batch_size != 1:
        config["dynamic_batching"] = {
            "max_queue_delay_microseconds": round(settings.batch_timeout_ms * 1000)
        }
    return config


def _samples(families: Iterable[Any]) -> Iterable[tuple[str, dict[str, str], float]]:
    for family in families:
        for sample in family.samples:
            yield sample.name, sample.labels, sample.value


def statistics(
    metrics: Metrics | None, registry: ModelRegistry, name: str | None, version: int | None
) -> dict[str, Any]:
    """Triton's ``model_stats`` for one model (a version of it), or every model when ``name`` is
    None: per version, the requests answered (success: under 400; fail: the rest), the images
    run and the passes, and the time per phase, from camserve's metrics. BadRequest when the
    metrics are off (CAMSERVE_METRICS=false): there is nothing to read them from."""
    if metrics is None:
        raise BadRequest(
            "Statistics are read from camserve's metrics, which are off; set "
            "CAMSERVE_METRICS=true to have them."
        )
    if name is None:
        keys = [(n, str(v)) for n, e in registry.entries.items() for v in sorted(e.versions)]
    else:
        entry = registry.entry(name)
        numbers = sorted(entry.versions) if version is None else [version]
        if version is not None and version not in entry.versions:
            registry.get(name, version)  # raises the registry's not-found, naming the versions
        keys = [(entry.name, str(v)) for v in numbers]
    # cache_hit and cache_miss stay zero: the explanation cache counts per tier, not per model
    # (camserve_cache_hits and camserve_cache_misses on /metrics).
    zero = {"count": 0, "ns": 0}
    stats: dict[tuple[str, str], dict[str, Any]] = {
        key: {
            "name": key[0],
            "version": key[1],
            "last_inference": 0,
            "inference_count": 0,
            "execution_count": 0,
            "inference_stats": {
                phase: dict(zero)
                for phase in ("success", "fail", *_PHASES, "cache_hit", "cache_miss")
            },
            "batch_stats": [],
        }
        for key in keys
    }
    answered, durations, images, last_pass, passes = metrics.every_worker(
        metrics.requests,
        metrics.duration,
        metrics.batch_images,
        metrics.last_pass,
        metrics.pass_seconds,
    )
    requests: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: {"ok": 0, "fail": 0})
    for sample, labels, value in _samples(answered):
        if sample.endswith("_total"):
            key = (labels["model"], labels["version"])
            requests[key]["ok" if int(labels["status"]) < 400 else "fail"] += int(value)
    totals: dict[tuple[str, str, str], list[float]] = defaultdict(lambda: [0.0, 0.0])
    for sample, labels, value in _samples(durations):
        key3 = (labels["model"], labels["version"], labels["stage"])
        if sample.endswith("_sum"):
            totals[key3][1] += value
        elif sample.endswith("_count"):
            totals[key3][0] += value
    for sample, labels, value in _samples(images):
        key = (labels["model"], labels["version"])
        if key in stats and sample.endswith("_sum"):
            stats[key]["inference_count"] = int(value)
        elif key in stats and sample.endswith("_count"):
            stats[key]["execution_count"] = int(value)
    for _sample, labels, value in _samples(last_pass):
        key = (labels["model"], labels["version"])
        if key in stats:
            stats[key]["last_inference"] = round(value * 1000)  # Triton's: ms since the epoch
    batches: dict[tuple[str, str], dict[int, list[float]]] = defaultdict(
        lambda: defaultdict(lambda: [0.0, 0.0])
    )
    for sample, labels, value in _samples(passes):
        key = (labels["model"], labels["version"])
        if sample.endswith("_count"):
            batches[key][int(labels["images"])][0] += value
        elif sample.endswith("_sum"):
            batches[key][int(labels["images"])][1] += value
    for key, entry_stats in stats.items():
        # Per pass size, the pass itself; decoding and drawing run per request, outside the
        # pass, so compute_input and compute_output are counted in inference_stats only.
        entry_stats["batch_stats"] = [
            {
                "batch_size": size,
                "compute_input": dict(zero),
                "compute_infer": {"count": int(count), "ns": round(seconds * 1e9)},
                "compute_output": dict(zero),
            }
            for size, (count, seconds) in sorted(batches[key].items())
        ]
        phases = entry_stats["inference_stats"]
        seconds = totals[(key[0], key[1], "total")][1]
        ok, fail = requests[key]["ok"], requests[key]["fail"]
        # The duration histogram does not split by status: the time is shared in proportion.
        share = ok / (ok + fail) if ok + fail else 0.0
        phases["success"] = {"count": ok, "ns": round(seconds * share * 1e9)}
        phases["fail"] = {"count": fail, "ns": round(seconds * (1 - share) * 1e9)}
        for phase, stages in _PHASES.items():
            counted = max((totals[(key[0], key[1], stage)][0] for stage in stages), default=0)
            spent = sum(totals[(key[0], key[1], stage)][1] for stage in stages)
            phases[phase] = {"count": int(counted), "ns": round(spent * 1e9)}
    return {"model_stats": list(stats.values())}
