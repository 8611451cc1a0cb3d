"""Every method on a CUDA device: maps stay on the device. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from app.cam import METHODS
from tests.fixtures_models import build_tiny_vit

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")

OPTIONS = {
    "SmoothGradCAMpp": {"seed": 0},
    "SSCAM": {"num_samples": 2, "seed": 0},
    "RandomCAM": {"seed": 0},
    "AblationCAM": {"ablation_ratio": 0.5},
}
#: Their draws come from per-device generators: the CPU and the GPU maps differ.
PER_DEVICE_NOISE = ("SmoothGradCAMpp", "SSCAM", "RandomCAM")


#: RefineCAM fuses several layers; LeGrad reads a Vision Transformer's blocks (found by itself).
LAYERS: dict[str, list[str] | None] = {"RefineCAM": ["conv", "feat"], "LeGrad": None}


@pytest.mark.parametrize("name", list(METHODS))
def test_maps_stay_on_the_gpu_and_match_the_cpu(tiny_net, name):
    torch.manual_seed(0)
    if name == "LeGrad":
        net, shape = build_tiny_vit().eval(), (3, 32, 32)
    else:
        net, shape = tiny_net, (3, 16, 16)
    layers = LAYERS.get(name, ["feat"])
    x = torch.randn(2, *shape)
    results = {}
    for device in ("cpu", "cuda"):
        model = net.to(device)
        with METHODS[name](model, layers, input_shape=shape, **OPTIONS.get(name, {})) as ext:
            context = torch.enable_grad() if ext.requires_grad else torch.inference_mode()
            with context:
                scores = model(x.to(device))
            maps = ext([0, 2], scores)[0]
        assert maps.device.type == device
        results[device] = maps
    if name not in PER_DEVICE_NOISE:
        torch.testing.assert_close(results["cuda"].cpu(), results["cpu"], rtol=1e-4, atol=1e-4)


EXTRA = [name for name, cls in METHODS.items() if cls.masked_forwards or cls.noisy_forwards]


@pytest.mark.parametrize("name", EXTRA)
def test_a_pass_run_in_every_pause_on_the_gpu_leaves_both_answers_as_if_alone(tiny_net, name):
    """The CUDA twin of tests/cam/test_core.py's pause test: kernels of the paused forward are
    still queued when the other pass's are, on the same stream."""
    from app.cam import GradCAM
    from app.cam.core import hook_scope

    model, shape = tiny_net.to("cuda"), (3, 16, 16)
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0)).cuda()
    y = torch.randn(2, *shape, generator=torch.Generator().manual_seed(1)).cuda()

    def guest() -> torch.Tensor:
        with hook_scope(object()), torch.inference_mode(False):
            with GradCAM(model, "feat", input_shape=shape) as ext, torch.enable_grad():
                return ext([2, 1], model(y))[0]

    def host(pause=None) -> torch.Tensor:
        options = {"batch_size": 2} if name != "SmoothGradCAMpp" else {"num_samples": 20}
        options = {**OPTIONS.get(name, {}), **options}
        with METHODS[name](model, "feat", input_shape=shape, **options) as ext:
            context = torch.enable_grad() if ext.requires_grad else torch.inference_mode()
            with context:
                scores = model(x)
            return ext([0, 2], scores, pause=pause)[0]

    guest_alone, alone = guest(), host()
    seen: list[torch.Tensor] = []
    hosted = host(pause=lambda: seen.append(guest()))
    assert len(seen) >= 4
    torch.testing.assert_close(hosted, alone, rtol=1e-5, atol=1e-5)
    for maps in seen:
        torch.testing.assert_close(maps, guest_alone, rtol=1e-5, atol=1e-5)


#: Both smoothing options where the method takes them (aug_smooth: every method).
SMOOTHING = {
    name: {o: True for o in ("eigen_smooth", "aug_smooth") if o in METHODS[name].option_names}
    for name in METHODS
}


