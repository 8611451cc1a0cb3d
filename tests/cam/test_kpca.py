"""KPCA-CAM against a direct kernel PCA of the activations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from app.cam import KPCACAM
from app.cam.kpca import kernel_component


def _direct(features: np.ndarray, gamma: float) -> np.ndarray:
    """One sample (K, H, W): the first kernel principal component's projection, signed."""
    k, h, w = features.shape
    points = features.reshape(k, h * w).T  # (P, K)
    p = points.shape[0]
    kernel = np.empty((p, p))
    for i in range(p):
        for j in range(p):
            kernel[i, j] = np.exp(-gamma * np.sum((points[i] - points[j]) ** 2))
    centring = np.eye(p) - np.full((p, p), 1 / p)
    centred = centring @ kernel @ centring
    values, vectors = np.linalg.eigh(centred)
    alpha = vectors[:, -1] / np.sqrt(values[-1])  # so that the projection has norm sqrt(lambda)
    projection = centred @ alpha
    total = points.sum(axis=1)
    if np.sum(projection * (total - total.mean())) < 0:
        projection = -projection
    return np.maximum(projection, 0).reshape(h, w)


@pytest.mark.parametrize("gamma", [None, 0.05])
def test_the_map_is_the_first_kernel_component(gamma):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
    x = torch.randn(2, 3, 5, 7)
    with KPCACAM(net, "1", input_shape=(3, 5, 7), kernel_gamma=gamma) as extractor:
        with torch.inference_mode():
            features = net(x).numpy().astype(np.float64)
            (raw,) = extractor(None, None, normalized=False)
    for sample in range(2):
        expected = _direct(features[sample], 1 / 6 if gamma is None else gamma)
        np.testing.assert_allclose(raw[sample].numpy(), expected, rtol=1e-4, atol=1e-5)


def test_class_agnostic_and_bounded_in_positions():
    assert KPCACAM.class_agnostic
    net = nn.Sequential(nn.Identity())
    with KPCACAM(net, "0", input_shape=(2, 65, 65)) as extractor:
        with torch.inference_mode():
            net(torch.randn(1, 2, 65, 65))
        with pytest.raises(ValueError, match="4225 x 4225"):
            extractor(0)
    with pytest.raises(ValueError, match="kernel_gamma must be a finite number > 0"):
        KPCACAM(net, "0", input_shape=(2, 4, 4), kernel_gamma=0.0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_image_does_not_fail_its_batch(bad: float) -> None:
    features = torch.rand(2, 5, 4, 4, generator=torch.Generator().manual_seed(0))
    features[0, :, 1, 1] = bad
    projection = kernel_component(features)
    assert torch.isfinite(projection).all()
    torch.testing.assert_close(projection[1:], kernel_component(features[1:]))
