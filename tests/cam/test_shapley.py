"""ShapleyCAM against its formula: w_k = mean_ij (g - 1/2 H A)_k, with H A computed directly."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from app.cam import GradCAM, ShapleyCAM


def test_a_quadratic_score_halves_the_gradient(quadratic):
    """S_c = 1/2 sum W_c A^2: g = W_c A and H A = W_c A, so g - 1/2 H A = 1/2 W_c A."""
    a = torch.rand(2, 4, 5, 6)
    classes = [2, 0]
    with ShapleyCAM(quadratic, "feat", input_shape=(4, 5, 6)) as extractor:
        scores = quadratic(a)
        (raw,) = extractor(classes, scores, normalized=False)
    weight = quadratic.weight.detach()[classes]  # (N, K, H, W)
    w = (0.5 * weight * a).mean(dim=(2, 3))
    expected = torch.relu((w[:, :, None, None] * a).sum(dim=1))
    torch.testing.assert_close(raw, expected, rtol=1e-5, atol=1e-6)


class SmoothHead(nn.Module):
    """feat → Softplus → 1x1 conv → GAP → Linear: the score is curved in the activation."""

    def __init__(self) -> None:
        super().__init__()
        self.feat = nn.Identity()
        self.mix = nn.Conv2d(4, 6, 1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = nn.functional.softplus(self.mix(nn.functional.softplus(self.feat(x))))
        return self.fc(hidden.mean(dim=(2, 3)))


def test_the_hessian_vector_term_matches_autograd_functional():
    torch.manual_seed(3)
    net = SmoothHead().eval()
    a = torch.randn(2, 4, 5, 5)
    classes = [1, 2]

    def score(act: torch.Tensor) -> torch.Tensor:
        return net(act)[torch.arange(2), classes].sum()

    _, grad = torch.autograd.functional.vjp(score, a)
    _, hvp = torch.autograd.functional.hvp(score, a, a)
    w = (grad - 0.5 * hvp).mean(dim=(2, 3))
    expected = torch.relu((w[:, :, None, None] * a).sum(dim=1))
    assert float(hvp.abs().max()) > 1e-3  # the second-order term is there to be checked
    with ShapleyCAM(net, "feat", input_shape=(4, 5, 5)) as extractor:
        scores = net(a)
        (raw,) = extractor(classes, scores, normalized=False)
    torch.testing.assert_close(raw, expected, rtol=1e-5, atol=1e-6)


def test_after_a_piecewise_linear_head_it_is_grad_cam(tiny_net):
    x = torch.randn(2, 3, 16, 16)
    with ShapleyCAM(tiny_net, "feat", input_shape=(3, 16, 16)) as shapley:
        with GradCAM(tiny_net, "feat", input_shape=(3, 16, 16)) as grad_cam:
            scores = tiny_net(x)
            mine = shapley([0, 1], scores, retain_graph=True)[0]
            theirs = grad_cam([0, 1], scores)[0]
    torch.testing.assert_close(mine, theirs)
    assert all(p.grad is None for p in tiny_net.parameters())


class _AttentionHead(nn.Module):
    """conv → ``feat`` → one self-attention over the positions by F.scaled_dot_product_attention
    (fused on CPU: its backward has no derivative) → mean → Linear. The softmax makes the score
    curved in A, so the Hessian term is not zero."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.feat = nn.Identity()
        self.qkv = nn.Linear(8, 24)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.feat(self.conv(x)).flatten(2).transpose(1, 2)  # (N, HW, C)
        q, k, v = self.qkv(tokens).unsqueeze(1).chunk(3, dim=-1)
        attended = F.scaled_dot_product_attention(q, k, v)[:, 0]
        return self.fc(attended.mean(1))


def test_a_fused_attention_forward_is_run_again_twice_differentiable():
    """A ViT's forward takes PyTorch's fused attention, whose backward has no derivative: the
    double backward raised torch's own 'derivative for aten::_scaled_dot_product_flash_attention_
    for_cpu_backward is not implemented'. The map now equals the one of a forward run with the
    plain attention formula, and the model's hooks and gradients are left clean."""
    torch.manual_seed(0)
    model = _AttentionHead().eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    maps = {}
    for backend in (None, SDPBackend.MATH):
        with ShapleyCAM(model, "feat", input_shape=(3, 16, 16)) as extractor:
            with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
                scores = model(x)
            maps[backend] = extractor([0, 2], scores, normalized=False)[0]
    torch.testing.assert_close(maps[None], maps[SDPBackend.MATH], rtol=1e-4, atol=1e-6)
    with GradCAM(model, "feat", input_shape=(3, 16, 16)) as extractor:
        grad_cam = extractor([0, 2], model(x), normalized=False)[0]
    assert not torch.allclose(maps[None], grad_cam)  # the second-order term is there
    assert all(p.grad is None for p in model.parameters())
    assert not model.feat._forward_hooks and not model._forward_pre_hooks


def test_an_op_without_a_second_derivative_even_run_again_is_named(tiny_net, monkeypatch):
    """When the plain re-run has no second derivative either, the error says so and names the
    methods that need the first derivative only."""
    calls = []

    def refuse(self, *args):
        calls.append(self.model.training)
        raise RuntimeError("derivative for aten::some_fused_op_backward is not implemented")

    monkeypatch.setattr(ShapleyCAM, "_shapley_weights", refuse)
    with ShapleyCAM(tiny_net, "feat", input_shape=(3, 16, 16)) as extractor:
        scores = tiny_net(torch.randn(1, 3, 16, 16))
        with pytest.raises(RuntimeError, match=r"second derivative.*some_fused_op.*Use GradCAM"):
            extractor(0, scores)
    assert len(calls) == 2  # the hooked forward's graph, then the re-run's
    assert not tiny_net.feat._forward_hooks
