"""Gradient methods against their papers' formulas, on models whose gradients are known."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from app.cam import GradCAM, GradCAMpp, LayerCAM, SmoothGradCAMpp, XGradCAM, normalize_maps

GRADIENT_METHODS = [GradCAM, GradCAMpp, XGradCAM, LayerCAM, SmoothGradCAMpp]


def _relu_sum(weights: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    if weights.ndim == 2:
        weights = weights[:, :, None, None]
    return torch.relu((weights * a).sum(1))


def _expected(method: type, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The paper's map from activations ``a`` and gradients ``g`` (float64, written out)."""
    a, g = a.double(), g.double()
    if method is GradCAM:
        return _relu_sum(g.mean((2, 3)), a)
    if method is XGradCAM:
        total = a.sum((2, 3))
        return _relu_sum((a * g).sum((2, 3)) / total, a)
    if method is LayerCAM:
        return torch.relu((torch.relu(g) * a).sum(1))
    if method is GradCAMpp:
        s = a.sum((2, 3), keepdim=True)
        num = g**2
        den = 2 * g**2 + s * g**3
        alpha = torch.where(den != 0, num / torch.where(den != 0, den, 1), 0)
        return _relu_sum((alpha * torch.relu(g)).sum((2, 3)), a)
    raise AssertionError(method)


@pytest.mark.parametrize("method", [GradCAM, GradCAMpp, XGradCAM, LayerCAM])
@pytest.mark.parametrize("scale", [1.0, 1e-4])
def test_map_matches_paper_formula(quadratic, method, scale):
    with torch.no_grad():
        quadratic.weight.mul_(scale)
    a = torch.rand(2, 4, 5, 6) + 0.1
    classes = [2, 0]
    with method(quadratic, "feat", input_shape=(4, 5, 6)) as extractor:
        scores = quadratic(a)
        raw = extractor(classes, scores, normalized=False)[0]
    g = quadratic.weight.detach()[classes] * a  # dS_c/dA = W_c * A
    expected = _expected(method, a, g)
    torch.testing.assert_close(raw.double(), expected, rtol=1e-5, atol=1e-12)
    with method(quadratic, "feat", input_shape=(4, 5, 6)) as extractor:
        normalized = extractor(classes, quadratic(a))[0]
    torch.testing.assert_close(normalized.double(), normalize_maps(expected), rtol=1e-5, atol=1e-6)


def test_gradcampp_alpha_does_not_hinge_on_an_epsilon(quadratic):
    # Gradients around 1e-4 (g^2 ~ 1e-8, g^3 ~ 1e-12): alpha must still be 1 / (2 + sum(A) g).
    with torch.no_grad():
        quadratic.weight.mul_(1e-4)
    a = torch.rand(1, 4, 5, 6) + 0.5
    with GradCAMpp(quadratic, "feat", input_shape=(4, 5, 6)) as extractor:
        raw = extractor(1, quadratic(a), normalized=False)[0]
    g = (quadratic.weight.detach()[[1]] * a).double()
    s = a.double().sum((2, 3), keepdim=True)
    weights = (torch.relu(g) / (2 + s * g)).sum((2, 3))
    torch.testing.assert_close(raw.double(), _relu_sum(weights, a.double()), rtol=1e-5, atol=0)


def test_smoothgradcampp_matches_formula_with_seeded_noise(quadratic):
    a = torch.rand(2, 4, 5, 6) + 0.1
    classes = [1, 2]
    n, std, seed = 3, 0.2, 123
    with SmoothGradCAMpp(
        quadratic, "feat", input_shape=(4, 5, 6), num_samples=n, std=std, seed=seed
    ) as extractor:
        quadratic(a)
        raw = extractor(classes, normalized=False)[0]
    generator = torch.Generator().manual_seed(seed)
    w = quadratic.weight.detach()[classes].double()
    moments = [torch.zeros(2, 4, 5, 6, dtype=torch.float64) for _ in range(3)]
    for _ in range(n):
        noisy = a + std * torch.randn((1, *a.shape[1:]), generator=generator)
        g = w * noisy.double()
        for p in range(3):
            moments[p] += g ** (p + 1) / n
    d1, d2, d3 = moments
    s = a.double().sum((2, 3), keepdim=True)
    den = 2 * d2 + s * d3
    alpha = torch.where(den != 0, d2 / torch.where(den != 0, den, 1), 0)
    expected = _relu_sum((alpha * torch.relu(d1)).sum((2, 3)), a.double())
    torch.testing.assert_close(raw.double(), expected, rtol=1e-5, atol=1e-9)


