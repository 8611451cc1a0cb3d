"""Build a model from its spec: weights, freezing, device, warm-up, and which CAMs apply.

The warm-up is also the load's proof: one forward on the warm-up input must give finite logits
of the manifest's class count, or the load fails (and a reload leaves the old version serving).
"""

from __future__ import annotations

import importlib
import inspect
import logging
import pickle
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from app.cam import (
    METHODS,
    UnknownMethod,
    close_matches,
    find_fc_layer,
    find_method,
    locate_candidate_layer,
)
from app.cam.hierarchical import channels_last_layers, hierarchical_target, is_hierarchical
from app.cam.layers import trace_forward
from app.cam.vit import TokensToGrid, token_grid, vit_target
from app.models.access import factory_defined_in
from app.models.compiling import CompiledForward, CompileRefused, compiled_forward
from app.models.manifest import RANDOM_WEIGHTS, TIMM_PREFIX, ManifestError, ModelSpec
from app.models.tasks import task_of
from app.models.weights import WeightsSource, torchvision_source

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class LoadedModel:
    """A model in eval mode on the service device, with what the CAM routes need to know.

    Compared and hashed by identity: a reload makes a new one beside the old, and work keyed by
    the model (its batcher) must not mix the two."""

    spec: ModelSpec
    module: nn.Module
    device: torch.device
    labels: tuple[str, ...]
    target_layers: tuple[str, ...]
    candidate_layers: tuple[str, ...]
    layer_names: frozenset[str]
    methods: dict[str, str | None]
    """Every CAM method name -> None when it applies, else the reason it does not."""
    layer_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    """Output shape of every submodule for one warm-up image, e.g. (1, 256, 16, 16)."""
    allowed_methods: frozenset[str] = frozenset()
    """Methods the manifest permits (all by default), whatever the target layer."""
    channels_last: frozenset[str] = frozenset()
    """Modules whose outputs are (N, H, W, C) grids (Swin, ``app.cam.hierarchical``); their
    ``layer_shapes`` are given as the extractors see them, (N, C, H, W)."""
    compiled: CompiledForward | None = None
    """The compiled plain forward (``[model] compile``); None: the eager module."""
    lock: threading.RLock = field(default_factory=threading.RLock)
    """Held for every pass: extractors hook the shared module, so passes of two threads must not
    overlap. Reentrant: a short pass may run between two chunks of a long one, on its thread."""

    def plain_forward(self, batch: torch.Tensor) -> torch.Tensor:
        """The model's output for a batch without hooks (logits only): compiled when the
        manifest asks. CAM passes call ``module``, which takes their hooks."""
        return (self.compiled or self.module)(batch)

    @property
    def applicable_methods(self) -> list[str]:
        return [name for name, reason in self.methods.items() if reason is None]


def _resolve_factory(architecture: str) -> Callable[..., nn.Module]:
    """The factory of a ``module:factory`` architecture (its module was found trusted when the
    manifest was read: ``app.models.access``)."""
    module_name, _, attribute = architecture.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ManifestError(
            f"architecture {architecture!r}: cannot import {module_name}: {error}"
        ) from None
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ManifestError(f"architecture {architecture!r}: {module_name} has no {attribute}")
    if not factory_defined_in(module_name, factory):
        raise ManifestError(
            f"architecture {architecture!r}: {attribute} is not defined in {module_name} (it "
            f"comes from {getattr(factory, '__module__', None) or 'elsewhere'}); name the "
            "module that defines the factory"
        )
    return factory


