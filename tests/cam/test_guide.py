"""The usage guide's snippets, with `from app.cam import ...` in place of the reference imports."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchvision

from app.cam import ClassificationMetric, GradCAM, LayerCAM, SmoothGradCAMpp, overlay_mask


@pytest.fixture(scope="module")
def mobilenet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.mobilenet_v2(num_classes=10).eval()


def test_own_model_by_name_or_by_module(mobilenet):
    model = mobilenet
    names = [name for name, _ in model.named_modules()]
    assert "features.7" in names
    x = torch.randn(1, 3, 224, 224)
    maps = []
    for target in ("features.7", model.features[7]):
        cam_extractor = SmoothGradCAMpp(model, target_layer=target)
        model(x)
        maps.append(cam_extractor(3)[0])
        cam_extractor.remove_hooks()
    assert maps[0].shape == (1, 14, 14)
    assert cam_extractor.target_names == ["features.7"]


def test_input_shape_for_automatic_resolution(mobilenet):
    cam_extractor = LayerCAM(mobilenet, input_shape=(3, 384, 384))
    assert cam_extractor.target_names == ["features"]
    cam_extractor.remove_hooks()


def test_fusing_layers():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    input_tensor = torch.randn(1, 3, 224, 224)
    with LayerCAM(model, ["layer2", "layer3", "layer4"]) as cam_extractor:
        out = model(input_tensor)
        class_idx = out.squeeze(0).argmax().item()
        cams = cam_extractor(class_idx, out)
        fused = cam_extractor.fuse_cams(cams)
    assert [c.shape for c in cams] == [(1, 28, 28), (1, 14, 14), (1, 7, 7)]
    assert fused.shape == (1, 28, 28)
    # "With a single layer and a single image, the map you want is cams[0].squeeze(0)."
    assert cams[2].squeeze(0).shape == (7, 7)
    from PIL import Image

    overlay = overlay_mask(Image.new("RGB", (224, 224)), fused.squeeze(0), alpha=0.5)
    assert overlay.size == (224, 224)


def test_batched_inputs():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    img1, img2, img3 = torch.randn(3, 3, 224, 224)
    input_batch = torch.stack([img1, img2, img3])
    with GradCAM(model) as cam_extractor:
        out = model(input_batch)
        class_ids = out.argmax(dim=1).tolist()
        cams = cam_extractor(class_ids, out)
    assert cams[0].shape == (3, 7, 7)


def test_3d_volume():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv3d(1, 4, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv3d(4, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool3d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    ).eval()
    volume = torch.randn(1, 1, 64, 128, 128)
    cam_extractor = GradCAM(model, target_layer="3", input_shape=(1, 64, 128, 128))
    out = model(volume)
    cam = cam_extractor(out.squeeze(0).argmax().item(), out)[0]
    assert cam.shape == (1, 16, 32, 32)
    assert cam[0, 8].cpu().numpy().shape == (32, 32)  # one depth slice


def test_classification_metric_after_training_use(mobilenet):
    metric = ClassificationMetric(GradCAM(mobilenet, "features.18"))
    metric.update(torch.randn(2, 3, 64, 64))
    summary = metric.summary()
    assert 0 <= summary["avg_drop"] <= 1 and 0 <= summary["conf_increase"] <= 1
