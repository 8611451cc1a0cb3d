"""Eigen-CAM and EigenGrad-CAM against the formula, with the sign that keeps maps upright."""

from __future__ import annotations

import pytest
import torch

from app.cam import EigenCAM, EigenGradCAM, normalize_maps


def _principal_projection(x: torch.Tensor) -> torch.Tensor:
    """ReLU((X - mean X) v1) per sample, v1 the top eigenvector of the centred covariance,
    signed to correlate positively with the channel sum (written independently of the SVD)."""
    x = x.double()
    maps = []
    for sample in x:
        m = sample.flatten(1).T  # (P, K)
        centred = m - m.mean(0)
        _, vectors = torch.linalg.eigh(centred.T @ centred)
        v1 = vectors[:, -1]
        projection = centred @ v1
        total = m.sum(1)
        if (projection * (total - total.mean())).sum() < 0:
            projection = -projection
        maps.append(torch.relu(projection).reshape(sample.shape[1:]))
    return torch.stack(maps)


def test_eigencam_matches_the_formula_under_inference_mode(quadratic):
    torch.manual_seed(1)
    a = torch.rand(2, 4, 5, 6) - 0.3
    with EigenCAM(quadratic, "feat", input_shape=(4, 5, 6)) as extractor:
        with torch.inference_mode():
            quadratic(a)
        raw = extractor(normalized=False)[0]
        ignored = extractor([2, 1], normalized=False)[0]  # class_idx is accepted and ignored
    expected = _principal_projection(a)
    torch.testing.assert_close(raw.double(), expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ignored, raw)


def test_eigengradcam_matches_the_formula(quadratic):
    torch.manual_seed(2)
    a = torch.rand(2, 4, 5, 6) + 0.1
    classes = [0, 2]
    with EigenGradCAM(quadratic, "feat", input_shape=(4, 5, 6)) as extractor:
        raw = extractor(classes, quadratic(a), normalized=False)[0]
    g = quadratic.weight.detach()[classes] * a  # dS_c/dA = W_c * A
    expected = _principal_projection(g * a)
    torch.testing.assert_close(raw.double(), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("seed", range(8))
def test_eigencam_is_never_inverted(quadratic, seed):
    # An object (high activations in every channel) on a background: the map must peak on it,
    # whatever sign the SVD picks for this draw.
    generator = torch.Generator().manual_seed(seed)
    a = 0.1 * torch.rand(1, 4, 5, 6, generator=generator)
    a[:, :, 1:3, 2:4] += 1 + torch.rand(1, 4, 2, 2, generator=generator)
    with EigenCAM(quadratic, "feat", input_shape=(4, 5, 6)) as extractor:
        with torch.inference_mode():
            quadratic(a)
        cam = extractor()[0][0]
    inside = cam[1:3, 2:4].mean()
    outside = (cam.sum() - cam[1:3, 2:4].sum()) / (cam.numel() - 4)
    assert inside > 0.5 > outside
    assert torch.equal(cam, normalize_maps(cam[None])[0])
