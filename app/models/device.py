"""Pick the torch device once at startup; everything else receives it."""

from __future__ import annotations

import logging

import torch

from app.settings import ConfigurationError

logger = logging.getLogger(__name__)


def resolve_device(spec: str) -> torch.device:
    """Map a ``CAMSERVE_DEVICE`` value to a usable device, or raise ConfigurationError."""
    spec = spec.strip().lower()
    if spec == "cpu":
        return torch.device("cpu")
    cuda_ok = torch.cuda.is_available()
    if spec == "auto":
        if not cuda_ok:
            return torch.device("cpu")
        return torch.device("cuda", _most_free_cuda_device())
    if not cuda_ok:
        raise ConfigurationError(
            f"CAMSERVE_DEVICE={spec}: CUDA is not available on this machine "
            "(use auto or cpu, or install a CUDA build of torch and a driver)"
        )
    if spec == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    index = int(spec.removeprefix("cuda:"))
    count = torch.cuda.device_count()
    if index >= count:
        raise ConfigurationError(
            f"CAMSERVE_DEVICE={spec}: no such device; this machine has {count} CUDA "
            f"device(s), cuda:0..cuda:{count - 1}"
        )
    return torch.device("cuda", index)


def _most_free_cuda_device() -> int:
    free = [torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())]
    return max(range(len(free)), key=free.__getitem__)


def describe_device(device: torch.device) -> str:
    """A human-readable name: ``cpu`` or ``cuda:0 (NVIDIA H100 80GB HBM3)``."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def synchronize(device: torch.device) -> None:
    """Wait for the kernels this thread queued so that stage timings measure the work, not its
    launch. Only the current stream's: a whole-device wait would also wait for the pictures
    other requests draw on the lane's drawing stream, and undo the overlap."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def default_batch_size(device: torch.device) -> int:
    """Images one cross-request pass holds when CAMSERVE_MAX_BATCH_SIZE is not set.

    On CPU a batch of 8 costs about 6x one image (resnet18, 2 cores), so larger batches only
    lengthen the wait; on an accelerator one image leaves most of the chip idle."""
    return 8 if device.type == "cpu" else 32


def release_cached_memory(device: torch.device) -> None:
    """Hand the allocator's cached blocks back to the device (after an out-of-memory error)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
