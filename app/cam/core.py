"""The base extractor shared by every CAM method.

It owns the target layers and their hooks, the checks made before a map is computed, the weighted
sum of activations, the ReLU, the normalisation and the fusion of several layers. A concrete method
only says how its channel weights are computed (``_get_weights``) and what it needs.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from functools import partial
from numbers import Integral
from typing import Any, ClassVar, NamedTuple, TypeVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from app.cam.hierarchical import (
    channels_last_layers,
    hierarchical_target,
    is_hierarchical,
    layout_transform,
)
from app.cam.layers import LayerSpec, eval_mode, locate_candidate_layer, resolve_layers
from app.cam.options import AUG_VARIANTS, SMOOTHING, SMOOTHING_NAMES, MethodOption
from app.cam.smoothing import augmented, flip_refusal, merged, principal_map
from app.cam.targets import Objective, Target, not_logits, output_length, target_list
from app.cam.vit import TokensToGrid, token_grid

logger = logging.getLogger(__name__)
_Self = TypeVar("_Self", bound="_CAM")

ClassIndex = int | Sequence[int] | Tensor
#: ``progress(done, total)``: called between chunks with the extra forwards' inputs done so far.
ProgressCallback = Callable[[int, int], None]
#: ``should_stop()``: asked between chunks; ``True`` ends the call with ``CamInterrupted``.
StopCheck = Callable[[], bool]
#: ``pause()``: called inside the extra forwards, before each of the model's leaf modules runs,
#: on the caller's thread. The caller may run other passes on the model there, each in a hook
#: scope of its own (``hook_scope``); the forward then resumes where it stopped.
PauseCallback = Callable[[], None]


class ExtraForwards(NamedTuple):
    """The forwards a CAM call runs besides the model's own: one per image, channel and sample
    (``channels`` is 1 for noisy forwards; everything 0 for a method that runs none)."""

    images: int
    channels: int
    samples: int

    @property
    def total(self) -> int:
        return self.images * self.channels * self.samples


_state = threading.local()
_NOBODY = object()


@contextmanager
def hooks_only_for(owner: object) -> Iterator[None]:
    """Within this block, on this thread, only ``owner``'s hooks record (``_NOBODY``: none do).

    The extractors' own extra forwards (masked inputs, noisy inputs) must not overwrite what other
    extractors hooked on the same model have recorded from the user's forward.
    """
    previous = getattr(_state, "owner", None)
    _state.owner = owner
    try:
        yield
    finally:
        _state.owner = previous


def hooks_silenced() -> AbstractContextManager[None]:
    """Within this block, on this thread, no extractor's hooks record."""
    return hooks_only_for(_NOBODY)


@contextmanager
def hook_scope(scope: object) -> Iterator[None]:
    """Within this block, on this thread, extractors belong to ``scope``: those created here
    record only the forwards run here, and the extractors of other scopes record none of them.

    A caller that runs a second pass on a model between two chunks of a first one (on the same
    thread, while the first's hooks stay registered) gives each pass its own scope, so that
    activations and inputs never cross from one pass to the other. Outside every scope (the
    default) extractors record every forward of their thread, as before.
    """
    previous = getattr(_state, "scope", None), getattr(_state, "owner", None)
    _state.scope, _state.owner = scope, None
    try:
        yield
    finally:
        _state.scope, _state.owner = previous


class ForwardCount:
    """The forwards of a model counted by ``counting_forwards``."""

    def __init__(self, scope: object) -> None:
        self.calls = 0
        self.scope = scope


@contextmanager
def counting_forwards(model: nn.Module) -> Iterator[ForwardCount]:
    """Within this block, count the calls of ``model``'s forward run on this thread in the
    current hook scope: the hooked forward, masked, ablated, noisy and re-run forwards alike
    (each batch once), and none of the passes that other scopes run in a pause of them."""
    scope, thread = getattr(_state, "scope", None), threading.get_ident()
    count = ForwardCount(scope)

    def counted(_module: nn.Module, _args: Any) -> None:
        if threading.get_ident() == thread and getattr(_state, "scope", None) is scope:
            count.calls += 1

    handle = model.register_forward_pre_hook(counted)
    previous, _state.count = getattr(_state, "count", None), count
    try:
        yield count
    finally:
        _state.count = previous
        handle.remove()


def note_forward() -> None:
    """Count a forward that does not go through the model's own forward (Ablation-CAM's run of
    the model's tail from the ablated layer) in the ``counting_forwards`` of this thread."""
    count = getattr(_state, "count", None)
    if count is not None and count.scope is getattr(_state, "scope", None):
        count.calls += 1


class CamInterrupted(RuntimeError):
    """An extractor call stopped early because its ``should_stop`` check said so."""


