"""The device is decided once from CAMSERVE_DEVICE; bad choices stop startup."""

from __future__ import annotations

import pytest
import torch

from app.models.device import describe_device, resolve_device
from app.settings import ConfigurationError


def test_cpu() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert describe_device(torch.device("cpu")) == "cpu"


def test_auto_without_cuda_is_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.parametrize("spec", ["cuda", "cuda:0"])
def test_cuda_without_cuda_stops(monkeypatch: pytest.MonkeyPatch, spec: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigurationError, match="CUDA is not available"):
        resolve_device(spec)


def test_auto_picks_most_free_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    free = {0: 1_000, 1: 9_000, 2: 5_000}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (free[i], 10_000))
    assert resolve_device("auto") == torch.device("cuda", 1)


def test_missing_cuda_index_stops(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigurationError, match=r"cuda:5.*2 CUDA device\(s\), cuda:0..cuda:1"):
        resolve_device("cuda:5")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_real_cuda_device() -> None:
    device = resolve_device("auto")
    assert device.type == "cuda"
    assert "(" in describe_device(device)
