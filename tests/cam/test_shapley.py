"""ShapleyCAM against its formula: w_k = mean_ij (g - 1/2 H A)_k, with H A computed directly."""

from __future__ import annotations

import torch
from torch import nn

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