@dataclass
class Work:
    """The progress of one extractor call over its extra forwards (masked or noisy inputs).

    Methods that run such forwards size the work once (``begin``) and ``advance`` it after each
    chunk; both report to the caller's ``progress`` and ask its ``should_stop``. The others never
    touch it, so a call of theirs reports nothing and is only checked before it starts.
    """

    progress: ProgressCallback | None = None
    should_stop: StopCheck | None = None
    pause: PauseCallback | None = None
    total: int = 0
    done: int = 0
    _armed: bool = field(default=False, repr=False)
    """Whether an extra forward is running now (``pausable``): only those pause."""

    def check(self) -> None:
        if self.should_stop is not None and self.should_stop():
            raise CamInterrupted(f"stopped by the caller after {self.done} of {self.total} inputs")

    def begin(self, total: int) -> None:
        self.total += total
        self._report()

    def advance(self, count: int) -> None:
        self.done += count
        self._report()

    def _report(self) -> None:
        if self.progress is not None:
            self.progress(self.done, self.total)
        self.check()

    @contextmanager
    def pause_points(self, model: nn.Module) -> Iterator[None]:
        """For one extractor call: ``pause`` before each leaf module of ``model`` that runs in an
        extra forward (``pausable``) on this thread. The forwards of whatever runs inside a
        pause (other passes, on this thread) do not pause again."""
        if self.pause is None:
            yield
            return
        pause, thread = self.pause, threading.get_ident()

        def before(_module: nn.Module, _args: Any) -> None:
            if not self._armed or threading.get_ident() != thread:
                return
            self._armed = False
            try:
                pause()
            finally:
                self._armed = True

        leaves = [m for m in model.modules() if next(m.children(), None) is None]
        handles = [leaf.register_forward_pre_hook(before) for leaf in leaves]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @contextmanager
    def pausable(self) -> Iterator[None]:
        """Within this block (one extra forward) the pause points are live."""
        armed, self._armed = self._armed, self.pause is not None
        try:
            yield
        finally:
            self._armed = armed


def positive_int(name: str, value: object, low: int = 1) -> int:
    """``value`` if it is an int >= ``low`` (1: a positive int), else a ``ValueError`` naming the
    option."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        what = "a positive int" if low == 1 else f"an int >= {low}"
        raise ValueError(f"{name} must be {what}, got {value!r}.")
    return value


def finite_number(
    name: str, value: object, low: float = 0.0, *, above: bool = False, high: float | None = None
) -> float:
    """``value`` as a float if it is a finite real number >= ``low`` (> ``low`` when ``above``)
    and <= ``high``, else a ``ValueError`` naming the option and the range: the one rule of the
    constructors' number options (the service's tighter bounds are the declared ones)."""
    number = math.nan
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:  # an int past float's range
            number = math.inf
    ok = (
        math.isfinite(number)
        and (number > low if above else number >= low)
        and (high is None or number <= high)
    )
    if not ok:
        if high is not None:
            span = f"lie in {'(' if above else '['}{low:g}, {high:g}]"
        else:
            span = f"be a finite number {'>' if above else '>='} {low:g}"
        raise ValueError(f"{name} must {span}, got {value!r}.")
    return number


def optional_int(name: str, value: object) -> int | None:
    """``value`` if it is an int or ``None`` (a seed), else a ``ValueError`` naming it."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{name} must be an int or None, got {value!r}.")
    return value


def seeded_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    """A generator seeded with ``seed`` on ``device``; ``None`` (torch's global one) without."""
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def normalize_maps(cams: Tensor) -> Tensor:
    """Min-max normalise each map of a batch ``(N, *S)`` to [0, 1]; a flat map becomes zeros."""
    flat = cams.flatten(1)
    low = flat.min(dim=1, keepdim=True).values
    span = flat.max(dim=1, keepdim=True).values - low
    safe_span = torch.where(span > 0, span, torch.ones_like(span))
    scaled = torch.where(span > 0, (flat - low) / safe_span, torch.zeros_like(flat))
    return scaled.clamp_(0.0, 1.0).reshape(cams.shape)


def resize_maps(cams: Tensor, size: Sequence[int]) -> Tensor:
    """Resize maps ``(N, *S)`` to ``size`` (bilinear in 2D, trilinear in 3D)."""
    if tuple(cams.shape[1:]) == tuple(size):
        return cams
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(size)]
    return F.interpolate(cams.unsqueeze(1), size=tuple(size), mode=mode, align_corners=False)[:, 0]


def _asked_list(
    classes: Sequence[ClassIndex] | None, targets: Sequence[Target | Sequence[Target]] | None
) -> list[tuple[ClassIndex | None, Target | Sequence[Target] | None]]:
    """The entries of ``explain_classes``: from exactly one of ``classes`` and ``targets``, a
    non-empty list, each entry as ``(class_idx, targets)`` of one call."""
    if (classes is None) == (targets is None):
        raise ValueError(
            "explain_classes takes exactly one of classes (one entry per class to explain) and "
            "targets= (one entry per target)."
        )
    given: object
    if targets is None:
        name, one, entry, given = "classes", "class", "an int", classes
    else:
        name, one, entry, given = "targets", "target", "a target", targets
    if isinstance(given, str | Tensor | int) or not isinstance(given, Sequence):
        raise TypeError(
            f"{name} must be a list with one entry per {one} to explain (each {entry} for every "
            f"sample, or one per sample), not {type(given).__name__}."
        )
    if not given:
        raise ValueError(f"{name} is empty: give at least one {one} to explain.")
    if targets is None:
        return [(c, None) for c in list(classes or ())]
    return [(None, t) for t in targets]


