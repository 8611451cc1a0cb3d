"""Loading a store: frozen eval models on the device, broken folders reported, lookups."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torchvision

from app.errors import ModelNotFound, ModelUnavailable
from app.models.loading import build_model
from app.models.manifest import parse_manifest
from app.models.registry import ModelRegistry
from tests.fixtures_models import fixture_access


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
