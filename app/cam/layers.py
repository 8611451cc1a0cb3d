"""Target-layer resolution: names, modules, lists, and automatic discovery by a dummy forward."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from app.cam.names import close_matches

logger = logging.getLogger(__name__)

LayerSpec = str | nn.Module | Sequence[str | nn.Module] | None


def _close_matches(name: str, candidates: list[str], n: int = 5) -> list[str]:
    matches = close_matches(name, candidates, n=n, cutoff=0.5)
    if not matches:
        # Wrapping a model shifts every name under a prefix: suggest the names that end like it.
        matches = [c for c in candidates if c.endswith("." + name) or c.endswith(name)][:n]
    return matches


def resolve_layer(model: nn.Module, layer: str | nn.Module) -> tuple[str, nn.Module]:
    """Return ``(qualified_name, module)`` for a layer given by name or by module object."""
    if isinstance(layer, str):
        modules = dict(model.named_modules())
        if layer in modules and layer != "":
            return layer, modules[layer]
        names = [n for n in modules if n]
        close = _close_matches(layer, names)
        hint = f" Closest matches: {close}." if close else ""
        raise ValueError(
            f"Unknown target layer {layer!r}: the model has no submodule with that name.{hint} "
            "List them with `[n for n, _ in model.named_modules()]`."
        )
    if isinstance(layer, nn.Module):
        for name, module in model.named_modules():
            if module is layer:
                if name == "":
                    raise ValueError(
                        "The target layer is the model itself; pass one of its submodules."
                    )
                return name, module
        raise ValueError(
            f"The target layer module ({type(layer).__name__}) is not a submodule of the model: "
            "pass a module taken from this model instance (e.g. `model.layer4`) or its name."
        )
    raise TypeError(
        f"target_layer must be a str, an nn.Module or a list of them, not {type(layer).__name__}."
    )


def resolve_layers(model: nn.Module, target_layer: LayerSpec) -> list[tuple[str, nn.Module]]:
    """Resolve a target-layer specification (name, module, or a list of either)."""
    if isinstance(target_layer, (str, nn.Module)):
        return [resolve_layer(model, target_layer)]
    if isinstance(target_layer, Sequence) and not isinstance(target_layer, (bytes, str)):
        if len(target_layer) == 0:
            raise ValueError("target_layer is an empty list: give at least one layer.")
        resolved = [resolve_layer(model, item) for item in target_layer]
        names = [name for name, _ in resolved]
        if len(set(names)) != len(names):
            raise ValueError(f"target_layer lists the same layer twice: {names}.")
        return resolved
    raise TypeError(
        "target_layer must be a str, an nn.Module, a list of them, or None, "
        f"not {type(target_layer).__name__}."
    )


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.float32


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Within this block ``model`` is in eval mode; on leaving, every submodule gets back its own
    mode. ``model.train(was_training)`` would not do: it would also put a train-mode model's
    frozen submodules (a BatchNorm kept in eval) in train mode. A model already in eval mode is
    not touched (no flag is written, so a forward of it on another thread is not disturbed)."""
    modes = [(module, module.training) for module in model.modules()]
    if not any(training for _, training in modes):
        yield
        return
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def trace_output_shapes(
    model: nn.Module, input_shape: Sequence[int]
) -> list[tuple[str, tuple[int, ...] | None]]:
    """Run a dummy forward of shape ``(1, *input_shape)`` and list, in the order their forward
    finished, each submodule's name with its output shape (``None`` when it is not a tensor).

    The model is put in eval mode for the pass (so BatchNorm statistics are not updated) and
    every submodule's mode is restored afterwards.
    """
    return trace_forward(model, input_shape)[0]


def trace_forward(
    model: nn.Module, input_shape: Sequence[int]
) -> tuple[list[tuple[str, tuple[int, ...] | None]], Any]:
    """``trace_output_shapes`` and the model's own output on the dummy input."""
    device, dtype = _model_device_dtype(model)
    order: list[tuple[str, tuple[int, ...] | None]] = []
    handles = []

    def make_hook(name: str) -> Callable[[nn.Module, object, object], None]:
        def hook(_module: nn.Module, _inputs: object, output: object) -> None:
            shape = tuple(output.shape) if isinstance(output, Tensor) else None
            order.append((name, shape))

        return hook

    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_hook(make_hook(name)))
    try:
        with eval_mode(model), torch.inference_mode():
            output = model(torch.zeros((1, *input_shape), device=device, dtype=dtype))
    finally:
        for handle in handles:
            handle.remove()
    return order, output


_RESAMPLERS = (
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.Upsample,
)
"""Layers that only resample the grid they are given to a size of their own: a map read there
is the previous layer's grid, stretched or shrunk (VGG's ``avgpool`` brings a 64 px input's 2x2
features to 7x7), so they never become the automatic target layer."""


def locate_candidate_layer(
    model: nn.Module, input_shape: Sequence[int] = (3, 224, 224)
) -> str | None:
    """Name of the last layer (in forward order) whose output still has spatial dimensions.

    A dummy input of shape ``(1, *input_shape)`` is run through the model; a layer qualifies when
    its output is a tensor of shape (N, C, *S) with at least one spatial size above 1 and it does
    more than resample its input's grid (adaptive pooling, upsampling: the layer before it is
    taken). Returns ``None`` when no layer qualifies (e.g. a Vision Transformer, whose blocks emit
    token sequences).
    """
    n_spatial = len(input_shape) - 1
    try:
        order = trace_output_shapes(model, input_shape)
    except Exception as exc:  # the dummy forward itself failed: the input shape is wrong
        raise ValueError(
            f"The dummy forward of shape (1, *{tuple(input_shape)}) used to find a target layer "
            f"failed ({type(exc).__name__}: {exc}). Pass the model's real input_shape, or give "
            "target_layer explicitly."
        ) from exc
    modules = dict(model.named_modules())
    candidate = None
    for name, shape in order:
        if shape is None:
            continue
        if len(shape) == 2 + n_spatial and any(size > 1 for size in shape[2:]):
            if not isinstance(modules.get(name), _RESAMPLERS):
                candidate = name
        elif candidate is not None and n_spatial == 2 and len(shape) == 3 and shape[1] > 1:
            # Token sequences (N, tokens, dim) after the last grid: a transformer, whose patch
            # embedding is not a meaningful CAM layer (see app.cam.vit).
            candidate = None
    return candidate
