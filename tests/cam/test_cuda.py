"""Every method on a CUDA device: maps stay on the device. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from app.cam import METHODS
from tests.fixtures_models import build_tiny_vit

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")

OPTIONS = {"SmoothGradCAMpp": {"seed": 0}, "SSCAM": {"num_samples": 2, "seed": 0}}


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
    if name not in ("SmoothGradCAMpp", "SSCAM"):  # their noise comes from per-device generators
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
