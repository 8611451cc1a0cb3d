"""FEM against its formula, one channel and one position at a time."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from app.cam import FEM


def _direct(a: torch.Tensor, k: float) -> torch.Tensor:
    n, channels, h, w = a.shape
    out = torch.zeros(n, h, w, dtype=torch.float64)
    for s in range(n):
        for c in range(channels):
            values = a[s, c].double()
            mean = values.mean()
            std = ((values - mean) ** 2).mean().sqrt()
            for i in range(h):
                for j in range(w):
                    if values[i, j] >= mean + k * std:
                        out[s, i, j] += mean
    return torch.relu(out)


@pytest.mark.parametrize("k", [2.0, 0.5, 0.0])
def test_channel_means_over_their_k_sigma_masks(k):
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU())
    x = torch.randn(2, 3, 9, 8)
    kwargs = {} if k == 2.0 else {"k_std": k}
    with FEM(net, "1", input_shape=(3, 9, 8), **kwargs) as extractor:
        with torch.inference_mode():
            activation = net(x)
        (raw,) = extractor(None, normalized=False)
    expected = _direct(activation, k)
    assert float(expected.max()) > 0
    torch.testing.assert_close(raw.double(), expected, rtol=1e-5, atol=1e-6)


def test_class_agnostic_and_k_checked(tiny_net):
    x = torch.randn(1, 3, 16, 16)
    with FEM(tiny_net, "feat", input_shape=(3, 16, 16)) as extractor:
        with torch.inference_mode():
            tiny_net(x)
        first = extractor(0)[0]
        second = extractor(2)[0]
    torch.testing.assert_close(first, second)
    with pytest.raises(ValueError, match="k_std"):
        FEM(tiny_net, "feat", input_shape=(3, 16, 16), k_std=-1.0)
