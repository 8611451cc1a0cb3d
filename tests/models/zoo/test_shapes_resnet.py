"""Tests for the shipped shapes classifier (architecture and trained weights)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from app.models.zoo.shapes_dataset import CLASSES, make_dataset, to_tensor_batch
from app.models.zoo.shapes_resnet import build

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

STORE = Path(__file__).resolve().parents[3] / "model_store" / "shapes"


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    return build(num_classes=8).eval()


def test_output_shape(model: nn.Module) -> None:
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 128, 128)).shape == (2, 8)
        assert model(torch.zeros(1, 3, 96, 96)).shape == (1, 8)
    assert build(num_classes=3)(torch.zeros(1, 3, 128, 128)).shape == (1, 3)


def test_single_linear_head_fed_by_avgpool(model: nn.Module) -> None:
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert linears == ["fc"]
    assert isinstance(model.avgpool, nn.AdaptiveAvgPool2d)
    assert [name for name, _ in model.named_children()][-2:] == ["avgpool", "fc"]
    # fc(avgpool(layer3)) reproduces the forward pass, so CAM = fc weights x layer3 maps.
    x = torch.randn(2, 3, 128, 128)
    feats = {}
    handle = model.layer3.register_forward_hook(lambda m, i, o: feats.setdefault("f", o))
    with torch.no_grad():
        logits = model(x)
    handle.remove()
    manual = model.fc(model.avgpool(feats["f"]).flatten(1))
    torch.testing.assert_close(logits, manual)


def test_target_layer_spatial_size(model: nn.Module) -> None:
    feats = {}
    handle = model.layer3.register_forward_hook(lambda m, i, o: feats.setdefault("f", o))
    with torch.no_grad():
        model(torch.zeros(1, 3, 128, 128))
    handle.remove()
    h, w = feats["f"].shape[-2:]
    assert h >= 12 and w >= 12
    assert model.fc.in_features == feats["f"].shape[1]


def test_manifest_and_labels() -> None:
    manifest = tomllib.loads((STORE / "model.toml").read_text())
    assert manifest["model"]["architecture"] == "app.models.zoo.shapes_resnet:build"
    assert manifest["model"]["num_classes"] == len(CLASSES)
    assert manifest["cam"]["target_layers"] == ["layer3"]
    assert manifest["cam"]["fc_layer"] == "fc"
    assert manifest["preprocess"]["input_shape"] == [3, 128, 128]
    labels = (STORE / manifest["model"]["labels"]).read_text().split()
    assert tuple(labels) == CLASSES
    assert (STORE / manifest["model"]["weights"]).stat().st_size <= 10_000_000


def test_shipped_weights_classify_fresh_images() -> None:
    manifest = tomllib.loads((STORE / "model.toml").read_text())
    state = torch.load(STORE / manifest["model"]["weights"], weights_only=True)
    net = build(**manifest["model"]["kwargs"])
    net.load_state_dict(state)
    net.eval()
    images, _, labels = make_dataset(64, seed=424242)
    pre = manifest["preprocess"]
    x = to_tensor_batch(images, pre["mean"], pre["std"])
    with torch.no_grad():
        pred = net(x).argmax(1).numpy()
    acc = float((pred == labels).mean())
    assert acc >= 0.9, acc
