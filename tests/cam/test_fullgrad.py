"""FullGrad against a direct computation of its terms, and its completeness."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from app.cam import FullGrad
from app.cam.fullgrad import bias_layers, effective_bias


def _net() -> nn.Sequential:
    """conv (bias) → BN (eval, running stats set) → ReLU(inplace) → conv (bias, stride 2) →
    ReLU → GAP → Linear: every kind of bias FullGrad reads, and an in-place op after a BN."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(inplace=True),
        nn.Conv2d(4, 5, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(5, 3),
    )
    with torch.no_grad():
        bn = net[1]
        bn.running_mean.copy_(torch.randn(4) * 0.3)
        bn.running_var.copy_(torch.rand(4) + 0.5)
        bn.weight.copy_(torch.rand(4) + 0.5)
        bn.bias.copy_(torch.randn(4) * 0.2)
    return net.eval()


def _psi(terms: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """|.|, min-max per sample, summed over channels, resized to the input: (N, H, W)."""
    out = []
    for sample in terms.abs().double():
        scaled = (sample - sample.min()) / (sample.max() - sample.min())
        summed = scaled.sum(dim=0)[None, None]
        out.append(F.interpolate(summed, size=size, mode="bilinear", align_corners=False)[0, 0])
    return torch.stack(out)


def _direct(net: nn.Sequential, x: torch.Tensor, classes: list[int]):
    """The input and every bias layer's output, their gradients, by a hand-written forward."""
    x = x.clone().requires_grad_(True)
    z1 = net[0](x)
    z2 = net[1](z1)
    z3 = net[3](torch.relu(z2))
    logits = net[7](torch.relu(z3).mean(dim=(2, 3)))
    score = logits[torch.arange(len(classes)), classes]
    grads = torch.autograd.grad(score.sum(), [x, z1, z2, z3])
    return x, grads, score.detach(), [net[0].bias, effective_bias(net[1]), net[3].bias]


def test_the_map_is_the_sum_of_the_rescaled_input_and_bias_gradients():
    net = _net()
    x = torch.randn(2, 3, 8, 8)
    classes = [2, 0]
    xin, grads, _, biases = _direct(net, x, classes)
    size = (8, 8)
    expected = _psi(grads[0] * xin, size)
    for grad, bias in zip(grads[1:], biases, strict=True):
        expected = expected + _psi(grad * bias.detach()[None, :, None, None], size)
    with FullGrad(net, input_shape=(3, 8, 8)) as extractor:
        assert extractor.target_names == ["0", "1", "3"] == bias_layers(net)
        scores = net(x)
        (raw,) = extractor(classes, scores, normalized=False)
    assert raw.shape == (2, 8, 8)
    torch.testing.assert_close(raw.double(), expected.detach(), rtol=1e-5, atol=1e-6)


def test_the_gradients_it_reads_add_up_to_the_score():
    """Full-gradient completeness for a ReLU net: S = <dS/dx, x> + sum_l <dS/dz_l, b_l> + the
    head's bias. It holds only if each bias layer's gradient is taken before the in-place ReLU."""
    net = _net()
    x = torch.randn(2, 3, 8, 8)
    xin, grads, score, biases = _direct(net, x, [1, 2])
    total = (grads[0] * xin).sum(dim=(1, 2, 3))
    for grad, bias in zip(grads[1:], biases, strict=True):
        total = total + (grad * bias.detach()[None, :, None, None]).sum(dim=(1, 2, 3))
    total = total + net[7].bias[[1, 2]]
    torch.testing.assert_close(total.detach(), score, rtol=1e-4, atol=1e-5)
    # The extractor's recorded tensors get the same gradients as the hand-written forward.
    with FullGrad(net, input_shape=(3, 8, 8)) as extractor:
        scores = net(x)
        outputs = extractor._recorded()
        target = scores[[0, 1], [1, 2]].sum()
        recorded = torch.autograd.grad(target, [extractor._input, *outputs])
    for mine, theirs in zip(recorded, grads, strict=True):
        torch.testing.assert_close(mine, theirs)


def test_it_takes_no_layer_and_gives_one_map_at_input_resolution():
    net = _net()
    assert FullGrad.takes_layers is False and FullGrad.one_map
    with FullGrad(net, "4", input_shape=(3, 8, 8)) as extractor:  # the layer is not used
        assert extractor.target_names == ["0", "1", "3"]
        maps = extractor(0, net(torch.randn(1, 3, 8, 8)))
    assert len(maps) == 1 and maps[0].shape == (1, 8, 8)
    assert float(maps[0].max()) == pytest.approx(1.0)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())


def test_a_frozen_model_under_no_parameter_gradients_still_gets_the_input_term():
    net = _net().requires_grad_(False)
    x = torch.randn(1, 3, 8, 8)
    with FullGrad(net, input_shape=(3, 8, 8)) as extractor:
        maps = extractor(1, net(x), normalized=False)
    assert float(maps[0].sum()) > 0
    assert all(p.grad is None for p in net.parameters())


def test_refusals():
    plain = nn.Sequential(nn.Conv2d(3, 2, 3, bias=False), nn.Flatten(), nn.LazyLinear(2))
    reason = FullGrad.unavailable_reason(plain, None, (3, 8, 8))
    assert reason is not None and "no" in reason
    with pytest.raises(ValueError, match="FullGrad needs convolutions with a bias"):
        FullGrad(plain)
    net = _net().train()
    with FullGrad(net, input_shape=(3, 8, 8)) as extractor:
        scores = net(torch.randn(2, 3, 8, 8))
        with pytest.raises(ValueError, match="eval mode"):
            extractor(0, scores)
    net.eval()
    with FullGrad(net, input_shape=(3, 8, 8)) as extractor:
        with torch.inference_mode():
            scores = net(torch.randn(1, 3, 8, 8))
        with pytest.raises(RuntimeError, match="inference_mode"):
            extractor(0, scores)


class _WithAuxHead(nn.Module):
    """``_net()`` and an auxiliary head (conv + BN) that the forward calls only in train mode,
    as GoogLeNet's and Inception v3's."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _net()
        self.aux = nn.Sequential(nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.aux(self.net[:3](x))
        return self.net(x)


def test_bias_layers_the_forward_does_not_call_add_nothing():
    """GoogLeNet and Inception v3 in eval mode raised 'No activation recorded for
    ['aux1.conv.bn', 'aux2.conv.bn'] ... Pick a layer that the forward uses', though FullGrad
    takes no layer: the uncalled layers now add no term, and the map is the one without them."""
    model = _WithAuxHead().eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    maps = []
    for net in (model, model.net):
        with FullGrad(net, input_shape=(3, 8, 8)) as extractor:
            maps.append(extractor([0, 2], net(x))[0])
    torch.testing.assert_close(maps[0], maps[1])
    with FullGrad(model, input_shape=(3, 8, 8)) as extractor:
        with pytest.raises(RuntimeError, match="run a forward pass"):
            extractor(0, torch.zeros(2, 3))
