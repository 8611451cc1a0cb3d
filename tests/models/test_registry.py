"""Loading a store: frozen eval models on the device, broken folders reported, lookups."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torchvision

from app.errors import InvalidModelName, ModelNotFound, ModelUnavailable
from app.models.loading import build_model
from app.models.manifest import parse_manifest
from app.models.registry import ModelEntry, ModelRegistry
from tests.fixtures_models import fixture_access
from tests.models.store_helpers import put_tiny


@pytest.fixture(scope="module")
def registry(store: Path) -> ModelRegistry:
    registry = ModelRegistry(store, torch.device("cpu"), "tiny", access=fixture_access(store))
    registry.discover()
    registry.load_all()
    return registry


def test_loads_models_frozen_in_eval_mode(registry: ModelRegistry) -> None:
    assert registry.ready
    assert {n for n, e in registry.entries.items() if e.status == "ready"} == {
        "tiny",
        "resnet",
        "vgg",
    }
    for name in ("tiny", "resnet", "vgg"):
        model = registry.get(name)
        assert not model.module.training
        assert all(not p.requires_grad for p in model.module.parameters())
        assert all(p.device.type == "cpu" for p in model.module.parameters())


def test_weights_are_the_saved_ones(registry: ModelRegistry, store: Path) -> None:
    saved = torch.load(store / "tiny" / "weights.pt", weights_only=True)
    loaded = registry.get("tiny").module.state_dict()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)


def test_broken_model_is_reported_not_fatal(registry: ModelRegistry) -> None:
    entry = registry.entry("broken")
    assert entry.status == "failed"
    assert "weights is required" in (entry.error or "")
    with pytest.raises(ModelUnavailable, match="failed to load"):
        registry.get("broken")


def test_unknown_model_lists_close_matches_first(registry: ModelRegistry) -> None:
    with pytest.raises(ModelNotFound) as caught:
        registry.get("resnt")
    assert caught.value.details == {"available": ["resnet", "broken", "tiny", "vgg"]}
    assert "resnet" in caught.value.message


def test_default_model_when_no_name(registry: ModelRegistry) -> None:
    assert registry.get(None).spec.name == "tiny"


def test_methods_that_apply(registry: ModelRegistry) -> None:
    assert registry.get("tiny").methods["CAM"] is None
    # CAM needs the layer the head pools: layer4 on a ResNet, not the manifest's layer3.
    assert "layer4" in (registry.get("resnet").methods["CAM"] or "")
    reason = registry.get("vgg").methods["CAM"]
    assert reason is not None and "Linear" in reason
    assert "GradCAM" in registry.get("vgg").applicable_methods


def test_candidate_layers(registry: ModelRegistry) -> None:
    resnet = registry.get("resnet")
    assert resnet.target_layers == ("layer3",)
    assert {"layer1", "layer2", "layer3", "layer4"} <= set(resnet.candidate_layers)
    assert "fc" not in resnet.candidate_layers


def test_wrong_target_layer_fails_with_close_matches(store: Path, tmp_path: Path) -> None:
    shutil.copytree(store / "tiny", tmp_path / "tiny")
    manifest = tmp_path / "tiny" / "model.toml"
    manifest.write_text(manifest.read_text().replace('"features"', '"featurs"'))
    registry = ModelRegistry(tmp_path, torch.device("cpu"), "tiny", access=fixture_access(tmp_path))
    registry.discover()
    registry.load_all()
    assert "close matches: features" in (registry.entry("tiny").error or "")


def test_missing_store_serves_nothing(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "nope", torch.device("cpu"), "tiny")
    registry.discover()
    assert registry.ready and registry.names() == []


def test_torchvision_weights_name_goes_to_the_builder(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copytree(store / "resnet", tmp_path / "resnet")
    manifest = tmp_path / "resnet" / "model.toml"
    text = manifest.read_text().replace('"weights.pt"', '"IMAGENET1K_V1"')
    manifest.write_text(text.replace("kwargs = { num_classes = 5 }", ""))
    seen = {}

    def fake_builder(weights: object = None, **kwargs: object) -> torch.nn.Module:
        seen["weights"] = weights
        return torchvision.models.resnet18(num_classes=5)

    monkeypatch.setattr(torchvision.models, "get_model_builder", lambda name: fake_builder)
    model, categories = build_model(parse_manifest(tmp_path / "resnet"))
    assert seen["weights"] is torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    assert categories is not None and len(categories) == 1000


def test_unknown_torchvision_architecture(store: Path, tmp_path: Path) -> None:
    shutil.copytree(store / "resnet", tmp_path / "resnet")
    manifest = tmp_path / "resnet" / "model.toml"
    manifest.write_text(manifest.read_text().replace('"resnet18"', '"resnet19"'))
    registry = ModelRegistry(tmp_path, torch.device("cpu"), "resnet")
    registry.discover()
    registry.load_all()
    error = registry.entry("resnet").error or ""
    assert "unknown torchvision architecture 'resnet19'" in error
    assert "resnet18" in error


def odd_store(root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Good models around folders that once stopped every load: a version folder "²", a
    deeply nested manifest, a folder that cannot be listed."""
    put_tiny(root, "a_good", seed=0)
    put_tiny(root, "digits", seed=1, version=1)
    (root / "digits" / "²").mkdir()
    nested = put_tiny(root, "nested", seed=2, version=1)
    (nested / "model.toml").write_text("x = " + "[" * 5000 + "]" * 5000 + "\n")
    put_tiny(root, "unreadable", seed=3)
    put_tiny(root, "z_good", seed=4)
    listing = Path.iterdir

    def iterdir(self: Path):  # type: ignore[no-untyped-def]
        if self.name == "unreadable":  # chmod 000 does not stop root, who runs these tests
            raise PermissionError(13, "Permission denied", str(self))
        return listing(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    return root


def test_one_odd_folder_does_not_stop_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    registry = ModelRegistry(
        odd_store(tmp_path, monkeypatch),
        torch.device("cpu"),
        "a_good",
        access=fixture_access(tmp_path),
    )
    registry.discover()
    registry.load_all()
    status = {name: entry.status for name, entry in registry.entries.items()}
    assert status == {
        "a_good": "ready",
        "digits": "ready",
        "nested": "failed",
        "unreadable": "failed",
        "z_good": "ready",
    }
    assert registry.ready
    assert "nests arrays or tables too deeply" in (registry.entry("nested").error or "")
    assert "Permission denied" in (registry.entry("unreadable").error or "")
    assert str(tmp_path) not in (registry.entry("unreadable").error or "")
    failures = [r for r in caplog.records if "failed to load" in r.getMessage()]
    assert len(failures) == 1  # nested (the listing problem is a warning of its own)


def test_a_load_that_breaks_outside_its_guard_fails_that_model_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    put_tiny(tmp_path, "a", seed=0)
    put_tiny(tmp_path, "b", seed=1)
    registry = ModelRegistry(tmp_path, torch.device("cpu"), "a", access=fixture_access(tmp_path))
    registry.discover()
    load = registry.load

    def flaky(name: str):  # type: ignore[no-untyped-def]
        if name == "a":
            raise RuntimeError("something nobody foresaw")
        return load(name)

    monkeypatch.setattr(registry, "load", flaky)
    registry.load_all()
    assert registry.entry("a").status == "failed"
    assert registry.entry("a").error == "RuntimeError: something nobody foresaw"
    assert registry.entry("b").status == "ready"
    assert registry.ready


def test_not_ready_while_a_model_stays_loading_past_the_bound(tmp_path: Path) -> None:
    put_tiny(tmp_path, "a", seed=0)
    registry = ModelRegistry(
        tmp_path, torch.device("cpu"), "a", access=fixture_access(tmp_path), stall_s=30
    )
    registry.discover()
    registry.load_all()
    assert registry.ready
    registry.entries = {**registry.entries, "slow": ModelEntry("slow")}
    assert registry.ready  # loading, within the bound
    registry.entries["slow"].since -= 31
    assert not registry.ready and registry.stalled() == ["slow"]
    assert registry.scanned


@pytest.mark.parametrize("call", ["load", "entry", "get"])
def test_a_name_too_long_for_a_folder_is_a_400(registry: ModelRegistry, call: str) -> None:
    with pytest.raises(InvalidModelName) as error:
        getattr(registry, call)("m" * 5000)
    assert error.value.status_code == 400 and "(5000 characters)" in error.value.message
