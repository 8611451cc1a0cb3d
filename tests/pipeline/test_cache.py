"""The explanation cache: its key, its LRU bound, and the explainer answering from it."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import torch

from app.cam import METHODS
from app.errors import InvalidParameter, Overloaded
from app.models.registry import ModelRegistry
from app.pipeline.admission import SlotLimiter
from app.pipeline.cache import (
    ENTRY_OVERHEAD,
    ExplanationCache,
    MemoryTier,
    cacheable,
    explanation_key,
    is_random,
    model_build,
)
from app.pipeline.decoding import Upload
from app.pipeline.explainer import Explainer, ExplainParams
from app.pipeline.passes import CamPlan
from app.pipeline.rendering import RenderStyle
from app.pipeline.results import ExplainResponse
from app.settings import Settings
from tests.conftest import image_bytes
from tests.fixtures_models import fixture_access
from tests.models.store_helpers import new_weights, put_tiny


@pytest.fixture(scope="module")
def registry(store: Path) -> ModelRegistry:
    registry = ModelRegistry(store, torch.device("cpu"), "tiny", access=fixture_access(store))
    registry.discover()
    registry.load_all()
    return registry


class Seen:
    """The passes that ran and the cache's events."""

    def __init__(self) -> None:
        self.passes = 0
        self.events: list[tuple[str, str]] = []

    def on_pass(self, model: str, version: int, images: int, seconds: float) -> None:
        self.passes += 1

    def on_event(self, event: str, tier: str) -> None:
        self.events.append((event, tier))


def cached_explainer(registry: ModelRegistry, seen: Seen, capacity: int = 1 << 22) -> Explainer:
    cache = ExplanationCache(MemoryTier(capacity), on_event=seen.on_event)
    return Explainer(
        registry,
        SlotLimiter(max_running=1, max_waiting=8),
        10**7,
        on_pass=seen.on_pass,
        cache=cache,
    )


def uploads(*seeds: int, name: str = "img") -> list[Upload]:
    return [Upload(f"{name}-{seed}.png", image_bytes(seed=seed)) for seed in seeds]


Call = tuple[list[Upload], ExplainParams]


def run(explainer: Explainer, calls: list[Call], model: str = "tiny") -> list[ExplainResponse]:
    """The calls one after the other on one event loop."""

    async def all_of_them() -> list[ExplainResponse]:
        try:
            return [await explainer.explain(model, ups, params) for ups, params in calls]
        finally:
            await explainer.close()

    return asyncio.run(all_of_them())


def without_timings(answer: ExplainResponse) -> dict[str, Any]:
    body = answer.model_dump(exclude={"timings"})
    for result in body["results"]:
        result.pop("filename")
    return body


GRAD = ExplainParams(method="GradCAM", outputs=("overlay", "raw"))


# ------------------------------------------------------------------ the key


def _changed(value: Any) -> Any:
    """Another value of the same kind as ``value`` (a field's default)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    if isinstance(value, str) or value is None:
        return "other"
    if isinstance(value, tuple):
        return (*value, "other")
    if isinstance(value, dict):
        return {**value, "other": 1}
    raise AssertionError(f"no other value for {value!r}: teach _changed this kind")


def test_every_explain_parameter_is_in_the_key() -> None:
    """Read from ExplainParams' fields, so that a parameter added later is covered too."""
    plan = CamPlan("GradCAM", METHODS["GradCAM"], ("features",), (), True)
    model = ("tiny", 1, "cpu", "build")
    base = ExplainParams()
    key = explanation_key(model, ["digest"], base, [plan], RenderStyle())
    for field in dataclasses.fields(ExplainParams):
        changed = dataclasses.replace(base, **{field.name: _changed(getattr(base, field.name))})
        assert explanation_key(model, ["digest"], changed, [plan], RenderStyle()) != key, field
    assert explanation_key(model, ["digest"], ExplainParams(), [plan], RenderStyle()) == key