@pytest.mark.parametrize("name", list(METHODS))
def test_the_smoothing_options_run_on_the_gpu_and_match_the_cpu(tiny_net, name):
    torch.manual_seed(0)
    if name == "LeGrad":
        net, shape = build_tiny_vit().eval(), (3, 32, 32)
    else:
        net, shape = tiny_net, (3, 16, 16)
    layers = LAYERS.get(name, ["feat"])
    x = torch.randn(2, *shape)
    results = {}
    for device in ("cpu", "cuda"):
        model = net.to(device)
        with METHODS[name](model, layers, input_shape=shape, **OPTIONS.get(name, {})) as ext:
            context = torch.enable_grad() if ext.requires_grad else torch.inference_mode()
            with context:
                scores = model(x.to(device))
            maps = ext([0, 2], scores, **SMOOTHING[name])[0]
        assert maps.device.type == device and maps.shape[0] == 2
        results[device] = maps
    if name not in ("SmoothGradCAMpp", "SSCAM"):  # their noise comes from per-device generators
        torch.testing.assert_close(results["cuda"].cpu(), results["cpu"], rtol=1e-3, atol=1e-3)


def test_gradcam_on_a_swin_runs_on_the_gpu_and_matches_the_cpu():
    from app.cam import GradCAM, hierarchical_target
    from tests.fixtures_models import build_tiny_timm_swin

    torch.manual_seed(0)
    net, shape = build_tiny_timm_swin().eval(), (3, 32, 32)
    x = torch.randn(2, *shape)
    results = {}
    for device in ("cpu", "cuda"):
        model = net.to(device)
        target = hierarchical_target(model)
        with GradCAM(
            model, target.layer, input_shape=shape, reshape_transform=target.reshape_transform
        ) as ext:
            maps = ext([0, 2], model(x.to(device)), aug_smooth=True, eigen_smooth=True)[0]
        assert maps.device.type == device and maps.shape == (2, 4, 4)
        results[device] = maps
    torch.testing.assert_close(results["cuda"].cpu(), results["cpu"], rtol=1e-3, atol=1e-3)


def test_the_new_methods_formulas_hold_on_the_gpu(quadratic):
    """ShapleyCAM's double backward, FullGrad's input and bias gradients and KPCA-CAM's eigh run
    on the device and give the CPU's maps (the formula tests check the CPU's)."""
    from app.cam import KPCACAM, FullGrad, ShapleyCAM

    a = torch.rand(2, 4, 5, 6)
    cpu = ShapleyCAM(quadratic, "feat", input_shape=(4, 5, 6))
    with cpu:
        expected = cpu([2, 0], quadratic(a), normalized=False)[0]
    model = quadratic.to("cuda")
    with ShapleyCAM(model, "feat", input_shape=(4, 5, 6)) as ext:
        got = ext([2, 0], model(a.cuda()), normalized=False)[0]
    assert got.is_cuda
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-4, atol=1e-5)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(inplace=True),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 3),
    ).eval()
    x = torch.randn(2, 3, 8, 8)
    for cls in (FullGrad, KPCACAM):
        maps = {}
        for device in ("cpu", "cuda"):
            net.to(device)
            layer = "2" if cls is KPCACAM else None
            with cls(net, layer, input_shape=(3, 8, 8)) as ext:
                context = torch.enable_grad() if ext.requires_grad else torch.inference_mode()
                with context:
                    scores = net(x.to(device))
                maps[device] = ext([0, 1], scores)[0]
        assert maps["cuda"].is_cuda
        torch.testing.assert_close(maps["cuda"].cpu(), maps["cpu"], rtol=1e-4, atol=1e-4)


def test_score_cam_on_cuda_sizes_chunks_by_time_and_bf16_keeps_the_ranking():
    import torchvision

    from app.cam import ScoreCAM, spearman_correlation

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval().cuda()
    x = torch.randn(1, 3, 96, 96, device="cuda")
    maps = {}
    for precision in ("fp32", "bf16"):
        with ScoreCAM(model, "layer3", input_shape=(3, 96, 96), precision=precision) as cam:
            with torch.inference_mode():
                scores = model(x)
            maps[precision] = cam([3], scores)[0]
        assert cam.chunk_sizes[0] == 32 and max(cam.chunk_sizes) <= 256
    assert maps["bf16"].dtype == torch.float32
    assert float(spearman_correlation(maps["bf16"][None], maps["fp32"][None])[0]) >= 0.9
