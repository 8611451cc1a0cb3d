"""The service on a CUDA device: same answers as on the CPU, a real out-of-memory error, and a
job's progress and cancellation. Skipped without CUDA."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from app.cam import METHODS
from tests.conftest import assert_error, files, image_bytes
from tests.fixtures_models import write_tiny_vit
from tests.http.routes.test_explain import PER_LAYER, TINY_OPTIONS, raw_maps

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")

NOISY = {"SmoothGradCAMpp", "SSCAM"}  # per-device generators: same seed, other noise


#: The one-map methods need their own models or layers: RefineCAM two layers, LeGrad a ViT;
#: GuidedBackprop's one map comes from the input, whatever the layer.
ONE_MAP = {
    "RefineCAM": {"target_layer": "features.1,features.3"},
    "LeGrad": {},
    "GuidedBackprop": {},
}


@pytest.mark.parametrize("method", PER_LAYER + list(ONE_MAP))
def test_every_method_on_cuda_answers_as_on_the_cpu(
    client: TestClient, make_client: Callable[..., TestClient], method: str, tmp_path: Path
) -> None:
    assert set(PER_LAYER) | set(ONE_MAP) == set(METHODS)
    if method == "LeGrad":
        write_tiny_vit(tmp_path)
        client = make_client(model_store=tmp_path, default_model="vit")
        gpu = make_client(
            model_store=tmp_path, default_model="vit", device="cuda", image_lane="cpu"
        )
    else:
        # The engine on CUDA against the CPU: the same inputs (the CUDA image lane, whose
        # resampling differs by a fraction of a level, is held to its own bounds in
        # tests/pipeline/lanes/test_cuda.py).
        gpu = make_client(device="cuda", image_lane="cpu")
    form = {
        "method": method,
        "output": "raw,overlay",
        **TINY_OPTIONS.get(method, {}),
        **ONE_MAP.get(method, {}),
    }
    images = files(image_bytes(seed=1), image_bytes(seed=2))
    on_cpu = client.post("/explain", files=images, data=form).json()
    on_gpu = gpu.post("/explain", files=images, data=form)
    assert on_gpu.status_code == 200, on_gpu.text
    body = on_gpu.json()
    assert body["device"].startswith("cuda")
    np.testing.assert_allclose(
        [r["logits"] for r in body["results"]],
        [r["logits"] for r in on_cpu["results"]],
        atol=1e-4,
    )
    if method not in NOISY:
        for a, b in zip(raw_maps(body), raw_maps(on_cpu), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-3)


def test_a_real_cuda_out_of_memory_is_503_and_the_next_request_works(
    make_client: Callable[..., TestClient],
) -> None:
    gpu = make_client(device="cuda")
    module = gpu.app.state.registry.get("tiny").module  # type: ignore[attr-defined]
    calls = []

    def allocate_too_much(mod, args, out):  # type: ignore[no-untyped-def]
        calls.append(None)
        if len(calls) == 1:
            torch.empty(1 << 50, dtype=torch.uint8, device=out.device)  # 1 PiB
        return out

    handle = module.register_forward_hook(allocate_too_much)
    try:
        refused = gpu.post("/explain", files=files(image_bytes()))
        after = gpu.post("/explain", files=files(image_bytes()))
    finally:
        handle.remove()
    assert_error(refused, 503, "out_of_memory")
    assert refused.headers["retry-after"]
    assert after.status_code == 200, after.text


def test_a_job_on_cuda_reports_progress_and_stops_when_deleted(
    make_client: Callable[..., TestClient],
) -> None:
    gpu = make_client(device="cuda")
    form = {"model": "resnet", "method": "SSCAM", "num_samples": "64", "batch_size": "4"}
    job = gpu.post("/jobs", files=files(image_bytes()), data=form).json()
    deadline = time.monotonic() + 60
    while (view := gpu.get(job["url"]).json())["progress"]["done"] == 0:
        assert time.monotonic() < deadline and view["status"] in ("queued", "running"), view
        time.sleep(0.01)
    total = view["progress"]["total"]
    assert total == 256 * 64
    stopped = gpu.delete(job["url"]).json()
    assert stopped["status"] == "cancelled"
    quick = gpu.post("/explain", files=files(image_bytes()), data={"model": "resnet"})
    assert quick.status_code == 200
    assert gpu.get(job["url"]).json()["progress"]["done"] < total


@pytest.mark.parametrize("factory", ["", "build_tiny_swin", "build_tiny_timm_swin"])
def test_the_smoothing_options_and_a_swin_on_cuda_answer_as_on_the_cpu(
    client: TestClient, make_client: Callable[..., TestClient], factory: str, tmp_path: Path
) -> None:
    from tests.fixtures_models import write_tiny_swin

    if factory:
        write_tiny_swin(tmp_path, factory=factory)
        client = make_client(model_store=tmp_path, default_model="swin")
        gpu = make_client(model_store=tmp_path, default_model="swin", device="cuda")
    else:
        gpu = make_client(device="cuda")
    form = {"method": "GradCAM,ScoreCAM", "output": "raw", "eigen_smooth": "true"}
    form["aug_smooth"] = "true"
    images = files(image_bytes(seed=1), image_bytes(seed=2))
    on_cpu = client.post("/explain", files=images, data=form)
    on_gpu = gpu.post("/explain", files=images, data=form)
    assert on_cpu.status_code == 200 and on_gpu.status_code == 200, on_gpu.text
    assert on_gpu.json()["device"].startswith("cuda")
    for a, b in zip(raw_maps(on_gpu.json()), raw_maps(on_cpu.json()), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-3)
