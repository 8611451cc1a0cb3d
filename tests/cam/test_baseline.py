"""RandomCAM: uniform noise on the layer's grid, seeded, blind to the model and the class."""

from __future__ import annotations

import torch

from app.cam import RandomCAM


def _maps(net, seed, class_idx=0, x=None, normalized=False):
    x = torch.randn(2, 3, 16, 16) if x is None else x
    with RandomCAM(net, "feat", input_shape=(3, 16, 16), seed=seed) as extractor:
        with torch.inference_mode():
            net(x)
        return extractor(class_idx, normalized=normalized)[0]


def test_a_seeded_uniform_map_in_minus_one_one_at_the_layers_resolution(tiny_net):
    raw = _maps(tiny_net, 7)
    assert raw.shape == (2, 8, 8)
    assert float(raw.min()) >= -1 and float(raw.max()) <= 1
    expected = 2 * torch.rand((2, 8, 8), generator=torch.Generator().manual_seed(7)) - 1
    torch.testing.assert_close(raw, expected)  # a draw per sample: the images differ
    assert not torch.equal(raw[0], raw[1])
    torch.testing.assert_close(_maps(tiny_net, 7, class_idx=2, x=torch.zeros(2, 3, 16, 16)), raw)
    assert not torch.equal(_maps(tiny_net, 8), raw)
    normalized = _maps(tiny_net, 7, normalized=True)
    assert float(normalized.min()) == 0 and float(normalized.max()) == 1


def test_uniform_on_a_large_grid():
    net = torch.nn.Sequential(torch.nn.Identity())
    with RandomCAM(net, "0", input_shape=(1, 200, 200), seed=0) as extractor:
        with torch.inference_mode():
            net(torch.zeros(1, 1, 200, 200))
        raw = extractor(0, normalized=False)[0]
    assert abs(float(raw.mean())) < 0.01
    assert abs(float((raw < 0).float().mean()) - 0.5) < 0.01
