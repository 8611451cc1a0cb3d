"""ModelControl: one poll applies the store's changes; the API needs explicit mode."""

from __future__ import annotations

import asyncio
import logging
import shutil
import threading
from pathlib import Path

import pytest
import torch

from app.errors import ModelBusy, ModelControlMode
from app.models.control import ModelControl
from app.models.registry import ModelEntry, ModelRegistry
from tests.fixtures_models import fixture_access
from tests.models.store_helpers import new_weights, put_tiny


def control(store: Path, mode: str) -> ModelControl:
    registry = ModelRegistry(
        store,
        torch.device("cpu"),
        "tiny",
        control=mode,  # type: ignore[arg-type]
        access=fixture_access(store),
    )
    registry.discover()
    registry.load_all()
    return ModelControl(registry, mode, poll_s=0.01)  # type: ignore[arg-type]


def test_a_poll_loads_reloads_and_unloads(tmp_path: Path) -> None:
    put_tiny(tmp_path, "tiny", seed=0)
    put_tiny(tmp_path, "gone", seed=1)
    poller = control(tmp_path, "poll")
    registry = poller.registry
    first = registry.get("tiny")
    put_tiny(tmp_path, "added", seed=2)
    new_weights(tmp_path / "tiny", seed=3)
    shutil.rmtree(tmp_path / "gone")
    asyncio.run(poller.poll())
    assert sorted(registry.names()) == ["added", "tiny"]
    assert registry.entry("added").status == "ready"
    assert registry.get("tiny") is not first
    again = registry.get("tiny")
    asyncio.run(poller.poll())  # nothing changed: nothing is rebuilt
    assert registry.get("tiny") is again


def test_a_poll_skips_a_model_that_is_busy(tmp_path: Path) -> None:
    put_tiny(tmp_path, "tiny", seed=0)
    poller = control(tmp_path, "poll")
    before = poller.registry.get("tiny")
    new_weights(tmp_path / "tiny", seed=3)
    with poller.registry.claim("tiny"):
        asyncio.run(poller.poll())
    assert poller.registry.get("tiny") is before
    asyncio.run(poller.poll())  # the next scan catches up
    assert poller.registry.get("tiny") is not before


@pytest.mark.parametrize("mode", ["none", "poll"])
def test_the_api_needs_explicit_mode(tmp_path: Path, mode: str) -> None:
    put_tiny(tmp_path, "tiny", seed=0)
    with pytest.raises(ModelControlMode, match="CAMSERVE_MODEL_CONTROL=explicit"):
        asyncio.run(control(tmp_path, mode).load("tiny"))


def test_an_api_load_holds_the_model_until_it_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    put_tiny(tmp_path, "tiny", seed=0)
    explicit = control(tmp_path, "explicit")
    registry = explicit.registry
    release = threading.Event()
    load = registry.load

    def slow_load(name: str) -> ModelEntry:
        release.wait(10)
        return load(name)

    monkeypatch.setattr(registry, "load", slow_load)

    async def two_loads() -> None:
        first = asyncio.create_task(explicit.load("tiny"))
        await asyncio.sleep(0)  # the first load runs (and waits) on its thread, holding tiny
        with pytest.raises(ModelBusy):
            await explicit.load("tiny")
        with pytest.raises(ModelBusy):
            await explicit.unload("tiny")
        release.set()
        await first

    asyncio.run(two_loads())
    asyncio.run(explicit.load("tiny"))  # released after the first


def test_a_poll_logs_a_broken_folder_once_per_change(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    put_tiny(tmp_path, "tiny", seed=0)
    poller = control(tmp_path, "poll")
    broken = put_tiny(tmp_path, "odd", seed=1, version=1)
    (broken / "²").mkdir()  # once: int("²") raised on every scan
    (broken / "model.toml").write_text("x = " + "[" * 5000 + "]" * 5000 + "\n")
    caplog.set_level(logging.INFO)
    for _ in range(3):
        asyncio.run(poller.poll())
    failures = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.getMessage() for r in failures] == [
        "model odd version 1 failed to load: model.toml nests arrays or tables too deeply"
    ]
    assert not any(r.exc_info for r in caplog.records)
    assert poller.registry.entry("odd").status == "failed"
    assert poller.registry.entry("tiny").status == "ready"
    (broken / "model.toml").write_text("[model]\n")  # a change: reported again, once
    for _ in range(2):
        asyncio.run(poller.poll())
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 2


def test_a_poll_reports_an_unexpected_error_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    put_tiny(tmp_path, "tiny", seed=0)
    poller = control(tmp_path, "poll")
    put_tiny(tmp_path, "new", seed=1)

    def broken(name: str) -> ModelEntry:
        raise RuntimeError(f"cannot load {name}")

    monkeypatch.setattr(poller.registry, "load", broken)
    for _ in range(3):
        asyncio.run(poller.poll())
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None


def test_a_store_that_is_gone_for_a_scan_unloads_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A store renamed away (a deploy that swaps it) or unmounted for one scan unloaded every
    model: requests got 404 and /ready stayed 200 with no model, then all loaded again (a
    hostile review). The scan reports it, once, and changes nothing."""
    store = tmp_path / "store"
    put_tiny(store, "tiny", seed=0)
    poller = control(store, "poll")
    before = poller.registry.get("tiny")
    store.rename(tmp_path / "away")
    for _ in range(2):
        asyncio.run(poller.poll())
    assert poller.registry.get("tiny") is before
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "cannot scan the model store" in errors[0]
    assert "the models loaded go on serving" in errors[0]
    (tmp_path / "away").rename(store)
    asyncio.run(poller.poll())
    assert poller.registry.get("tiny") is before
