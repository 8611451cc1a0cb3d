"""Guided Backpropagation and Guided Grad-CAM against direct computations, and their scope."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import _get_current_function_mode_stack

from app.cam import GradCAM, GuidedBackprop, GuidedGradCAM, guided_relus, resize_maps
from app.cam.guided import channel_abs_max, guided_gradients
from app.cam.targets import Objective


class TwoLayer(nn.Module):
    """x -> Linear -> ReLU -> Linear: dS_c/dx by the guided rule is W1^T ([z > 0] max(W2_c, 0))."""

    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 5)
        self.relu = nn.ReLU(inplace=inplace)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.relu(self.fc1(x)))


def _guided_by_hand(model: TwoLayer, x: torch.Tensor, classes: list[int]) -> torch.Tensor:
    with torch.no_grad():
        z = model.fc1(x)
        upstream = model.fc2.weight[classes]  # dS_c/dh, (N, 5)
        passed = (z > 0).float() * upstream.clamp(min=0)
        return passed @ model.fc1.weight


def _objective(classes: list[int]) -> Objective:
    return Objective(classes=torch.tensor(classes))


@pytest.mark.parametrize("inplace", [False, True])
def test_guided_gradient_of_a_two_layer_net_is_the_guided_rule(inplace: bool) -> None:
    torch.manual_seed(0)
    model = TwoLayer(inplace).eval()
    x = torch.randn(4, 6)
    classes = [0, 1, 2, 1]
    got = guided_gradients(model, x, _objective(classes))
    torch.testing.assert_close(got, _guided_by_hand(model, x, classes), rtol=1e-5, atol=1e-6)
    # ... and it is not the plain gradient (some upstream gradients are negative here).
    x_plain = x.clone().requires_grad_(True)
    score = model(x_plain).gather(1, torch.tensor(classes)[:, None]).sum()
    (plain,) = torch.autograd.grad(score, x_plain)
    assert not torch.allclose(got, plain, atol=1e-4)


class FunctionalConvNet(nn.Module):
    """conv -> F.relu in forward (no ReLU module, as in DenseNet) -> GAP -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.feat = nn.Identity()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.feat(F.relu(self.conv(x)))
        return self.fc(a.mean(dim=(2, 3)))


def _conv_guided_by_hand(model, x: torch.Tensor, classes: list[int]) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """The guided rule at the one ReLU, then the plain (linear) backward of the convolution."""
    x = x.clone().requires_grad_(True)
    z = model.conv(x)
    spatial = z.shape[2] * z.shape[3]
    upstream = (model.fc.weight[classes] / spatial)[:, :, None, None].expand_as(z)
    passed = (z > 0).float() * upstream.clamp(min=0)
    (grad,) = torch.autograd.grad((z * passed.detach()).sum(), x)
    return grad


def test_guided_backprop_covers_relu_called_as_a_function_inside_forward() -> None:
    torch.manual_seed(0)
    model = FunctionalConvNet().eval()
    x = torch.randn(2, 3, 8, 8)
    with GuidedBackprop(model, "feat", input_shape=(3, 8, 8)) as extractor:
        with torch.inference_mode():
            scores = model(x)
        maps = extractor([0, 2], scores, normalized=False)
    expected = _conv_guided_by_hand(model, x, [0, 2])
    assert extractor.input_gradients is not None
    torch.testing.assert_close(extractor.input_gradients, expected, rtol=1e-5, atol=1e-6)
    assert len(maps) == 1 and maps[0].shape == (2, 8, 8)
    torch.testing.assert_close(maps[0], expected.abs().amax(dim=1), rtol=1e-5, atol=1e-6)


def test_guided_gradcam_is_the_guided_gradient_times_the_upsampled_gradcam(tiny_net) -> None:
    x = torch.randn(2, 3, 16, 16)
    classes = [1, 2]
    with GradCAM(tiny_net, "feat", input_shape=(3, 16, 16)) as extractor:
        cam = extractor(classes, tiny_net(x), normalized=False)[0]
    guided = guided_gradients(tiny_net, x, _objective(classes))
    expected = channel_abs_max(guided * resize_maps(cam, (16, 16)).unsqueeze(1))
    with GuidedGradCAM(tiny_net, "feat", input_shape=(3, 16, 16)) as extractor:
        got = extractor(classes, tiny_net(x), normalized=False)[0]
    assert got.shape == (2, 16, 16)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def _hook_count(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )


def _plain_gradient(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(x)[:, 0].sum(), x)
    return grad


@pytest.mark.parametrize("method", [GuidedBackprop, GuidedGradCAM])
def test_the_model_is_unchanged_after_a_call_even_one_that_fails(method) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = TwoLayerConv().eval()
    x = torch.randn(2, 3, 8, 8)
    before = _plain_gradient(model, x)
    modules_before = [(n, type(m), getattr(m, "inplace", None)) for n, m in model.named_modules()]
    with method(model, "feat", input_shape=(3, 8, 8)) as extractor:
        extractor([0, 1], model(x))
        model.fail = True  # the next guided forward raises inside the guided scope
        with pytest.raises(RuntimeError, match="forward failed"):
            extractor([0, 1], model(x))
        model.fail = False
    assert _get_current_function_mode_stack() == []
    assert _hook_count(model) == 0
    assert [(n, type(m), getattr(m, "inplace", None)) for n, m in model.named_modules()] == (
        modules_before
    )
    torch.testing.assert_close(_plain_gradient(model, x), before)


class TwoLayerConv(nn.Module):
    """conv -> ReLU(inplace) -> conv -> ReLU (``feat``) -> GAP -> Linear; ``fail`` makes a
    forward whose input requires grad (the guided one) raise."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True))
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.feat = nn.ReLU()
        self.fc = nn.Linear(4, 3)
        self.fail = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fail and x.requires_grad:
            raise RuntimeError("forward failed")
        return self.fc(self.feat(self.conv(self.body(x))).mean(dim=(2, 3)))


def test_a_gradient_method_on_the_same_forward_keeps_its_plain_gradients(tiny_net) -> None:
    x = torch.randn(2, 3, 16, 16)
    with GradCAM(tiny_net, "feat", input_shape=(3, 16, 16)) as alone:
        expected = alone([0, 1], tiny_net(x))[0]
    with (
        GradCAM(tiny_net, "feat", input_shape=(3, 16, 16)) as gradcam,
        GuidedBackprop(tiny_net, "feat", input_shape=(3, 16, 16)) as guided,
    ):
        scores = tiny_net(x)
        guided([0, 1], scores)
        torch.testing.assert_close(gradcam([0, 1], scores)[0], expected)


def test_the_guided_scope_leaves_with_its_block_on_error() -> None:
    with pytest.raises(ValueError, match="inside"):
        with guided_relus():
            assert len(_get_current_function_mode_stack()) == 1
            raise ValueError("inside")
    assert _get_current_function_mode_stack() == []


def test_the_guided_scope_hooks_every_relu_entry_point() -> None:
    x = torch.randn(3, requires_grad=True)
    with guided_relus() as mode:
        y = F.relu(x * 1) + torch.relu(x * 1) + (x * 1).relu() + nn.ReLU()(x * 1)
        (x * 1).relu_()
        F.relu(x * 1, inplace=True)
    # nn.ReLU runs through F.relu: 6 entry points called, 6 outputs hooked.
    assert mode.hooked == 6
    (grad,) = torch.autograd.grad(y.sum() * -1, x)
    assert torch.equal(grad, torch.zeros(3))  # every negative upstream gradient is stopped