def test_the_model_its_build_the_images_and_the_drawing_are_in_the_key() -> None:
    plan = CamPlan("GradCAM", METHODS["GradCAM"], ("features",), (), True)
    model = ("tiny", 1, "cpu", "build")
    key = explanation_key(model, ["a"], GRAD, [plan], RenderStyle())
    others = [
        explanation_key(("tiny", 2, "cpu", "build"), ["a"], GRAD, [plan], RenderStyle()),
        explanation_key(("tiny", 1, "cuda:0", "build"), ["a"], GRAD, [plan], RenderStyle()),
        explanation_key(("tiny", 1, "cpu", "rebuilt"), ["a"], GRAD, [plan], RenderStyle()),
        explanation_key(model, ["b"], GRAD, [plan], RenderStyle()),
        explanation_key(model, ["a", "a"], GRAD, [plan], RenderStyle()),
        explanation_key(
            model, ["a"], GRAD, [dataclasses.replace(plan, layers=("x",))], RenderStyle()
        ),
        explanation_key(model, ["a"], GRAD, [plan], RenderStyle(image_format="png")),
    ]
    assert len({key, *others}) == len(others) + 1


def test_random_methods_are_those_with_a_seed_option() -> None:
    random = {name for name, cls in METHODS.items() if is_random(cls)}
    assert {"SSCAM", "SmoothGradCAMpp"} <= random
    assert not random & {"GradCAM", "ScoreCAM", "CAM", "EigenCAM"}
    smooth = METHODS["SmoothGradCAMpp"]
    assert not cacheable([CamPlan("SmoothGradCAMpp", smooth, ("f",), (), True)])
    assert cacheable([CamPlan("SmoothGradCAMpp", smooth, ("f",), (("seed", 3),), True)])


# ------------------------------------------------------------------ the memory tier


def test_the_memory_tier_drops_the_least_recently_used_at_its_bound() -> None:
    events: list[str] = []
    entry = 100 + ENTRY_OVERHEAD  # 4 bytes of key, 96 of value
    tier = MemoryTier(4 * entry, on_event=events.append)
    for name in "abcd":
        assert tier.put(name * 4, bytes(96))  # 4 fit exactly
    assert tier.held_bytes == 4 * entry and len(tier) == 4 and events == []
    assert tier.get("aaaa") == bytes(96)  # a is used again: b is now the least recent
    tier.put("eeee", bytes(96))
    assert tier.get("bbbb") is None
    assert [tier.get(k) is not None for k in ("aaaa", "cccc", "dddd", "eeee")] == [True] * 4
    assert events == ["eviction"] and tier.held_bytes == 4 * entry
    big = MemoryTier(10 * entry, on_event=events.append)
    for number in range(10):
        big.put(f"{number:04}", bytes(96))
    big.put("ffff", bytes(96 + entry))  # twice as large: the two least recent go
    assert events == ["eviction"] * 3 and big.held_bytes == 10 * entry and len(big) == 9
    assert big.get("0000") is None and big.get("0001") is None and big.get("0002") is not None


def test_many_small_answers_stay_within_the_bound() -> None:
    # Only the keys' and values' data were counted: at the smallest answers (1.7 kB) Python's
    # own bytes per entry (the index's node, the tuple, the objects' headers: 227) took the
    # tier 13% past its bound; at 600 bytes, 34%.
    capacity = 1 << 20
    tracemalloc.start()
    try:
        tier = MemoryTier(capacity)
        for number in range(5_000):
            tier.put(hashlib.blake2b(bytes(number)).hexdigest()[:64], os.urandom(600))
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert held <= capacity and tier.held_bytes <= capacity


def test_an_answer_over_a_quarter_of_the_cache_is_not_kept() -> None:
    events: list[str] = []
    tier = MemoryTier(4 * (100 + ENTRY_OVERHEAD), on_event=events.append)
    tier.put("aaaa", bytes(96))
    assert not tier.put("bbbb", bytes(97))
    assert events == ["too_large"] and tier.get("bbbb") is None and tier.get("aaaa") is not None


