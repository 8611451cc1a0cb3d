"""Tiny seeded models whose activations and gradients the engine tests can write down."""

from __future__ import annotations

import pytest
import torch
from torch import nn


class QuadraticHead(nn.Module):
    """The input is the activation A (N, K, H, W) at layer ``feat``; S_c = 1/2 sum W_c * A^2.

    So dS_c/dA = W_c * A exactly, which lets a test write the gradients down.
    """

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.feat = nn.Identity()
        self.weight = nn.Parameter(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.feat(x)
        return 0.5 * torch.einsum("nkhw,ckhw->nc", a * a, self.weight)


class TinyConvNet(nn.Module):
    """conv(3→4, stride 2) → ReLU (layer ``feat``) → GAP → Linear(4→3); channel 0 is dead."""

    def __init__(self, dims: int = 2) -> None:
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        pool = nn.AdaptiveAvgPool2d if dims == 2 else nn.AdaptiveAvgPool3d
        self.conv = conv(3, 4, 3, stride=2, padding=1)
        self.feat = nn.ReLU()
        self.pool = pool(1)
        self.fc = nn.Linear(4, 3)
        with torch.no_grad():
            self.conv.weight[0].zero_()
            self.conv.bias[0] = -1.0  # channel 0 is ReLU'd to a flat zero map

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.feat(self.conv(x))).flatten(1))


@pytest.fixture
def tiny_net() -> TinyConvNet:
    torch.manual_seed(0)
    return TinyConvNet().eval()


@pytest.fixture
def tiny_net3d() -> TinyConvNet:
    torch.manual_seed(0)
    return TinyConvNet(dims=3).eval()


@pytest.fixture
def quadratic() -> QuadraticHead:
    torch.manual_seed(0)
    return QuadraticHead(torch.randn(3, 4, 5, 6, dtype=torch.float64).float())