def test_zero_gradients_give_zero_maps_not_nan(quadratic):
    with torch.no_grad():
        quadratic.weight.zero_()
    a = torch.rand(2, 4, 5, 6)
    for method in GRADIENT_METHODS:
        with method(quadratic, "feat", input_shape=(4, 5, 6)) as extractor:
            maps = extractor([0, 1], quadratic(a))[0]
        assert torch.isfinite(maps).all()
        assert torch.count_nonzero(maps) == 0


@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_frozen_model_plain_input_and_no_parameter_grad(tiny_net, method):
    tiny_net.requires_grad_(False)
    x = torch.randn(2, 3, 16, 16)
    with method(tiny_net, "feat", input_shape=(3, 16, 16)) as extractor:
        scores = tiny_net(x)
        maps = extractor([0, 2], scores)[0]
    assert maps.shape == (2, 8, 8)
    assert maps.max() <= 1 and maps.min() >= 0
    assert all(p.grad is None for p in tiny_net.parameters())
    assert x.grad is None


@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_trainable_model_gets_no_parameter_grad(tiny_net, method):
    x = torch.randn(2, 3, 16, 16)
    with method(tiny_net, "feat", input_shape=(3, 16, 16)) as extractor:
        maps = extractor([1, 1], tiny_net(x))[0]
    assert torch.isfinite(maps).all()
    assert all(p.grad is None for p in tiny_net.parameters())


def test_frozen_and_trainable_models_give_the_same_map(tiny_net):
    x = torch.randn(2, 3, 16, 16)
    with GradCAM(tiny_net, "feat", input_shape=(3, 16, 16)) as extractor:
        trainable = extractor([0, 1], tiny_net(x))[0]
    tiny_net.requires_grad_(False)
    with GradCAM(tiny_net, "feat", input_shape=(3, 16, 16)) as extractor:
        frozen = extractor([0, 1], tiny_net(x))[0]
    torch.testing.assert_close(trainable, frozen)


@pytest.mark.parametrize("frozen", [True, False])
def test_inplace_relu_after_target_layer(frozen):
    # ResNet blocks, DenseNet and MobileNet apply ReLU(inplace=True) right after such layers.
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4).eval()
    model.requires_grad_(not frozen)
    x = torch.randn(1, 3, 64, 64)
    for layer in ("layer4.1.bn1", "layer4.1.bn2", "layer4"):
        for method in (GradCAM, LayerCAM, GradCAMpp):
            with method(model, layer, input_shape=(3, 64, 64)) as extractor:
                scores = model(x)
                maps = extractor(0, scores)[0]
            assert torch.isfinite(maps).all()
    # The hooked forward returns the same logits as a plain one.
    with GradCAM(model, "layer4.1.bn1", input_shape=(3, 64, 64)):
        hooked = model(x)
    torch.testing.assert_close(hooked.detach(), model(x).detach())


def test_densenet_features_inplace_relu():
    torch.manual_seed(0)
    model = torchvision.models.densenet121(num_classes=3).eval().requires_grad_(False)
    with GradCAM(model, "features", input_shape=(3, 64, 64)) as extractor:
        maps = extractor(1, model(torch.randn(1, 3, 64, 64)))[0]
    assert maps.shape == (1, 2, 2) and torch.isfinite(maps).all()


def test_second_call_needs_retain_graph(tiny_net):
    x = torch.randn(1, 3, 16, 16)
    with GradCAM(tiny_net, "feat", input_shape=(3, 16, 16)) as extractor:
        scores = tiny_net(x)
        first = extractor(0, scores, retain_graph=True)[0]
        second = extractor(1, scores)[0]
        assert not torch.equal(first, second)
        with pytest.raises(RuntimeError, match="retain_graph=True"):
            extractor(2, scores)


def test_gradient_method_after_inference_mode_forward_says_what_to_change(tiny_net):
    with GradCAM(tiny_net, "feat", input_shape=(3, 16, 16)) as extractor:
        with torch.inference_mode():
            scores = tiny_net(torch.randn(1, 3, 16, 16))
        with pytest.raises(RuntimeError, match="inference_mode"):
            extractor(0, scores)


