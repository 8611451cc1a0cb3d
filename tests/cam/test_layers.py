"""Target-layer resolution: by name, by module, lists, automatic, and the guide's wrapper cases."""

from __future__ import annotations

import logging

import pytest
import torch
import torchvision
from torch import nn

from app.cam import GradCAM, LayerCAM, find_fc_layer, locate_candidate_layer
from app.cam.layers import trace_output_shapes
from tests.fixtures_models import build_vgg_like


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=4).eval()


def test_by_name_module_and_list(resnet):
    assert GradCAM(resnet, "layer4").target_names == ["layer4"]
    assert GradCAM(resnet, resnet.layer3).target_names == ["layer3"]
    extractor = LayerCAM(resnet, ["layer2", resnet.layer3, "layer4"])
    assert extractor.target_names == ["layer2", "layer3", "layer4"]
    extractor.remove_hooks()


def test_unknown_name_lists_close_matches(resnet):
    with pytest.raises(ValueError, match="layer4") as info:
        GradCAM(resnet, "layer5")
    assert "Closest matches" in str(info.value)


def test_module_outside_the_model(resnet):
    with pytest.raises(ValueError, match="not a submodule"):
        GradCAM(resnet, nn.Conv2d(1, 1, 1))


@pytest.mark.parametrize("bad", [3, 2.0, {"a": 1}, b"layer4"])
def test_wrong_types(resnet, bad):
    with pytest.raises(TypeError):
        GradCAM(resnet, bad)


def test_empty_or_repeated_lists(resnet):
    with pytest.raises(ValueError, match="empty"):
        GradCAM(resnet, [])
    with pytest.raises(ValueError, match="twice"):
        GradCAM(resnet, ["layer4", resnet.layer4])


@pytest.mark.parametrize(
    ("builder", "expected"),
    [("resnet18", "layer4"), ("mobilenet_v2", "features"), ("densenet121", "features")],
)
def test_automatic_layer_is_the_last_spatial_one(builder, expected, caplog):
    model = getattr(torchvision.models, builder)(num_classes=3).eval()
    assert locate_candidate_layer(model, (3, 64, 64)) == expected
    with caplog.at_level(logging.INFO, logger="app.cam.core"):
        extractor = GradCAM(model, input_shape=(3, 64, 64))
    assert extractor.target_names == [expected]
    assert expected in caplog.text


def test_a_layer_that_only_resamples_its_grid_is_not_the_automatic_layer():
    # VGG's avgpool brings 64 px features (2x2) to 7x7: the map would be that 2x2 grid stretched
    vgg = torchvision.models.vgg11(num_classes=3).eval()
    assert dict(trace_output_shapes(vgg, (3, 64, 64)))["avgpool"] == (1, 512, 7, 7)
    assert locate_candidate_layer(vgg, (3, 64, 64)) == "features"
    assert locate_candidate_layer(build_vgg_like(), (3, 32, 32)) == "features"
    upsampled = nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=4), nn.ReLU(), nn.Upsample(scale_factor=4), nn.Flatten()
    )
    assert locate_candidate_layer(upsampled, (3, 32, 32)) == "1"


def test_automatic_resolution_keeps_training_mode_and_bn_stats():
    model = torchvision.models.resnet18(num_classes=3).train()
    before = model.bn1.running_mean.clone()
    locate_candidate_layer(model, (3, 32, 32))
    assert model.training
    torch.testing.assert_close(model.bn1.running_mean, before)


def _frozen_bn_net() -> nn.Module:
    """A train-mode model whose BatchNorm was frozen (kept in eval mode) by its user."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 2),
    ).train()
    model[1].eval()
    return model


def test_automatic_resolution_gives_each_submodule_its_own_mode_back():
    model = _frozen_bn_net()
    GradCAM(model, input_shape=(3, 8, 8)).remove_hooks()
    assert model.training and model[0].training
    assert not model[1].training  # was put back in train mode: its statistics would move


def test_find_fc_layer_gives_each_submodule_its_own_mode_back():
    model = _frozen_bn_net()
    assert find_fc_layer(model, "2", (3, 8, 8)) == "5"
    assert model.training and not model[1].training


def test_wrong_input_shape_for_automatic_resolution_is_explained():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 30 * 30, 2))
    with pytest.raises(ValueError, match="input_shape"):
        GradCAM(model)  # default (3, 224, 224) does not fit a 1-channel 32x32 model
    assert GradCAM(model, input_shape=(1, 32, 32)).target_names == ["0"]


def test_vit_has_no_automatic_layer():
    vit = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32
    )
    assert locate_candidate_layer(vit, (3, 32, 32)) is None
    with pytest.raises(ValueError, match="vit_target"):
        GradCAM(vit, input_shape=(3, 32, 32))


class Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = torchvision.models.resnet18(num_classes=4)

    def forward(self, x):
        return self.backbone(x), {"aux": x.mean()}


class LogitsOnly(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)[0]


def test_guide_wrapper_case():
    torch.manual_seed(0)
    wrapped = LogitsOnly(Backbone()).eval()
    with pytest.raises(ValueError, match=r"model\.backbone\.layer4"):
        GradCAM(wrapped, target_layer="backbone.layer4")
    names = [n for n, _ in wrapped.named_modules() if n.endswith("layer4")]
    assert names == ["model.backbone.layer4"]
    x = torch.randn(1, 3, 64, 64)
    for target in (wrapped.model.backbone.layer4, "model.backbone.layer4"):
        with GradCAM(wrapped, target_layer=target, input_shape=(3, 64, 64)) as extractor:
            out = wrapped(x)
            maps = extractor(out.squeeze(0).argmax().item(), out)
        assert maps[0].shape == (1, 2, 2)


def test_layer_with_non_tensor_output_is_explained():
    class TupleLayer(nn.Module):
        def forward(self, x):
            return x, x

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 3)
            self.pair = TupleLayer()
            self.fc = nn.Linear(2, 2)

        def forward(self, x):
            a, _ = self.pair(self.conv(x))
            return self.fc(a.mean((2, 3)))

    model = Model()
    with GradCAM(model, "pair", input_shape=(3, 8, 8)):
        with pytest.raises(TypeError, match="single tensor"):
            model(torch.randn(1, 3, 8, 8))