class _CAM:
    """Base class of all extractors. Not used directly: pick a method such as ``GradCAM``.

    Args:
        model: the classifier; its forward returns logits of shape (N, num_classes).
        target_layer: a layer name, a module of the model, a list of either, or ``None`` to pick
            the last layer with spatial output by a dummy forward of ``input_shape``.
        input_shape: the shape of one input without the batch dimension, (C, H, W) or (C, D, H, W).
        reshape_transform: applied to activations and gradients before use, to turn token-shaped
            outputs (N, tokens, dim) into grids (N, dim, H, W); see ``app.cam.vit``.
        enable_hooks: whether the hooks record from the start.
    """

    #: needs a forward with gradients enabled (else one under ``torch.inference_mode()`` will do)
    requires_grad: ClassVar[bool] = False
    #: reads the model's output (``scores``) of the hooked forward
    uses_scores: ClassVar[bool] = False
    #: a missing ``scores`` is recomputed by re-running the recorded input
    scores_optional: ClassVar[bool] = False
    #: records the model's input (for its own extra forwards)
    uses_input: ClassVar[bool] = False
    #: runs one extra (masked or ablated) forward per channel and image: its cost does not shrink
    #: in a batch
    masked_forwards: ClassVar[bool] = False
    #: runs extra forwards and backwards on noisy copies of the input
    noisy_forwards: ClassVar[bool] = False
    #: forwards (each with its backward) it runs of its own on the recorded input, per image and
    #: class, besides the hooked one (the guided methods' guided pass: 1)
    own_forwards: ClassVar[int] = 0
    #: explains ``targets=`` callables as well as class indices
    supports_targets: ClassVar[bool] = True
    #: the map does not depend on the class: ``class_idx`` and ``targets`` are ignored
    class_agnostic: ClassVar[bool] = False
    #: returns one map for all its target layers (a list of one tensor), not one per layer
    one_map: ClassVar[bool] = False
    #: reads the class weights of the model's head (CAM): the manifest's ``fc_layer`` applies
    reads_head: ClassVar[bool] = False
    #: ``explain_classes`` computes every class from the same work (the hooked forward, and the
    #: masked forwards' logits): its extra forwards do not grow with the number of classes
    shares_classes: ClassVar[bool] = True
    #: besides its maps, keeps the concepts it found in ``concepts`` after a call (DFF)
    gives_concepts: ClassVar[bool] = False
    #: explains the target layers it is given; ``False``: it reads the whole network and takes
    #: none (FullGrad), so a client's ``target_layer`` is refused for it
    takes_layers: ClassVar[bool] = True
    #: hooks target layers; ``False``: it reads only the model's input and output (D-RISE, a
    #: black-box method), so it resolves no layer and needs no dummy forward to find one
    hooks_layers: ClassVar[bool] = True
    #: reads what it records as maps over the input's grid (N, C, *S), laid out by the
    #: ``reshape_transform``; ``False``: it takes what it records as it is (LeGrad's tokens,
    #: FullGrad's bias terms, D-RISE's input, Guided Backpropagation's unused layers)
    reads_grids: ClassVar[bool] = True
    #: explains a detection by comparing it with the detections of masked inputs (D-RISE): a
    #: detector's pipeline gives it a ``DetectionSimilarity`` target rather than a box's score
    explains_detections: ClassVar[bool] = False
    #: the method's options, declared once (see ``app.cam.options``)
    options: ClassVar[tuple[MethodOption, ...]] = ()
    #: the names of ``options`` (derived)
    option_names: ClassVar[tuple[str, ...]] = ()
    #: takes ``eigen_smooth``: its map is a sum over channels of weighted activations. Derived
    #: (unless a class sets it): a method that computes its maps otherwise (its own ``_maps``)
    #: has none
    eigen_smoothable: ClassVar[bool] = True
    #: takes ``aug_smooth`` (every map method does, unless a class says otherwise)
    aug_smoothable: ClassVar[bool] = True
    #: whether the call running now asked for ``eigen_smooth`` (read by ``_combine``)
    _eigen_smooth: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "eigen_smoothable" not in cls.__dict__:
            cls.eigen_smoothable = cls.eigen_smoothable and cls._maps is _CAM._maps
        # The smoothing options are declared once (app.cam.options) and added to every method
        # that takes them, after its own.
        smoothing = {o.name for o in SMOOTHING}
        takes = {"eigen_smooth": cls.eigen_smoothable, "aug_smooth": cls.aug_smoothable}
        cls.options = (
            *(o for o in cls.options if o.name not in smoothing),
            *(o for o in SMOOTHING if takes[o.name]),
        )
        cls.option_names = tuple(option.name for option in cls.options)

    @classmethod
    def option(cls, name: str) -> MethodOption | None:
        """The declared option ``name``, or ``None`` when the method does not take it."""
        return next((o for o in cls.options if o.name == name), None)

    @classmethod
    def extra_forwards(
        cls, layer_shapes: Sequence[Sequence[int]], options: Mapping[str, Any], images: int
    ) -> ExtraForwards:
        """What a call on ``images`` images would run besides the model's forward, from the
        output shapes (N, C, ...) of its target layers and its options: with
        ``masked_forwards`` one forward per image, channel and sample; with ``noisy_forwards``
        one forward and backward per image and sample; ``own_forwards`` per image (the guided
        pass; counted as channels); none otherwise. ``num_samples`` defaults to the declared
        default. ``aug_smooth`` explains six variants of each image: six times those forwards,
        plus the six variants' own (counted as one more channel)."""
        variants = AUG_VARIANTS if options.get("aug_smooth") else 1
        if not (cls.masked_forwards or cls.noisy_forwards):
            channels = cls.own_forwards + (1 if variants > 1 else 0)
            return (
                ExtraForwards(images * variants, channels, 1)
                if channels
                else ExtraForwards(0, 0, 0)
            )
        declared = cls.option("num_samples")
        samples = int(options.get("num_samples", declared.default)) if declared else 1
        channels = 1
        if cls.masked_forwards:
            channels = sum(shape[1] if len(shape) >= 2 else 1 for shape in layer_shapes)
        if variants > 1:
            return ExtraForwards(images * variants, channels * samples + 1, 1)
        return ExtraForwards(images, channels, samples)

    def __init__(
        self,
        model: nn.Module,
        target_layer: LayerSpec = None,
        input_shape: Sequence[int] = (3, 224, 224),
        reshape_transform: Callable[[Tensor], Tensor] | None = None,
        enable_hooks: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, not {type(model).__name__}.")
        self.model = model
        self.input_shape = tuple(int(s) for s in input_shape)
        if len(self.input_shape) not in (3, 4):
            raise ValueError(
                f"input_shape must be (C, H, W) or (C, D, H, W), got {self.input_shape}."
            )
        if reshape_transform is not None and not callable(reshape_transform):
            raise TypeError("reshape_transform must be callable or None.")
        self.reshape_transform = reshape_transform
        if not self.hooks_layers:
            target_layer = []
        elif target_layer is None:
            target_layer = self._automatic_layer(model)
        resolved = resolve_layers(model, target_layer) if self.hooks_layers else []
        self.target_names: list[str] = [name for name, _ in resolved]
        if reshape_transform is None and self.takes_layers:
            self.reshape_transform = self._layout_of(model)
        self._target_modules: list[nn.Module] = [module for _, module in resolved]
        self._activations: list[Tensor | None] = [None] * len(resolved)
        self._input: Tensor | None = None
        self._work = Work()
        self._scope = getattr(_state, "scope", None)
        self._hooks_enabled = enable_hooks
        self._handles: list[Any] = []
        self._register_hooks()

    def _automatic_layer(self, model: nn.Module) -> str:
        """The layer explained when none is given: a Swin's final norm (the grid its head
        pools, which a dummy forward cannot tell from a (N, H, W, C) grid's other axes), else
        the last layer with a spatial output."""
        final_norm = getattr(model, "norm", None)
        if is_hierarchical(model) and isinstance(final_norm, nn.Module):
            found: str | None = hierarchical_target(model).layer_name
        else:
            found = locate_candidate_layer(model, self.input_shape)
        if found is None:
            raise ValueError(
                "No layer with a spatial output was found by a dummy forward of shape "
                f"(1, *{self.input_shape}). Give target_layer explicitly; for a Vision "
                "Transformer use app.cam.vit_target(model)."
            )
        logger.info("%s: target layer resolved automatically to %r", type(self).__name__, found)
        return found

    def _layout_of(self, model: nn.Module) -> Callable[[Tensor], Tensor] | None:
        """``ChannelsLast()`` when the target layers emit (N, H, W, C) grids (a Swin's trunk and
        final norm): read as (N, C, H, W) they gave maps over the grid's width and channels."""
        try:
            transform = layout_transform(
                channels_last_layers(model), self.target_names, fix="use one extractor for each"
            )
        except ValueError as exc:
            raise ValueError(f"{type(self).__name__}: {exc}") from None
        if transform is not None:
            logger.info(
                "%s: %s give (N, H, W, C) grids, read with reshape_transform=ChannelsLast()",
                type(self).__name__,
                self.target_names,
            )
        return cast(Callable[[Tensor], Tensor] | None, transform)

    @classmethod
    def option_problem(
        cls, layer_shapes: Sequence[Sequence[int]], options: Mapping[str, Any]
    ) -> str | None:
        """Why ``options`` do not fit target layers of these output shapes (N, C, ...), e.g.
        more DFF concepts than channels; ``None`` when they fit (decided without a forward)."""
        return None

    @classmethod
    def unavailable_reason(
        cls, model: nn.Module, target_layer: LayerSpec, input_shape: Sequence[int]
    ) -> str | None:
        """Why this method cannot run on ``model`` with ``target_layer`` (``None``: it can),
        decided from the model's structure, without a forward."""
        return None

    @classmethod
    def default_layers(cls, model: nn.Module) -> list[str] | None:
        """The layers this method explains when none are given, if it has its own (LeGrad:
        a ViT's blocks); ``None``: the caller's default target layers."""
        return None

    # ----------------------------------------------------------------------------- hooks
    def _register_hooks(self) -> None:
        for idx, module in enumerate(self._target_modules):
            self._handles.append(module.register_forward_hook(partial(self._record, idx)))
        # Every method records the model's input: its own extra forwards (``uses_input``) and
        # ``aug_smooth`` run on it.
        self._handles.append(self.model.register_forward_pre_hook(self._record_input))

    def _in_scope(self) -> bool:
        """Whether the forward running on this thread is one of this extractor's scope (not
        another pass's, run in a pause of it)."""
        return getattr(_state, "scope", None) is self._scope

    def _recording(self) -> bool:
        owner = getattr(_state, "owner", None)
        return self._hooks_enabled and self._in_scope() and (owner is None or owner is self)

    def _record_input(self, _module: nn.Module, args: tuple[Any, ...]) -> None:
        if self._recording() and args and isinstance(args[0], Tensor):
            self._input = args[0]

    def _record(self, idx: int, module: nn.Module, _inputs: Any, output: Any) -> Tensor | None:
        if not self._recording():
            return None
        if not isinstance(output, Tensor):
            raise TypeError(
                f"Target layer {self.target_names[idx]!r} returned a {type(output).__name__}, "
                "not a tensor: hook a layer that outputs a single tensor, or wrap it."
            )
        if self.requires_grad and torch.is_grad_enabled() and not output.requires_grad:
            # Frozen model or plain input: start recording the graph here, so that only the part
            # after the target layer is recorded. The clone is returned in place of the output so
            # that an in-place op that follows (ReLU(inplace=True)) acts on a non-leaf tensor.
            output = output.detach().requires_grad_(True).clone()
            self._activations[idx] = output
            return output
        self._activations[idx] = output
        return None

    def enable_hooks(self) -> None:
        """Let the hooks record activations again."""
        self._hooks_enabled = True

    def disable_hooks(self) -> None:
        """Stop recording activations; the hooks stay registered."""
        self._hooks_enabled = False

    def reset_hooks(self) -> None:
        """Forget what the hooks have recorded."""
        self._activations = [None] * len(self._target_modules)
        self._input = None

    def remove_hooks(self) -> None:
        """Unregister every hook from the model (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.reset_hooks()

    def __enter__(self: _Self) -> _Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove_hooks()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(target_layer={self.target_names})"

    # ----------------------------------------------------------------------------- checks
    def _recorded(self) -> list[Tensor]:
        """The activations the hooks recorded, one per target layer; RuntimeError if missing."""
        recorded = [a for a in self._activations if a is not None]
        if len(recorded) != len(self._activations):
            missing = [
                n for n, a in zip(self.target_names, self._activations, strict=True) if a is None
            ]
            if self._input is not None:
                # The model's own forward was recorded, so it ran: it never called these layers.
                raise RuntimeError(
                    f"No activation recorded for {missing}: the model's forward ran but never "
                    "called this target layer. Pick a layer that the forward uses (one listed by "
                    "`model.named_modules()` is not necessarily called)."
                )
            raise RuntimeError(
                f"No activation recorded for {missing}: run a forward pass of the model with the "
                "extractor's hooks enabled before calling it."
            )
        return recorded

    def _batch_size(self) -> int:
        return int(self._recorded()[0].shape[0])

    def _class_tensor(self, class_idx: ClassIndex, batch: int, device: torch.device) -> Tensor:
        if isinstance(class_idx, Tensor):
            if class_idx.is_floating_point() or class_idx.is_complex():
                raise TypeError("class_idx must hold integers.")
            values = class_idx.flatten().tolist()
            if class_idx.ndim == 0:
                values = values * batch
        elif isinstance(class_idx, bool):
            raise TypeError("class_idx must be an int or a list of ints, not a bool.")
        elif isinstance(class_idx, Integral):  # numpy's ints too (np.argmax)
            values = [int(class_idx)] * batch
        elif isinstance(class_idx, Sequence) and not isinstance(class_idx, str):
            values = list(class_idx)
            if any(isinstance(v, bool) or not isinstance(v, Integral) for v in values):
                raise TypeError("class_idx must be an int or a list of ints.")
            values = [int(v) for v in values]
        else:
            raise TypeError(f"class_idx must be an int or a list of ints, not {type(class_idx)}.")
        if len(values) != batch:
            raise ValueError(
                f"class_idx has {len(values)} entries but the batch has {batch} samples: "
                "pass one class index per sample, or a single int for all of them."
            )
        if any(v < 0 for v in values):
            raise ValueError(f"class_idx must be non-negative, got {values}.")
        return torch.tensor(values, dtype=torch.long, device=device)

    @staticmethod
    def _check_range(class_idx: Tensor, num_classes: int) -> None:
        if class_idx.numel() and int(class_idx.max()) >= num_classes:
            raise ValueError(
                f"class_idx {class_idx.tolist()} out of range: the model has {num_classes} "
                f"classes (valid indices 0..{num_classes - 1})."
            )

    def _objective(
        self,
        class_idx: ClassIndex | None,
        targets: Target | Sequence[Target] | None,
        batch: int,
        device: torch.device,
    ) -> Objective | None:
        """What to explain, from exactly one of ``class_idx`` and ``targets``."""
        if self.class_agnostic:
            return None
        name = type(self).__name__
        if targets is not None:
            if class_idx is not None:
                raise ValueError(f"{name}: pass either class_idx or targets, not both.")
            if not self.supports_targets:
                raise ValueError(
                    f"{name} explains class indices only (it reads the class's own weights or "
                    "logits), so it does not take targets=: pass class_idx."
                )
            return Objective(targets=target_list(targets, batch))
        if class_idx is None:
            raise ValueError(
                f"{name} needs what to explain: a class_idx (an int, or one per sample) or "
                "targets= (callables that turn each sample's output into a score)."
            )
        return Objective(classes=self._class_tensor(class_idx, batch, device))

    def _rerun_input(self) -> Any:
        """The model's output on the recorded input, with every extractor's hooks off."""
        recorded = self._recorded_input()
        with torch.inference_mode(), hooks_silenced():
            return self.model(recorded)

    def _recorded_input(self) -> Tensor:
        """The model's input of the hooked forward (the methods that run the model again)."""
        if self._input is None:
            raise RuntimeError(
                f"{type(self).__name__} recorded no model input: run the forward of the model "
                "with the extractor's hooks enabled before calling it."
            )
        return self._input

    def _check_scores(self, scores: Any, batch: int, objective: Objective | None) -> Any:
        if scores is None and self.scores_optional:
            scores = self._rerun_input()
        if scores is None:
            raise ValueError(
                f"{type(self).__name__} needs the model's output: call extractor(class_idx, scores)"
                " with scores = model(input)."
            )
        if objective is not None and objective.classes is not None:
            if not isinstance(scores, Tensor) or scores.ndim != 2:
                raise ValueError(not_logits(scores))
        held = output_length(scores)
        if held != batch:
            raise ValueError(
                f"scores hold {held} samples but the hooked forward had {batch}: pass "
                "the output of the same forward."
            )
        if objective is not None:
            objective.check_output(scores)
        return scores

    # ----------------------------------------------------------------------------- compute
    def _get_weights(
        self,
        objective: Objective | None,
        scores: Any,
        retain_graph: bool,
        activations: list[Tensor],
    ) -> list[Tensor]:
        """Per layer, weights broadcastable to its activation (N, K, *S); ``activations`` are
        the recorded ones, detached and reshape-transformed. ``objective`` scores an output per
        sample (``None`` for a class-agnostic method)."""
        raise NotImplementedError

    def _maps(
        self,
        objective: Objective | None,
        scores: Any,
        retain_graph: bool,
        activations: list[Tensor],
    ) -> list[Tensor]:
        """The raw maps (N, *S), one per layer: ReLU(sum_k w_k A_k) unless a method says else."""
        weights = self._get_weights(objective, scores, retain_graph, activations)
        with torch.no_grad():
            return [self._combine(w, a) for w, a in zip(weights, activations, strict=True)]

    def _transformed(self, tensor: Tensor) -> Tensor:
        return self.reshape_transform(tensor) if self.reshape_transform is not None else tensor

    def _activations_for_use(self) -> list[Tensor]:
        recorded = [a.detach() for a in self._recorded()]
        if not self.reads_grids:
            return recorded
        inputs = self._input
        # A reshape_transform may lay the maps out as it likes; without one, a layer whose
        # output is no grid like the input's is a mistake, unless it is a recognised ViT's
        # tokens, which are laid on their grid as vit_target's transform lays them.
        if isinstance(inputs, Tensor) and self.reshape_transform is None:
            self.reshape_transform = self._token_layout(recorded, inputs)
            if self.reshape_transform is None:
                for name, activation in zip(self.target_names, recorded, strict=True):
                    if activation.ndim != inputs.ndim:
                        raise ValueError(self._not_a_map(name, activation, inputs))
        return [self._transformed(a) for a in recorded]

    def _token_layout(self, recorded: list[Tensor], inputs: Tensor) -> TokensToGrid | None:
        """A recognised ViT's ``TokensToGrid`` when every target layer gives its tokens (an
        image model's layers that are not all maps like the input's), else None."""
        if inputs.ndim != 4 or all(a.ndim == inputs.ndim for a in recorded):
            return None
        grid = token_grid(self.model)
        if grid is None or not all(grid.fits(tuple(a.shape)) for a in recorded):
            return None
        logger.info(
            "%s: %s give a ViT's tokens, read with reshape_transform=%r",
            type(self).__name__,
            self.target_names,
            grid,
        )
        return grid

    @staticmethod
    def _not_a_map(name: str, activation: Tensor, inputs: Tensor) -> str:
        """Why a target layer's output is no map over the input's grid: without this, a ViT
        block's tokens (N, T, D) were read as channels T over a 1-D "grid" D."""
        shape, given = tuple(activation.shape), tuple(inputs.shape)
        if activation.ndim == 3 and inputs.ndim == 4:
            return (
                f"Target layer {name!r} gives {shape}: tokens (N, tokens, dim), not a map "
                f"(N, C, H, W) over the input's grid {given}, as a transformer's layers do. Lay "
                "its tokens on their grid with reshape_transform: for a ViT, target = "
                "vit_target(model), then GradCAM(model, target.layer, "
                "reshape_transform=target.reshape_transform); for a Swin, hierarchical_target."
            )
        return (
            f"Target layer {name!r} gives {shape}, not a map (N, C, *S) with the "
            f"input's {inputs.ndim - 2} spatial dimension(s) {given}: pick a layer before the "
            "global pooling (a convolution's or a stage's output), or pass a reshape_transform "
            "that gives one."
        )

    def __call__(
        self,
        class_idx: ClassIndex | None = None,
        scores: Any = None,
        normalized: bool = True,
        retain_graph: bool = False,
        *,
        targets: Target | Sequence[Target] | None = None,
        progress: ProgressCallback | None = None,
        should_stop: StopCheck | None = None,
        pause: PauseCallback | None = None,
        eigen_smooth: bool = False,
        aug_smooth: bool = False,
    ) -> list[Tensor]:
        """Class activation maps for ``class_idx`` (or ``targets``): one (N, *S) per target layer.

        Args:
            class_idx: the class to explain, one int for every sample or one per sample.
            scores: the output of the forward that was hooked (required by gradient methods and
                Ablation-CAM; optional for the Score-CAM family, which re-runs the recorded input
                without it; ignored by CAM, SmoothGradCAMpp and the Eigen methods).
            normalized: min-max normalise each map to [0, 1] (else the raw ReLU'd weighted sum).
            retain_graph: keep the autograd graph, to call the extractor again on the same forward.
            targets: instead of ``class_idx``, a callable (or one per sample) that turns one
                sample's output (a row of ``scores``, or an item of a per-sample list) into the
                scalar tensor to explain. Exactly one of ``class_idx`` and ``targets`` is given.
            progress: ``progress(done, total)``, called between chunks of the extra forwards of the
                Score-CAM family, Ablation-CAM and SmoothGradCAMpp (counted in extra inputs).
            should_stop: asked before the work and between those chunks; when it answers
                ``True`` the call raises ``CamInterrupted`` and returns no map.
            pause: called inside those extra forwards, before each of the model's leaf modules
                runs (on this thread): other passes on the model may run there, each in a
                ``hook_scope`` of its own, and leave the model as they found it. The forward
                then resumes; the maps do not change.
            eigen_smooth: keep the first principal component of the weighted activations
                (``app.cam.smoothing``); not for methods without them (``eigen_smoothable``).
            aug_smooth: the mean map over six variants of the recorded input (flip x input scale
                0.9/1.0/1.1), run as one batch through the model (``app.cam.smoothing``).
        """
        self._check_smoothing(eigen_smooth, aug_smooth)
        if aug_smooth:
            return self._aug_smoothed(
                class_idx,
                normalized,
                targets=targets,
                progress=progress,
                should_stop=should_stop,
                pause=pause,
                eigen_smooth=eigen_smooth,
            )
        if eigen_smooth:
            # ``_combine`` reads the switch; it is off again once the call is done.
            self._eigen_smooth = True
            try:
                return self(
                    class_idx,
                    scores,
                    normalized,
                    retain_graph,
                    targets=targets,
                    progress=progress,
                    should_stop=should_stop,
                    pause=pause,
                )
            finally:
                self._eigen_smooth = False
        asked = [(class_idx, targets)]
        return self._explain(asked, scores, normalized, retain_graph, progress, should_stop, pause)[
            0
        ]

    @classmethod
    def shares_classes_with(cls, options: Mapping[str, Any]) -> bool:
        """Whether ``explain_classes`` shares its work between classes with these call options:
        a smoothing switch makes it one call per class (``aug_smooth`` runs its six variants,
        and a Score-CAM method its masked forwards, once per class)."""
        return cls.shares_classes and not any(options.get(name) for name in SMOOTHING_NAMES)

    def explain_classes(
        self,
        classes: Sequence[ClassIndex] | None = None,
        scores: Any = None,
        normalized: bool = True,
        retain_graph: bool = False,
        *,
        targets: Sequence[Target | Sequence[Target]] | None = None,
        **kwargs: Any,
    ) -> list[list[Tensor]]:
        """Maps of several classes after one hooked forward: per entry of ``classes`` (a class
        index for every sample, or one per sample, as ``class_idx`` takes), what ``__call__``
        would return for it; or, instead of ``classes``, per entry of ``targets`` (a target for
        every sample, or one per sample, as ``targets=`` takes) what ``__call__(targets=entry)``
        would. ``kwargs`` go to each call (``progress``, ``should_stop``, ``pause``, a method's
        call options).

        The model's forward is never re-run for another class: the gradient methods take one
        backward per class from the retained graph (or one batched backward,
        ``batched_class_grads``), CAM reads one row of the head per class, and the Score-CAM
        family, Ablation-CAM and D-RISE score every class (target) on the outputs of the same
        masked forwards, and SmoothGrad-CAM++ takes one backward per class from each noisy
        forward. A method that cannot share (``shares_classes = False``), and one with a call of
        its own (the composites, which call their base), make one call per class."""
        asked = _asked_list(classes, targets)
        if type(self).__call__ is not _CAM.__call__ or not self.shares_classes_with(kwargs):
            # A method with a call of its own (composites) or extra forwards per call: one call
            # per class, each keeping the graph for the next.
            last = len(asked) - 1
            return [
                self(
                    c,
                    scores,
                    normalized=normalized,
                    retain_graph=retain_graph or i < last,
                    targets=t,
                    **kwargs,
                )
                for i, (c, t) in enumerate(asked)
            ]
        for name in SMOOTHING_NAMES:  # off (shares_classes_with): nothing to pass on
            kwargs.pop(name, None)
        calls = {k: kwargs.pop(k, None) for k in ("progress", "should_stop", "pause")}
        if kwargs:
            raise TypeError(f"{type(self).__name__} takes no call options {sorted(kwargs)}.")
        return self._explain(
            asked,
            scores,
            normalized,
            retain_graph,
            calls["progress"],
            calls["should_stop"],
            calls["pause"],
        )

    def _explain(
        self,
        asked: Sequence[tuple[ClassIndex | None, Target | Sequence[Target] | None]],
        scores: Any,
        normalized: bool,
        retain_graph: bool,
        progress: ProgressCallback | None,
        should_stop: StopCheck | None,
        pause: PauseCallback | None,
    ) -> list[list[Tensor]]:
        """Maps for each (class_idx, targets) of ``asked``, from the one hooked forward.

        The forwards the engine runs itself (masked, noisy, guided, a re-run for missing scores)
        run with the model in eval mode: on a model in train mode they would move its BatchNorm
        statistics, and normalise each chunk of masked inputs by its own batch statistics."""
        with eval_mode(self.model):
            extra = self.masked_forwards or self.noisy_forwards
            self._work = Work(progress, should_stop, pause if extra else None)
            self._work.check()
            batch = self._batch_size()
            device = self._recorded()[0].device
            objectives = [self._objective(c, t, batch, device) for c, t in asked]
            if self.uses_scores:
                for objective in objectives:
                    scores = self._check_scores(scores, batch, objective)
            activations = self._activations_for_use()
            with self._work.pause_points(self.model), self._backward_mode():
                raw = self._maps_many(objectives, scores, retain_graph, activations)
        results = []
        with torch.no_grad():
            for maps in raw:
                cams = []
                for cam in maps:
                    cam = torch.nan_to_num(cam, nan=0.0, posinf=0.0, neginf=0.0)
                    cams.append(normalize_maps(cam) if normalized else cam)
                results.append(cams)
        return results

    @contextmanager
    def _backward_mode(self) -> Iterator[None]:
        """Gradients on, for a method that takes them, whatever mode the call itself runs in.

        The graph is the hooked forward's: a call wrapped in ``torch.no_grad()`` or
        ``torch.inference_mode()`` (as explanation code often is) would otherwise score the
        class on a copy of the logits detached from it, and find no gradient to take."""
        if not self.requires_grad:
            yield
            return
        with torch.inference_mode(False), torch.enable_grad():
            yield

    def _maps_many(
        self,
        objectives: Sequence[Objective | None],
        scores: Any,
        retain_graph: bool,
        activations: list[Tensor],
    ) -> list[list[Tensor]]:
        """The raw maps of each objective. By default one ``_maps`` per objective, the graph
        kept for the next; a class-agnostic map is computed once and serves every objective."""
        if self.class_agnostic:
            once = self._maps(None, scores, retain_graph, activations)
            return [once for _ in objectives]
        last = len(objectives) - 1
        return [
            self._maps(objective, scores, retain_graph or i < last, activations)
            for i, objective in enumerate(objectives)
        ]

    # ----------------------------------------------------------------------------- smoothing
    def _check_smoothing(self, eigen_smooth: object, aug_smooth: object) -> None:
        for name, value, takes in (
            ("eigen_smooth", eigen_smooth, self.eigen_smoothable),
            ("aug_smooth", aug_smooth, self.aug_smoothable),
        ):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be True or False, got {value!r}.")
            if value and not takes:
                raise ValueError(
                    f"{type(self).__name__} does not take {name}: "
                    + (
                        "its map is no sum of weighted activations."
                        if name == "eigen_smooth"
                        else "it cannot explain flipped variants."
                    )
                )

    def _recorded_state(self) -> dict[str, Any]:
        """What the hooks recorded from the caller's forward, to put back after ``aug_smooth``'s
        own forward (a method that records more extends it)."""
        return {"_activations": list(self._activations), "_input": self._input}

    def _aug_smoothed(
        self,
        class_idx: ClassIndex | None,
        normalized: bool,
        **calls: Any,
    ) -> list[Tensor]:
        """``aug_smooth``: run the six variants of the recorded input as one batch (with only this
        extractor's hooks recording), explain them, flip back and average."""
        batch = self._batch_size()  # the caller's forward was recorded
        inputs = self._input
        if inputs is None:
            raise ValueError(
                f"aug_smooth: {type(self).__name__} recorded no model input (one tensor): run "
                "the forward of the model with the extractor's hooks enabled before calling it."
            )
        refusal = flip_refusal(inputs)
        if refusal is not None:
            raise ValueError(refusal)
        if not self.class_agnostic and class_idx is not None:
            class_idx = self._class_tensor(class_idx, batch, inputs.device).repeat(AUG_VARIANTS)
        targets = calls.pop("targets")
        if targets is not None:
            targets = target_list(targets, batch) * AUG_VARIANTS
        saved = self._recorded_state()
        self.reset_hooks()
        try:
            with (
                self._backward_mode() if self.requires_grad else torch.no_grad(),
                hooks_only_for(self),
                eval_mode(self.model),
            ):
                # A fresh leaf outside inference mode, so that the variants' forward can be
                # recorded.
                variants = augmented(inputs.detach().clone())
                scores = self.model(variants)
                maps = self(class_idx, scores, normalized, targets=targets, **calls)
        finally:
            for name, value in saved.items():
                setattr(self, name, value)
        smoothed = []
        with torch.no_grad():
            for cam in maps:
                refusal = flip_refusal(inputs, cam.ndim)
                if refusal is not None:
                    raise ValueError(refusal)
                mean = merged(cam, batch)
                smoothed.append(normalize_maps(mean) if normalized else mean)
        return smoothed

    def _combine(self, weights: Tensor, activation: Tensor) -> Tensor:
        """ReLU of the weighted sum over channels: (N, K, *S) → (N, *S); with ``eigen_smooth``,
        ReLU of the first principal component of the weighted activations X_k = w_k A_k."""
        if weights.ndim == 2:
            spatial = activation.ndim - 2
            weights = weights.reshape(*weights.shape, *([1] * spatial))
        weighted = weights.to(activation.dtype) * activation
        if self._eigen_smooth:
            return principal_map(weighted)
        return torch.relu(weighted.sum(dim=1))

    # ----------------------------------------------------------------------------- fusion
    @classmethod
    def fuse_cams(cls, cams: Sequence[Tensor], target_shape: Sequence[int] | None = None) -> Tensor:
        """Fuse maps of several layers into one: each resized to ``target_shape`` (default: the
        largest), then the element-wise maximum, normalised to [0, 1]. A single map is returned
        unchanged, as TorchCAM does: there is nothing to fuse (nor to rescale, for LayerCAM)."""
        if isinstance(cams, Tensor) or not isinstance(cams, Sequence):
            raise TypeError(
                f"fuse_cams expects a list of maps (one tensor per layer), not a "
                f"{type(cams).__name__}: pass the list the extractor returned."
            )
        if len(cams) == 0:
            raise ValueError("fuse_cams needs at least one map.")
        if any(not isinstance(c, Tensor) for c in cams):
            raise TypeError("fuse_cams expects a list of tensors.")
        if len(cams) == 1:
            return cams[0]
        if len({c.ndim for c in cams}) != 1:
            raise ValueError("All maps must have the same number of dimensions to be fused.")
        if target_shape is None:
            target_shape = max(
                (tuple(c.shape[1:]) for c in cams), key=lambda s: torch.Size(s).numel()
            )
        scaled = [cls._scale_cams(resize_maps(c.float(), target_shape)) for c in cams]
        return normalize_maps(torch.stack(scaled).amax(dim=0))

    @staticmethod
    def _scale_cams(cams: Tensor) -> Tensor:
        return cams


class _SharedExtraForwards(_CAM):
    """A method whose extra forwards (masked, ablated or noisy inputs) serve every objective of
    a call: ``_weights_many`` gives each objective's weights (one per layer) from one run of
    them, and one objective's weights and every objective's maps are read from it."""

    def _weights_many(
        self, objectives: Sequence[Objective], scores: Any, activations: list[Tensor]
    ) -> list[list[Tensor]]:
        raise NotImplementedError

    def _get_weights(
        self,
        objective: Objective | None,
        scores: Any,
        retain_graph: bool,
        activations: list[Tensor],
    ) -> list[Tensor]:
        return self._weights_many([cast(Objective, objective)], scores, activations)[0]

    def _maps_many(
        self,
        objectives: Sequence[Objective | None],
        scores: Any,
        retain_graph: bool,
        activations: list[Tensor],
    ) -> list[list[Tensor]]:
        weights = self._weights_many(cast(list[Objective], objectives), scores, activations)
        with torch.no_grad():
            return [
                [self._combine(w, a) for w, a in zip(per_layer, activations, strict=True)]
                for per_layer in weights
            ]