def build_model(spec: ModelSpec) -> tuple[nn.Module, tuple[str, ...] | None]:
    """Instantiate the architecture and load its weights; returns the labels the weights carry."""
    import torchvision.models as tvm

    kwargs: dict[str, Any] = dict(spec.kwargs)
    categories: tuple[str, ...] | None = None
    if spec.architecture.startswith(TIMM_PREFIX):
        from app.models.timm_models import build_timm, pretrained_source

        with downloads(spec, pretrained_source(spec) if spec.pretrained else None):
            model = build_timm(spec)
    elif ":" in spec.architecture:
        if spec.weights_path is None and spec.weights != RANDOM_WEIGHTS:
            raise ManifestError(
                f"weights {spec.weights!r} names torchvision weights, which only torchvision "
                "architectures take; point weights at a state_dict file instead"
            )
        model = _resolve_factory(spec.architecture)(**kwargs)
    else:
        try:
            builder = tvm.get_model_builder(spec.architecture)
        except ValueError:
            known = tvm.list_models(module=tvm)
            close = close_matches(spec.architecture, known)
            raise ManifestError(
                f"unknown torchvision architecture {spec.architecture!r}"
                + (f"; did you mean {', '.join(close)}?" if close else "")
                + " (or use package.module:factory)"
            ) from None
        if "weights_backbone" in inspect.signature(builder).parameters:
            # A detector's or segmenter's backbone would download ImageNet weights by default:
            # the manifest's weights (a file, or random) hold the whole model.
            kwargs.setdefault("weights_backbone", None)
        if spec.weights == RANDOM_WEIGHTS:
            model = builder(weights=None, **kwargs)
        elif spec.weights_path is None:
            # Torchvision downloads these into TORCH_HOME on first use; that needs internet.
            try:
                weights = tvm.get_model_weights(spec.architecture)[spec.weights]
            except KeyError:
                enum = tvm.get_model_weights(spec.architecture)
                raise ManifestError(
                    f"{spec.architecture} has no weights {spec.weights!r}; "
                    f"known: {', '.join(enum.__members__)}"
                ) from None
            categories = tuple(weights.meta.get("categories") or ()) or None
            with downloads(spec, torchvision_source(weights.url)):
                model = builder(weights=weights, **kwargs)
        else:
            model = builder(weights=None, **kwargs)
    if spec.weights_path is not None:
        model.load_state_dict(_read_state_dict(spec.weights_path))
    return model, categories


