"""An optional compiled forward per model (``[model] compile``), built and warmed at load.

``compile`` runs the plain classification forward through ``torch.compile`` (inductor);
``cudagraphs`` does the same with CUDA graphs (inductor's ``reduce-overhead``), CUDA only, with
the batch padded up to a power of two so that a few fixed shapes are recorded, not one per
batch size. ``off`` (the default) keeps the eager module everywhere.

Only the logits-only passes (``/predict``, ``run_forward_pass``) take the compiled forward. CAM
passes keep the eager module: a compiled module runs its submodules inside one graph, so the
activation a forward hook records is an intermediate of that graph with no autograd history of
its own, and ``torch.autograd.grad`` to it fails ("element 0 of tensors does not require grad";
checked with torch 2.14). Hooks added after compilation would also make it recompile.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from app.models.manifest import CompileMode

_WARM_BATCHES = (1, 2)
"""Batch sizes run at load: the second makes dynamo mark the batch dimension dynamic, so that
no later batch size compiles again while requests wait."""


class CompileRefused(ValueError):
    """The compile mode cannot run on this device; the message says what to set instead."""


def padded_size(size: int) -> int:
    """The batch a CUDA graph runs for ``size`` images: the next power of two."""
    return 1 << max(0, size - 1).bit_length()


class CompiledForward:
    """The compiled plain forward of one module: takes and gives what ``module(batch)`` does."""

    def __init__(self, module: nn.Module, mode: CompileMode, backend: str = "inductor") -> None:
        self.mode = mode
        self.pad = mode == "cudagraphs"
        self._compiled: Callable[[Tensor], Tensor] = torch.compile(
            module,
            backend=backend,
            mode="reduce-overhead" if self.pad else None,
            dynamic=False if self.pad else None,
        )

    def __call__(self, batch: Tensor) -> Tensor:
        if not self.pad:
            return self._compiled(batch)
        size = int(batch.shape[0])
        padded = padded_size(size)
        if padded > size:
            batch = torch.cat([batch, batch.new_zeros((padded - size, *batch.shape[1:]))])
        torch.compiler.cudagraph_mark_step_begin()  # type: ignore[no-untyped-call]
        # A CUDA graph's outputs are overwritten by its next replay: this pass keeps a copy.
        return self._compiled(batch)[:size].clone()

    def warm_up(self, input_shape: tuple[int, ...], device: torch.device) -> None:
        """Compile now (at load), for the shapes the first requests will bring."""
        with torch.inference_mode():
            for size in _WARM_BATCHES:
                self(torch.zeros((size, *input_shape), device=device))


def compiled_forward(
    module: nn.Module,
    mode: CompileMode,
    device: torch.device,
    input_shape: tuple[int, ...],
    backend: str = "inductor",
) -> CompiledForward | None:
    """The warmed compiled forward of ``module`` for ``mode`` (None for ``off``);
    CompileRefused where the device cannot run it."""
    if mode == "off":
        return None
    if mode == "cudagraphs" and device.type != "cuda":
        raise CompileRefused(
            f'[model] compile = "cudagraphs" needs a CUDA device; this service runs on '
            f'{device.type}: set compile = "compile" (torch.compile without CUDA graphs) or "off"'
        )
    forward = CompiledForward(module, mode, backend)
    forward.warm_up(input_shape, device)
    return forward
