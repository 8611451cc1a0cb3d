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