@contextmanager
def downloads(spec: ModelSpec, source: WeightsSource | None) -> Iterator[None]:
    """Turn a failed weights download into a ManifestError naming the file to put in place
    (for machines without internet) and the URL it comes from."""
    try:
        yield
    except ManifestError:
        raise
    except Exception as error:
        if source is None:
            raise
        raise ManifestError(
            f"cannot download the weights of {spec.architecture} "
            f"({type(error).__name__}: {str(error).strip() or 'no details'}). Without internet, "
            f"put the file {source.file} in place, downloaded from {source.url}, or point "
            "weights at a local state_dict file."
        ) from None


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ManifestError(
                f"{path.name} needs the safetensors package (pip install safetensors)"
            ) from None
        return load_file(str(path), device="cpu")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ManifestError(f"cannot read weights {path.name}: {_unreadable(error)}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ManifestError(f"{path.name} does not hold a state_dict")
    return state


_PICKLED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_PICKLE_OPCODE = re.compile(r"Unsupported operand \d+")


def _unreadable(error: Exception) -> str:
    """Why torch.load could not read a weights file, in the service's terms (torch's refusal
    of a pickle advises weights_only=False, which the service never does)."""
    if isinstance(error, EOFError):
        return "the file ends too early (it is empty or truncated); copy it again"
    text = str(error).strip()
    if isinstance(error, pickle.UnpicklingError) and "weights_only" in text:
        named, opcode = _PICKLED_GLOBAL.search(text), _PICKLE_OPCODE.search(text)
        what = f"it names {named[1]}" if named else opcode[0] if opcode else "not a state_dict"
        return (
            f"it holds more than tensors ({what}). Weights are read as data (torch.load with "
            "weights_only=True), never run as code: save the state_dict with "
            "torch.save(model.state_dict(), path)"
        )
    return text or type(error).__name__


def load_model(spec: ModelSpec, device: torch.device) -> LoadedModel:
    """Build, freeze, move and warm up one model, and work out which CAM methods apply."""
    module, categories = build_model(spec)
    task = task_of(spec.task)
    task.prepare(module, spec)
    module.eval().requires_grad_(False).to(device)
    if device.type == "cpu" and len(spec.input_shape) == 3:
        # oneDNN's CPU convolutions run about 1.25x faster with channels-last weights (measured on
        # resnet18); the values agree with the contiguous layout to float rounding.
        module.to(memory_format=torch.channels_last)
    labels = spec.labels or categories or tuple(f"class_{i}" for i in range(spec.num_classes))
    if len(labels) != spec.num_classes:
        raise ManifestError(f"{len(labels)} labels but num_classes is {spec.num_classes}")

    channels_last = channels_last_layers(module)
    tokens = token_grid(module)
    shapes = {
        name: (shape[0], shape[3], shape[1], shape[2])
        if name in channels_last and len(shape) == 4
        # A ViT's token layers as the extractors lay them out (app.cam.vit.token_grid).
        else tokens.grid_shape(shape)
        if tokens is not None and len(spec.input_shape) == 3 and tokens.fits(shape)
        else shape
        for name, shape in _warm_up(module, spec).items()
    }
    _check_finite(module)
    layer_names = frozenset(name for name, _ in module.named_modules() if name)
    preset = _preset_layers(module, tokens)
    candidates = _candidate_layers(shapes, preset[0] if tokens is not None else None)
    missing = [name for name in spec.target_layers if name not in layer_names]
    if missing:
        close = close_matches(missing[0], sorted(layer_names))
        raise ManifestError(
            f"[cam] target layer {missing[0]!r} is not a module of the model"
            + (f"; close matches: {', '.join(close)}" if close else "")
        )
    if spec.fc_layer is not None and spec.fc_layer not in layer_names:
        raise ManifestError(f"[cam] fc_layer {spec.fc_layer!r} is not a module of the model")
    target_layers = (
        spec.target_layers
        or task.preset_layers(spec, layer_names)
        or preset
        or _default_layers(module, spec, candidates)
    )
    methods, allowed = applicable_methods(module, spec, target_layers)
    for name in methods:
        methods[name] = methods[name] or task.method_reason(name)
    try:
        compiled = compiled_forward(module, spec.compile, device, spec.input_shape)
    except CompileRefused as error:
        raise ManifestError(str(error)) from None
    return LoadedModel(
        spec=spec,
        module=module,
        device=device,
        labels=labels,
        target_layers=target_layers,
        candidate_layers=candidates,
        layer_names=layer_names,
        methods=methods,
        allowed_methods=allowed,
        layer_shapes=shapes,
        channels_last=channels_last,
        compiled=compiled,
    )


def _candidate_layers(shapes: dict[str, tuple[int, ...]], last: str | None) -> tuple[str, ...]:
    """The layers worth trying, offered in ``/models`` and on the page: those with a grid, at
    most one dot deep, in forward order. A ViT's end at ``last``, its preset (included): past
    its last block's first norm the patch tokens no longer reach the class token that the head
    reads, so every gradient map there is blank (torchvision's ``encoder.layers``,
    ``encoder.ln`` and ``encoder`` were offered and gave zeros)."""
    names: list[str] = []
    for name, shape in shapes.items():
        if name == last:
            return (*names, name)
        if len(shape) == 4 and shape[2] * shape[3] > 1 and name.count(".") <= 1:
            names.append(name)
    return tuple(names)


def _check_finite(module: nn.Module) -> None:
    """Refuse weights with a NaN or infinite parameter, or a NaN buffer (a norm's running
    statistics), after the warm-up, whose probe names them in a classifier's logits: a detector
    drops NaN scores and a segmenter's output is not probed, so such weights served, answering
    no box or only background. A buffer may hold infinities on purpose (an attention mask's
    -inf), so only its NaNs are refused."""
    for name, parameter in module.named_parameters():
        _refuse_where(name, "parameter", ~torch.isfinite(parameter), "NaN or infinite")
    for name, buffer in module.named_buffers():
        if buffer.is_floating_point() or buffer.is_complex():
            _refuse_where(name, "buffer", torch.isnan(buffer), "NaN")


def _refuse_where(name: str, kind: str, bad: torch.Tensor, what: str) -> None:
    if bool(bad.any()):
        raise ManifestError(
            f"{kind} {name} holds {int(bad.sum())} of {bad.numel()} values that are {what}; the "
            "weights are broken (check the checkpoint)"
        )


def _warm_up(module: nn.Module, spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """One forward on zeros (on the module's device); records every submodule's output shape
    (its first call's) and proves the output is the task's (for a classifier: ``num_classes``
    logits, all finite)."""
    order, out = trace_forward(module, spec.input_shape)
    shapes: dict[str, tuple[int, ...]] = {}
    for name, shape in order:
        shapes.setdefault(name, shape or ())
    task_of(spec.task).check_output(out, spec)
    return shapes


def _preset_layers(module: nn.Module, tokens: TokensToGrid | None) -> tuple[str, ...]:
    """The target layer preset for a transformer, if any: a Swin's final norm, a ViT's last
    block's first norm (``vit_target``: the class token still reads its patch tokens there).
    ``tokens``: the model's ``token_grid``, None when it is no recognised ViT."""
    if tokens is not None:
        return (vit_target(module).layer_name,)
    if not is_hierarchical(module):
        return ()
    try:
        return (hierarchical_target(module).layer_name,)
    except ValueError:  # channels-last, but no final norm to hook: the generic search decides
        return ()


def _default_layers(
    module: nn.Module, spec: ModelSpec, candidates: tuple[str, ...]
) -> tuple[str, ...]:
    layer = locate_candidate_layer(module, spec.input_shape)
    if layer is None and candidates:
        layer = candidates[-1]
    if layer is None:
        raise ManifestError("no [cam] target_layers given and no convolutional layer was found")
    return (layer,)


def applicable_methods(
    module: nn.Module, spec: ModelSpec, target_layers: tuple[str, ...]
) -> tuple[dict[str, str | None], frozenset[str]]:
    """Method name -> None when it applies to this model, else the reason it does not; and the
    methods the manifest allows."""
    result: dict[str, str | None] = {}
    layer: str | list[str] = target_layers[0] if len(target_layers) == 1 else list(target_layers)
    for name, cls in METHODS.items():
        reason = None
        if cls.reads_head and spec.fc_layer is None:
            try:
                find_fc_layer(module, layer, spec.input_shape)
            except ValueError as error:
                reason = str(error)
        result[name] = reason or cls.unavailable_reason(module, layer, spec.input_shape)
    if result.get("LeGrad") and spec.architecture.startswith(TIMM_PREFIX):
        if hasattr(module, "blocks") and hasattr(module, "patch_embed"):
            result["LeGrad"] = (
                "LeGrad reads the attention of torchvision's VisionTransformer blocks "
                "(nn.MultiheadAttention); this timm ViT computes attention in timm's own "
                "Attention module, which LeGrad cannot read. To use LeGrad, serve the ViT as a "
                'torchvision architecture in model.toml ([model] architecture = "vit_b_16" or '
                "another torchvision ViT)."
            )
    if spec.allowed_methods is not None:
        allowed = set()
        for wanted in spec.allowed_methods:
            try:
                allowed.add(find_method(wanted)[0])
            except UnknownMethod as error:
                raise ManifestError(f"[cam] allowed_methods: {error}") from None
        for name in result:
            if name not in allowed and result[name] is None:
                result[name] = f"not in this model's allowed_methods ({', '.join(sorted(allowed))})"
    else:
        allowed = set(METHODS)
    try:
        find_method(spec.default_method)
    except UnknownMethod as error:
        raise ManifestError(f"[cam] default_method: {error}") from None
    return result, frozenset(allowed)