def test_an_entry_past_its_ttl_is_gone(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr("app.pipeline.cache.time.monotonic", lambda: now[0])
    events: list[str] = []
    tier = MemoryTier(4 * (100 + ENTRY_OVERHEAD), ttl_s=60, on_event=events.append)
    tier.put("aaaa", b"x")
    now[0] += 59
    assert tier.get("aaaa") == b"x"
    now[0] += 2
    assert tier.get("aaaa") is None and tier.held_bytes == 0 and events == ["expiry"]


def test_the_setting_sizes_the_cache_and_0_turns_it_off(store: Path) -> None:
    cache = ExplanationCache.from_settings(Settings(model_store=store, cache_mb=3))
    assert cache is not None and cache.memory.capacity == 3 * 1024 * 1024
    assert ExplanationCache.from_settings(Settings(model_store=store, cache_mb=0)) is None


# ------------------------------------------------------------------ the explainer


def test_a_repeated_explanation_is_a_hit_without_any_pass(registry: ModelRegistry) -> None:
    seen = Seen()
    first, again, renamed = run(
        cached_explainer(registry, seen),
        [(uploads(1, 2), GRAD), (uploads(1, 2), GRAD), (uploads(1, 2, name="other"), GRAD)],
    )
    assert [a.timings.cache for a in (first, again, renamed)] == ["miss", "hit", "hit"]
    assert seen.passes == 1
    assert without_timings(again) == without_timings(first) == without_timings(renamed)
    # The key is the bytes, not the names: a hit answers with the request's own file names.
    assert [r.filename for r in renamed.results] == ["other-1.png", "other-2.png"]
    assert again.timings.forward_ms == 0 and again.timings.batch_images == 0
    assert again.timings.cam_ms_by_method == {"GradCAM": 0.0}
    assert seen.events == [("miss", ""), ("hit", "memory"), ("hit", "memory")]


def test_other_images_or_parameters_miss(registry: ModelRegistry) -> None:
    seen = Seen()
    answers = run(
        cached_explainer(registry, seen),
        [
            (uploads(1), GRAD),
            (uploads(2), GRAD),
            (uploads(1), dataclasses.replace(GRAD, colormap="viridis")),
            (uploads(1), dataclasses.replace(GRAD, class_idx=(2,))),
            (uploads(1), dataclasses.replace(GRAD, method="ScoreCAM")),
            (uploads(1), dataclasses.replace(GRAD, size="64")),
        ],
    )
    assert [a.timings.cache for a in answers] == ["miss"] * 6 and seen.passes == 6


def test_a_swapped_model_never_meets_the_old_models_entries(tmp_path: Path) -> None:
    folder = put_tiny(tmp_path, "tiny", seed=0)
    registry = ModelRegistry(
        tmp_path, torch.device("cpu"), "tiny", control="explicit", access=fixture_access(tmp_path)
    )
    registry.discover()
    registry.load_all()
    seen = Seen()
    explainer = cached_explainer(registry, seen)
    params = ExplainParams(method="GradCAM", outputs=("raw",), class_idx=(0,))
    old, hit = run(explainer, [(uploads(1), params), (uploads(1), params)])
    assert (old.timings.cache, hit.timings.cache) == ("miss", "hit")

    new_weights(folder, seed=1)
    registry.load("tiny")  # the same name and version, new weights
    (new,) = run(explainer, [(uploads(1), params)])
    assert new.timings.cache == "miss" and seen.passes == 2
    assert new.version == old.version == 1
    assert new.results[0].logits != old.results[0].logits


def test_builds_whose_files_agree_in_size_and_time_are_told_apart(tmp_path: Path) -> None:
    # Two images of a reproducible build (every file's time fixed) with new weights of the
    # same size: the build was the files' names, sizes and times, so replicas of the new image
    # read the old model's explanations from the shared tier.
    builds = []
    for seed in (0, 1):
        folder = put_tiny(tmp_path / str(seed), "tiny", seed=seed)
        for path in folder.rglob("*"):
            os.utime(path, ns=(315_532_800 * 10**9,) * 2)
        registry = ModelRegistry(
            folder.parent,
            torch.device("cpu"),
            "tiny",
            control="explicit",
            access=fixture_access(folder.parent),
        )
        registry.discover()
        registry.load_all()
        builds.append(model_build(registry, registry.get("tiny")))
    assert builds[0] != builds[1]


def test_a_random_method_is_cached_only_with_a_seed(registry: ModelRegistry) -> None:
    seen = Seen()
    unseeded = ExplainParams(method="SmoothGradCAMpp", outputs=("raw",), options={"num_samples": 2})
    seeded = dataclasses.replace(unseeded, options={"num_samples": 2, "seed": 7})
    answers = run(
        cached_explainer(registry, seen),
        [
            (uploads(1), unseeded),
            (uploads(1), unseeded),
            (uploads(1), seeded),
            (uploads(1), seeded),
        ],
    )
    assert [a.timings.cache for a in answers] == ["bypass", "bypass", "miss", "hit"]
    assert seen.passes == 3
    # With a random method among several, the whole answer is random.
    both = dataclasses.replace(unseeded, method="GradCAM,SmoothGradCAMpp")
    answers = run(cached_explainer(registry, seen), [(uploads(1), both), (uploads(1), both)])
    assert [a.timings.cache for a in answers] == ["bypass", "bypass"]


def test_the_cache_evicts_the_oldest_answers_at_its_bound(registry: ModelRegistry) -> None:
    probe = Seen()
    (one,) = run(cached_explainer(registry, probe), [(uploads(1), GRAD)])
    size = len(one.model_dump_json()) + 64
    seen = Seen()
    capacity = int(size * 4.5)  # about four answers
    explainer = cached_explainer(registry, seen, capacity)
    calls = [(uploads(seed), GRAD) for seed in range(1, 8)]
    *answers, first, last = run(explainer, [*calls, (uploads(7), GRAD), (uploads(1), GRAD)])
    assert {a.timings.cache for a in answers} == {"miss"}
    assert (first.timings.cache, last.timings.cache) == ("hit", "miss")
    cache = explainer.cache
    assert cache is not None and cache.memory.held_bytes <= capacity
    evicted = [e for e, _ in seen.events].count("eviction")
    assert evicted >= 4 and len(cache.memory) == 8 - evicted


def test_without_a_cache_every_answer_says_off(registry: ModelRegistry) -> None:
    seen = Seen()
    explainer = Explainer(registry, SlotLimiter(1, 4), 10**7, on_pass=seen.on_pass)
    answers = run(explainer, [(uploads(1), GRAD), (uploads(1), GRAD)])
    assert [a.timings.cache for a in answers] == ["off", "off"] and seen.passes == 2


def test_a_bad_parameter_is_refused_even_when_cached(registry: ModelRegistry) -> None:
    explainer = cached_explainer(registry, Seen())

    async def both() -> None:
        try:
            await explainer.explain("tiny", uploads(1), GRAD)
            with pytest.raises(InvalidParameter, match="class_idx"):
                await explainer.explain(
                    "tiny", uploads(1), dataclasses.replace(GRAD, class_idx=(9,))
                )
        finally:
            await explainer.close()

    asyncio.run(both())


def test_a_hit_answers_while_the_service_is_full(registry: ModelRegistry) -> None:
    """The cache stage comes before admission: a full queue refuses misses, not hits."""
    seen = Seen()
    explainer = cached_explainer(registry, seen)
    explainer.limiter = SlotLimiter(max_running=1, max_waiting=0)

    async def full() -> ExplainResponse:
        try:
            await explainer.explain("tiny", uploads(1), GRAD)
            with explainer.limiter.admit():  # another request holds the only place
                with pytest.raises(Overloaded):
                    await explainer.explain("tiny", uploads(2), GRAD)
                return await explainer.explain("tiny", uploads(1), GRAD)
        finally:
            await explainer.close()

    assert asyncio.run(full()).timings.cache == "hit"
    assert seen.passes == 1