def test_gradient_method_after_no_grad_forward_says_what_to_change(tiny_net):
    with GradCAM(tiny_net, "feat", input_shape=(3, 16, 16)) as extractor:
        with torch.no_grad():
            scores = tiny_net(torch.randn(1, 3, 16, 16))
        with pytest.raises(RuntimeError, match="no_grad"):
            extractor(0, scores)


def test_gradient_methods_need_scores(tiny_net):
    with GradCAM(tiny_net, "feat", input_shape=(3, 16, 16)) as extractor:
        tiny_net(torch.randn(1, 3, 16, 16))
        with pytest.raises(ValueError, match="scores"):
            extractor(0)


def test_smoothgrad_is_seeded_and_ignores_scores(tiny_net):
    x = torch.randn(2, 3, 16, 16)
    results = []
    for _ in range(2):
        with SmoothGradCAMpp(tiny_net, "feat", input_shape=(3, 16, 16), seed=7) as extractor:
            tiny_net(x)
            results.append(extractor([0, 1])[0])
    torch.testing.assert_close(results[0], results[1])


def test_smoothgrad_works_after_inference_mode_forward(tiny_net):
    with SmoothGradCAMpp(tiny_net, "feat", input_shape=(3, 16, 16), seed=1) as extractor:
        with torch.inference_mode():
            tiny_net(torch.randn(1, 3, 16, 16))
        maps = extractor(2)[0]
    assert maps.shape == (1, 8, 8) and torch.isfinite(maps).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"num_samples": 0}, "num_samples"), ({"std": -1.0}, "std"), ({"num_samples": 1.5}, "num")],
)
def test_smoothgrad_rejects_bad_options(tiny_net, kwargs, message):
    with pytest.raises(ValueError, match=message):
        SmoothGradCAMpp(tiny_net, "feat", input_shape=(3, 16, 16), **kwargs)


def test_layercam_fusion_scales_shallow_maps_with_tanh():
    cams = [torch.tensor([[[0.0, 0.5], [1.0, 0.25]]]), torch.zeros(1, 4, 4)]
    fused = LayerCAM.fuse_cams(cams)
    expected = torch.tanh(
        2
        * torch.nn.functional.interpolate(
            cams[0][None], size=(4, 4), mode="bilinear", align_corners=False
        )[0]
    )
    torch.testing.assert_close(fused, normalize_maps(expected))


def test_no_gradient_flows_to_layers_before_target():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.LazyLinear(2)
    )
    model(torch.randn(1, 3, 8, 8))
    model.requires_grad_(False)
    with GradCAM(model, "2", input_shape=(3, 8, 8)) as extractor:
        scores = model(torch.randn(1, 3, 8, 8))
        assert scores.grad_fn is not None
        extractor(0, scores)
        # Only the part after the hooked layer was recorded.
        assert model[0].weight.grad is None


def test_smoothgrad_batch_maps_equal_single_sample_maps(quadratic):
    # Here the gradients depend on the (noisy) input, so the noise draw matters.
    a = torch.rand(3, 4, 5, 6) + 0.1
    classes = [0, 2, 1]

    def run(inputs, idx):
        with SmoothGradCAMpp(quadratic, "feat", input_shape=(4, 5, 6), seed=5) as extractor:
            quadratic(inputs)
            return extractor(idx)[0]

    batch = run(a, classes)
    for i in range(3):
        torch.testing.assert_close(
            batch[i : i + 1], run(a[i : i + 1], [classes[i]]), rtol=1e-5, atol=1e-6
        )


def test_smoothgrad_result_does_not_depend_on_how_draws_are_batched(quadratic):
    a = torch.rand(2, 4, 5, 6) + 0.1
    maps = []
    for max_batch in (1, 3, 64):
        with SmoothGradCAMpp(
            quadratic, "feat", input_shape=(4, 5, 6), num_samples=5, seed=9
        ) as extractor:
            extractor.max_batch = max_batch
            quadratic(a)
            maps.append(extractor([0, 1], normalized=False)[0])
    torch.testing.assert_close(maps[0], maps[1], rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(maps[0], maps[2], rtol=1e-5, atol=1e-9)


def test_smoothgradcampp_second_call_starts_from_the_users_input(tiny_net):
    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with SmoothGradCAMpp(tiny_net, "feat", num_samples=4, seed=0) as extractor:
        scores = tiny_net(x)
        first = extractor(0, scores, retain_graph=True)[0]
        second = extractor(0, scores)[0]
    assert second.shape == first.shape == (1, 4, 4)
    torch.testing.assert_close(second, first)
